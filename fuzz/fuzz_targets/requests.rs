//! The requests topic decoder (MeteringRequest).
#![no_main]
libfuzzer_sys::fuzz_target!(
    |data: &[u8]| meterflow_fuzz::one::<meterflow_types::MeteringRequest>(data)
);
