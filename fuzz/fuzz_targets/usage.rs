//! The usage topic (usage records and watermarks) decoder.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| meterflow_fuzz::usage(data));
