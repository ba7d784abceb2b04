fn main() -> anyhow::Result<()> {
    fixed_malloc_thresholds();
    meterflow_runtime::service_main("rater", meterflow_rater::run)
}

/// glibc's malloc raises its mmap threshold to the size of each large block freed (up to
/// 32 MiB): after the first large batch, blocks of hundreds of KiB (a batch's messages
/// and decoded records, the open windows' id sets as they grow) come from the heap, and
/// their pages stay resident after they are freed. Fixed at 128 KiB (glibc's starting
/// value), with the heap trimmed beyond 128 KiB free at its top, such blocks are mapped
/// and unmapped again: with ten times the events in the same windows the rater's largest
/// anonymous memory was 11.7–12.0 MiB against 13.4–14.5 MiB, 9.0–9.1 MiB at 1× either
/// way (BENCHMARKS.md, "Rater memory"). Malloc settings of the user's `GLIBC_TUNABLES`
/// are left as they are.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn fixed_malloc_thresholds() {
    const THRESHOLD: libc::c_int = 128 * 1024;
    if std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("glibc.malloc.")) {
        return;
    }
    // SAFETY: `mallopt` only sets the allocator's parameters; it is called first thing in
    // `main`, before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, THRESHOLD);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn fixed_malloc_thresholds() {}
