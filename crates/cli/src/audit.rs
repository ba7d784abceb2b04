//! `meterflow audit --parked`: what the enricher is holding back, and which nodes it has
//! stopped waiting for. Read from the compacted `meterflow.parked` and
//! `meterflow.instances` topics, so it works against any running deployment.
//!
//! `meterflow audit --from T --to T`: loss and duplication between stages (`flow`).
//!
//! `meterflow audit --period <p>`: a period reconciled per entity — the usage out of the
//! enricher re-rated in batch, the revenue events on the rated topic, and the settlement
//! files' totals, each rounded per line as settled; exit code 1 on any mismatch.

use anyhow::Result;
use meterflow_kafka::{read_table, KafkaConfig};
use meterflow_types::{headers, Millis, Sample};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

#[derive(clap::Args)]
pub struct AuditArgs {
    /// Show usage parked for want of an owner, per instance, and the node table.
    #[arg(long)]
    pub parked: bool,
    /// Reconcile this settlement period (its `period=<label>`): usage → rated → settled.
    #[arg(long)]
    pub period: Option<String>,
    /// The settlement location (for --period): a directory or s3://bucket/prefix.
    #[arg(long, default_value = "out/settlements")]
    pub settlements: String,
    /// Loss and duplication between stages: compare every topic's producers and
    /// consumers bucket by bucket from this event time (RFC 3339) ...
    #[arg(long)]
    pub from: Option<String>,
    /// ... to this one (default: now).
    #[arg(long)]
    pub to: Option<String>,
    /// The rules the rater runs (for --period). Default: the rule set applied on the
    /// control topic, else `rules/`.
    #[arg(long)]
    pub rules: Option<std::path::PathBuf>,
    /// The rater's billing_period (for --period).
    #[arg(long, default_value = "month")]
    pub billing_period: String,
    /// One JSON document instead of tables.
    #[arg(long)]
    pub json: bool,
    /// A live node silent this much longer than the most advanced one is "missing"
    /// (the enricher's `node_timeout`).
    #[arg(long, default_value = "15m", value_parser = humantime::parse_duration)]
    pub node_timeout: Duration,
    #[arg(long, default_value = "127.0.0.1:9092")]
    pub brokers: String,
}

#[derive(Serialize, Debug, PartialEq, Eq)]
pub struct ParkedInstance {
    pub instance_id: String,
    pub node_id: String,
    pub samples: usize,
    pub from: Millis,
    pub to: Millis,
    /// Σ vCPU-milliseconds of the parked samples (allocation × interval), exact.
    pub vcpu_ms: i128,
    pub cpu_ns: i128,
    pub parked_by: String,
    /// What the oldest of them waits for: `owner`, or `instance` (its registration).
    pub waiting_for: String,
    /// Wall-clock time the oldest of them was parked.
    pub since: Millis,
}

#[derive(Serialize, Debug, PartialEq, Eq)]
pub struct NodeRow {
    pub node_id: String,
    pub last_heartbeat: Millis,
    /// live, retired or missing
    pub status: &'static str,
}

#[derive(Serialize, Debug, Default)]
pub struct ParkedReport {
    pub parked: Vec<ParkedInstance>,
    pub undecodable: usize,
    pub nodes: Vec<NodeRow>,
}

pub fn parked_report(cfg: &KafkaConfig, node_timeout: Duration) -> Result<ParkedReport> {
    let t = &cfg.topics;
    let recs = read_table(
        cfg,
        &[&t.parked, &t.instances],
        &HashMap::new(),
        Duration::from_secs(60),
    )?;
    let mut live: BTreeMap<String, (Sample, String, Millis, String)> = BTreeMap::new();
    let mut nodes: BTreeMap<String, (Millis, bool)> = BTreeMap::new();
    let mut undecodable = 0;
    for r in recs {
        let key = r
            .key
            .as_deref()
            .map(|k| String::from_utf8_lossy(k).to_string())
            .unwrap_or_default();
        if r.topic == t.parked {
            let Some(p) = &r.payload else {
                live.remove(&key);
                continue;
            };
            match meterflow_avro::decode::<Sample>(p) {
                Ok(s) => {
                    let by = r
                        .header(headers::PARKED_BY)
                        .map(|v| String::from_utf8_lossy(v).to_string())
                        .unwrap_or_default();
                    let at = r
                        .header(headers::PARKED_AT)
                        .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
                        .unwrap_or(0);
                    let why = r
                        .header(headers::PARKED_FOR)
                        .map_or("owner".to_string(), |v| {
                            String::from_utf8_lossy(v).to_string()
                        });
                    live.insert(key, (s, by, at, why));
                }
                Err(_) => undecodable += 1,
            }
        } else if let Some(p) = &r.payload {
            if let Ok(meterflow_avro::InstancesMsg::Node(h)) =
                meterflow_avro::decode_instances_msg(p)
            {
                nodes.insert(h.node_id, (h.time, h.retired));
            }
        }
    }
    let mut by_instance: BTreeMap<String, ParkedInstance> = BTreeMap::new();
    for (s, by, at, why) in live.into_values() {
        let ms = (s.interval_end - s.interval_start) as i128;
        let e = by_instance
            .entry(s.instance_id.clone())
            .or_insert_with(|| ParkedInstance {
                instance_id: s.instance_id.clone(),
                node_id: s.node_id.clone(),
                samples: 0,
                from: s.interval_start,
                to: s.interval_end,
                vcpu_ms: 0,
                cpu_ns: 0,
                parked_by: by.clone(),
                waiting_for: why.clone(),
                since: at,
            });
        e.samples += 1;
        e.from = e.from.min(s.interval_start);
        e.to = e.to.max(s.interval_end);
        e.vcpu_ms += s.vcpu_millis as i128 * ms / 1000;
        e.cpu_ns += s.deltas.cpu_time_ns as i128;
        if at < e.since {
            e.since = at;
            e.waiting_for = why;
        }
    }
    let missing: BTreeMap<String, Millis> =
        meterflow_types::watermark::missing_nodes(&nodes, node_timeout.as_millis() as i64)
            .into_iter()
            .collect();
    Ok(ParkedReport {
        parked: by_instance.into_values().collect(),
        undecodable,
        nodes: nodes
            .into_iter()
            .map(|(n, (t, retired))| NodeRow {
                status: if retired {
                    "retired"
                } else if missing.contains_key(&n) {
                    "missing"
                } else {
                    "live"
                },
                node_id: n,
                last_heartbeat: t,
            })
            .collect(),
    })
}

pub fn run(a: AuditArgs) -> Result<()> {
    let cfg = KafkaConfig {
        brokers: a.brokers.clone(),
        ..Default::default()
    };
    if let Some(from) = &a.from {
        let t = |s: &str| meterflow_types::time::parse_rfc3339(s).map_err(anyhow::Error::msg);
        let to = match &a.to {
            Some(x) => t(x)?,
            None => meterflow_kafka::now_ms(),
        };
        if !crate::flow::run(&cfg, t(from)?, to, a.json)? {
            std::process::exit(1);
        }
        return Ok(());
    }
    if let Some(period) = a.period.clone() {
        let ok = tokio::runtime::Handle::current().block_on(period_audit(&a, &cfg, &period))?;
        if !ok {
            std::process::exit(1);
        }
        return Ok(());
    }
    let _ = a.parked; // the default audit
    let r = parked_report(&cfg, a.node_timeout)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    let fmt = meterflow_types::time::fmt_rfc3339;
    if r.parked.is_empty() {
        println!("nothing parked");
    } else {
        println!(
            "{:<38} {:<14} {:>7} {:<20} {:<20} {:>14} {:<20} {:<11}",
            "parked instance",
            "node",
            "samples",
            "from",
            "to",
            "vcpu-seconds",
            "parked since",
            "waiting for"
        );
        for p in &r.parked {
            println!(
                "{:<38} {:<14} {:>7} {:<20} {:<20} {:>14} {:<20} {:<11}",
                p.instance_id,
                p.node_id,
                p.samples,
                fmt(p.from),
                fmt(p.to),
                format!("{}.{:03}", p.vcpu_ms / 1000, p.vcpu_ms % 1000),
                fmt(p.since),
                p.waiting_for
            );
        }
        let n: usize = r.parked.iter().map(|p| p.samples).sum();
        println!("{n} sample(s) of {} instance(s) parked", r.parked.len());
    }
    if r.undecodable > 0 {
        println!("{} parked record(s) could not be decoded", r.undecodable);
    }
    println!();
    println!("{:<24} {:<20} {:<8}", "node", "last heartbeat", "status");
    for n in &r.nodes {
        println!(
            "{:<24} {:<20} {:<8}",
            n.node_id,
            fmt(n.last_heartbeat),
            n.status
        );
    }
    Ok(())
}

/// One entity's reconciliation for a period, per currency.
#[derive(Serialize, Debug, Default, Clone, PartialEq, Eq)]
pub struct PeriodRow {
    pub entity_id: String,
    pub currency: String,
    /// Σ vCPU-seconds of the usage whose interval starts in the period.
    pub usage_vcpu_seconds: String,
    /// The recorded usage re-rated, rounded per line.
    pub rerated: String,
    /// The revenue events on the rated topic (each id once), rounded per line.
    pub rated: String,
    /// The settlement files' totals (all versions).
    pub settled: String,
    pub ok: bool,
}

async fn period_audit(a: &AuditArgs, cfg: &KafkaConfig, period: &str) -> Result<bool> {
    use meterflow_settler::files::{manifests, rounded};
    use meterflow_settler::store::Store;
    use meterflow_types::{Dec, RatedEvent};
    let store = Store::open(&a.settlements, &BTreeMap::new())?;
    let manifests: Vec<_> = manifests(&store)
        .await?
        .into_iter()
        .filter(|m| m.period == period)
        .collect();
    let Some(first) = manifests.first() else {
        anyhow::bail!("no settlement of period {period} in {store}");
    };
    let bounds = (
        meterflow_types::time::parse_rfc3339(&first.period_start).map_err(anyhow::Error::msg)?,
        meterflow_types::time::parse_rfc3339(&first.period_end).map_err(anyhow::Error::msg)?,
    );
    let inside = |t: Millis| t >= bounds.0 && t < bounds.1;
    type Key = (String, String);
    let add = |m: &mut BTreeMap<Key, Dec>, k: Key, d: Dec| -> Result<()> {
        let e = m.entry(k).or_insert(Dec::ZERO);
        *e = e.checked_add(d)?;
        Ok(())
    };
    let mut settled: BTreeMap<Key, Dec> = BTreeMap::new();
    for m in &manifests {
        for (cur, total) in &m.totals {
            add(
                &mut settled,
                (m.entity_id.clone(), cur.clone()),
                total.parse()?,
            )?;
        }
    }
    // the rated topic, each id once
    let mut rated: BTreeMap<Key, Dec> = BTreeMap::new();
    let mut seen = std::collections::HashSet::new();
    let mut events: Vec<RatedEvent> = Vec::new();
    tokio::task::block_in_place(|| {
        meterflow_kafka::scan_topic(cfg, &cfg.topics.rated, Duration::from_secs(3600), |r| {
            if let Ok(meterflow_avro::RatedMsg::Rated(e)) =
                meterflow_avro::decode_rated_msg(r.payload.as_deref().unwrap_or_default())
            {
                if inside(e.window_start) && seen.insert(e.id.clone()) {
                    events.push(e);
                }
            }
        })
    })?;
    for e in &events {
        add(
            &mut rated,
            (e.entity_id.clone(), e.currency.clone()),
            rounded(e),
        )?;
    }
    // the usage topic, recorded and re-rated as the stream rated it
    let dir = std::env::temp_dir().join(format!("meterflow-audit-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("usage.parquet");
    let mut usage_vcpu: BTreeMap<String, Dec> = BTreeMap::new();
    {
        let mut w = meterflow_rater::batch::UsageWriter::create(&file)?;
        let mut err = None;
        tokio::task::block_in_place(|| {
            meterflow_kafka::scan_topic(cfg, &cfg.topics.usage, Duration::from_secs(3600), |r| {
                let row = match meterflow_avro::decode_usage_msg(
                    r.payload.as_deref().unwrap_or_default(),
                ) {
                    Ok(meterflow_avro::UsageMsg::Usage(u)) => {
                        if inside(u.interval_start) {
                            let v = usage_vcpu.entry(u.entity_id.clone()).or_insert(Dec::ZERO);
                            *v = v.checked_add(u.vcpu_seconds).unwrap_or(*v);
                        }
                        meterflow_rater::batch::Row::Usage(r.partition, u)
                    }
                    Ok(meterflow_avro::UsageMsg::Watermark(m)) => {
                        meterflow_rater::batch::Row::Marker(r.partition, m)
                    }
                    Err(_) => return,
                };
                if let Err(e) = w.push(row) {
                    err.get_or_insert(e);
                }
            })
        })?;
        if let Some(e) = err {
            return Err(e);
        }
        w.finish()?;
    }
    let rules = crate::apply::resolve(cfg, a.rules.as_deref())?;
    let engines = crate::rerate::engines(&rules, 1024).await?;
    let mut rerated: BTreeMap<Key, Dec> = BTreeMap::new();
    let billing =
        meterflow_types::window::Period::parse(&a.billing_period).map_err(anyhow::Error::msg)?;
    let mut fail = None;
    tokio::task::block_in_place(|| {
        meterflow_rater::batch::rerate_files(
            &engines,
            billing,
            std::slice::from_ref(&file),
            24 * 3600 * 1000,
            2 * 3600 * 1000,
            |_| {},
            |ev| {
                for e in ev.iter().filter(|e| inside(e.window_start)) {
                    if let Err(x) = add(
                        &mut rerated,
                        (e.entity_id.clone(), e.currency.clone()),
                        rounded(e),
                    ) {
                        fail.get_or_insert(x);
                    }
                }
                Ok(())
            },
        )
    })?;
    let _ = std::fs::remove_dir_all(&dir);
    if let Some(e) = fail {
        return Err(e);
    }
    let keys: std::collections::BTreeSet<&Key> = settled
        .keys()
        .chain(rated.keys())
        .chain(rerated.keys())
        .collect();
    let get = |m: &BTreeMap<Key, Dec>, k: &Key| m.get(k).copied().unwrap_or(Dec::ZERO);
    let rows: Vec<PeriodRow> = keys
        .into_iter()
        .map(|k| {
            let (x, y, z) = (get(&rerated, k), get(&rated, k), get(&settled, k));
            let places = meterflow_types::decimal::minor_units(&k.1);
            PeriodRow {
                entity_id: k.0.clone(),
                currency: k.1.clone(),
                usage_vcpu_seconds: usage_vcpu
                    .get(&k.0)
                    .copied()
                    .unwrap_or(Dec::ZERO)
                    .to_string(),
                rerated: x.to_fixed(places),
                rated: y.to_fixed(places),
                settled: z.to_fixed(places),
                ok: x == y && y == z,
            }
        })
        .collect();
    let ok = rows.iter().all(|r| r.ok);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!(
            "{:<24} {:<8} {:>18} {:>14} {:>14} {:>14}  status",
            "entity", "currency", "usage vCPU-s", "re-rated", "rated", "settled"
        );
        for r in &rows {
            println!(
                "{:<24} {:<8} {:>18} {:>14} {:>14} {:>14}  {}",
                r.entity_id,
                r.currency,
                r.usage_vcpu_seconds,
                r.rerated,
                r.rated,
                r.settled,
                if r.ok { "ok" } else { "MISMATCH" }
            );
        }
        let bad = rows.iter().filter(|r| !r.ok).count();
        println!(
            "period {period}: {} entit(ies), {bad} mismatch(es)",
            rows.len()
        );
    }
    Ok(ok)
}
