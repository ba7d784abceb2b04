//! The enricher: joins samples with instance state and temporal ownership (both
//! materialised from compacted topics) into usage records keyed by entity id.
//!
//! Exactness: usage ids derive from sample ids, so a replay re-emits identical records
//! that the rater drops. Offsets are committed only after the output is acknowledged
//! and never past a parked sample. A sample whose owner or whose instance's registration
//! (labels, flavor: what rules may price by) has not been read yet is parked on the
//! parked topic until both are, or until its deadline (then billed to its owner without
//! the registration, or with no owner to the unallocated entity). After each commit the
//! enricher broadcasts a watermark for each of its samples partitions to every usage
//! partition: "all usage with interval_end ≤ T from that partition is written and
//! committed", where T comes from the nodes' poll markers read before the commit point.

pub mod join;

use anyhow::{Context, Result};
use join::Owners;
use meterflow_avro::{InstancesMsg, SamplesViewMsg};
use meterflow_kafka::probe::{Forward, Probes, Trace};
use meterflow_kafka::{
    ensure_topics, partition_count, Coordinates, KafkaConfig, Message, StageIo, TableRecord,
};
use meterflow_runtime::{Ctx, HasHttp, HttpConfig};
use meterflow_types::headers;
use meterflow_types::watermark::NodeProgress;
use meterflow_types::{
    FastMap, InstanceState, Millis, NodeHeartbeat, Ownership, Sample, SampleView, UsageView,
    Watermark,
};
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
    /// Usage with no known owner (or no registration of its instance) is parked this long
    /// (event time), then billed to `unallocated_entity` (or to its owner, without labels).
    #[serde(with = "humantime_serde")]
    pub unowned_deadline: Duration,
    pub unallocated_entity: String,
    /// Samples ending further than this ahead of the wall clock are dead-lettered.
    #[serde(with = "humantime_serde")]
    pub max_future: Duration,
    /// Samples starting further than this behind the wall clock are dead-lettered
    /// (`ancient_timestamp`): a zeroed or corrupted clock, not late data.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    pub batch_size: usize,
    /// How often the ownership and instance tables are re-read when nothing is parked.
    #[serde(with = "humantime_serde")]
    pub table_refresh: Duration,
    /// How long one read of the ownership and instance tables to their end may take. A
    /// read that takes longer is given up with a report of where each partition stood,
    /// and tried again (the enricher goes on with the tables it has; samples without an
    /// owner wait parked, their deadline counting only from a read that succeeds).
    #[serde(with = "humantime_serde")]
    pub table_read_timeout: Duration,
    /// How often progress is made durable: the usage acknowledged, the duplicate-detection
    /// checkpoint, then the offset commit it covers, then the watermarks sent.
    #[serde(with = "humantime_serde")]
    pub checkpoint_interval: Duration,
    /// Sooner than `checkpoint_interval`, but at most this often, progress is made
    /// durable when a poll marker moved a partition's completeness (so the watermark that
    /// closes a window follows its last poll within this, not within a second). Markers
    /// come once per node poll, so a paced fleet checkpoints no more often than its nodes
    /// poll.
    #[serde(with = "humantime_serde")]
    pub watermark_interval: Duration,
    /// An instance with nothing billed for this long (event time) is forgotten by
    /// duplicate detection; a copy of one of its samples arriving later would count again.
    #[serde(with = "humantime_serde")]
    pub dedup_retention: Duration,
    /// Fault injection, for tests of the audit: never set in production.
    pub faults: Faults,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Faults {
    /// Drop the nth usage record this process emits after counting it as sent (a record
    /// lost between the enricher and the rater).
    pub drop_usage: Option<u64>,
    /// The nth usage record this process emits is refused at delivery: never sent, and
    /// the next flush fails after the records sent with it were delivered (a broker
    /// refusing one write of many). The enricher stops with the error.
    pub refuse_usage: Option<u64>,
    /// The first n reads of the tables after start-up time out at once (a read given a
    /// deadline already past): the enricher must report each and try again, not stop.
    pub fail_table_reads: Option<u64>,
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
            max_age: Duration::from_secs(2 * 366 * 24 * 3600),
            batch_size: 5000,
            table_refresh: Duration::from_secs(2),
            table_read_timeout: Duration::from_secs(60),
            checkpoint_interval: Duration::from_secs(1),
            watermark_interval: Duration::from_millis(200),
            dedup_retention: Duration::from_secs(7 * 24 * 3600),
            faults: Faults::default(),
        }
    }
}

impl HasHttp for EnricherConfig {
    fn http(&self) -> &HttpConfig {
        &self.http
    }
}

/// How long a deleted instance's state is kept for samples still in flight (wall clock).
const DELETED_RETENTION: Duration = Duration::from_secs(3600);

/// Instance state, ownership history and the node table, from their compacted topics.
#[derive(Default)]
pub struct Tables {
    pub instances: FastMap<String, InstanceState>,
    /// Instances whose tombstone was read, and when: kept (samples may still be in
    /// flight) until `DELETED_RETENTION` has passed.
    deleted: HashMap<String, Instant>,
    pub owners: Owners,
    pub nodes: BTreeMap<String, (Millis, bool)>,
    offsets: HashMap<(String, i32), i64>,
    /// How many times the tables were read to the end.
    pub refreshes: u64,
    /// When the latest read to the end started: everything published before it is here.
    pub fresh_from: Option<Instant>,
    /// Records that could not be decoded since the last `take_bad`: (record, reason code, reason).
    bad: Vec<(TableRecord, &'static str, String)>,
}

impl Tables {
    /// Read everything new on the instances and ownership topics (at start-up; then
    /// `TableFeed` reads them on a thread of its own).
    pub fn refresh(&mut self, cfg: &KafkaConfig, timeout: Duration) -> Result<usize> {
        let read_from = Instant::now();
        let from = self.offsets.clone();
        let mut n = 0;
        // each record applied as it is read: the instances topic holds a registration per
        // instance every `registration_interval` (compacted only eventually, never on
        // Tansu), and holding all of them before applying any took memory in proportion
        // to the topic (560 MiB at two million records)
        tokio::task::block_in_place(|| {
            read_tables(cfg, &from, timeout, |r| {
                self.apply_one(&cfg.topics, r);
                n += 1;
            })
        })?;
        self.applied(read_from);
        Ok(n)
    }

    /// Take records read from the table topics by a read that started at `read_from`.
    pub fn apply(
        &mut self,
        t: &meterflow_kafka::Topics,
        recs: Vec<TableRecord>,
        read_from: Instant,
    ) -> usize {
        let n = recs.len();
        for r in recs {
            self.apply_one(t, r);
        }
        self.applied(read_from);
        n
    }

    fn apply_one(&mut self, t: &meterflow_kafka::Topics, r: TableRecord) {
        self.offsets
            .insert((r.topic.clone(), r.partition), r.offset + 1);
        let Some(p) = &r.payload else {
            if r.topic == t.instances {
                self.tombstone(&r);
            }
            return;
        };
        if r.topic == t.ownership {
            match meterflow_avro::decode::<Ownership>(p) {
                Ok(o) => self.owners.insert(o),
                Err(e) => self.bad.push((r, e.reason_code(), e.to_string())),
            }
        } else {
            match meterflow_avro::decode_instances_msg(p) {
                Ok(InstancesMsg::Instance(s)) => {
                    self.deleted.remove(&s.instance_id);
                    self.instances.insert(s.instance_id.clone(), s);
                }
                Ok(InstancesMsg::Node(h)) => {
                    self.nodes.insert(h.node_id, (h.time, h.retired));
                }
                Err(e) => self.bad.push((r, e.reason_code(), e.to_string())),
            }
        }
    }

    /// A read that started at `read_from` is applied whole.
    fn applied(&mut self, read_from: Instant) {
        self.refreshes += 1;
        self.fresh_from = Some(self.fresh_from.map_or(read_from, |f| f.max(read_from)));
        let deleted = &mut self.deleted;
        let instances = &mut self.instances;
        deleted.retain(|id, at| {
            let keep = at.elapsed() < DELETED_RETENTION;
            if !keep {
                instances.remove(id);
            }
            keep
        });
    }

    /// An instance tombstone. The collector that saw the instance go names itself in a
    /// header; if the latest registration is from another node, the instance migrated
    /// there and the tombstone is about the old place only.
    fn tombstone(&mut self, r: &TableRecord) {
        let Some(id) = r.key.as_deref().and_then(|k| std::str::from_utf8(k).ok()) else {
            return;
        };
        let by = r.header(meterflow_types::headers::DELETED_BY);
        let current = self.instances.get(id).map(|s| s.node_id.as_bytes());
        if current.is_some() && by.is_some() && current != by {
            return;
        }
        if current.is_some() {
            self.deleted.insert(id.to_string(), Instant::now());
        }
    }

    /// Live nodes silent for longer than `timeout` behind the most advanced one.
    pub fn missing_nodes(&self, timeout: Millis) -> Vec<(String, Millis)> {
        meterflow_types::watermark::missing_nodes(&self.nodes, timeout)
    }

    /// Undecodable table records found by `refresh` since the last call.
    pub fn take_bad(&mut self) -> Vec<(TableRecord, &'static str, String)> {
        std::mem::take(&mut self.bad)
    }
}

/// Everything new on the instances and ownership topics after `from`, each record handed
/// to `each` as it is read.
fn read_tables(
    cfg: &KafkaConfig,
    from: &HashMap<(String, i32), i64>,
    timeout: Duration,
    each: impl FnMut(TableRecord),
) -> Result<()> {
    let t = &cfg.topics;
    meterflow_kafka::read_table_each(cfg, &[&t.instances, &t.ownership], from, timeout, each)
}

/// The wait before reading the tables again after `failures` reads in a row failed:
/// half a second, doubling, at most ten.
fn table_retry_wait(failures: u32) -> Duration {
    Duration::from_millis(500)
        .saturating_mul(1 << failures.saturating_sub(1).min(5))
        .min(Duration::from_secs(10))
}

/// What the enricher does while a failed read of the tables waits to be tried again.
const REFRESH_FAILED: &str = "going on with the tables as they are";
const START_UP_FAILED: &str = "at start-up: no sample is joined before they are read; trying again";

/// Count and report a failed read of the tables (`then`: what the enricher does
/// meanwhile); returns how long to wait before the next.
fn table_read_failed(
    e: &anyhow::Error,
    failed_in_a_row: &mut u32,
    failures: &meterflow_runtime::Counter,
    then: &str,
) -> Duration {
    *failed_in_a_row += 1;
    failures.inc();
    let wait = table_retry_wait(*failed_in_a_row);
    tracing::warn!(
        error = format!("{e:#}"),
        failed_in_a_row = *failed_in_a_row,
        retry_in = ?wait,
        "reading the ownership and instance tables failed; {then}"
    );
    wait
}

/// Sleep `d` in short steps, returning early once `stop` says so.
fn sleep_unless(stop: &std::sync::atomic::AtomicBool, d: Duration) {
    let until = Instant::now() + d;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// One read of the table topics to their end: the records, and when the read started.
type TableRead = (Vec<TableRecord>, Instant);

/// How the table reads go: the read's deadline, and what a failure costs.
struct FeedSettings {
    every: Duration,
    timeout: Duration,
    /// `faults.fail_table_reads`
    fail_first: u64,
    failures: meterflow_runtime::Counter,
}

/// Reads the instance and ownership topics to their end over and over on a thread of its
/// own — every `table_refresh`, or back to back while `urgent` (samples are parked,
/// waiting for an owner) — so the main loop never waits for a read (a read to the end
/// takes a few hundred milliseconds: a quarter of the enricher's time when it blocked).
/// A read that fails (its deadline passed: a broker slow or away) is reported and tried
/// again, never the end of the enricher: until one succeeds the enricher works with the
/// tables it has, and a parked sample's deadline does not count (see `Parked::parked_at`).
struct TableFeed {
    rx: std::sync::mpsc::Receiver<TableRead>,
    urgent: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl TableFeed {
    fn start(
        cfg: &KafkaConfig,
        from: HashMap<(String, i32), i64>,
        settings: FeedSettings,
    ) -> TableFeed {
        use std::sync::atomic::{AtomicBool, Ordering};
        let (tx, rx) = std::sync::mpsc::channel();
        let urgent = std::sync::Arc::new(AtomicBool::new(false));
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let (cfg, u, st) = (cfg.clone(), urgent.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut offsets = from;
            let (mut reads, mut failed_in_a_row) = (0u64, 0u32);
            while !st.load(Ordering::Relaxed) {
                let started = Instant::now();
                reads += 1;
                let timeout = if reads <= settings.fail_first {
                    Duration::ZERO // fault injection: the deadline has passed
                } else {
                    settings.timeout
                };
                let mut recs = Vec::new();
                if let Err(e) = read_tables(&cfg, &offsets, timeout, |r| recs.push(r)) {
                    // what was read is dropped: the next read starts where this one did
                    let wait = table_read_failed(
                        &e,
                        &mut failed_in_a_row,
                        &settings.failures,
                        REFRESH_FAILED,
                    );
                    sleep_unless(&st, wait);
                    continue;
                }
                if failed_in_a_row > 0 {
                    tracing::info!(
                        after_failures = failed_in_a_row,
                        "the ownership and instance tables read to the end again"
                    );
                    failed_in_a_row = 0;
                }
                for r in &recs {
                    offsets.insert((r.topic.clone(), r.partition), r.offset + 1);
                }
                if tx.send((recs, started)).is_err() {
                    return; // the enricher is gone
                }
                while !st.load(Ordering::Relaxed)
                    && !u.load(Ordering::Relaxed)
                    && started.elapsed() < settings.every
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        });
        TableFeed { rx, urgent, stop }
    }

    /// Apply every read that finished since the last call; `urgent` asks for the next
    /// read at once.
    fn take(
        &self,
        tables: &mut Tables,
        topics: &meterflow_kafka::Topics,
        urgent: bool,
    ) -> Result<()> {
        self.urgent
            .store(urgent, std::sync::atomic::Ordering::Relaxed);
        loop {
            match self.rx.try_recv() {
                Ok((recs, started)) => {
                    tables.apply(topics, recs, started);
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => return Ok(()),
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    anyhow::bail!("the table reader stopped")
                }
            }
        }
    }
}

impl Drop for TableFeed {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

struct Parked {
    offset: i64,
    sample: Sample,
    /// The partition's completeness just before this sample's offset.
    snapshot: Option<Millis>,
    /// When it was parked: the unowned deadline only counts once a read of the tables
    /// that started after this has been applied, so an owner published just before the
    /// sample arrived is always seen, however fast event time runs.
    parked_at: Instant,
    /// What the join misses: its owner, or its instance's registration.
    waits_for: Missing,
    /// Its probe trail (the `enricher.join` point), forwarded when it is billed.
    trace: Trace,
}

#[derive(Default)]
struct PartState {
    /// Last billed sample per instance incarnation (duplicate detection).
    seen: join::Seen,
    /// `seen` changed since the last checkpoint.
    dirty: bool,
    /// Latest interval end billed (event time), for pruning `seen`.
    latest_end: Millis,
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
    duplicates: meterflow_runtime::Counter,
    parked: meterflow_runtime::Gauge,
    watermark: meterflow_runtime::Gauge,
    missing: meterflow_runtime::Gauge,
    /// `faults.drop_usage`: the nth usage record this process emits is dropped.
    drop_usage: Option<u64>,
    /// `faults.refuse_usage`: the nth usage record this process emits is refused.
    refuse_usage: Option<u64>,
}

pub async fn run(cfg: EnricherConfig, ctx: Ctx) -> Result<()> {
    if !meterflow_kafka::await_brokers(&cfg.kafka, &ctx.shutdown).await? {
        return Ok(()); // stopped before the broker answered
    }
    ensure_topics(&cfg.kafka).await?;
    let topics = cfg.kafka.topics.clone();
    let usage_parts = partition_count(&cfg.kafka, &topics.usage)?;
    let sample_parts = partition_count(&cfg.kafka, &topics.samples)?;
    // Join the group before reading the tables: librdkafka heartbeats while the
    // assignment waits for the first poll, so a restarted static member is back in its
    // group within moments however long the tables take (`kafka.session_timeout`).
    let mut io = StageIo::new(
        &cfg.kafka,
        "enricher",
        &cfg.group,
        &[&topics.samples],
        &cfg.member,
    )?;
    let mut tables = Tables::default();
    let read_failures = ctx.metrics.counter(
        "meterflow_enricher_table_read_failures_total",
        "Reads of the ownership and instance tables that failed (and were tried again).",
        &[],
    );
    // the first read is waited for (no sample is joined without it), and tried again
    // until it succeeds (each try continues where the last stopped): a broker slow at
    // start-up is no reason to stop
    let mut failed_in_a_row = 0u32;
    let n = loop {
        match tables.refresh(&cfg.kafka, cfg.table_read_timeout) {
            Ok(n) => break n,
            Err(e) => {
                let wait =
                    table_read_failed(&e, &mut failed_in_a_row, &read_failures, START_UP_FAILED);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = ctx.shutdown.cancelled() => return Ok(()),
                }
            }
        }
    };
    tracing::info!(
        records = n,
        instances = tables.instances.len(),
        owners = tables.owners.len(),
        "tables read to the end"
    );
    let feed = TableFeed::start(
        &cfg.kafka,
        tables.offsets.clone(),
        FeedSettings {
            every: cfg.table_refresh,
            timeout: cfg.table_read_timeout,
            fail_first: cfg.faults.fail_table_reads.unwrap_or(0),
            failures: read_failures,
        },
    );
    let mut probes = Probes::new(&cfg.kafka, "enricher", &cfg.member, ctx.metrics.clone())?
        .with_ends(io.partition_ends());
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
        duplicates: m.counter(
            "meterflow_enricher_duplicate_samples_total",
            "Samples dropped because the same sample was already billed.",
            &[],
        ),
        parked: m.gauge(
            "meterflow_enricher_parked",
            "Samples parked waiting for an owner or their instance's registration.",
            &[],
        ),
        watermark: m.gauge(
            "meterflow_enricher_watermark_ms",
            "Lowest watermark emitted.",
            &[],
        ),
        missing: m.gauge(
            "meterflow_enricher_missing_nodes",
            "Live nodes silent longer than node_timeout (no longer holding the watermark).",
            &[],
        ),
        drop_usage: cfg.faults.drop_usage,
        refuse_usage: cfg.faults.refuse_usage,
    };
    let mut missing_reported: BTreeMap<String, Millis> = BTreeMap::new();
    let timeout = cfg.node_timeout.as_millis() as i64;
    let deadline = cfg.unowned_deadline.as_millis() as i64;
    let mut parts: FastMap<i32, PartState> = FastMap::default();
    // Samples parked by earlier runs (or other members), cleared when billed, and the
    // duplicate-detection checkpoints: both read on every assignment (the first batch
    // brings one), never before the first poll. A restarted static member must reach its
    // first heartbeat quickly (see `kafka.session_timeout`).
    let mut parked_before: std::collections::HashSet<String> = Default::default();
    let mut checkpoints: HashMap<i32, join::Seen> = HashMap::new();
    let mut last_commit = Instant::now();
    // input taken since progress was last made durable
    let mut uncommitted = false;
    // a full batch taken since then (so input is uncommitted): working off a backlog
    let mut backlog = false;
    while !ctx.shutdown.is_cancelled() {
        // with progress not yet durable, wait for input no longer than until it is due
        // (so the last of a backlog is committed on time, not a whole wait later)
        let mut wait = Duration::from_millis(200);
        if uncommitted {
            let interval = if progressed(&parts, timeout, &tables.nodes) {
                cfg.watermark_interval
            } else {
                cfg.checkpoint_interval
            };
            wait = wait.min(interval.saturating_sub(last_commit.elapsed()));
        }
        let batch = io.next_batch(cfg.batch_size, wait, &ctx.shutdown).await?;
        probes.refresh();
        let rebalanced = !batch.rebalances.is_empty();
        if rebalanced {
            // both read to their end, side by side
            let (parked, seen) = tokio::task::block_in_place(|| {
                std::thread::scope(|sc| {
                    let parked = sc.spawn(|| read_parked(&cfg.kafka));
                    let seen = load_seen(&cfg.kafka);
                    (parked.join(), seen)
                })
            });
            parked_before =
                parked.map_err(|_| anyhow::anyhow!("reading parked samples panicked"))??;
            checkpoints = seen?;
        }
        for r in batch.rebalances {
            match r {
                meterflow_kafka::Assignment::Revoked(ps) => {
                    for (_, p) in ps {
                        parts.remove(&p);
                    }
                }
                meterflow_kafka::Assignment::Assigned(ps) => {
                    for (_, p) in ps {
                        parts.entry(p).or_insert_with(|| {
                            let seen = checkpoints.remove(&p).unwrap_or_default();
                            PartState {
                                seen,
                                ..Default::default()
                            }
                        });
                    }
                }
            }
        }
        let any_parked = parts.values().any(|s| !s.parked.is_empty());
        feed.take(&mut tables, &topics, any_parked)?;
        let missing: BTreeMap<String, Millis> = tables.missing_nodes(timeout).into_iter().collect();
        if missing != missing_reported {
            for (node, last) in &missing {
                if !missing_reported.contains_key(node) {
                    tracing::warn!(node = %node, last_heartbeat_ms = last, timeout_ms = timeout, "node missing: silent longer than node_timeout, no longer waited for");
                }
            }
            for node in missing_reported.keys() {
                if !missing.contains_key(node) {
                    tracing::info!(node = %node, "node reporting again");
                }
            }
            c.missing.set(missing.len() as i64);
            missing_reported = missing;
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
        let limits = Limits {
            now: meterflow_kafka::now_ms(),
            max_future: cfg.max_future.as_millis() as i64,
            max_age: cfg.max_age.as_millis() as i64,
        };
        let mut prepared = prepare_batch(&batch.messages, &tables, &limits);
        // taken by reference: a prepared sample is a few hundred bytes, and moving each
        // out of the vector was a copy per message (memmove, BENCHMARKS.md)
        for (msg, prepared) in batch.messages.iter().zip(prepared.iter_mut()) {
            let p = msg.partition();
            let st = parts.entry(p).or_default();
            st.position = Some(msg.offset() + 1);
            match prepared {
                Prepared::Undecodable(e) => {
                    io.dead_letter(msg, e.reason_code(), &e.to_string()).await?;
                    c.dlq.inc();
                }
                Prepared::Heartbeat(h) => st.progress.observe(&h.node_id, h.time, h.retired),
                Prepared::Sample(s, verdict) => {
                    let s: &SampleView<'_> = s;
                    let verdict = std::mem::replace(verdict, Verdict::Nothing);
                    let trace = probes.begin("enricher.join", msg);
                    c.samples.inc();
                    io.audit(&topics.samples, "in", meterflow_kafka::audit::of_sample(s));
                    let joined = match verdict {
                        Verdict::Invalid(code, why) => {
                            io.dead_letter(msg, code, &why).await?;
                            c.dlq.inc();
                            continue;
                        }
                        // a baseline, or a final sample with nothing measured
                        Verdict::Nothing => continue,
                        Verdict::Joined(j) => j,
                    };
                    if st.seen.is_duplicate(s) || st.parked.iter().any(|q| q.sample.id == s.id) {
                        c.duplicates.inc();
                        io.audit(&topics.samples, "dup", meterflow_kafka::audit::of_sample(s));
                        continue;
                    }
                    let earlier_parked = st
                        .parked
                        .iter()
                        .find(|q| q.sample.instance_id == s.instance_id)
                        .map(|q| q.waits_for);
                    let fwd = if earlier_parked.is_some() {
                        None
                    } else {
                        probes.finish(&trace)
                    };
                    // an earlier sample of the instance waits: this one waits behind it
                    // (for the same thing)
                    let waits = if let Some(q) = earlier_parked {
                        Err(q)
                    } else {
                        send_usage(&mut io, &topics.usage, joined, &c, fwd.as_ref()).await?
                    };
                    let emitted = waits.is_ok();
                    if emitted {
                        st.seen.record(s);
                        st.latest_end = st.latest_end.max(s.interval_end);
                        st.dirty = true;
                    }
                    if emitted && !parked_before.is_empty() && parked_before.remove(s.id) {
                        // parked by an earlier run, billed now: clear its record
                        release(&mut io, &topics.parked, s.id, "owner").await?;
                    }
                    if let Err(waits_for) = waits {
                        let snapshot = st.progress.complete_through(timeout, &tables.nodes);
                        let parked_at = meterflow_kafka::now_ms().to_string();
                        io.send_with(
                            &topics.parked,
                            s.id.as_bytes(),
                            msg.payload(),
                            None,
                            &[
                                (headers::PARKED_BY, cfg.member.as_bytes()),
                                (headers::PARKED_AT, parked_at.as_bytes()),
                                (headers::PARKED_FOR, waits_for.as_str().as_bytes()),
                            ],
                        )
                        .await?;
                        st.parked.push_back(Parked {
                            offset: msg.offset(),
                            sample: s.to_sample(),
                            snapshot,
                            parked_at: Instant::now(),
                            waits_for,
                            trace,
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
                    let fwd = probes.finish(&pk.trace);
                    // the deadline only counts once a read of the tables that started
                    // after it was parked has been applied
                    let deadline_passed = tables.fresh_from.is_some_and(|f| f > pk.parked_at)
                        && complete.is_some_and(|t| t - pk.sample.interval_end > deadline);
                    let joined = join_sample(
                        &tables,
                        &pk.sample.view(),
                        deadline_passed.then_some(cfg.unallocated_entity.as_str()),
                    );
                    let billed =
                        send_usage(&mut io, &topics.usage, joined, &c, fwd.as_ref()).await?;
                    if let Ok(billed) = billed {
                        let to = match billed {
                            Billed::Joined => "owner",
                            Billed::OwnerOnly => {
                                tracing::warn!(instance = %pk.sample.instance_id, sample = %pk.sample.id, "instance never registered: usage billed to its owner without labels or flavor");
                                "owner"
                            }
                            Billed::Unallocated => {
                                c.unallocated.inc();
                                cfg.unallocated_entity.as_str()
                            }
                        };
                        release(&mut io, &topics.parked, &pk.sample.id, to).await?;
                        st.seen.record(&pk.sample.view());
                        st.latest_end = st.latest_end.max(pk.sample.interval_end);
                        st.dirty = true;
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
        // Durable progress, every checkpoint_interval (sooner for a moved watermark or a
        // worked-off backlog): the usage produced so far acknowledged, then the
        // duplicate-detection checkpoint of each changed partition, then the offsets it
        // covers (never past a parked sample), then the watermarks.
        uncommitted |= !batch.messages.is_empty();
        let full = batch.messages.len() >= cfg.batch_size;
        backlog |= full;
        // A short batch after full ones: the backlog is worked off. Its progress is made
        // durable now, not up to an interval later (the watermarks it moved follow it, and
        // a stage catching up is done when its commit says so).
        let caught_up = backlog && !full;
        let due = rebalanced
            || caught_up
            || ctx.shutdown.is_cancelled()
            || last_commit.elapsed() >= cfg.checkpoint_interval
            || (last_commit.elapsed() >= cfg.watermark_interval
                && progressed(&parts, timeout, &tables.nodes));
        if !due {
            continue;
        }
        uncommitted = false;
        backlog = false;
        last_commit = Instant::now();
        // A checkpoint names samples as billed: it must never be durable before their
        // usage is. Sent in one flush, the checkpoint could land while a usage batch for
        // another partition did not, and a SIGKILL then lost that usage for good (the
        // replay dropped its samples as duplicates; the 1M chaos run found it).
        io.commit(&[])
            .await
            .context("acknowledging usage before its checkpoint")?;
        let retention = cfg.dedup_retention.as_millis() as i64;
        for (p, st) in parts.iter_mut().filter(|(_, st)| st.dirty) {
            st.seen.prune(st.latest_end - retention);
            let cp = meterflow_types::EnricherCheckpoint {
                partition: *p,
                seen: st.seen.to_checkpoint(),
            };
            io.send(
                &topics.enricher_state,
                format!("enricher|{p}").as_bytes(),
                &meterflow_avro::encode(&cp),
                None,
            )
            .await?;
            st.dirty = false;
        }
        let offsets: Vec<(String, i32, i64)> = parts
            .iter()
            .filter_map(|(p, st)| {
                let o = st.parked.front().map(|pk| pk.offset).or(st.position)?;
                Some((topics.samples.clone(), *p, o))
            })
            .collect();
        io.commit(&offsets).await?;
        // then the watermarks, from markers read before the commit point: acknowledged by
        // the next commit's first flush (a lost one is sent again from the same markers
        // after a restart), so they cost no wait of their own — except at shutdown
        let mut sent = false;
        let mut lowest: Option<Millis> = None;
        for (p, st) in parts.iter_mut() {
            let Some(t) = complete(st, timeout, &tables.nodes) else {
                continue;
            };
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
        if sent && ctx.shutdown.is_cancelled() {
            io.commit(&[]).await?;
        }
    }
    Ok(())
}

/// What the main loop judges a sample by: the wall clock and the configured bounds.
struct Limits {
    now: Millis,
    max_future: Millis,
    max_age: Millis,
}

/// A samples message as the batch's threads leave it for the main loop: a sample is a
/// view of its message (the batch outlives it; one is copied only when it is parked).
// Nearly every message is the large variant: boxing it would allocate once a message
// on the hot path to save space in a batch's one vector.
#[allow(clippy::large_enum_variant)]
enum Prepared<'a> {
    Undecodable(meterflow_avro::DecodeError),
    Heartbeat(NodeHeartbeat),
    Sample(SampleView<'a>, Verdict),
}

/// What a sample comes to, judged alone: everything that does not depend on the samples
/// before it (duplicates and parked samples are the main loop's, in order).
enum Verdict {
    /// Not billable: dead-lettered with this reason code and reason.
    Invalid(&'static str, String),
    /// Nothing measured: a baseline, or a final sample with nothing in it.
    Nothing,
    /// Joined against the tables as they are for the whole batch (the main loop changes
    /// them only between batches).
    Joined(Joined),
}

fn prepare<'a>(m: &'a meterflow_kafka::OwnedMessage, tables: &Tables, l: &Limits) -> Prepared<'a> {
    let s = match meterflow_avro::decode_samples_view(m.payload().unwrap_or_default()) {
        Err(e) => return Prepared::Undecodable(e),
        Ok(SamplesViewMsg::Heartbeat(h)) => return Prepared::Heartbeat(h),
        Ok(SamplesViewMsg::Sample(s)) => s,
    };
    let verdict = if let Err((code, why)) = join::validate(&s, l.now, l.max_future, l.max_age) {
        Verdict::Invalid(code, why)
    } else if join::carries_nothing(&s) {
        Verdict::Nothing
    } else {
        Verdict::Joined(join_sample(tables, &s, None))
    };
    Prepared::Sample(s, verdict)
}

/// Every message of a batch decoded, validated and joined, in order; a large batch's
/// second half on a thread of its own. All of it is pure and was most of the main loop's
/// time; what follows depends on the order (duplicates, parked samples, sends).
fn prepare_batch<'a>(
    messages: &'a [meterflow_kafka::OwnedMessage],
    tables: &Tables,
    limits: &Limits,
) -> Vec<Prepared<'a>> {
    // nothing here panics on input (the decoders are fuzzed, the join is checked by the
    // hostile corpus); were it to, as on the main loop: the main loop's panic
    meterflow_runtime::map_in_halves(messages, |m| prepare(m, tables, limits))
}

/// How far a samples partition is complete: every node's marker, held back by the
/// oldest parked sample's snapshot.
fn complete(
    st: &PartState,
    timeout: Millis,
    nodes: &BTreeMap<String, (Millis, bool)>,
) -> Option<Millis> {
    match st.parked.front() {
        Some(pk) => pk.snapshot,
        None => st.progress.complete_through(timeout, nodes),
    }
}

/// Whether a poll marker moved some partition's completeness past its last watermark.
fn progressed(
    parts: &FastMap<i32, PartState>,
    timeout: Millis,
    nodes: &BTreeMap<String, (Millis, bool)>,
) -> bool {
    parts.values().any(|st| {
        complete(st, timeout, nodes).is_some_and(|t| st.last_marker.is_none_or(|l| t > l))
    })
}

/// The latest duplicate-detection checkpoint of every samples partition.
fn load_seen(cfg: &KafkaConfig) -> Result<HashMap<i32, join::Seen>> {
    let mut out = HashMap::new();
    for (_, r) in meterflow_kafka::read_latest(cfg, &cfg.topics.enricher_state)? {
        let p = r.payload.unwrap_or_default();
        match meterflow_avro::decode::<meterflow_types::EnricherCheckpoint>(&p) {
            Ok(cp) => {
                out.insert(cp.partition, join::Seen::from_checkpoint(cp.seen));
            }
            Err(e) => {
                tracing::warn!(offset = r.offset, error = %e, "undecodable enricher checkpoint skipped")
            }
        }
    }
    Ok(out)
}

/// Sample ids with a live record on the parked topic.
fn read_parked(cfg: &KafkaConfig) -> Result<std::collections::HashSet<String>> {
    Ok(meterflow_kafka::read_latest(cfg, &cfg.topics.parked)?
        .into_iter()
        .filter_map(|(k, _)| String::from_utf8(k).ok())
        .collect())
}

/// Tombstone of a parked sample's record: it was billed (to its owner, or to `to`).
async fn release(io: &mut StageIo, topic: &str, sample_id: &str, to: &str) -> Result<()> {
    io.send_with(
        topic,
        sample_id.as_bytes(),
        None,
        None,
        &[(headers::RELEASED_TO, to.as_bytes())],
    )
    .await
}

/// What a parked sample waits for: the join needs both its owner and its instance's
/// registration (labels and flavor, which rules may price by).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Missing {
    Owner,
    Instance,
}

impl Missing {
    fn as_str(self) -> &'static str {
        match self {
            Missing::Owner => "owner",
            Missing::Instance => "instance",
        }
    }
}

/// Where the usage of a sample went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Billed {
    /// Joined with its owner and its instance's registration.
    Joined,
    /// Past its deadline: to its owner without the registration (never read).
    OwnerOnly,
    /// Past its deadline with no owner: to the unallocated entity.
    Unallocated,
}

/// A usage record ready to send: its key (the entity id) and its Avro bytes in one
/// buffer, and what the audit counts of it.
struct Encoded {
    buf: Vec<u8>,
    key_len: usize,
    at: (Millis, meterflow_types::Dec),
}

impl Encoded {
    fn of(u: &UsageView<'_>) -> Encoded {
        let mut buf = Vec::with_capacity(u.entity_id.len() + 320);
        buf.extend_from_slice(u.entity_id.as_bytes());
        meterflow_avro::encode_usage_into(u, &mut buf);
        Encoded {
            buf,
            key_len: u.entity_id.len(),
            at: meterflow_kafka::audit::of_usage_view(u),
        }
    }
}

/// A sample's join: where its usage goes and that usage encoded, or what it misses.
/// (One record nearly always: kept inline, not allocated.)
type Joined = std::result::Result<(Billed, smallvec::SmallVec<[Encoded; 1]>), Missing>;

/// Join one sample (pure: the batch's threads run it against the tables as they are at
/// the batch's start): `Err(what)` if the join still misses its owner or its instance's
/// registration. With `deadline_passed`, what is known instead: its owner without labels
/// and flavor, or, with no owner, the unallocated entity `deadline_passed` names.
fn join_sample(tables: &Tables, s: &SampleView<'_>, deadline_passed: Option<&str>) -> Joined {
    let fallback;
    let state = tables.instances.get(s.instance_id);
    let owned = tables
        .owners
        .segments(s.instance_id, s.interval_start, s.interval_end);
    let (segments, billed) = match (owned, deadline_passed) {
        (Some(v), _) if state.is_some() => (v, Billed::Joined),
        (Some(v), Some(_)) => (v, Billed::OwnerOnly),
        (None, Some(entity)) => {
            fallback = Ownership {
                instance_id: s.instance_id.to_string(),
                user_id: "unknown".into(),
                entity_id: entity.into(),
                project: None,
                valid_from: s.interval_start,
                source: "unallocated".into(),
            };
            (
                smallvec::smallvec![(s.interval_start, s.interval_end, &fallback)],
                Billed::Unallocated,
            )
        }
        (Some(_), None) => return Err(Missing::Instance),
        (None, None) => return Err(Missing::Owner),
    };
    let usage = join::usage_views(s, &segments, state);
    Ok((billed, usage.iter().map(Encoded::of).collect()))
}

/// Send a joined sample's usage (in order, after its probe headers); returns where it went.
async fn send_usage(
    io: &mut StageIo,
    topic: &str,
    joined: Joined,
    c: &Counters,
    fwd: Option<&Forward>,
) -> Result<std::result::Result<Billed, Missing>> {
    let (billed, usage) = match joined {
        Ok(j) => j,
        Err(m) => return Ok(Err(m)),
    };
    let headers = fwd.map(meterflow_kafka::probe::as_refs).unwrap_or_default();
    for u in usage {
        io.audit(topic, "out", u.at);
        let (key, payload) = u.buf.split_at(u.key_len);
        if c.drop_usage == Some(c.usage.get() + 1) {
            // fault injection (tests): counted as sent, never sent
            tracing::warn!(usage = c.usage.get() + 1, entity = %String::from_utf8_lossy(key), "fault injection: usage record dropped");
            c.usage.inc();
            continue;
        }
        if c.refuse_usage == Some(c.usage.get() + 1) {
            // fault injection (tests): refused by the "broker" at the next flush
            let n = c.usage.get() + 1;
            tracing::warn!(usage = n, "fault injection: usage record refused");
            io.refuse_next_flush(format!("usage record #{n} refused (fault injection)"));
            c.usage.inc();
            continue;
        }
        io.send_with(topic, key, Some(payload), None, &headers)
            .await?;
        c.usage.inc();
    }
    Ok(Ok(billed))
}
