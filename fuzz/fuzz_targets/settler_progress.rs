//! The settler's progress topic decoder (SettlerProgress).
#![no_main]
libfuzzer_sys::fuzz_target!(
    |data: &[u8]| meterflow_fuzz::one::<meterflow_types::SettlerProgress>(data)
);
