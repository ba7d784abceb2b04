//! The chaos runs (RELIABILITY.md).
//!
//! `chaos [samples] [kills] [seed]`: defaults 1,000,000 samples (500 instances × 2,000
//! polls) and 50 SIGKILLs of random stages, with an extra enricher and rater member
//! added and removed mid-run, on Tansu in memory.
//!
//! `chaos --persistent [samples] [kills] [seed]`: defaults 20,000 samples (20 instances ×
//! 1,000 polls) and 4 SIGKILLs, on Tansu with sqlite storage, whose broker is also
//! SIGKILLed and restarted twice.
//!
//! `--sync=filesystem`: the settler writes with the storage option `sync =
//! "filesystem"` (one `syncfs` a phase of a batch) instead of an fsync a file.
//!
//! Exit code 1 unless the bill is exact.

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let persistent = args.iter().any(|a| a == "--persistent");
    args.retain(|a| a != "--persistent");
    let settler_extra = match args.iter().find_map(|a| a.strip_prefix("--sync=")) {
        Some(how) => format!("[storage_options]\nsync = \"{how}\"\n"),
        None => String::new(),
    };
    args.retain(|a| !a.starts_with("--sync="));
    let arg = |i: usize, d: u64| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (samples, kills, seed) = if persistent {
        (arg(0, 20_000), arg(1, 4) as usize, arg(2, 1))
    } else {
        (arg(0, 1_000_000), arg(1, 50) as usize, arg(2, 1))
    };
    let instances = (if persistent { 20 } else { 500 }).min(samples.max(1)) as u32;
    let polls = (samples / u64::from(instances)).max(2) as i64;
    let broker_restarts = if persistent { 2 } else { 0 };
    let faults = (kills + broker_restarts).max(1) as u64;
    let report = meterflow_tests::chaos::run(&meterflow_tests::chaos::Chaos {
        instances,
        polls,
        kills,
        // collection lasts about 10 s a fault (each fault waits for the groups to settle
        // from the one before, then a random moment), so the faults land while data flows;
        // sqlite storage takes a few hundred messages a second, so slower there
        speed: (polls as u64 * 300_000 / (faults * if persistent { 30_000 } else { 10_000 })).max(1)
            as u32,
        seed,
        extra_members: true,
        drain_secs: 1800,
        storage: if persistent {
            "sqlite://broker.db".into()
        } else {
            "memory://tansu/".into()
        },
        broker_restarts,
        settler_extra,
    });
    report.print();
    if !report.passed() {
        std::process::exit(1);
    }
}
