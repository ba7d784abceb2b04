//! The control topic (probe specs) decoder (ProbeSpec).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| meterflow_fuzz::one::<meterflow_types::ProbeSpec>(data));
