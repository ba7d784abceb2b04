//! `meterflow audit --parked`: what the enricher is holding back, and which nodes it has
//! stopped waiting for. Read from the compacted `meterflow.parked` and
//! `meterflow.instances` topics, so it works against any running deployment.

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
    let mut live: BTreeMap<String, (Sample, String, Millis)> = BTreeMap::new();
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
                    live.insert(key, (s, by, at));
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
    for (s, by, at) in live.into_values() {
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
                since: at,
            });
        e.samples += 1;
        e.from = e.from.min(s.interval_start);
        e.to = e.to.max(s.interval_end);
        e.vcpu_ms += s.vcpu_millis as i128 * ms / 1000;
        e.cpu_ns += s.deltas.cpu_time_ns as i128;
        e.since = e.since.min(at);
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
    let _ = a.parked; // the only audit so far; the default
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
            "{:<38} {:<14} {:>7} {:<20} {:<20} {:>14} {:<20}",
            "parked instance", "node", "samples", "from", "to", "vcpu-seconds", "parked since"
        );
        for p in &r.parked {
            println!(
                "{:<38} {:<14} {:>7} {:<20} {:<20} {:>14} {:<20}",
                p.instance_id,
                p.node_id,
                p.samples,
                fmt(p.from),
                fmt(p.to),
                format!("{}.{:03}", p.vcpu_ms / 1000, p.vcpu_ms % 1000),
                fmt(p.since)
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
