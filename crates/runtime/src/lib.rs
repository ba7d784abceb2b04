//! What every meterflow service shares at run time: layered configuration, tracing,
//! graceful shutdown on SIGTERM/SIGINT, metrics, and the `/metrics` + `/healthz` endpoint.

pub mod config;
pub mod http;
pub mod metrics;

pub use config::{load, HttpConfig};
pub use metrics::{Counter, Gauge, Histogram, Metrics};

use std::future::Future;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Handed to a service's `run`: when to stop, and where to count.
#[derive(Clone)]
pub struct Ctx {
    pub shutdown: CancellationToken,
    pub metrics: Arc<Metrics>,
}

impl Ctx {
    pub fn new() -> Ctx {
        Ctx {
            shutdown: CancellationToken::new(),
            metrics: Arc::new(Metrics::default()),
        }
    }
}

impl Default for Ctx {
    fn default() -> Ctx {
        Ctx::new()
    }
}

/// This process's peak resident set (VmHWM) in MiB, for benchmarks; 0 if unknown.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
        })
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

/// Logs go to standard error, coloured only when it is a terminal: a log redirected to a
/// file or collected by a container runtime carries no escape codes (they split every
/// `key=value` a log search would look for).
pub fn init_tracing() {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("METERFLOW_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rdkafka=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// Cancel `token` on SIGTERM or SIGINT.
pub fn cancel_on_signals(token: CancellationToken) {
    tokio::spawn(async move {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
            _ = term => tracing::info!("SIGTERM: shutting down"),
        }
        token.cancel();
    });
}

/// The whole `main` of a service binary: `meterflow-<name> [--config FILE]`.
/// Config layers: defaults → FILE (TOML) → `METERFLOW__SECTION__KEY` environment.
pub fn service_main<C, F, Fut>(name: &str, run: F) -> anyhow::Result<()>
where
    C: serde::de::DeserializeOwned + serde::Serialize + Default + HasHttp,
    F: FnOnce(C, Ctx) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    init_tracing();
    let mut args = std::env::args().skip(1);
    let mut file = std::env::var("METERFLOW_CONFIG").ok();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--config" | "-c" => file = args.next(),
            "--help" | "-h" => {
                println!("meterflow-{name} [--config FILE]\n\nConfiguration: defaults, then FILE (TOML), then METERFLOW__SECTION__KEY environment variables.");
                return Ok(());
            }
            other => anyhow::bail!("unknown argument {other:?} (try --help)"),
        }
    }
    let cfg: C = load(file.as_deref().map(std::path::Path::new))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let ctx = Ctx::new();
        cancel_on_signals(ctx.shutdown.clone());
        if let Some(addr) = cfg.http().listen.clone() {
            http::serve(&addr, ctx.metrics.clone(), ctx.shutdown.clone()).await?;
        }
        tracing::info!(service = name, "starting");
        let r = run(cfg, ctx.clone()).await;
        ctx.shutdown.cancel();
        match &r {
            Ok(()) => tracing::info!(service = name, "stopped"),
            Err(e) => tracing::error!(service = name, error = format!("{e:#}"), "failed"),
        }
        r
    })
}

/// Service configs expose their HTTP section so `service_main` can start the endpoint.
pub trait HasHttp {
    fn http(&self) -> &HttpConfig;
}

/// `f` of every item, in order; from `HALVES_FROM` items on, the second half runs on a
/// scoped thread of its own (for work that depends on no other item: a stage prepares
/// its batch this way while what depends on the order stays on its main loop). A panic
/// in `f` is the caller's panic, as it would be on one thread.
/// `R` may borrow from the items.
pub fn map_in_halves<'a, T: Sync, R: Send>(
    items: &'a [T],
    f: impl Fn(&'a T) -> R + Sync,
) -> Vec<R> {
    if items.len() < HALVES_FROM {
        return items.iter().map(&f).collect();
    }
    let (first, second) = items.split_at(items.len() / 2);
    std::thread::scope(|sc| {
        let later = sc.spawn(|| second.iter().map(&f).collect::<Vec<_>>());
        // room for both halves at once: growing it for the second half copied the first
        // (records of a few hundred bytes each; measured as memmove in the enricher)
        let mut out: Vec<R> = Vec::with_capacity(items.len());
        out.extend(first.iter().map(&f));
        out.extend(
            later
                .join()
                .unwrap_or_else(|e| std::panic::resume_unwind(e)),
        );
        out
    })
}

/// Fewer items than this are mapped on the calling thread alone (a thread's start costs
/// more than a few hundred records' decoding).
pub const HALVES_FROM: usize = 512;

#[cfg(test)]
mod halves_tests {
    #[test]
    fn map_in_halves_keeps_the_order_on_one_thread_or_two() {
        for n in [0, 1, super::HALVES_FROM - 1, super::HALVES_FROM, 1001] {
            let items: Vec<u32> = (0..n as u32).collect();
            let want: Vec<u64> = items.iter().map(|i| u64::from(*i) * 3).collect();
            assert_eq!(super::map_in_halves(&items, |i| u64::from(*i) * 3), want);
        }
    }
}
