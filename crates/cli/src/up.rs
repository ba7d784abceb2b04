//! `meterflow up`: the whole pipeline in one process.

use anyhow::{Context, Result};
use meterflow_kafka::{EmbeddedBroker, KafkaConfig};
use meterflow_runtime::Ctx;
use meterflow_types::Dec;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const RULES: [(&str, &str); 3] = [
    (
        "vcpu_hours.sql",
        include_str!("../../../rules/vcpu_hours.sql"),
    ),
    (
        "memory_gb_hours.sql",
        include_str!("../../../rules/memory_gb_hours.sql"),
    ),
    (
        "network_egress_gb.sql",
        include_str!("../../../rules/network_egress_gb.sql"),
    ),
];

#[derive(clap::Args)]
pub struct UpArgs {
    /// Stop collecting after this many seconds, drain, and print the summary.
    #[arg(long, default_value = "45")]
    duration: u64,
    /// Where settlement files go.
    #[arg(long, default_value = "out/settlements")]
    out: PathBuf,
    /// Use this Kafka instead of the embedded broker.
    #[arg(long)]
    brokers: Option<String>,
    /// Rules directory (default: the shipped rules).
    #[arg(long)]
    rules: Option<PathBuf>,
    /// Event time of the first poll, RFC 3339 (default: midnight UTC a week ago).
    #[arg(long)]
    start: Option<String>,
    /// Simulated instances and billing entities.
    #[arg(long, default_value = "20")]
    instances: u32,
    #[arg(long, default_value = "4")]
    entities: u32,
    /// Event-time milliseconds per wall-clock millisecond (3600 = an hour a second).
    #[arg(long, default_value = "3600")]
    speed: u32,
    /// Billing period: month, week, day, or a duration like 6h.
    #[arg(long, default_value = "day")]
    period: String,
    /// libvirt URI of the second node (empty to skip).
    #[arg(long, default_value = "test:///default")]
    libvirt_uri: String,
    /// Serve /metrics and /healthz here.
    #[arg(long)]
    http: Option<String>,
    /// Where the embedded broker can be reached by other commands on this machine
    /// (e.g. 127.0.0.1:9092). A TCP forwarder to the mock broker, which keeps
    /// advertising its own local address.
    #[arg(long)]
    listen: Option<String>,
}

pub async fn run(a: UpArgs) -> Result<()> {
    let _broker;
    let brokers = match &a.brokers {
        Some(b) => b.clone(),
        None => {
            let b = EmbeddedBroker::start()?;
            let s = b.bootstrap_servers();
            for (name, parts, _) in
                meterflow_kafka::topic_specs(&meterflow_kafka::KafkaConfig::default())
            {
                b.create_topic(&name, parts)?;
            }
            println!("meterflow up: embedded broker at {s} (librdkafka mock cluster — ephemeral, gone when this process exits)");
            _broker = b;
            if let Some(l) = &a.listen {
                forward(l, &s).await?;
                println!("meterflow up: embedded broker reachable at {l} (e.g. meterflow-enricher with METERFLOW__KAFKA__BROKERS={l})");
            }
            s
        }
    };
    let kafka = KafkaConfig {
        brokers,
        partitions: 4,
        ..KafkaConfig::default()
    };
    meterflow_kafka::ensure_topics(&kafka).await?;
    let rules_dir = match &a.rules {
        Some(d) => d.clone(),
        None => {
            let d = a.out.parent().unwrap_or(&a.out).join("rules");
            std::fs::create_dir_all(&d)?;
            for (n, t) in RULES {
                std::fs::write(d.join(n), t)?;
            }
            d
        }
    };
    std::fs::create_dir_all(&a.out)?;
    // an accelerated clock that starts a week ago, so event time never runs into the future
    let day = 86_400_000;
    let start = match &a.start {
        Some(s) => meterflow_types::time::parse_rfc3339(s).map_err(anyhow::Error::msg)?,
        None => (meterflow_kafka::now_ms() - 7 * day).div_euclid(day) * day,
    };
    let start_s = meterflow_types::time::fmt_rfc3339(start);
    let ctx = Ctx::new();
    meterflow_runtime::cancel_on_signals(ctx.shutdown.clone());
    if let Some(h) = &a.http {
        meterflow_runtime::http::serve(h, ctx.metrics.clone(), ctx.shutdown.clone()).await?;
    }
    let collectors = ctx.shutdown.child_token();
    let cctx = Ctx {
        shutdown: collectors.clone(),
        metrics: ctx.metrics.clone(),
    };
    let clock = meterflow_collector::config::ClockConfig {
        speed: a.speed,
        start: Some(start_s),
    };
    let fleet_cfg = meterflow_collector::CollectorConfig {
        kafka: kafka.clone(),
        node_id: "sim-node-1".into(),
        site: "demo".into(),
        poll_interval: Duration::from_secs(60),
        fleet: Some(meterflow_collector::fleet::FleetConfig {
            instances: a.instances,
            entities: a.entities,
            seed: 1,
            ..Default::default()
        }),
        clock: clock.clone(),
        retire_on_exit: true,
        ..Default::default()
    };
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(named(
        "collector(fleet)",
        meterflow_collector::run(fleet_cfg, cctx.clone()),
    ));
    if !a.libvirt_uri.is_empty() {
        let lv = meterflow_collector::CollectorConfig {
            kafka: kafka.clone(),
            node_id: "libvirt-node-1".into(),
            site: "demo".into(),
            poll_interval: Duration::from_secs(60),
            libvirt_uri: Some(a.libvirt_uri.clone()),
            clock,
            retire_on_exit: true,
            ..Default::default()
        };
        tasks.spawn(named(
            "collector(libvirt)",
            meterflow_collector::run(lv, cctx.clone()),
        ));
    }
    let en = meterflow_enricher::EnricherConfig {
        kafka: kafka.clone(),
        member: "up".into(),
        ..Default::default()
    };
    tasks.spawn(named("enricher", meterflow_enricher::run(en, ctx.clone())));
    let ra = meterflow_rater::RaterConfig {
        kafka: kafka.clone(),
        member: "up".into(),
        rules_dir,
        billing_period: a.period.clone(),
        ..Default::default()
    };
    tasks.spawn(named("rater", meterflow_rater::run(ra, ctx.clone())));
    let se = meterflow_settler::SettlerConfig {
        kafka: kafka.clone(),
        member: "up".into(),
        out_dir: a.out.display().to_string(),
        period: a.period.clone(),
        ..Default::default()
    };
    tasks.spawn(named("settler", meterflow_settler::run(se, ctx.clone())));

    let m = ctx.metrics.clone();
    let get = |name: &str| -> u64 {
        m.render()
            .lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    let t0 = Instant::now();
    let mut draining_since: Option<Instant> = None;
    let mut last_files = 0;
    let mut stable_since = Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            r = tasks.join_next() => {
                if let Some(Ok(Err(e))) = r { ctx.shutdown.cancel(); return Err(e); }
            }
        }
        if ctx.shutdown.is_cancelled() {
            break;
        }
        let files = get("meterflow_settler_file_sets_total");
        print!(
            "\r[{:>4.0}s] samples {:>7}  usage {:>7}  revenue events {:>6}  settlement file sets {:>4}  {}",
            t0.elapsed().as_secs_f64(),
            get("meterflow_collector_samples_total"),
            get("meterflow_enricher_usage_total"),
            get("meterflow_rater_revenue_events_total"),
            files,
            if draining_since.is_some() { "draining" } else { "collecting" }
        );
        let _ = std::io::stdout().flush();
        if files != last_files {
            last_files = files;
            stable_since = Instant::now();
        }
        match draining_since {
            None if t0.elapsed() >= Duration::from_secs(a.duration) => {
                collectors.cancel();
                draining_since = Some(Instant::now());
                stable_since = Instant::now();
            }
            Some(d)
                if (stable_since.elapsed() > Duration::from_secs(4) && files > 0)
                    || d.elapsed() > Duration::from_secs(60) =>
            {
                break
            }
            _ => {}
        }
    }
    println!();
    ctx.shutdown.cancel();
    while let Some(r) = tasks.join_next().await {
        if let Ok(Err(e)) = r {
            eprintln!("a service failed: {e:#}");
        }
    }
    summary(&meterflow_settler::store::Store::local(&a.out)?).await
}

/// Accept connections on `listen` and pipe each to the first of `brokers`.
async fn forward(listen: &str, brokers: &str) -> Result<()> {
    let target = brokers.split(',').next().unwrap_or_default().to_string();
    let l = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = l.accept().await {
            let target = target.clone();
            tokio::spawn(async move {
                if let Ok(mut out) = tokio::net::TcpStream::connect(&target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                }
            });
        }
    });
    Ok(())
}

async fn named(name: &'static str, f: impl std::future::Future<Output = Result<()>>) -> Result<()> {
    f.await.with_context(|| format!("{name} failed"))
}

/// Per entity: periods settled, lines, quantities per unit and revenue, from the files.
pub async fn summary(out: &meterflow_settler::store::Store) -> Result<()> {
    let manifests = meterflow_settler::files::manifests(out).await?;
    #[derive(Default)]
    struct Row {
        periods: std::collections::BTreeSet<String>,
        lines: usize,
        qty: BTreeMap<String, Dec>,
        total: BTreeMap<String, Dec>,
    }
    let mut rows: BTreeMap<String, Row> = BTreeMap::new();
    for man in &manifests {
        let dir = meterflow_settler::files::entity_dir(&man.period, &man.entity_id);
        let r = rows.entry(man.entity_id.clone()).or_default();
        r.periods.insert(man.period.clone());
        r.lines += man.line_count;
        for (c, t) in &man.totals {
            *r.total.entry(c.clone()).or_default() += t.parse::<Dec>().unwrap_or_default();
        }
        let csv_name = man
            .files
            .keys()
            .find(|k| k.ends_with(".csv"))
            .cloned()
            .unwrap_or_default();
        let bytes = out.get(&format!("{dir}/{csv_name}")).await?;
        let text = String::from_utf8_lossy(bytes.as_deref().unwrap_or_default());
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split(',').collect();
            if f.len() >= 9 {
                *r.qty.entry(f[7].to_string()).or_default() +=
                    f[8].parse::<Dec>().unwrap_or_default();
            }
        }
    }
    println!(
        "\nSettlement files in {} ({} manifests)\n",
        out,
        manifests.len()
    );
    println!(
        "{:<14} {:>7} {:>6} {:>14} {:>12} {:>12} {:>14}",
        "entity", "periods", "lines", "vCPU-hours", "GB-hours", "egress GB", "revenue"
    );
    let mut grand: BTreeMap<String, Dec> = BTreeMap::new();
    for (e, r) in &rows {
        let q = |u: &str| r.qty.get(u).copied().unwrap_or_default().to_fixed(2);
        let rev: Vec<String> = r
            .total
            .iter()
            .map(|(c, t)| format!("{} {}", t.to_fixed(2), c))
            .collect();
        for (c, t) in &r.total {
            *grand.entry(c.clone()).or_default() += *t;
        }
        println!(
            "{:<14} {:>7} {:>6} {:>14} {:>12} {:>12} {:>14}",
            e,
            r.periods.len(),
            r.lines,
            q("vcpu_hour"),
            q("gb_hour"),
            q("gb"),
            rev.join(" ")
        );
    }
    let g: Vec<String> = grand
        .iter()
        .map(|(c, t)| format!("{} {}", t.to_fixed(2), c))
        .collect();
    println!(
        "{:<14} {:>7} {:>6} {:>14} {:>12} {:>12} {:>14}",
        "total",
        "",
        rows.values().map(|r| r.lines).sum::<usize>(),
        "",
        "",
        "",
        g.join(" ")
    );
    anyhow::ensure!(!manifests.is_empty(), "no settlement files were written");
    Ok(())
}
