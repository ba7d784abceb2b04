//! End-to-end tests: real binaries, real libvirt test driver, real Parquet and CSV.

mod chaos;
mod hostile;
mod probe;
mod query;
mod redelivery;
mod tansu;
mod up;
