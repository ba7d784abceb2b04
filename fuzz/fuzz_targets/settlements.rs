//! The settlements topic decoder (Settlement).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| meterflow_fuzz::one::<meterflow_types::Settlement>(data));
