//! The samples topic (samples and node heartbeats) decoder.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| meterflow_fuzz::samples(data));
