//! The rater's checkpoint topic decoder (RaterCheckpoint).
#![no_main]
libfuzzer_sys::fuzz_target!(
    |data: &[u8]| meterflow_fuzz::one::<meterflow_types::RaterCheckpoint>(data)
);
