//! On-demand metering over the bus (US 9,251,481): a request names what to meter
//! (instances, or a user's or entity's instances; metrics; an event-time range) and goes to
//! `meterflow.requests`, which every collector reads whole. Each collector answers for the
//! matching instances on its node — live values read from its hypervisor when the request
//! arrives, and usage over the range from its local log of the samples it published — on
//! the reply topic, keyed by the request's correlation id. The requester knows the nodes
//! from the cluster state (the node rows of `meterflow.instances`), waits for every one of
//! them or the timeout, names the nodes that did not answer, and merges the replies into
//! metering information per user per instance.
//!
//! [`ask`] is the library call; `meterflow query` prints it as a table or JSON.

use anyhow::{bail, Context, Result};
use meterflow_avro::InstancesMsg;
use meterflow_enricher::join::Owners;
use meterflow_kafka::{read_latest, KafkaConfig, Outbox, Tail};
use meterflow_types::{
    Dec, Labels, MeteringReply, MeteringRequest, Millis, NodeHeartbeat, Ownership, Sample,
};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// The metrics a request may name.
pub const METRICS: [&str; 5] = ["cpu", "vcpu", "memory", "network", "disk"];

/// What to meter.
#[derive(Clone, Debug, Default)]
pub struct Query {
    /// Instance ids (with `user`/`entity`: their union).
    pub instances: Vec<String>,
    /// Every instance this user owns (ownership in force at `to`, or now).
    pub user: Option<String>,
    /// Every instance this billing entity owns.
    pub entity: Option<String>,
    /// Subset of [`METRICS`]; empty = all.
    pub metrics: Vec<String>,
    /// Usage of the samples ending in (from, to], event time.
    pub from: Option<Millis>,
    pub to: Option<Millis>,
    pub timeout: Duration,
}

/// The merged answer.
#[derive(Clone, Debug, Serialize)]
pub struct Answer {
    pub request_id: String,
    /// The nodes the cluster state lists (not retired), each expected to answer.
    pub nodes: Vec<String>,
    pub answered: Vec<String>,
    /// Expected nodes that did not answer within the timeout.
    pub missing: Vec<String>,
    /// Per node: what it could not read live.
    pub errors: BTreeMap<String, Vec<String>>,
    /// One row per instance, ordered by user, entity, instance.
    pub rows: Vec<Row>,
}

/// Metering information for one instance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Row {
    pub user_id: Option<String>,
    pub entity_id: Option<String>,
    pub instance_id: String,
    pub name: String,
    pub kind: String,
    pub state: String,
    pub node_id: String,
    pub site: String,
    pub live: Labels,
    pub usage: Labels,
    pub samples: i64,
}

/// Refuse metric names nobody answers.
pub fn check_metrics(metrics: &[String]) -> Result<()> {
    for m in metrics {
        if !METRICS.contains(&m.as_str()) {
            bail!("unknown metric {m:?}: one of {}", METRICS.join(", "));
        }
    }
    Ok(())
}

fn wants(metrics: &[String], m: &str) -> bool {
    metrics.is_empty() || metrics.iter().any(|x| x == m)
}

/// Whether a sample belongs to the range (it ends in (from, to]).
pub fn in_range(s: &Sample, from: Option<Millis>, to: Option<Millis>) -> bool {
    from.is_none_or(|f| s.interval_end > f) && to.is_none_or(|t| s.interval_end <= t)
}

/// Usage of samples, exact: `cpu_seconds` (Σ cpu time), `vcpu_seconds` (Σ allocated
/// vCPUs × interval), `memory_byte_seconds` (Σ allocated bytes × interval),
/// `net_rx_bytes`/`net_tx_bytes`, `disk_read_bytes`/`disk_write_bytes`, as decimal text.
pub fn usage_of<'a>(samples: impl IntoIterator<Item = &'a Sample>, metrics: &[String]) -> Labels {
    // integers at scale 9 (Dec's): exact, and i128 holds a fleet-year of byte-seconds
    let mut raw: BTreeMap<&'static str, i128> = BTreeMap::new();
    for s in samples {
        let ms = s.interval_ms() as i128;
        let d = &s.deltas;
        let mut add = |k: &'static str, v: i128| *raw.entry(k).or_default() += v;
        if wants(metrics, "cpu") {
            add("cpu_seconds", d.cpu_time_ns as i128);
        }
        if wants(metrics, "vcpu") {
            add("vcpu_seconds", s.vcpu_millis as i128 * ms * 1_000);
        }
        if wants(metrics, "memory") {
            add(
                "memory_byte_seconds",
                s.memory_alloc_bytes as i128 * ms * 1_000_000,
            );
        }
        if wants(metrics, "network") {
            add("net_rx_bytes", d.net_rx_bytes as i128 * 1_000_000_000);
            add("net_tx_bytes", d.net_tx_bytes as i128 * 1_000_000_000);
        }
        if wants(metrics, "disk") {
            add("disk_read_bytes", d.disk_read_bytes as i128 * 1_000_000_000);
            add(
                "disk_write_bytes",
                d.disk_write_bytes as i128 * 1_000_000_000,
            );
        }
    }
    raw.into_iter()
        .map(|(k, v)| (k.to_string(), Dec::from_raw(v).to_string()))
        .collect()
}

/// What the cluster state says: the nodes expected to answer and who owns what.
struct ClusterState {
    nodes: BTreeMap<String, NodeHeartbeat>,
    owners: Owners,
    owned: Vec<Ownership>,
}

fn cluster_state(cfg: &KafkaConfig) -> Result<ClusterState> {
    let mut nodes = BTreeMap::new();
    for (_, r) in read_latest(cfg, &cfg.topics.instances)? {
        if let Ok(InstancesMsg::Node(n)) =
            meterflow_avro::decode_instances_msg(r.payload.as_deref().unwrap_or_default())
        {
            if !n.retired {
                nodes.insert(n.node_id.clone(), n);
            }
        }
    }
    let mut owners = Owners::default();
    let mut owned = Vec::new();
    for (_, r) in read_latest(cfg, &cfg.topics.ownership)? {
        if let Ok(o) = meterflow_avro::decode::<Ownership>(r.payload.as_deref().unwrap_or_default())
        {
            owners.insert(o.clone());
            owned.push(o);
        }
    }
    Ok(ClusterState {
        nodes,
        owners,
        owned,
    })
}

impl ClusterState {
    /// The owner of an instance at `at`.
    fn owner(&self, instance: &str, at: Millis) -> Option<&Ownership> {
        self.owners
            .segments(instance, at, at + 1)
            .and_then(|s| s.first().map(|(_, _, o)| *o))
    }
}

/// Send the request, wait for every node or the timeout, and merge the replies.
pub async fn ask(cfg: &KafkaConfig, q: &Query) -> Result<Answer> {
    check_metrics(&q.metrics)?;
    let state = tokio::task::block_in_place(|| cluster_state(cfg))?;
    let at = q.to.unwrap_or_else(meterflow_kafka::now_ms);
    // the instances asked for: named ones, plus the user's / entity's at `at`
    let by_owner = q.user.is_some() || q.entity.is_some();
    let mut instances: BTreeSet<String> = q.instances.iter().cloned().collect();
    if by_owner {
        let ids: BTreeSet<&str> = state.owned.iter().map(|o| o.instance_id.as_str()).collect();
        for id in ids {
            if let Some(o) = state.owner(id, at) {
                let user_ok = q.user.as_ref().is_none_or(|u| &o.user_id == u);
                let entity_ok = q.entity.as_ref().is_none_or(|e| &o.entity_id == e);
                if user_ok && entity_ok {
                    instances.insert(id.to_string());
                }
            }
        }
    }
    let all_instances = instances.is_empty() && !by_owner;
    let now = meterflow_kafka::now_ms();
    let id = format!(
        "q-{now}-{}-{}",
        std::process::id(),
        REQUESTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let req = MeteringRequest {
        id: id.clone(),
        reply_topic: cfg.topics.replies.clone(),
        sent_at: now,
        deadline: now + q.timeout.as_millis() as Millis,
        instances: instances.into_iter().collect(),
        all_instances,
        metrics: q.metrics.clone(),
        from: q.from,
        to: q.to,
    };
    // listen before asking, so no reply can come before the reader
    let replies = tokio::task::block_in_place(|| Tail::at_end(cfg, &cfg.topics.replies))?;
    let mut out = Outbox::connect(cfg, "meterflow-query")?;
    out.send(
        &cfg.topics.requests,
        id.as_bytes(),
        &meterflow_avro::encode(&req),
        None,
    )
    .await?;
    out.flush().await.context("sending the request")?;
    let expected: BTreeSet<String> = state.nodes.keys().cloned().collect();
    let mut got: BTreeMap<String, MeteringReply> = BTreeMap::new();
    let end = Instant::now() + q.timeout;
    while Instant::now() < end && !expected.iter().all(|n| got.contains_key(n)) {
        for r in tokio::task::block_in_place(|| replies.poll())? {
            if r.key.as_deref() != Some(id.as_bytes()) {
                continue;
            }
            match meterflow_avro::decode::<MeteringReply>(r.payload.as_deref().unwrap_or_default())
            {
                Ok(reply) if reply.request_id == id => {
                    got.insert(reply.node_id.clone(), reply);
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "undecodable reply skipped"),
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut rows = Vec::new();
    let mut errors = BTreeMap::new();
    for (node, reply) in &got {
        if !reply.errors.is_empty() {
            errors.insert(node.clone(), reply.errors.clone());
        }
        for i in &reply.instances {
            let owner = state.owner(&i.instance_id, at);
            rows.push(Row {
                user_id: owner.map(|o| o.user_id.clone()),
                entity_id: owner.map(|o| o.entity_id.clone()),
                instance_id: i.instance_id.clone(),
                name: i.name.clone(),
                kind: i.kind.clone(),
                state: i.state.clone(),
                node_id: node.clone(),
                site: reply.site.clone(),
                live: i.live.clone(),
                usage: i.usage.clone(),
                samples: i.samples,
            });
        }
    }
    rows.sort_by(|a, b| {
        (&a.user_id, &a.entity_id, &a.instance_id, &a.node_id).cmp(&(
            &b.user_id,
            &b.entity_id,
            &b.instance_id,
            &b.node_id,
        ))
    });
    Ok(Answer {
        request_id: id,
        missing: expected
            .iter()
            .filter(|n| !got.contains_key(*n))
            .cloned()
            .collect(),
        nodes: expected.into_iter().collect(),
        answered: got.keys().cloned().collect(),
        errors,
        rows,
    })
}

static REQUESTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Whether an instance matches a request.
pub fn matches(req: &MeteringRequest, instance_id: &str) -> bool {
    req.all_instances || req.instances.iter().any(|i| i == instance_id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use meterflow_types::Counters;

    fn sample(end: Millis, ms: i64) -> Sample {
        Sample {
            id: format!("s{end}"),
            instance_id: "i".into(),
            node_id: "n".into(),
            site: "s".into(),
            kind: "vm".into(),
            incarnation: "a".into(),
            seq: 1,
            interval_start: end - ms,
            interval_end: end,
            counters: Counters::default(),
            deltas: Counters {
                cpu_time_ns: 1_500_000_000,
                net_rx_bytes: 10,
                net_tx_bytes: 20,
                disk_read_bytes: 30,
                disk_write_bytes: 40,
            },
            vcpu_millis: 2_000,
            memory_alloc_bytes: 1 << 30,
            memory_used_bytes: None,
            owner_hint: None,
            ended: false,
        }
    }

    #[test]
    fn usage_is_exact_per_metric_and_ranges_take_samples_by_their_end() {
        let s = [sample(10_000, 10_000), sample(20_000, 10_000)];
        let all = usage_of(&s, &[]);
        assert_eq!(all["cpu_seconds"], "3");
        assert_eq!(all["vcpu_seconds"], "40");
        assert_eq!(all["memory_byte_seconds"], (20u64 << 30).to_string());
        assert_eq!(all["net_tx_bytes"], "40");
        assert_eq!(all["disk_write_bytes"], "80");
        let cpu = usage_of(&s, &["cpu".to_string()]);
        assert_eq!(cpu.keys().collect::<Vec<_>>(), ["cpu_seconds"]);
        assert!(in_range(&s[1], Some(10_000), Some(20_000)));
        assert!(!in_range(&s[0], Some(10_000), Some(20_000)));
        assert!(in_range(&s[0], None, Some(10_000)));
        assert!(check_metrics(&["gpu".to_string()]).is_err());
    }
}
