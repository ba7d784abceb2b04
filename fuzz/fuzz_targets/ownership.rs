//! The ownership topic decoder (Ownership).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| meterflow_fuzz::one::<meterflow_types::Ownership>(data));
