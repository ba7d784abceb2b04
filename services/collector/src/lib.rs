//! The collector: one per node. Reads every instance from its sources (libvirt VMs, a
//! simulated fleet), turns readings into exact interval samples keyed by instance id,
//! registers instances on the compacted instances topic, publishes owners discovered
//! in metadata, and after each complete poll writes a poll marker (node heartbeat) to
//! every samples partition so downstream knows how far this node is complete.

pub mod cgroup;
pub mod config;
pub mod fleet;
pub mod libvirt;
pub mod query;
pub mod sampler;
pub mod source;

pub use config::CollectorConfig;

use anyhow::{Context, Result};
use meterflow_kafka::{ensure_topics, partition_count, Outbox};
use meterflow_runtime::Ctx;
use meterflow_types::{InstanceState, MeteringRequest, Millis, NodeHeartbeat, Ownership, Sample};
use sampler::Sampler;
use source::{Reading, SourceError};
use std::collections::HashMap;
use std::time::{Duration, Instant};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// All configured sources of one node.
pub struct Sources {
    libvirt: Option<libvirt::LibvirtSource>,
    cgroup: Option<(
        std::path::PathBuf,
        std::path::PathBuf,
        std::sync::Arc<cgroup::RuntimeMeta>,
    )>,
    deadline: Duration,
    fleet: Option<(fleet::FleetConfig, Vec<fleet::SimInstance>, Millis)>,
}

impl Sources {
    pub fn open(cfg: &CollectorConfig, fleet_start: Millis) -> Result<Sources> {
        let deadline = cfg
            .poll_interval
            .min(Duration::from_secs(30))
            .max(Duration::from_secs(5));
        let libvirt = cfg
            .libvirt_uri
            .as_deref()
            .map(|u| libvirt::LibvirtSource::open(u, cfg.libvirt_call_timeout, deadline))
            .transpose()?;
        let fleet = cfg
            .fleet
            .as_ref()
            .map(|f| (f.clone(), f.model(), fleet_start));
        let cgroup = cfg.cgroup_root.clone().map(|r| {
            let meta = std::sync::Arc::new(cgroup::RuntimeMeta::new(&cfg.runtime_root));
            (r, cfg.proc_root.clone(), meta)
        });
        Ok(Sources {
            libvirt,
            cgroup,
            deadline,
            fleet,
        })
    }

    /// Read every instance at event time `t`.
    pub async fn poll(&self, t: Millis) -> (Vec<Reading>, Vec<SourceError>) {
        let mut readings = Vec::new();
        let mut errors = Vec::new();
        if let Some((f, model, start)) = &self.fleet {
            readings.extend(f.readings(model, t - start));
        }
        if let Some(lv) = &self.libvirt {
            match lv.poll().await {
                Ok((r, e)) => {
                    readings.extend(r);
                    errors.extend(e);
                }
                Err(reason) => errors.push(SourceError {
                    instance: "*".into(),
                    reason,
                }),
            }
        }
        if let Some((root, proc_root, runtime_root)) = &self.cgroup {
            let (root, proc_root, runtime_root) =
                (root.clone(), proc_root.clone(), runtime_root.clone());
            let job =
                tokio::task::spawn_blocking(move || cgroup::poll(&root, &proc_root, &runtime_root));
            match tokio::time::timeout(self.deadline, job).await {
                Ok(Ok((r, e))) => {
                    readings.extend(r);
                    errors.extend(e);
                }
                Ok(Err(e)) => errors.push(SourceError {
                    instance: "*".into(),
                    reason: format!("cgroup poll failed: {e}"),
                }),
                Err(_) => errors.push(SourceError {
                    instance: "*".into(),
                    reason: format!("cgroup poll exceeded its {:?} deadline", self.deadline),
                }),
            }
        }
        (readings, errors)
    }
}

/// This node's phase within the poll interval (FNV-1a of its id): nodes of a fleet poll
/// at different moments instead of all at once, each at an exact interval.
pub fn poll_phase(node_id: &str, poll_ms: i64) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in node_id.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % poll_ms.max(1) as u64) as i64
}

/// The first time at or after `now` that falls on this node's phase.
pub fn next_phase_point(now: Millis, poll_ms: i64, node_id: &str) -> Millis {
    let p = now - now.rem_euclid(poll_ms) + poll_phase(node_id, poll_ms);
    if p < now {
        p + poll_ms
    } else {
        p
    }
}

fn state_of(r: &Reading, node: &str, site: &str, first_seen: Millis, t: Millis) -> InstanceState {
    InstanceState {
        instance_id: r.instance_id.clone(),
        node_id: node.to_string(),
        site: r.site.clone().unwrap_or_else(|| site.to_string()),
        kind: r.kind.to_string(),
        name: r.name.clone(),
        state: r.state.clone(),
        hypervisor: r.hypervisor.clone(),
        flavor: r.flavor.clone(),
        vcpu_millis: r.vcpu_millis,
        memory_alloc_bytes: r.memory_alloc_bytes,
        first_seen,
        last_seen: t,
        labels: r.labels.clone(),
    }
}

/// Per-node bookkeeping of what was registered and which owners were published.
#[derive(Default)]
struct Registry {
    instances: HashMap<String, (InstanceState, Millis)>,
    owners: HashMap<String, (String, String)>,
}

pub async fn run(cfg: CollectorConfig, ctx: Ctx) -> Result<()> {
    if !meterflow_kafka::await_brokers(&cfg.kafka, &ctx.shutdown).await? {
        return Ok(()); // stopped before the broker answered
    }
    ensure_topics(&cfg.kafka).await?;
    let topics = cfg.kafka.topics.clone();
    let partitions = partition_count(&cfg.kafka, &topics.samples)?;
    let mut out = Outbox::connect(&cfg.kafka, &format!("collector-{}", cfg.node_id))?;
    let poll_ms = cfg.poll_interval.as_millis() as i64;
    anyhow::ensure!(poll_ms > 0, "poll_interval must be positive");
    let mut sampler = Sampler::new(
        &cfg.node_id,
        &cfg.site,
        poll_ms,
        cfg.max_gap.as_millis() as i64,
        cfg.state_file.as_deref(),
    )?;
    let speed = cfg.clock.speed.max(1) as i64;
    // Real time: polls at this node's phase of the interval (spread across the fleet,
    // stable per node), stamped with the time they are taken. A restart resumes at the
    // next phase point, so the interval since the last sample covers the downtime.
    // Accelerated or replayed clocks continue where the state file left off.
    let real_time = cfg.clock.start.is_none() && speed == 1;
    let now0 = meterflow_kafka::now_ms();
    let start = match (&cfg.clock.start, sampler.last_time()) {
        _ if real_time => {
            let next = next_phase_point(now0, poll_ms, &cfg.node_id);
            sampler
                .last_time()
                .map_or(next, |last| next.max(last + poll_ms))
        }
        (_, Some(last)) => last + poll_ms,
        (Some(s), None) => meterflow_types::time::parse_rfc3339(s).map_err(anyhow::Error::msg)?,
        (None, None) => now0.div_euclid(poll_ms) * poll_ms,
    };
    let lead_ms = if real_time { (start - now0).max(0) } else { 0 };
    let fleet_start = cfg
        .clock
        .start
        .as_deref()
        .map(meterflow_types::time::parse_rfc3339)
        .transpose()
        .map_err(anyhow::Error::msg)?
        .unwrap_or(start);
    let sources = Sources::open(&cfg, fleet_start)?;
    // A bounded run on a set clock counts its polls in event time, so a collector that
    // is killed and restarted stops where one uninterrupted run would have.
    let polls_before = if cfg.clock.start.is_some() && !real_time {
        (start - fleet_start).div_euclid(poll_ms).max(0)
    } else {
        0
    };
    let m = &ctx.metrics;
    let labels = [("node", cfg.node_id.as_str())];
    let samples_total = m.counter(
        "meterflow_collector_samples_total",
        "Samples published.",
        &labels,
    );
    let errors_total = m.counter(
        "meterflow_collector_source_errors_total",
        "Instances skipped for a poll because a source failed.",
        &labels,
    );
    let deleted_total = m.counter(
        "meterflow_collector_deleted_total",
        "Instances seen deleted (final sample and tombstone sent).",
        &labels,
    );
    let polls_total = m.counter(
        "meterflow_collector_polls_total",
        "Complete polls.",
        &labels,
    );
    let last_poll = m.gauge(
        "meterflow_collector_last_poll_time_ms",
        "Event time of the last complete poll.",
        &labels,
    );
    let queries_total = m.counter(
        "meterflow_collector_queries_answered_total",
        "On-demand metering requests answered.",
        &labels,
    );
    let log_file = cfg
        .state_file
        .as_ref()
        .map(|f| std::path::PathBuf::from(format!("{}.samples", f.display())));
    let mut log = query::SampleLog::open(log_file.as_deref(), cfg.query_retention)?;
    let requests = if cfg.answer_queries {
        Some(meterflow_kafka::Tail::at_end(&cfg.kafka, &topics.requests)?)
    } else {
        None
    };
    let mut ledger = meterflow_kafka::audit::Ledger::new("collector", &cfg.node_id);
    let mut probes = meterflow_kafka::probe::Probes::new(
        &cfg.kafka,
        "collector",
        &cfg.node_id,
        ctx.metrics.clone(),
    )?;
    let mut reg = Registry::default();
    let mut logged_errors: HashMap<String, String> = HashMap::new();
    let wall0 = Instant::now();
    let mut last_t = None;
    let mut k: i64 = 0;
    loop {
        if cfg.polls.is_some_and(|n| (polls_before + k) as u64 >= n) {
            break;
        }
        let due = wall0 + Duration::from_millis((lead_ms + k * poll_ms / speed) as u64);
        // between polls: answer metering requests as they arrive
        let mut stop = false;
        loop {
            tokio::select! {
                _ = ctx.shutdown.cancelled() => { stop = true; break }
                _ = tokio::time::sleep_until(due.into()) => break,
                _ = tokio::time::sleep(Duration::from_millis(100)), if requests.is_some() => {
                    // event time now: the last poll plus the wall time since, on this clock
                    let since = Instant::now().saturating_duration_since(wall0).as_millis() as i64;
                    let live_t = (start + (since - lead_ms) * speed).max(last_t.unwrap_or(start));
                    if let Some(tail) = &requests {
                        let n = serve_requests(tail, &mut out, &cfg, &sources, &log, live_t).await?;
                        queries_total.add(n);
                    }
                }
            }
        }
        if stop {
            break;
        }
        let t = start + k * poll_ms;
        probes.refresh();
        let poll_started = Instant::now();
        let (readings, errors) = sources.poll(t).await;
        for e in &errors {
            errors_total.inc();
            if logged_errors.get(&e.instance) != Some(&e.reason) {
                tracing::warn!(instance = %e.instance, reason = %e.reason, "instance skipped this poll");
                logged_errors.insert(e.instance.clone(), e.reason.clone());
            }
        }
        // owners first, so the enricher rarely has to park a sample
        for r in &readings {
            if let Some(o) = &r.owner {
                let ent = (o.user_id.clone(), o.entity_id.clone());
                if reg.owners.get(&r.instance_id) != Some(&ent) {
                    let rec = Ownership {
                        instance_id: r.instance_id.clone(),
                        user_id: o.user_id.clone(),
                        entity_id: o.entity_id.clone(),
                        project: o.project.clone(),
                        valid_from: if r.hypervisor == "simulated" {
                            fleet_start
                        } else {
                            t
                        },
                        source: if r.hypervisor == "simulated" {
                            "fleet".into()
                        } else {
                            "metadata".into()
                        },
                    };
                    out.send(
                        &topics.ownership,
                        rec.key().as_bytes(),
                        &meterflow_avro::encode(&rec),
                        None,
                    )
                    .await?;
                    reg.owners.insert(r.instance_id.clone(), ent);
                }
            }
        }
        // acknowledged before any sample they own is sent (different topics, no ordering)
        if out.pending() > 0 {
            out.flush().await?;
        }
        let mut published: Vec<Sample> = Vec::new();
        for r in &readings {
            let first_seen = reg
                .instances
                .get(&r.instance_id)
                .map(|(s, _)| s.first_seen)
                .unwrap_or(t);
            let st = state_of(r, &cfg.node_id, &cfg.site, first_seen, t);
            let due_reg = match reg.instances.get(&r.instance_id) {
                None => true,
                Some((prev, at)) => {
                    prev.state != st.state
                        || prev.vcpu_millis != st.vcpu_millis
                        || prev.memory_alloc_bytes != st.memory_alloc_bytes
                        || prev.labels != st.labels
                        || prev.flavor != st.flavor
                        || t - at >= cfg.registration_interval.as_millis() as i64
                }
            };
            if due_reg {
                out.send(
                    &topics.instances,
                    r.instance_id.as_bytes(),
                    &meterflow_avro::encode(&st),
                    None,
                )
                .await?;
                reg.instances.insert(r.instance_id.clone(), (st, t));
            }
            let sample = if r.is_running() {
                match sampler.observe(r, t) {
                    Ok(s) => Some(s),
                    Err(e) => {
                        errors_total.inc();
                        tracing::warn!(instance = %r.instance_id, reason = %e, "bad reading skipped");
                        None
                    }
                }
            } else {
                // stopped: the final sample of its incarnation (once)
                sampler.end(&r.instance_id, r.kind, t)
            };
            if let Some(s) = sample {
                let fwd = probes.finish(&probes.start("collector.publish", &s.id, poll_started));
                out.send_with(
                    &topics.samples,
                    s.instance_id.as_bytes(),
                    Some(&meterflow_avro::encode(&s)),
                    None,
                    &fwd.as_ref()
                        .map(meterflow_kafka::probe::as_refs)
                        .unwrap_or_default(),
                )
                .await?;
                samples_total.inc();
                published.push(s);
            }
        }
        // Deleted: known here, absent from a poll whose sources all answered, and not
        // skipped for an error. A final sample, then a tombstone on the instances topic.
        let whole_source_failed = errors.iter().any(|e| e.instance == "*");
        if !whole_source_failed {
            let present: std::collections::HashSet<&str> = readings
                .iter()
                .map(|r| r.instance_id.as_str())
                .chain(errors.iter().map(|e| e.instance.as_str()))
                .collect();
            let mut gone: Vec<String> = sampler
                .live()
                .chain(reg.instances.keys().map(String::as_str))
                .filter(|i| !present.contains(i))
                .map(str::to_string)
                .collect();
            gone.sort_unstable();
            gone.dedup();
            for id in gone {
                let kind = reg
                    .instances
                    .get(&id)
                    .map_or("vm".to_string(), |(s, _)| s.kind.clone());
                if let Some(s) = sampler.end(&id, &kind, t) {
                    let fwd =
                        probes.finish(&probes.start("collector.publish", &s.id, poll_started));
                    out.send_with(
                        &topics.samples,
                        id.as_bytes(),
                        Some(&meterflow_avro::encode(&s)),
                        None,
                        &fwd.as_ref()
                            .map(meterflow_kafka::probe::as_refs)
                            .unwrap_or_default(),
                    )
                    .await?;
                    samples_total.inc();
                    published.push(s);
                }
                out.send_tombstone(
                    &topics.instances,
                    id.as_bytes(),
                    &[(meterflow_types::headers::DELETED_BY, cfg.node_id.as_bytes())],
                )
                .await?;
                reg.instances.remove(&id);
                reg.owners.remove(&id);
                deleted_total.inc();
                tracing::info!(instance = %id, "instance deleted: final sample and tombstone sent");
            }
        }
        out.flush().await?;
        // acknowledged: into the local log that queries read
        log.append(&published)?;
        log.prune(t)?;
        // the audit: what this poll sent to the samples topic
        for smp in &published {
            ledger.count(
                &topics.samples,
                "out",
                meterflow_kafka::audit::of_sample(&smp.view()),
            );
        }
        for (key, rec) in ledger.drain() {
            out.send(
                &topics.audit,
                key.as_bytes(),
                &meterflow_avro::encode(&rec),
                None,
            )
            .await?;
        }
        send_heartbeat(
            &mut out,
            &topics,
            partitions,
            &cfg,
            t,
            readings.len() as i32,
            false,
        )
        .await?;
        out.flush().await?;
        sampler.polled(t);
        sampler.save()?;
        polls_total.inc();
        last_poll.set(t);
        last_t = Some(t);
        k += 1;
    }
    let bounded_done = cfg.polls.is_some_and(|n| (polls_before + k) as u64 >= n);
    if cfg.retire_on_exit || bounded_done {
        let t = last_t.unwrap_or(start);
        send_heartbeat(&mut out, &topics, partitions, &cfg, t, 0, true).await?;
        out.flush().await?;
        tracing::info!(node = %cfg.node_id, polls = k, "node retired");
    }
    Ok(())
}

/// Answer the requests that arrived since the last look: read the sources now, take the
/// usage from the log, reply on each request's reply topic. A request that does not
/// decode goes to the dead-letter topic (every collector sends the same record: its id
/// derives from the request's coordinates); one past its deadline is skipped.
async fn serve_requests(
    tail: &meterflow_kafka::Tail,
    out: &mut Outbox,
    cfg: &CollectorConfig,
    sources: &Sources,
    log: &query::SampleLog,
    live_t: Millis,
) -> Result<u64> {
    let mut answered = 0;
    for r in tail.poll()? {
        let payload = r.payload.as_deref().unwrap_or_default();
        let req = match meterflow_avro::decode::<MeteringRequest>(payload) {
            Ok(req) => req,
            Err(e) => {
                let at = meterflow_kafka::Coordinates {
                    topic: &r.topic,
                    partition: r.partition,
                    offset: r.offset,
                    key: r.key.as_deref(),
                    payload,
                };
                let rec = meterflow_kafka::dlq_record(
                    &format!("collector-{}", cfg.node_id),
                    at,
                    e.reason_code(),
                    &e.to_string(),
                );
                out.send(
                    &cfg.kafka.topics.dlq,
                    rec.id.as_bytes(),
                    &meterflow_avro::encode(&rec),
                    None,
                )
                .await?;
                continue;
            }
        };
        if req.deadline < meterflow_kafka::now_ms() {
            tracing::info!(request = %req.id, "metering request past its deadline skipped");
            continue;
        }
        let (readings, errors) = sources.poll(live_t).await;
        let errors = errors
            .into_iter()
            .map(|e| format!("{}: {}", e.instance, e.reason))
            .collect();
        let reply = query::answer(
            &req,
            (&cfg.node_id, &cfg.site),
            live_t,
            &readings,
            errors,
            log,
        );
        out.send(
            &req.reply_topic,
            req.id.as_bytes(),
            &meterflow_avro::encode(&reply),
            None,
        )
        .await?;
        tracing::info!(request = %req.id, instances = reply.instances.len(), "metering request answered");
        answered += 1;
    }
    if answered > 0 || out.pending() > 0 {
        out.flush().await?;
    }
    Ok(answered)
}

/// Poll marker to every samples partition, and the node's row in the node table
/// (key `node/<id>` on the compacted instances topic).
async fn send_heartbeat(
    out: &mut Outbox,
    topics: &meterflow_kafka::Topics,
    partitions: i32,
    cfg: &CollectorConfig,
    t: Millis,
    instances: i32,
    retired: bool,
) -> Result<()> {
    let hb = NodeHeartbeat {
        node_id: cfg.node_id.clone(),
        site: cfg.site.clone(),
        version: VERSION.into(),
        time: t,
        instances,
        retired,
    };
    let bytes = meterflow_avro::encode(&hb);
    for p in 0..partitions {
        out.send(&topics.samples, cfg.node_id.as_bytes(), &bytes, Some(p))
            .await?;
    }
    out.send(
        &topics.instances,
        format!("node/{}", cfg.node_id).as_bytes(),
        &bytes,
        None,
    )
    .await
}

/// `meterflow collect --once --print`: observe every instance twice, `gap` apart, and
/// return one JSON object per instance: its id, state, owner fields and the interval
/// sample between the two observations (null for instances that are not running).
pub async fn poll_once_json(
    cfg: &CollectorConfig,
    gap: Duration,
) -> Result<Vec<serde_json::Value>> {
    let t0 = meterflow_kafka::now_ms();
    let sources = Sources::open(cfg, t0).context("opening sources")?;
    let gap_ms = gap.as_millis() as i64;
    let mut sampler = Sampler::new(&cfg.node_id, &cfg.site, gap_ms, gap_ms, None)?;
    let (first, _) = sources.poll(t0).await;
    for r in first.iter().filter(|r| r.is_running()) {
        let _ = sampler.observe(r, t0);
    }
    sampler.polled(t0);
    tokio::time::sleep(gap).await;
    let t1 = t0 + gap.as_millis() as i64;
    let (readings, errors) = sources.poll(t1).await;
    for e in errors {
        tracing::warn!(instance = %e.instance, reason = %e.reason, "instance skipped");
    }
    let mut out = Vec::new();
    for r in readings {
        let sample: Option<Sample> = if r.is_running() {
            sampler.observe(&r, t1).ok()
        } else {
            None
        };
        out.push(serde_json::json!({
            "instance_id": r.instance_id,
            "name": r.name,
            "kind": r.kind,
            "state": r.state,
            "node_id": cfg.node_id,
            "site": r.site.as_deref().unwrap_or(&cfg.site),
            "flavor": r.flavor,
            "owner": r.owner,
            "labels": r.labels,
            "vcpu_millis": r.vcpu_millis,
            "memory_alloc_bytes": r.memory_alloc_bytes,
            "memory_used_bytes": r.memory_used_bytes,
            "sample": sample,
        }));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_poll_at_stable_spread_phases_never_in_the_past() {
        let poll = 10_000;
        let phases: std::collections::BTreeSet<i64> = (0..50)
            .map(|i| poll_phase(&format!("node-{i}"), poll))
            .collect();
        assert!(phases.len() > 40, "spread: {phases:?}");
        assert!(phases.iter().all(|p| (0..poll).contains(p)));
        assert_eq!(poll_phase("node-7", poll), poll_phase("node-7", poll));
        for now in [0, 1, 9_999, 10_000, 1_763_800_000_123] {
            let t = next_phase_point(now, poll, "node-7");
            assert!(t >= now && t < now + poll, "{now} -> {t}");
            assert_eq!(t.rem_euclid(poll), poll_phase("node-7", poll));
        }
    }
}
