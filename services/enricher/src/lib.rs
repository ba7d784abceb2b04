//! The enricher: joins samples with instance state and temporal ownership (both
//! materialised from compacted topics) into usage records keyed by entity id.
//!
//! Exactness: usage ids derive from sample ids, so a replay re-emits identical records
//! that the rater drops. Offsets are committed only after the output is acknowledged
//! and never past a parked sample. After each commit the enricher broadcasts a
//! watermark for each of its samples partitions to every usage partition: "all usage
//! with interval_end ≤ T from that partition is written and committed", where T comes
//! from the nodes' poll markers read before the commit point.

pub mod join;

use anyhow::Result;
use join::Owners;
use meterflow_avro::{InstancesMsg, SamplesMsg};
use meterflow_kafka::{
    ensure_topics, partition_count, read_table, Coordinates, KafkaConfig, Message, StageIo,
    TableRecord,
};
use meterflow_runtime::{Ctx, HasHttp, HttpConfig};
use meterflow_types::watermark::NodeProgress;
use meterflow_types::{InstanceState, Millis, Ownership, Sample, Watermark};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EnricherConfig {
    pub kafka: KafkaConfig,
    pub http: HttpConfig,
    pub group: String,
    /// This replica's stable name within its group (default: the host name): its static
    /// group membership (`group.instance.id`, so a restart takes its partitions back
    /// without a rebalance) and its transactional id. Unique among running replicas.
    pub member: String,
    /// A node silent this long (event time) behind the others no longer holds the watermark.
    #[serde(with = "humantime_serde")]
    pub node_timeout: Duration,
    /// Usage with no known owner is parked this long (event time), then billed to `unallocated_entity`.
    #[serde(with = "humantime_serde")]
    pub unowned_deadline: Duration,
    pub unallocated_entity: String,
    /// Samples ending further than this ahead of the wall clock are dead-lettered.
    #[serde(with = "humantime_serde")]
    pub max_future: Duration,
    pub batch_size: usize,
    /// How often the ownership and instance tables are re-read when nothing is parked.
    #[serde(with = "humantime_serde")]
    pub table_refresh: Duration,
}

impl Default for EnricherConfig {
    fn default() -> EnricherConfig {
        EnricherConfig {
            kafka: KafkaConfig::default(),
            http: HttpConfig::default(),
            group: "meterflow-enricher".into(),
            member: meterflow_kafka::default_member(),
            node_timeout: Duration::from_secs(900),
            unowned_deadline: Duration::from_secs(3600),
            unallocated_entity: "unallocated".into(),
            max_future: Duration::from_secs(3600),
            batch_size: 5000,
            table_refresh: Duration::from_secs(2),
        }
    }
}

impl HasHttp for EnricherConfig {
    fn http(&self) -> &HttpConfig {
        &self.http
    }
}

/// Instance state, ownership history and the node table, from their compacted topics.
#[derive(Default)]
pub struct Tables {
    pub instances: HashMap<String, InstanceState>,
    pub owners: Owners,
    pub nodes: BTreeMap<String, (Millis, bool)>,
    offsets: HashMap<(String, i32), i64>,
    /// How many times the tables were read to the end.
    pub refreshes: u64,
    /// Records that could not be decoded since the last `take_bad`: (record, reason code, reason).
    bad: Vec<(TableRecord, &'static str, String)>,
}

impl Tables {
    /// Read everything new on the instances and ownership topics.
    pub fn refresh(&mut self, cfg: &KafkaConfig) -> Result<usize> {
        let t = &cfg.topics;
        let recs = tokio::task::block_in_place(|| {
            read_table(
                cfg,
                &[&t.instances, &t.ownership],
                &self.offsets,
                Duration::from_secs(60),
            )
        })?;
        let n = recs.len();
        self.refreshes += 1;
        for r in recs {
            self.offsets
                .insert((r.topic.clone(), r.partition), r.offset + 1);
            let Some(p) = &r.payload else { continue }; // tombstone
            if r.topic == t.ownership {
                match meterflow_avro::decode::<Ownership>(p) {
                    Ok(o) => self.owners.insert(o),
                    Err(e) => self.bad.push((r, e.reason_code(), e.to_string())),
                }
            } else {
                match meterflow_avro::decode_instances_msg(p) {
                    Ok(InstancesMsg::Instance(s)) => {
                        self.instances.insert(s.instance_id.clone(), s);
                    }
                    Ok(InstancesMsg::Node(h)) => {
                        self.nodes.insert(h.node_id, (h.time, h.retired));
                    }
                    Err(e) => self.bad.push((r, e.reason_code(), e.to_string())),
                }
            }
        }
        Ok(n)
    }

    /// Undecodable table records found by `refresh` since the last call.
    pub fn take_bad(&mut self) -> Vec<(TableRecord, &'static str, String)> {
        std::mem::take(&mut self.bad)
    }
}

struct Parked {
    offset: i64,
    sample: Sample,
    /// The partition's completeness just before this sample's offset.
    snapshot: Option<Millis>,
    /// `Tables::refreshes` when it was parked: the unowned deadline only counts once the
    /// tables were re-read after the sample arrived, so an owner published just before
    /// it is always seen, however fast event time runs.
    refreshes: u64,
}

#[derive(Default)]
struct PartState {
    progress: NodeProgress,
    parked: VecDeque<Parked>,
    position: Option<i64>,
    last_marker: Option<Millis>,
}

struct Counters {
    usage: meterflow_runtime::Counter,
    samples: meterflow_runtime::Counter,
    dlq: meterflow_runtime::Counter,
    unallocated: meterflow_runtime::Counter,
    parked: meterflow_runtime::Gauge,
    watermark: meterflow_runtime::Gauge,
}

pub async fn run(cfg: EnricherConfig, ctx: Ctx) -> Result<()> {
    ensure_topics(&cfg.kafka).await?;
    let topics = cfg.kafka.topics.clone();
    let usage_parts = partition_count(&cfg.kafka, &topics.usage)?;
    let sample_parts = partition_count(&cfg.kafka, &topics.samples)?;
    let mut tables = Tables::default();
    let n = tables.refresh(&cfg.kafka)?;
    tracing::info!(
        records = n,
        owners = tables.instances.len(),
        "tables read to the end"
    );
    let mut last_refresh = Instant::now();
    let mut io = StageIo::new(
        &cfg.kafka,
        "enricher",
        &cfg.group,
        &[&topics.samples],
        &cfg.member,
    )?;
    let m = &ctx.metrics;
    let c = Counters {
        usage: m.counter(
            "meterflow_enricher_usage_total",
            "Usage records emitted.",
            &[],
        ),
        samples: m.counter("meterflow_enricher_samples_total", "Samples consumed.", &[]),
        dlq: m.counter(
            "meterflow_dead_letters_total",
            "Messages sent to the dead-letter topic.",
            &[("stage", "enricher")],
        ),
        unallocated: m.counter(
            "meterflow_enricher_unallocated_total",
            "Usage records billed to the unallocated entity after the deadline.",
            &[],
        ),
        parked: m.gauge(
            "meterflow_enricher_parked",
            "Samples parked waiting for an owner.",
            &[],
        ),
        watermark: m.gauge(
            "meterflow_enricher_watermark_ms",
            "Lowest watermark emitted.",
            &[],
        ),
    };
    let timeout = cfg.node_timeout.as_millis() as i64;
    let deadline = cfg.unowned_deadline.as_millis() as i64;
    let mut parts: HashMap<i32, PartState> = HashMap::new();
    while !ctx.shutdown.is_cancelled() {
        let batch = io
            .next_batch(cfg.batch_size, Duration::from_millis(200), &ctx.shutdown)
            .await?;
        for r in batch.rebalances {
            match r {
                meterflow_kafka::Assignment::Revoked(ps) => {
                    for (_, p) in ps {
                        parts.remove(&p);
                    }
                }
                meterflow_kafka::Assignment::Assigned(ps) => {
                    for (_, p) in ps {
                        parts.entry(p).or_default();
                    }
                }
            }
        }
        let any_parked = parts.values().any(|s| !s.parked.is_empty());
        if any_parked || last_refresh.elapsed() >= cfg.table_refresh {
            tables.refresh(&cfg.kafka)?;
            last_refresh = Instant::now();
        }
        for (r, code, why) in tables.take_bad() {
            let at = Coordinates {
                topic: &r.topic,
                partition: r.partition,
                offset: r.offset,
                key: r.key.as_deref(),
                payload: r.payload.as_deref().unwrap_or_default(),
            };
            io.dead_letter_at(at, code, &why).await?;
            c.dlq.inc();
        }
        let now = meterflow_kafka::now_ms();
        for msg in &batch.messages {
            let p = msg.partition();
            let st = parts.entry(p).or_default();
            st.position = Some(msg.offset() + 1);
            let decoded = meterflow_avro::decode_samples_msg(msg.payload().unwrap_or_default());
            match decoded {
                Err(e) => {
                    io.dead_letter(msg, e.reason_code(), &e.to_string()).await?;
                    c.dlq.inc();
                }
                Ok(SamplesMsg::Heartbeat(h)) => st.progress.observe(&h.node_id, h.time, h.retired),
                Ok(SamplesMsg::Sample(s)) => {
                    c.samples.inc();
                    if let Err((code, why)) =
                        join::validate(&s, now, cfg.max_future.as_millis() as i64)
                    {
                        io.dead_letter(msg, code, &why).await?;
                        c.dlq.inc();
                        continue;
                    }
                    if s.interval_end == s.interval_start {
                        continue; // baseline observation: no usage
                    }
                    let earlier_parked = st
                        .parked
                        .iter()
                        .any(|q| q.sample.instance_id == s.instance_id);
                    if earlier_parked
                        || !emit(&mut io, &topics.usage, &tables, &s, None, &c).await?
                    {
                        let snapshot = st.progress.complete_through(timeout, &tables.nodes);
                        st.parked.push_back(Parked {
                            offset: msg.offset(),
                            sample: s,
                            snapshot,
                            refreshes: tables.refreshes,
                        });
                    }
                }
            }
        }
        // release parked samples whose owner arrived, or whose deadline passed
        let mut parked_total = 0;
        for st in parts.values_mut() {
            let complete = st.progress.complete_through(timeout, &tables.nodes);
            let mut keep = VecDeque::new();
            let mut blocked: Vec<String> = Vec::new();
            while let Some(pk) = st.parked.pop_front() {
                let inst = pk.sample.instance_id.clone();
                if !blocked.contains(&inst) {
                    if emit(&mut io, &topics.usage, &tables, &pk.sample, None, &c).await? {
                        continue;
                    }
                    if tables.refreshes > pk.refreshes
                        && complete.is_some_and(|t| t - pk.sample.interval_end > deadline)
                    {
                        emit(
                            &mut io,
                            &topics.usage,
                            &tables,
                            &pk.sample,
                            Some(&cfg.unallocated_entity),
                            &c,
                        )
                        .await?;
                        c.unallocated.inc();
                        continue;
                    }
                }
                blocked.push(inst);
                keep.push_back(pk);
            }
            st.parked = keep;
            parked_total += st.parked.len();
        }
        c.parked.set(parked_total as i64);
        // commit: never past a parked sample
        let offsets: Vec<(String, i32, i64)> = parts
            .iter()
            .filter_map(|(p, st)| {
                let o = st.parked.front().map(|pk| pk.offset).or(st.position)?;
                Some((topics.samples.clone(), *p, o))
            })
            .collect();
        io.commit(&offsets).await?;
        // then the watermarks, from markers read before the commit point
        let mut sent = false;
        let mut lowest: Option<Millis> = None;
        for (p, st) in parts.iter_mut() {
            let t = match st.parked.front() {
                Some(pk) => pk.snapshot,
                None => st.progress.complete_through(timeout, &tables.nodes),
            };
            let Some(t) = t else { continue };
            lowest = Some(lowest.map_or(t, |l: Millis| l.min(t)));
            if st.last_marker.is_some_and(|l| l >= t) {
                continue;
            }
            let w = Watermark {
                stage: "enricher".into(),
                source_partition: *p,
                source_partitions: sample_parts,
                time: t,
            };
            let bytes = meterflow_avro::encode(&w);
            for up in 0..usage_parts {
                io.send(&topics.usage, b"", &bytes, Some(up)).await?;
            }
            st.last_marker = Some(t);
            sent = true;
        }
        if let Some(l) = lowest {
            c.watermark.set(l);
        }
        if sent {
            io.commit(&[]).await?;
        }
    }
    Ok(())
}

/// Emit the usage of one sample; false if it has no owner yet. With `unallocated`,
/// bill it to that entity instead.
async fn emit(
    io: &mut StageIo,
    topic: &str,
    tables: &Tables,
    s: &Sample,
    unallocated: Option<&str>,
    c: &Counters,
) -> Result<bool> {
    let fallback;
    let segments = match unallocated {
        Some(entity) => {
            fallback = Ownership {
                instance_id: s.instance_id.clone(),
                user_id: "unknown".into(),
                entity_id: entity.into(),
                project: None,
                valid_from: s.interval_start,
                source: "unallocated".into(),
            };
            vec![(s.interval_start, s.interval_end, &fallback)]
        }
        None => match tables
            .owners
            .segments(&s.instance_id, s.interval_start, s.interval_end)
        {
            Some(v) => v,
            None => return Ok(false),
        },
    };
    for u in join::usage_for(s, &segments, tables.instances.get(&s.instance_id)) {
        io.send(
            topic,
            u.entity_id.as_bytes(),
            &meterflow_avro::encode(&u),
            None,
        )
        .await?;
        c.usage.inc();
    }
    Ok(true)
}
