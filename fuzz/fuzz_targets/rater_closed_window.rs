//! The rater's closed-window ids decoder (RaterClosedWindow, on its state topic).
#![no_main]
libfuzzer_sys::fuzz_target!(
    |data: &[u8]| meterflow_fuzz::one::<meterflow_types::RaterClosedWindow>(data)
);
