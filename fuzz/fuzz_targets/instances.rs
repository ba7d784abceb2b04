//! The instances topic (instance state and node rows) decoder.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| meterflow_fuzz::instances(data));
