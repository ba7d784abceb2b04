//! The rated topic (revenue events and watermarks) decoder.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| meterflow_fuzz::rated(data));
