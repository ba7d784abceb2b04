//! The settler: deduplicates revenue events by id and, when the rater's markers show a
//! billing period complete, writes per-entity settlement files (see `files`). The
//! settlement directory is its durable state: a replay after a crash finds the periods
//! already written and skips the events they hold; events that arrive for a period
//! already written become a correction version holding only the delta.

pub mod files;
pub mod index;
pub mod store;

use anyhow::Result;
use meterflow_avro::RatedMsg;
use meterflow_kafka::{ensure_topics, partition_count, KafkaConfig, Message, StageIo};
use meterflow_runtime::{Ctx, HasHttp, HttpConfig};
use meterflow_types::watermark::SourceTimes;
use meterflow_types::window::Period;
use meterflow_types::Settlement;
use meterflow_types::{FastMap, FastSet};
use meterflow_types::{Millis, RatedEvent};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;
use store::Store;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SettlerConfig {
    pub kafka: KafkaConfig,
    pub http: HttpConfig,
    pub group: String,
    /// This replica's stable name within its group (default: the host name): its static
    /// group membership (`group.instance.id`, so a restart takes its partitions back
    /// without a rebalance) and its transactional id. Unique among running replicas.
    pub member: String,
    /// Where settlement files go: a directory, `file:///path`, or `s3://bucket/prefix`
    /// (S3-compatible object storage, configured from the `AWS_*` environment and
    /// `storage_options`).
    pub out_dir: String,
    /// Options for `out_dir`. S3: `aws_endpoint`, `aws_region`, `aws_allow_http`,
    /// `aws_access_key_id`, `aws_secret_access_key`, ... A directory: `sync`, `each`
    /// (fsync every file and directory written, the default) or `filesystem` (Linux: one
    /// `syncfs` a phase of a batch, for a directory on a filesystem of its own; see
    /// `store::LocalSync`).
    pub storage_options: BTreeMap<String, String>,
    /// `month`, `week` or `day` (calendar, UTC unless a time zone is named:
    /// `month@Europe/Berlin`), or a fixed duration such as `6h`. The rater's
    /// `billing_period` must match.
    pub period: String,
    /// A period closes for an entity when the completeness watermark passes its end plus
    /// this much (event time): late usage inside it lands in the first version.
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
    /// If the period is still not complete this long (wall clock) after its end plus the
    /// grace, write what there is, marked `incomplete` with the reason; a later version
    /// completes it. None: wait for completeness, however long.
    #[serde(with = "humantime_serde")]
    pub deadline: Option<Duration>,
    pub batch_size: usize,
    /// Also write each file set's lines as FOCUS (`focus.csv`, FinOps Open Cost and Usage
    /// Specification columns), listed and checksummed in the manifest.
    pub focus: bool,
    /// Fault injection, for tests of crash recovery: never set in production.
    pub faults: Faults,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Faults {
    /// Once this process has written this many versions (file sets and corrections),
    /// stop with an error at the end of that batch's writes: files durable, offsets not
    /// committed. A dynamic member then leaves its group at once, as a crashed member
    /// does when its session expires (which Tansu 0.6 never does).
    pub stop_after_versions: Option<u64>,
}

impl Default for SettlerConfig {
    fn default() -> SettlerConfig {
        SettlerConfig {
            kafka: KafkaConfig::default(),
            http: HttpConfig::default(),
            group: "meterflow-settler".into(),
            member: meterflow_kafka::default_member(),
            out_dir: "settlements".into(),
            storage_options: BTreeMap::new(),
            period: "month".into(),
            grace: Duration::ZERO,
            deadline: None,
            batch_size: 5000,
            focus: false,
            faults: Faults::default(),
        }
    }
}

impl HasHttp for SettlerConfig {
    fn http(&self) -> &HttpConfig {
        &self.http
    }
}

/// The longest a settler goes without a commit while its offsets stand still.
const COMMIT_INTERVAL: Duration = Duration::from_secs(1);

type Key = (Millis, String);
/// A period that closes in this batch: its rated partition, key, the reason it closes
/// incomplete (if it does) and its events (partition, offset, event) with their ids.
type Closing = (i32, Key, Option<String>, Open);

#[derive(Default)]
struct Open {
    events: Vec<(i32, i64, RatedEvent)>,
    ids: FastSet<String>,
}

/// What the settlement store holds of one (period, entity): how many versions, and the
/// ids of the events in them.
#[derive(Default)]
struct Written {
    versions: u32,
    ids: FastSet<String>,
}

impl Written {
    /// What the store holds of a (period start, entity): its versions' manifests.
    async fn read(store: &Store, period: &Period, (ps, entity): &Key) -> Result<Written> {
        let versions =
            files::existing(store, &files::entity_dir(&period.label(*ps), entity)).await?;
        Ok(Written {
            versions: versions.len() as u32,
            ids: versions.into_iter().flat_map(|m| m.ids).collect(),
        })
    }
}

/// The (period start, entity) pairs with a version in the store, from its manifests.
fn keys_of(manifests: &[files::Manifest]) -> Result<HashSet<Key>> {
    manifests
        .iter()
        .map(|m| {
            let ps = meterflow_types::time::parse_rfc3339(&m.period_start)
                .map_err(anyhow::Error::msg)?;
            Ok((ps, m.entity_id.clone()))
        })
        .collect()
}

#[derive(Default)]
struct PartState {
    sources: SourceTimes,
    position: Option<i64>,
}

/// The file beside a version's manifest that says its settlements record was
/// acknowledged.
fn announced_marker(m: &files::Manifest) -> String {
    format!(
        "{}/{}",
        files::entity_dir(&m.period, &m.entity_id),
        files::version_name(m.version, "announced")
    )
}

/// Send a written version's record to the settlements topic (acknowledged with the next
/// commit; its marker is written after that).
async fn announce(io: &mut StageIo, topic: &str, m: &files::Manifest) -> Result<()> {
    let dir = files::entity_dir(&m.period, &m.entity_id);
    let rec = Settlement {
        entity_id: m.entity_id.clone(),
        period: m.period.clone(),
        period_start: meterflow_types::time::parse_rfc3339(&m.period_start)
            .map_err(anyhow::Error::msg)?,
        period_end: meterflow_types::time::parse_rfc3339(&m.period_end)
            .map_err(anyhow::Error::msg)?,
        version: m.version as i32,
        directory: dir,
        manifest: files::version_name(m.version, "manifest.json"),
        line_count: m.line_count as i64,
        totals: m.totals.clone().into_iter().collect(),
        files: m.files.clone().into_iter().collect(),
    };
    io.send(
        topic,
        rec.entity_id.as_bytes(),
        &meterflow_avro::encode(&rec),
        None,
    )
    .await
}

/// Per rated partition, the (period start, entity) whose latest version is incomplete.
fn incomplete_of(manifests: &[files::Manifest]) -> Result<HashMap<i32, HashSet<Key>>> {
    let mut latest: HashMap<Key, (u32, bool, Option<i32>)> = HashMap::new();
    for man in manifests {
        let ps =
            meterflow_types::time::parse_rfc3339(&man.period_start).map_err(anyhow::Error::msg)?;
        let l = latest
            .entry((ps, man.entity_id.clone()))
            .or_insert((0, false, None));
        if man.version > l.0 {
            l.0 = man.version;
            l.1 = man.status == "incomplete";
        }
        l.2 = l.2.or(man.input_offsets.keys().next().copied());
    }
    let mut out: HashMap<i32, HashSet<Key>> = HashMap::new();
    for (key, (_, open_version, partition)) in latest {
        if let (true, Some(p)) = (open_version, partition) {
            out.entry(p).or_default().insert(key);
        }
    }
    Ok(out)
}

/// One version to encode and write: its number, period label and bounds, entity,
/// events and options.
type Item = (
    u32,
    String,
    (Millis, Millis),
    String,
    Vec<(i32, i64, RatedEvent)>,
    files::VersionOpts,
);

/// Versions being encoded and written on a task of their own while the loop reads and
/// groups the next batch: the loop waits for them only when it writes again, meets a
/// rebalance or stops. Until the flight lands, no offset is committed past its events,
/// no progress is sent for its partitions, and nothing is forgotten of what the store
/// holds.
struct Flight {
    job: tokio::task::JoinHandle<Result<Vec<files::Manifest>>>,
    /// each version's rated partition, key, the reason it is incomplete (if it is) and
    /// its period's label
    meta: Vec<(i32, Key, Option<String>, String)>,
    /// per rated partition, the lowest offset of an event in flight
    first: HashMap<i32, i64>,
    /// cancelled when the job has ended (or on shutdown): wakes the loop's wait
    done: CancellationToken,
}

impl Flight {
    fn launch(
        store: &Store,
        items: Vec<Item>,
        meta: Vec<(i32, Key, Option<String>, String)>,
        first: HashMap<i32, i64>,
        shutdown: &CancellationToken,
    ) -> Flight {
        let done = shutdown.child_token();
        let (store, ended) = (store.clone(), done.clone());
        let job = tokio::spawn(async move {
            // however the job ends
            let _ended = ended.drop_guard();
            let (began, sets) = (std::time::Instant::now(), items.len());
            let prepared = futures::future::try_join_all(items.into_iter().map(
                |(version, label, bounds, entity, events, opts)| {
                    let store = &store;
                    async move {
                        files::prepare_version(
                            store,
                            Some(version),
                            &label,
                            bounds,
                            &entity,
                            events,
                            &opts,
                        )
                        .await
                    }
                },
            ))
            .await?;
            let encoded = began.elapsed();
            let written = files::write_versions(&store, prepared).await?;
            let ms = |d: Duration| d.as_secs_f64() * 1000.0;
            tracing::debug!(
                sets,
                encoded_ms = ms(encoded),
                written_ms = ms(began.elapsed() - encoded),
                "file sets encoded and written"
            );
            Ok(written)
        });
        Flight {
            job,
            meta,
            first,
            done,
        }
    }

    /// Whether a version of rated partition `p` is in flight.
    fn holds(&self, p: i32) -> bool {
        self.meta.iter().any(|m| m.0 == p)
    }
}

/// Where a landed flight's versions are announced, and what counts them.
struct Landing<'a> {
    topic: &'a str,
    files_total: &'a meterflow_runtime::Counter,
    incomplete_total: &'a meterflow_runtime::Counter,
}

impl Landing<'_> {
    /// Wait for a flight to end; log and announce its versions in order (their markers
    /// are written after the next commit). Returns how many versions it wrote.
    async fn land(&self, io: &mut StageIo, f: Flight, to_mark: &mut Vec<String>) -> Result<usize> {
        let manifests = f.job.await??;
        let n = manifests.len();
        for ((_, key, why, label), man) in f.meta.into_iter().zip(manifests) {
            match &why {
                Some(w) => {
                    tracing::warn!(period = %label, entity = %key.1, version = man.version, lines = man.line_count, reason = %w, "settled incomplete");
                    self.incomplete_total.inc();
                }
                None => {
                    tracing::info!(period = %label, entity = %key.1, version = man.version, lines = man.line_count, totals = ?man.totals, "settled");
                }
            }
            announce(io, self.topic, &man).await?;
            to_mark.push(announced_marker(&man));
            self.files_total.inc();
        }
        Ok(n)
    }
}

/// The master's view: every rated partition's progress, read from the settler-state topic.
struct Master {
    tail: meterflow_kafka::Tail,
    closed: HashMap<i32, Millis>,
    corrected: HashSet<String>,
    /// On taking over: look at every period once, indexed or not.
    full_check: bool,
}

impl Master {
    fn new(cfg: &KafkaConfig) -> Result<Master> {
        Ok(Master {
            tail: meterflow_kafka::Tail::new(cfg, &cfg.topics.settler_state)?,
            closed: HashMap::new(),
            corrected: HashSet::new(),
            full_check: true,
        })
    }

    /// Read new progress; write the index of every period all partitions have closed,
    /// each logged and counted in `indexes_total` as it is created.
    async fn step(
        &mut self,
        store: &Store,
        partitions: i32,
        indexes_total: &meterflow_runtime::Counter,
    ) -> Result<()> {
        for r in tokio::task::block_in_place(|| self.tail.poll())? {
            let Ok(p) = meterflow_avro::decode::<meterflow_types::SettlerProgress>(
                r.payload.as_deref().unwrap_or_default(),
            ) else {
                continue;
            };
            let c = self.closed.entry(p.partition).or_insert(p.closed_through);
            *c = (*c).max(p.closed_through);
            self.corrected.extend(p.corrected);
        }
        let Some(all) = (0..partitions)
            .map(|p| self.closed.get(&p).copied())
            .collect::<Option<Vec<Millis>>>()
            .and_then(|v| v.into_iter().min())
        else {
            return Ok(());
        };
        for dir in index::period_dirs(store).await? {
            let label = dir.trim_start_matches("period=");
            let indexed = store.exists(&format!("{dir}/index.json")).await?;
            let due = if indexed {
                self.full_check || self.corrected.contains(label)
            } else {
                index::period_end(store, &dir)
                    .await?
                    .is_some_and(|end| end <= all)
            };
            if due {
                if let Some(idx) = index::write(store, &dir).await? {
                    // said at once, not after the other periods' checks: a master killed
                    // meanwhile would have written an index no log line tells of
                    tracing::info!(period = %idx.period, version = idx.version, entities = idx.entity_count, totals = ?idx.totals, status = %idx.status, "period index written");
                    indexes_total.inc();
                }
            }
        }
        self.full_check = false;
        self.corrected.clear();
        Ok(())
    }
}

/// The master — the member that owns rated partition 0 (`owner` says whether this one
/// does) — writes the period indexes, on a task of its own: the main loop never waits
/// for its reads of the settler-state topic and the settlement directory (the first
/// step alone, which starts a consumer, took a sixth of the settler's time when it ran
/// in the loop).
fn spawn_master(
    kafka: KafkaConfig,
    store: Store,
    rated_parts: i32,
    member: String,
    mut owner: tokio::sync::watch::Receiver<bool>,
    indexes_total: meterflow_runtime::Counter,
) -> tokio::task::JoinHandle<Result<()>> {
    tokio::spawn(async move {
        let mut master: Option<Master> = None;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                // the loop stopped (the sender is gone): so does the master
                r = owner.changed() => if r.is_err() { return Ok(()) },
            }
            if *owner.borrow_and_update() {
                if master.is_none() {
                    tracing::info!(member = %member, "master: this member writes the period indexes");
                }
                let mm = match master.as_mut() {
                    Some(x) => x,
                    None => master.insert(Master::new(&kafka)?),
                };
                mm.step(&store, rated_parts, &indexes_total).await?;
            } else if master.take().is_some() {
                tracing::info!(member = %member, "no longer master");
            }
        }
    })
}

pub async fn run(cfg: SettlerConfig, ctx: Ctx) -> Result<()> {
    let period = Period::parse(&cfg.period).map_err(anyhow::Error::msg)?;
    let bounds = period.memo();
    // before waiting for the broker: a bad location or option is an error at once
    let store = Store::open(&cfg.out_dir, &cfg.storage_options)?;
    tracing::info!(location = %store, sync = ?store.sync(), "settlement files go to");
    if !meterflow_kafka::await_brokers(&cfg.kafka, &ctx.shutdown).await? {
        return Ok(()); // stopped before the broker answered
    }
    ensure_topics(&cfg.kafka).await?;
    let topics = cfg.kafka.topics.clone();
    let mut io = StageIo::new(
        &cfg.kafka,
        "settler",
        &cfg.group,
        &[&topics.rated],
        &cfg.member,
    )?;
    // the end of the trail: measured, recorded in histograms, not forwarded
    let mut probes = meterflow_kafka::probe::Probes::new(
        &cfg.kafka,
        "settler",
        &cfg.member,
        ctx.metrics.clone(),
    )?
    .with_ends(io.partition_ends());
    let m = &ctx.metrics;
    let grace = cfg.grace.as_millis() as Millis;
    let deadline = cfg.deadline.map(|d| d.as_millis() as Millis);
    // versions written but not yet announced (a crash between the files and the record)
    let mut to_mark: Vec<String> = Vec::new();
    let manifests = files::manifests(&store).await?;
    for man in &manifests {
        let marker = announced_marker(man);
        if !store.exists(&marker).await? {
            announce(&mut io, &topics.settlements, man).await?;
            to_mark.push(marker);
        }
    }
    // per rated partition: the (period, entity) whose latest version is incomplete
    let mut incomplete = incomplete_of(&manifests)?;
    // every (period, entity) with a version in the store when this member's partitions
    // were last assigned, or written since and forgotten: one not among them has none
    // (an entity's events are on one rated partition, so only its owner writes its
    // files), and is not looked up
    let mut stored = keys_of(&manifests)?;
    let files_total = m.counter(
        "meterflow_settler_file_sets_total",
        "Settlement file sets written.",
        &[],
    );
    let dup_total = m.counter(
        "meterflow_settler_duplicates_total",
        "Duplicate revenue events dropped.",
        &[],
    );
    let incomplete_total = m.counter(
        "meterflow_settler_incomplete_total",
        "File sets written incomplete because the deadline passed.",
        &[],
    );
    let corrections_total = m.counter(
        "meterflow_settler_corrections_total",
        "Correction versions written after a period closed.",
        &[],
    );
    let dlq_total = m.counter(
        "meterflow_dead_letters_total",
        "Messages sent to the dead-letter topic.",
        &[("stage", "settler")],
    );
    let indexes_total = m.counter(
        "meterflow_settler_period_indexes_total",
        "Period indexes written (by the master).",
        &[],
    );
    let rated_parts = partition_count(&cfg.kafka, &topics.rated)?;
    // the rated partitions this member owns; the owner of partition 0 is the master
    let mut owned: HashSet<i32> = HashSet::new();
    let (is_master, master_owner) = tokio::sync::watch::channel(false);
    let master = spawn_master(
        cfg.kafka.clone(),
        store.clone(),
        rated_parts,
        cfg.member.clone(),
        master_owner,
        indexes_total,
    );
    // per rated partition: the closed-through last announced, and labels corrected since
    let mut progress_sent: HashMap<i32, Millis> = HashMap::new();
    let mut corrected: HashMap<i32, Vec<String>> = HashMap::new();
    // per rated partition: its open periods
    let mut parts: HashMap<i32, PartState> = HashMap::new();
    let mut open: HashMap<i32, BTreeMap<Key, Open>> = HashMap::new();
    // what the store holds per (period start, entity), loaded on demand and kept for the
    // current and previous period
    let mut written: FastMap<Key, Written> = FastMap::default();
    // the versions being encoded and written while the loop reads on (at most one flight)
    let mut flight: Option<Flight> = None;
    let landing = Landing {
        topic: &topics.settlements,
        files_total: &files_total,
        incomplete_total: &incomplete_total,
    };
    // the offsets last committed, and when
    let mut committed: Vec<(String, i32, i64)> = Vec::new();
    let mut last_commit = std::time::Instant::now();
    loop {
        if ctx.shutdown.is_cancelled() && flight.is_none() {
            break;
        }
        // where a batch's time goes (logged at debug for a batch that wrote versions)
        let began = std::time::Instant::now();
        // a flight ending wakes the wait, as a shutdown does
        let wake = flight.as_ref().map_or(&ctx.shutdown, |f| &f.done);
        let batch = io
            .next_batch(cfg.batch_size, Duration::from_millis(200), wake)
            .await?;
        let received = began.elapsed();
        probes.refresh();
        // a flight lands once it has ended — and before a rebalance or a shutdown is
        // acted on: what this member read of the store and its offsets stay its own
        let mut landed = 0;
        if let Some(f) = flight.take_if(|f| {
            f.job.is_finished() || !batch.rebalances.is_empty() || ctx.shutdown.is_cancelled()
        }) {
            landed = landing.land(&mut io, f, &mut to_mark).await?;
        }
        for r in &batch.rebalances {
            match r {
                meterflow_kafka::Assignment::Revoked(ps) => {
                    for (_, p) in ps {
                        parts.remove(p);
                        open.remove(p);
                        owned.remove(p);
                        progress_sent.remove(p);
                    }
                }
                // the files are the state: what a partition's last owner left incomplete
                // (and what another member wrote while it owned them: what this one read
                // of the store before is forgotten, read again when it comes up)
                meterflow_kafka::Assignment::Assigned(ps) => {
                    owned.extend(ps.iter().map(|(_, p)| *p));
                    let manifests = files::manifests(&store).await?;
                    incomplete = incomplete_of(&manifests)?;
                    stored = keys_of(&manifests)?;
                    written.clear();
                }
            }
        }
        let mut corrections: BTreeMap<Key, Vec<(i32, i64, RatedEvent)>> = BTreeMap::new();
        let decoded: Vec<_> = batch
            .messages
            .iter()
            .map(|m| meterflow_avro::decode_rated_msg(m.payload().unwrap_or_default()))
            .collect();
        // what the store holds of each (period, entity) first seen here, read side by side
        // (nothing to read for one the store had none of at the assignment)
        let mut unread: Vec<Key> = Vec::new();
        // an entity's events come in runs: each run's pair is looked at once
        let mut last: Option<(Millis, &str)> = None;
        for d in &decoded {
            if let Ok(RatedMsg::Rated(e)) = d {
                let ps = bounds.of(e.window_start).0;
                if last == Some((ps, e.entity_id.as_str())) {
                    continue;
                }
                last = Some((ps, e.entity_id.as_str()));
                let key = (ps, e.entity_id.clone());
                if written.contains_key(&key) || unread.contains(&key) {
                    continue;
                }
                if stored.contains(&key) {
                    unread.push(key);
                } else {
                    written.insert(key, Written::default());
                }
            }
        }
        let read = futures::future::try_join_all(
            unread.iter().map(|key| Written::read(&store, &period, key)),
        )
        .await?;
        written.extend(unread.into_iter().zip(read));
        for (msg, decoded) in batch.messages.iter().zip(decoded) {
            let p = msg.partition();
            let st = parts.entry(p).or_default();
            st.position = Some(msg.offset() + 1);
            match decoded {
                Err(e) => {
                    io.dead_letter(msg, e.reason_code(), &e.to_string()).await?;
                    dlq_total.inc();
                }
                Ok(RatedMsg::Watermark(w)) => st.sources.observe(
                    w.source_partition as usize,
                    w.source_partitions as usize,
                    w.time,
                ),
                Ok(RatedMsg::Rated(e)) => {
                    let trace = probes.begin("settler.settle", msg);
                    let audited = meterflow_kafka::audit::of_rated(&e);
                    io.audit(&topics.rated, "in", audited);
                    let (ps, pe) = bounds.of(e.window_start);
                    let key = (ps, e.entity_id.clone());
                    // the scan above put every key of the batch there
                    let done = &mut written
                        .get_mut(&key)
                        .ok_or_else(|| anyhow::anyhow!("period {ps} of {} not looked up", key.1))?
                        .ids;
                    let closed_before = !done.is_empty()
                        || st
                            .sources
                            .min()
                            .is_some_and(|t| t >= pe.saturating_add(grace));
                    // an incomplete version's period takes the rest in its completing version
                    let held = incomplete.get(&p).is_some_and(|k| k.contains(&key));
                    if done.contains(&e.id) {
                        dup_total.inc();
                        io.audit(&topics.rated, "dup", audited);
                    } else if closed_before && !done.is_empty() && !held {
                        // the period was settled already: a correction with the delta
                        done.insert(e.id.clone());
                        corrections
                            .entry(key)
                            .or_default()
                            .push((p, msg.offset(), e));
                    } else {
                        let o = open.entry(p).or_default().entry(key).or_default();
                        if o.ids.insert(e.id.clone()) {
                            o.events.push((p, msg.offset(), e));
                        } else {
                            dup_total.inc();
                            io.audit(&topics.rated, "dup", audited);
                        }
                    }
                    probes.finish(&trace);
                }
            }
        }
        // close periods the markers show complete (or, past the deadline, incomplete)
        let now = meterflow_kafka::now_ms();
        let mut closing: Vec<Closing> = Vec::new();
        for (p, st) in parts.iter() {
            let through = st.sources.min();
            let complete = |ps: Millis| {
                through.is_some_and(|t| period.bounds(ps).1.saturating_add(grace) <= t)
            };
            let waiting = incomplete.entry(*p).or_default();
            let periods = open.entry(*p).or_default();
            let mut due: Vec<(Key, Option<String>)> = Vec::new();
            let held_only = waiting.iter().filter(|k| !periods.contains_key(*k));
            for key in periods.keys().chain(held_only) {
                let needs = period.bounds(key.0).1.saturating_add(grace);
                if complete(key.0) {
                    due.push((key.clone(), None));
                } else if let Some(d) = deadline.filter(|_| !waiting.contains(key)) {
                    if now >= needs.saturating_add(d) {
                        let why = format!(
                            "deadline {} passed: rated partition {p} was complete through {}, the period needs {} (end + grace {})",
                            humantime::format_duration(Duration::from_millis(d as u64)),
                            through.map_or("nothing yet".into(), meterflow_types::time::fmt_rfc3339),
                            meterflow_types::time::fmt_rfc3339(needs),
                            humantime::format_duration(cfg.grace),
                        );
                        due.push((key.clone(), Some(why)));
                    }
                }
            }
            for (key, why) in due {
                let o = periods.remove(&key).unwrap_or_default();
                closing.push((*p, key, why, o));
            }
        }
        // Writing needs what the store holds: a flight still writing lands first (then the
        // versions after it are numbered from it, and a correction reads it).
        let mut waited_landing = Duration::ZERO;
        if !closing.is_empty() || !corrections.is_empty() {
            if let Some(f) = flight.take() {
                let t = std::time::Instant::now();
                landed += landing.land(&mut io, f, &mut to_mark).await?;
                waited_landing = t.elapsed();
            }
        }
        let file_sets = closing.len();
        if !closing.is_empty() {
            // Every (period, entity) has a directory of its own: their versions are encoded
            // side by side, then written together — every data file synced, then every
            // manifest (`files::write_versions`), so the file system's syncs are shared
            // instead of queueing set by set. That runs on a task of its own (the
            // flight) while this loop reads on; what the versions hold is this loop's
            // state at once (written, incomplete), and the flight lands — is announced,
            // and its offsets may be committed — when it has ended.
            let mut items = Vec::with_capacity(closing.len());
            let mut meta = Vec::with_capacity(closing.len());
            let mut first: HashMap<i32, i64> = HashMap::new();
            for (p, key, why, Open { events, ids }) in closing {
                // a pair held incomplete since before the assignment may not have come up
                // yet: what the store holds of it is read now
                if !written.contains_key(&key) {
                    let w = Written::read(&store, &period, &key).await?;
                    written.insert(key.clone(), w);
                }
                let w = written.get_mut(&key).ok_or_else(|| {
                    anyhow::anyhow!("period {} of {} not looked up", key.0, key.1)
                })?;
                w.versions += 1;
                // the period's ids move over (a first version's set as it is)
                if w.ids.is_empty() {
                    w.ids = ids;
                } else {
                    w.ids.extend(ids);
                }
                let waiting = incomplete.entry(p).or_default();
                if why.is_some() {
                    waiting.insert(key.clone());
                } else {
                    waiting.remove(&key);
                }
                if let Some(o) = events.iter().map(|(_, o, _)| *o).min() {
                    let f = first.entry(p).or_insert(o);
                    *f = (*f).min(o);
                }
                let label = period.label(key.0);
                let opts = files::VersionOpts {
                    focus: cfg.focus,
                    generated_at: now,
                    incomplete: why.clone(),
                };
                items.push((
                    w.versions,
                    label.clone(),
                    period.bounds(key.0),
                    key.1.clone(),
                    events,
                    opts,
                ));
                meta.push((p, key, why, label));
            }
            flight = Some(Flight::launch(&store, items, meta, first, &ctx.shutdown));
        }
        let corrections_written = corrections.len();
        for (key, evs) in corrections {
            let label = period.label(key.0);
            let opts = files::VersionOpts {
                focus: cfg.focus,
                generated_at: now,
                incomplete: None,
            };
            let man =
                files::write_version(&store, &label, period.bounds(key.0), &key.1, evs, &opts)
                    .await?;
            tracing::info!(period = %label, entity = %key.1, version = man.version, "correction written");
            written.entry(key).or_default().versions = man.version;
            if let Some(p) = man.input_offsets.keys().next() {
                corrected.entry(*p).or_default().push(label.clone());
            }
            announce(&mut io, &topics.settlements, &man).await?;
            to_mark.push(announced_marker(&man));
            corrections_total.inc();
        }
        if let Some(n) = cfg.faults.stop_after_versions {
            let versions = files_total.get() + corrections_total.get();
            if versions >= n {
                // fault injection (tests): the settler stops before it commits (a flight
                // launched meanwhile ends first: its files are durable too)
                if let Some(f) = flight.take() {
                    f.job.await??;
                }
                anyhow::bail!("fault injection: stopping after {versions} versions written, before their commit");
            }
        }
        // progress for the master's period index: every period ending by `closed_through`
        // is written for this partition's entities (sent before the offsets commit)
        for (p, st) in parts.iter() {
            let Some(through) = st.sources.min() else {
                continue;
            };
            // not while versions of the partition are in flight (sent once they landed)
            if flight.as_ref().is_some_and(|f| f.holds(*p)) {
                continue;
            }
            let closed_through = through.saturating_sub(grace);
            let labels = corrected.remove(p).unwrap_or_default();
            if progress_sent.get(p) == Some(&closed_through) && labels.is_empty() {
                continue;
            }
            let rec = meterflow_types::SettlerProgress {
                partition: *p,
                partitions: rated_parts,
                member: cfg.member.clone(),
                closed_through,
                corrected: labels,
            };
            io.send(
                &topics.settler_state,
                format!("progress|{p}").as_bytes(),
                &meterflow_avro::encode(&rec),
                None,
            )
            .await?;
            progress_sent.insert(*p, closed_through);
        }
        // the master writes the index of every period all partitions have closed (on its
        // own task; an error there stops the settler)
        let now_master = owned.contains(&0);
        is_master.send_if_modified(|m| std::mem::replace(m, now_master) != now_master);
        if master.is_finished() {
            master.await??;
            anyhow::bail!("the period-index master stopped");
        }
        // commit: never past an event of a period not yet written (nor one in flight)
        let mut offsets: Vec<(String, i32, i64)> = parts
            .iter()
            .filter_map(|(p, st)| {
                let first_open = open.get(p).and_then(|m| {
                    m.values()
                        .flat_map(|o| o.events.iter().map(|(_, off, _)| *off))
                        .min()
                });
                let in_flight = flight.as_ref().and_then(|f| f.first.get(p).copied());
                let first = match (first_open, in_flight) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                first.or(st.position).map(|o| (topics.rated.clone(), *p, o))
            })
            .collect();
        offsets.sort_unstable();
        let processed = began.elapsed();
        // A commit when the offsets moved or versions were announced (their markers wait
        // for it), on a rebalance or shutdown, and otherwise once a second: while a
        // period is open its first event holds the offsets where they are, batch after
        // batch, and committing them again is a broker round trip for nothing (the
        // records sent meanwhile — progress, dead letters, audit counts — are sent, and
        // acknowledged at the next commit).
        let due = offsets != committed
            || !to_mark.is_empty()
            || !batch.rebalances.is_empty()
            || ctx.shutdown.is_cancelled()
            || last_commit.elapsed() >= COMMIT_INTERVAL;
        if due && (!offsets.is_empty() || !to_mark.is_empty()) {
            io.commit(&offsets).await?;
            committed = offsets;
            last_commit = std::time::Instant::now();
            if file_sets + landed + corrections_written > 0 {
                let ms = |d: Duration| d.as_secs_f64() * 1000.0;
                tracing::debug!(
                    messages = batch.messages.len(),
                    launched = file_sets,
                    landed,
                    corrections = corrections_written,
                    waited_ms = ms(received),
                    processed_ms = ms(processed - received),
                    landing_waited_ms = ms(waited_landing),
                    committed_ms = ms(began.elapsed() - processed),
                    "batch settled"
                );
            }
        }
        // What was read or written of periods before the previous one is forgotten (read
        // again from the store if an event comes for one): the map holds the event ids of
        // recent periods, not of every period since the assignment. A pair in flight is
        // kept: the store does not hold its version yet.
        if let Some(through) = parts.values().filter_map(|st| st.sources.min()).min() {
            let current = period.bounds(through.saturating_sub(grace)).0;
            let horizon = period.bounds(current.saturating_sub(1)).0;
            let before = written.len();
            let flying = |key: &Key| {
                flight
                    .as_ref()
                    .is_some_and(|f| f.meta.iter().any(|m| m.1 == *key))
            };
            written.retain(|key, w| {
                let keep = key.0 >= horizon || flying(key);
                if !keep && w.versions > 0 {
                    stored.insert(key.clone());
                }
                keep
            });
            if written.len() < before {
                tracing::info!(
                    forgotten = before - written.len(),
                    kept = written.len(),
                    "settled (period, entity) pairs before the previous period forgotten"
                );
            }
        }

        // the records are acknowledged: mark their versions announced (on one blocking
        // task; not synced: a marker lost to a crash only repeats an announcement,
        // identical, on start)
        store.mark_all(&to_mark).await?;
        to_mark.clear();
    }
    Ok(())
}
