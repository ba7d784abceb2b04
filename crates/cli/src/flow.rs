//! `meterflow audit --from T --to T`: loss and duplication between stages. Sums the
//! per-stage counts on `meterflow.audit` (see `meterflow_kafka::audit`) per topic,
//! direction and event-time bucket, and compares each topic's two sides bucket by bucket:
//! samples (collectors → enricher), usage (enricher → rater), rated (rater → settler).
//! Fewer read than sent is a loss, more is a duplication; either gives exit code 1 with
//! the bucket, the stages and the size.

use anyhow::Result;
use meterflow_kafka::KafkaConfig;
use meterflow_types::{AuditCount, Dec, Millis};
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Duration;

#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    pub topic: String,
    pub bucket_start: String,
    /// `loss` or `duplication`.
    pub kind: String,
    pub from_stage: String,
    pub to_stage: String,
    pub sent: i64,
    pub read: i64,
    /// Read minus sent.
    pub count: i64,
    pub quantity: String,
}

#[derive(Serialize, Debug)]
pub struct FlowReport {
    /// Buckets compared per topic.
    pub buckets: BTreeMap<String, usize>,
    /// Records each stage read again and dropped as duplicates, per topic.
    pub dropped_duplicates: BTreeMap<String, i64>,
    pub differences: Vec<Difference>,
}

type Sums = BTreeMap<(String, String, Millis), (i64, Dec)>;

/// Sum the audit records with buckets in [from, to).
pub fn sums(cfg: &KafkaConfig, from: Millis, to: Millis) -> Result<Sums> {
    let mut s: Sums = BTreeMap::new();
    meterflow_kafka::scan_topic(cfg, &cfg.topics.audit, Duration::from_secs(600), |r| {
        let Ok(a) = meterflow_avro::decode::<AuditCount>(r.payload.as_deref().unwrap_or_default())
        else {
            return;
        };
        if a.bucket_start < from || a.bucket_start >= to {
            return;
        }
        let q: Dec = a.quantity.parse().unwrap_or(Dec::ZERO);
        let e = s
            .entry((a.topic, a.direction, a.bucket_start))
            .or_insert((0, Dec::ZERO));
        e.0 += a.count;
        e.1 = e.1.checked_add(q).unwrap_or(e.1);
    })?;
    Ok(s)
}

/// Compare the two sides of every topic.
pub fn compare(cfg: &KafkaConfig, s: &Sums) -> FlowReport {
    let t = &cfg.topics;
    let edges = [
        (&t.samples, "collector", "enricher"),
        (&t.usage, "enricher", "rater"),
        (&t.rated, "rater", "settler"),
    ];
    let mut report = FlowReport {
        buckets: BTreeMap::new(),
        dropped_duplicates: BTreeMap::new(),
        differences: Vec::new(),
    };
    for (topic, from_stage, to_stage) in edges {
        let buckets: std::collections::BTreeSet<Millis> = s
            .keys()
            .filter(|(tp, d, _)| tp == topic && (d == "in" || d == "out"))
            .map(|k| k.2)
            .collect();
        report.buckets.insert(topic.clone(), buckets.len());
        let dups: i64 = s
            .iter()
            .filter(|((tp, d, _), _)| tp == topic && d == "dup")
            .map(|(_, v)| v.0)
            .sum();
        report.dropped_duplicates.insert(topic.clone(), dups);
        for b in buckets {
            let get = |d: &str| {
                s.get(&(topic.clone(), d.to_string(), b))
                    .copied()
                    .unwrap_or((0, Dec::ZERO))
            };
            let (sent, read) = (get("out"), get("in"));
            if sent.0 == read.0 && sent.1 == read.1 {
                continue;
            }
            report.differences.push(Difference {
                topic: topic.clone(),
                bucket_start: meterflow_types::time::fmt_rfc3339(b),
                kind: if read.0 < sent.0 || (read.0 == sent.0 && read.1 < sent.1) {
                    "loss".into()
                } else {
                    "duplication".into()
                },
                from_stage: from_stage.into(),
                to_stage: to_stage.into(),
                sent: sent.0,
                read: read.0,
                count: read.0 - sent.0,
                quantity: read.1.checked_sub(sent.1).unwrap_or(Dec::ZERO).to_string(),
            });
        }
    }
    report
}

/// Exit code 1 on any difference.
pub fn run(cfg: &KafkaConfig, from: Millis, to: Millis, json: bool) -> Result<bool> {
    let report = compare(cfg, &sums(cfg, from, to)?);
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for (topic, n) in &report.buckets {
            println!(
                "{topic}: {n} bucket(s) compared, {} duplicate(s) read again and dropped",
                report.dropped_duplicates.get(topic).copied().unwrap_or(0)
            );
        }
        for d in &report.differences {
            println!(
                "{}  {} {} → {}, bucket {}: sent {}, read {} ({:+} records, {} quantity)",
                d.kind.to_uppercase(),
                d.topic,
                d.from_stage,
                d.to_stage,
                d.bucket_start,
                d.sent,
                d.read,
                d.count,
                d.quantity
            );
        }
        if report.differences.is_empty() {
            println!("no loss, no duplication");
        }
    }
    Ok(report.differences.is_empty())
}
