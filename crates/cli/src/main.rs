//! `meterflow`: the operator and data-engineer command line.

/// mimalloc, not glibc's malloc: `meterflow rerate` builds, shares and frees a usage
/// record per row (43.2M in `bench-rerate`), and glibc's malloc and free were about a
/// third of its time (BENCHMARKS.md). The rater's service binary stays on glibc (its
/// peak memory, not its speed, is what its target watches).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::time::Duration;

mod apply;
mod audit;
mod flow;
mod golden;
mod ownership;
mod probe;
mod query;
mod rerate;
mod settle;
mod up;

#[derive(Parser)]
#[command(
    name = "meterflow",
    version,
    about = "Meter, rate and settle VM and container usage on Kafka"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the whole pipeline in one process on a simulated fleet plus the libvirt test
    /// driver, with an embedded (ephemeral) broker unless --brokers is given.
    Up(up::UpArgs),
    /// Read this node's instances.
    Collect {
        /// Poll once and print one JSON object per instance instead of producing to Kafka.
        #[arg(long)]
        once: bool,
        #[arg(long)]
        print: bool,
        #[arg(long)]
        libvirt_uri: Option<String>,
        /// Containers: a cgroup v2 root to walk (e.g. /sys/fs/cgroup).
        #[arg(long)]
        cgroup_root: Option<PathBuf>,
        /// Where `/proc` is (container network counters).
        #[arg(long)]
        proc_root: Option<PathBuf>,
        /// Where the host's root is (container labels and owners from the runtimes).
        #[arg(long)]
        runtime_root: Option<PathBuf>,
        /// Also include a simulated fleet of this many instances.
        #[arg(long)]
        fleet: Option<u32>,
        /// Seconds between the two observations of --once.
        #[arg(long, default_value = "1")]
        gap: u64,
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Assign instances to users and billing entities (explicit owners win over metadata).
    Ownership {
        #[command(subcommand)]
        cmd: ownership::OwnershipCmd,
    },
    /// What is held back: usage parked for want of an owner, and missing nodes.
    Audit(audit::AuditArgs),
    /// Recorded usage: export the usage topic to Parquet.
    Usage {
        #[command(subcommand)]
        cmd: rerate::UsageCmd,
    },
    /// Apply rules to recorded usage in batch (the stream's windows and event ids).
    Rerate(rerate::RerateArgs),
    /// Rebuild a period's settlement files from the rated topic and compare them, byte
    /// for byte, with the originals.
    Settle(settle::SettleArgs),
    /// Ask every collector, now, for its instances' live values and usage over a range;
    /// nodes that do not answer in time are named (exit code 3).
    Query(query::QueryArgs),
    /// Measurement points enabled at run time: hop latency, queue dwell, processing time
    /// and lag, carried in message headers and exported as Prometheus histograms.
    Probe {
        #[command(subcommand)]
        cmd: probe::ProbeCmd,
    },
    /// Check rule files: parse, plan, check the output contract.
    Rules {
        #[command(subcommand)]
        cmd: RulesCmd,
    },
}

#[derive(Subcommand)]
enum RulesCmd {
    Check {
        dir: PathBuf,
    },
    /// Run each rule on the usage in its `<name>.golden.json` and compare the events.
    Test {
        dir: PathBuf,
    },
    /// Replay recorded usage through the candidate and the active rules and print the
    /// revenue difference per entity.
    Diff(rerate::DiffArgs),
    /// Publish a rule set to the control topic: every rater switches to it at a window
    /// boundary (event time), without a restart.
    Apply(apply::ApplyArgs),
    /// Write the rule set applied on the control topic to a directory.
    Get(apply::GetArgs),
}

fn main() -> Result<()> {
    meterflow_runtime::init_tracing();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cli.cmd {
            Cmd::Up(a) => up::run(a).await,
            Cmd::Ownership { cmd } => ownership::run(cmd).await,
            Cmd::Audit(a) => tokio::task::block_in_place(|| audit::run(a)),
            Cmd::Usage { cmd } => tokio::task::block_in_place(|| rerate::export(cmd)),
            Cmd::Rerate(a) => rerate::run(a).await,
            Cmd::Probe { cmd } => probe::run(cmd).await,
            Cmd::Settle(a) => tokio::task::block_in_place(|| settle::run(a)),
            Cmd::Query(a) => {
                let code = query::run(a).await?;
                if code != 0 {
                    std::process::exit(code);
                }
                Ok(())
            }
            Cmd::Collect {
                once,
                print,
                libvirt_uri,
                cgroup_root,
                proc_root,
                runtime_root,
                fleet,
                gap,
                config,
            } => {
                let mut cfg: meterflow_collector::CollectorConfig =
                    meterflow_runtime::load(config.as_deref())?;
                if libvirt_uri.is_some() {
                    cfg.libvirt_uri = libvirt_uri;
                }
                if cgroup_root.is_some() {
                    cfg.cgroup_root = cgroup_root;
                }
                if let Some(p) = proc_root {
                    cfg.proc_root = p;
                }
                if let Some(p) = runtime_root {
                    cfg.runtime_root = p;
                }
                if let Some(n) = fleet {
                    cfg.fleet = Some(meterflow_collector::fleet::FleetConfig {
                        instances: n,
                        ..Default::default()
                    });
                }
                if once || print {
                    anyhow::ensure!(once && print, "--once and --print go together");
                    for obj in
                        meterflow_collector::poll_once_json(&cfg, Duration::from_secs(gap)).await?
                    {
                        println!("{}", serde_json::to_string(&obj)?);
                    }
                    Ok(())
                } else {
                    let ctx = meterflow_runtime::Ctx::new();
                    meterflow_runtime::cancel_on_signals(ctx.shutdown.clone());
                    meterflow_collector::run(cfg, ctx).await
                }
            }
            Cmd::Rules {
                cmd: RulesCmd::Diff(a),
            } => rerate::diff(a).await,
            Cmd::Rules {
                cmd: RulesCmd::Apply(a),
            } => apply::apply(a).await,
            Cmd::Rules {
                cmd: RulesCmd::Get(a),
            } => apply::get(a).await,
            Cmd::Rules {
                cmd: RulesCmd::Test { dir },
            } => {
                let n = golden::run(&dir).await?;
                println!("{n} rule(s) match their golden files");
                Ok(())
            }
            Cmd::Rules {
                cmd: RulesCmd::Check { dir },
            } => {
                let e =
                    meterflow_rater::rules::Engine::load(&dir, 64 << 20, Duration::from_secs(10))
                        .await
                        .context("rules check failed")?;
                let n = e.rules.len();
                for t in &e.tables {
                    println!(
                        "ok  {}  table {} ({} columns)",
                        t.source.path.display(),
                        t.source.name,
                        t.table.columns().fields().len()
                    );
                }
                for r in &e.rules {
                    let h = &r.source.header;
                    println!(
                        "ok  {}  {}@{}  window {} ms, lateness {} ms, {}",
                        r.source.path.display(),
                        h.name,
                        h.version,
                        h.window,
                        h.lateness,
                        h.currency
                    );
                }
                println!("{n} rule(s) ok, rule set {}", e.ruleset_id());
                Ok(())
            }
        }
    })
}
