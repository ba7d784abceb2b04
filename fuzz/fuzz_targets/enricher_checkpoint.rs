//! The enricher's checkpoint topic decoder (EnricherCheckpoint).
#![no_main]
libfuzzer_sys::fuzz_target!(
    |data: &[u8]| meterflow_fuzz::one::<meterflow_types::EnricherCheckpoint>(data)
);
