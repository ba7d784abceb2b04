//! The rater: evaluates SQL rating rules (DataFusion) over event-time tumbling windows
//! of usage, per usage partition (an entity's usage is always on one partition), and
//! emits revenue events keyed by entity id.
//!
//! A window closes, once, when the partition's watermark (the minimum of the enricher
//! markers from every samples partition) passes its end plus the rule's lateness. Later
//! usage is never dropped: it becomes an adjustment event for the window it belongs to.
//!
//! Crash safety: after the outputs of a batch are acknowledged, a checkpoint per
//! partition goes to the rater-state topic — the first offset of any record still in
//! an open window (`resume_offset`), the position read up to, and the source watermarks
//! — and then the offset `resume_offset` is committed. A restarted member replays from
//! the committed offset, skips records of windows the checkpoint shows closed up to the
//! checkpointed position, and so rebuilds exactly the open windows.

pub mod batch;
mod live;
pub mod rules;
pub mod ruleset;
pub mod tables;
pub mod todate;

use anyhow::{Context, Result};
use meterflow_avro::UsageViewMsg;
use meterflow_kafka::probe::{as_refs, Forward, Probes, Trace};
use meterflow_kafka::{ensure_topics, partition_count, KafkaConfig, Message, StageIo};
use meterflow_runtime::{Ctx, HasHttp, HttpConfig};
use meterflow_types::watermark::SourceTimes;
use meterflow_types::window::Tumbling;
use meterflow_types::{
    Dec, FastMap, FastSet, Millis, RatedEvent, RaterCheckpoint, Usage, UsageView, Watermark,
};
use rules::Engine;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaterConfig {
    pub kafka: KafkaConfig,
    pub http: HttpConfig,
    pub group: String,
    /// This replica's stable name within its group (default: the host name): its static
    /// group membership (`group.instance.id`, so a restart takes its partitions back
    /// without a rebalance) and its transactional id. Unique among running replicas.
    pub member: String,
    pub rules_dir: PathBuf,
    /// Memory pool of the rule engine, in MiB.
    pub memory_limit_mb: usize,
    /// Time limit of one rule evaluation.
    #[serde(with = "humantime_serde")]
    pub eval_timeout: Duration,
    pub batch_size: usize,
    /// How long (event time, by window start) the usage ids of closed windows are kept to
    /// drop duplicates that arrive late (e.g. a collector resending after a restart).
    #[serde(with = "humantime_serde")]
    pub dedup_horizon: Duration,
    /// The billing period `usage_to_date` counts within (`month`, `week`, `day`, or a
    /// duration): the settler's `period`.
    pub billing_period: String,
    /// How often progress is made durable when no window closed: the checkpoints, then
    /// the offset commit they cover. A batch that closes windows (and so moves the
    /// watermark on the rated topic) always commits at once.
    #[serde(with = "humantime_serde")]
    pub checkpoint_interval: Duration,
}

impl Default for RaterConfig {
    fn default() -> RaterConfig {
        RaterConfig {
            kafka: KafkaConfig::default(),
            http: HttpConfig::default(),
            group: "meterflow-rater".into(),
            member: meterflow_kafka::default_member(),
            rules_dir: PathBuf::from("rules"),
            memory_limit_mb: 256,
            eval_timeout: Duration::from_secs(10),
            batch_size: 5000,
            dedup_horizon: Duration::from_secs(2 * 3600),
            billing_period: "month".into(),
            checkpoint_interval: Duration::from_secs(1),
        }
    }
}

impl HasHttp for RaterConfig {
    fn http(&self) -> &HttpConfig {
        &self.http
    }
}

/// Split a usage record into its pieces in the windows it overlaps, quantities pro rata
/// by time so the pieces add up to the record exactly.
pub fn split_usage(u: &Usage, w: Tumbling) -> Vec<(Millis, Usage)> {
    let pieces = w.pieces(u.interval_start, u.interval_end);
    if pieces.len() == 1 {
        return vec![(pieces[0].0, u.clone())];
    }
    let weights: Vec<i64> = pieces.iter().map(|(_, ms)| *ms).collect();
    let sp = |d: Dec| d.split_pro_rata(&weights);
    let (vc, cs, mb, nr, nt, dr, dw) = (
        sp(u.vcpu_seconds),
        sp(u.cpu_seconds),
        sp(u.memory_byte_seconds),
        sp(u.net_rx_bytes),
        sp(u.net_tx_bytes),
        sp(u.disk_read_bytes),
        sp(u.disk_write_bytes),
    );
    let mu = u.memory_used_byte_seconds.map(sp);
    pieces
        .iter()
        .enumerate()
        .map(|(i, (ws, _))| {
            let mut p = u.clone();
            p.interval_start = u.interval_start.max(*ws);
            p.interval_end = u.interval_end.min(ws + w.size);
            p.vcpu_seconds = vc[i];
            p.cpu_seconds = cs[i];
            p.memory_byte_seconds = mb[i];
            p.memory_used_byte_seconds = mu.as_ref().map(|v| v[i]);
            p.net_rx_bytes = nr[i];
            p.net_tx_bytes = nt[i];
            p.disk_read_bytes = dr[i];
            p.disk_write_bytes = dw[i];
            (*ws, p)
        })
        .collect()
}

/// A set of usage ids as 128-bit keys (foldhash: SipHash was a tenth of the rater's time).
type Ids = FastSet<u128>;

/// The ids a closed window counted: one sorted array, shared by the rules whose windows
/// closed with the same ids (rules with the same panes see the same records), and the
/// ids this rule took late, after the window closed. 16 bytes a key and no hash slack:
/// at ten times the events, per-rule hash sets of closed windows were most of the
/// rater's growth in memory (BENCHMARKS.md).
#[derive(Default)]
struct ClosedIds {
    counted: std::sync::Arc<[u128]>,
    late: Ids,
}

impl ClosedIds {
    /// Ids already sorted, shared with an equal array of another rule's window if
    /// `others` holds one.
    fn new<'a>(sorted: Vec<u128>, others: impl IntoIterator<Item = &'a ClosedIds>) -> ClosedIds {
        debug_assert!(sorted.windows(2).all(|w| w[0] < w[1]));
        let counted = others
            .into_iter()
            .find(|o| *o.counted == *sorted)
            .map(|o| o.counted.clone())
            .unwrap_or_else(|| sorted.into());
        ClosedIds {
            counted,
            late: Ids::default(),
        }
    }
    /// Take an id late: false if the window already has it.
    fn insert(&mut self, k: u128) -> bool {
        self.counted.binary_search(&k).is_err() && self.late.insert(k)
    }
    #[cfg(test)]
    fn contains(&self, k: u128) -> bool {
        self.counted.binary_search(&k).is_ok() || self.late.contains(&k)
    }
}

/// A set of ids, sorted (and without repeats).
fn sorted_ids(ids: impl IntoIterator<Item = u128>) -> Vec<u128> {
    let mut v: Vec<u128> = ids.into_iter().collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// A usage id as 128 bits (ids are 32 hex digits; anything else is hashed).
pub(crate) fn id_key(id: &str) -> u128 {
    u128::from_str_radix(id, 16).unwrap_or_else(|_| {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        id.hash(&mut h);
        h.finish() as u128 | (1 << 127)
    })
}

#[derive(Default)]
struct Win {
    /// (offset, piece); a piece is shared by every rule with the same window size. For a
    /// rule whose rows merge (`Rule::merge`), a merged row with the offset of its first
    /// piece (the window's resume point stays the lowest offset it holds).
    rows: Vec<(i64, std::sync::Arc<Usage>)>,
    /// Merged rows by their merge key (index into `rows`).
    slots: FastMap<Vec<u8>, usize>,
    /// Usage pieces taken into the window (each event's `usage_records`). Its usage ids
    /// are in `PartState::open_ids`, shared by the rules of its geometry.
    records: i64,
    /// The probe trail of the last usage record that carried one (`rater.rate`): its
    /// revenue events forward it.
    trace: Option<std::sync::Arc<Trace>>,
}

struct PartState {
    sources: SourceTimes,
    /// Open windows per rule.
    windows: Vec<BTreeMap<Millis, Win>>,
    /// The usage ids in open windows as 128-bit keys (`id_key`), one set per window
    /// geometry (`Active::geometry`) and window start: rules with the same panes, size
    /// and lateness take the same records into the same windows, so they share one set
    /// (at ten times the events, a set per rule was most of what grew).
    open_ids: FastMap<(usize, Millis), Ids>,
    /// Usage ids of recently closed windows per rule (window start → ids), so a duplicate
    /// arriving after its window closed is dropped instead of becoming an adjustment.
    closed_ids: Vec<BTreeMap<Millis, ClosedIds>>,
    position: Option<i64>,
    /// From the checkpoint: records before this offset were already handled.
    replay_until: i64,
    last_marker: Option<Millis>,
    /// Period-to-date usage per rule (for rules reading `usage_to_date`).
    to_date: Vec<todate::ToDate>,
}

impl PartState {
    fn new(rules: usize, cp: Option<&RaterCheckpoint>) -> PartState {
        PartState {
            sources: cp
                .map(|c| SourceTimes::from_vec(&c.source_times))
                .unwrap_or_default(),
            windows: (0..rules).map(|_| BTreeMap::new()).collect(),
            open_ids: FastMap::default(),
            closed_ids: (0..rules).map(|_| BTreeMap::new()).collect(),
            position: None,
            replay_until: cp.map(|c| c.position).unwrap_or(0),
            last_marker: None,
            to_date: (0..rules).map(|_| todate::ToDate::default()).collect(),
        }
    }
    fn resume_offset(&self) -> Option<i64> {
        let open = self
            .windows
            .iter()
            .flat_map(|m| m.values())
            .flat_map(|w| w.rows.iter().map(|(o, _)| *o))
            .min();
        open.or(self.position)
    }
}

/// Take a piece into a window whose rule merges rows: added to the row with its merge
/// key, or a row of its own (`own` makes it). `key` is a scratch buffer (reused: only a
/// new row's key is allocated).
fn merge_into(
    win: &mut Win,
    m: &rules::Merge,
    off: i64,
    piece: &UsageView<'_>,
    own: impl FnOnce() -> std::sync::Arc<Usage>,
    key: &mut Vec<u8>,
) {
    m.key_into(piece, key);
    if let Some(&i) = win.slots.get(key.as_slice()) {
        let (first, row) = &mut win.rows[i];
        // copied from the shared piece on the first merge, then owned by this window
        if rules::add_quantities(std::sync::Arc::make_mut(row), piece) {
            *first = (*first).min(off);
            return;
        }
    }
    win.slots.insert(key.clone(), win.rows.len());
    win.rows.push((off, own()));
}

fn closed(w_end: Millis, lateness: Millis, watermark: Option<Millis>) -> bool {
    watermark.is_some_and(|wm| w_end.saturating_add(lateness) <= wm)
}

/// The rules in force, and what the loop needs of them per rule index.
struct Active {
    engine: Engine,
    /// The rule set id (checkpoint key)…
    ruleset: String,
    /// …and the ids whose checkpoints this set may resume from, in order of preference:
    /// itself, then the set it replaced (a switch, or a restart right after one, finds
    /// the state at the switch under the old id).
    accept: Vec<String>,
    /// Per rule: panes of `slide` (each usage record is split once per distinct pane
    /// size; rules share the pieces), each pane belonging to `hops` windows.
    panes: Vec<Tumbling>,
    /// The distinct panes among `panes` (what a record is split into, once each).
    distinct: Distinct,
    sizes: Vec<Millis>,
    lateness: Vec<Millis>,
    /// Per rule: its window geometry (distinct panes, size, lateness), as an index shared
    /// by the rules with the same one: their windows open, take records and close alike.
    geometry: Vec<usize>,
    keep_labels: bool,
}

impl Active {
    fn new(engine: Engine, earlier: &[String]) -> Active {
        let ruleset = engine.ruleset_id();
        let mut accept = vec![ruleset.clone()];
        accept.extend(earlier.iter().filter(|e| **e != ruleset).cloned());
        let h = |f: fn(&rules::RuleHeader) -> Millis| -> Vec<Millis> {
            engine.rules.iter().map(|r| f(&r.source.header)).collect()
        };
        let panes: Vec<Tumbling> = h(|h| h.slide).into_iter().map(Tumbling::new).collect();
        let distinct = Distinct::of(&panes);
        let (sizes, lateness) = (h(|h| h.window), h(|h| h.lateness));
        let mut shapes: Vec<(usize, Millis, Millis)> = Vec::new();
        let geometry = (0..panes.len())
            .map(|r| {
                let shape = (distinct.of_rule[r], sizes[r], lateness[r]);
                shapes.iter().position(|s| *s == shape).unwrap_or_else(|| {
                    shapes.push(shape);
                    shapes.len() - 1
                })
            })
            .collect();
        Active {
            distinct,
            panes,
            sizes,
            lateness,
            geometry,
            keep_labels: engine.rules.iter().any(|r| r.reads_labels()),
            ruleset,
            accept,
            engine,
        }
    }
}

impl Active {
    /// Before switching to this set: start every partition again from its resume offset
    /// (its state is rebuilt from the checkpoint just written). Returns how many
    /// partitions had already closed a window past `switch_at` (priced by the old rules).
    fn rewind(
        &self,
        io: &StageIo,
        topic: &str,
        parts: &HashMap<i32, PartState>,
        switch_at: Option<Millis>,
    ) -> Result<u64> {
        let mut late = 0;
        for (p, st) in parts {
            let wm = st.sources.min();
            let past = switch_at.is_some_and(|t| {
                (0..self.sizes.len()).any(|r| closed(t + self.sizes[r], self.lateness[r], wm))
            });
            if past {
                late += 1;
                tracing::error!(partition = p, switch_at = ?switch_at, watermark = ?wm, "rule set applied after windows past its switch had closed: those windows stay priced by the previous rules (`meterflow rules diff` shows the difference)");
            }
            if let Some(resume) = st.resume_offset() {
                io.rewind_to(topic, *p, resume)?;
            }
        }
        Ok(late)
    }
}

/// The rule set on the control topic, if `meterflow rules apply` published one.
fn applied_ruleset(records: &[meterflow_kafka::TableRecord]) -> Option<meterflow_types::RuleSet> {
    let r = records
        .iter()
        .rev()
        .find(|r| r.key.as_deref() == Some(ruleset::KEY))?;
    match meterflow_avro::decode(r.payload.as_deref()?) {
        Ok(rs) => Some(rs),
        Err(e) => {
            tracing::error!(error = %e, offset = r.offset, "undecodable rule set on the control topic: ignored");
            None
        }
    }
}

/// Load an applied rule set: its files written to a directory of this process, then
/// compiled as any rules directory.
async fn load_applied(cfg: &RaterConfig, rs: &meterflow_types::RuleSet) -> Result<Engine> {
    let dir = std::env::temp_dir()
        .join(format!("meterflow-rater-{}", std::process::id()))
        .join(&rs.id);
    ruleset::materialize(&ruleset::files_of(rs), &dir).map_err(anyhow::Error::msg)?;
    let engine = Engine::load(&dir, cfg.memory_limit_mb << 20, cfg.eval_timeout)
        .await
        .with_context(|| format!("applied rule set {}", rs.id))?;
    anyhow::ensure!(
        engine.ruleset_id() == rs.id,
        "applied rule set {} compiles to rule set {}: refused",
        rs.id,
        engine.ruleset_id()
    );
    Ok(engine)
}

pub async fn run(cfg: RaterConfig, ctx: Ctx) -> Result<()> {
    if !meterflow_kafka::await_brokers(&cfg.kafka, &ctx.shutdown).await? {
        return Ok(()); // stopped before the broker answered
    }
    ensure_topics(&cfg.kafka).await?;
    let topics = cfg.kafka.topics.clone();
    // how long the ids of closed windows are kept (event time, by window start)
    let horizon = cfg.dedup_horizon.as_millis() as i64;
    // the rule set applied on the control topic wins over `rules_dir`
    let control = meterflow_kafka::Tail::new(&cfg.kafka, &topics.control)?;
    let mut control_checked = std::time::Instant::now();
    let applied = applied_ruleset(
        &meterflow_kafka::read_latest(&cfg.kafka, &topics.control)?
            .into_iter()
            .map(|(_, r)| r)
            .collect::<Vec<_>>(),
    );
    let mut active = match &applied {
        Some(rs) => {
            let engine = load_applied(&cfg, rs).await?;
            tracing::info!(rules = engine.rules.len(), ruleset = %rs.id, applied_by = %rs.applied_by, "rules from the control topic (rules_dir is not read)");
            Active::new(engine, rs.previous.as_slice())
        }
        None => {
            let engine =
                Engine::load(&cfg.rules_dir, cfg.memory_limit_mb << 20, cfg.eval_timeout).await?;
            tracing::info!(rules = engine.rules.len(), dir = %cfg.rules_dir.display(), "rules compiled");
            Active::new(engine, &[])
        }
    };
    let mut refused: HashSet<String> = HashSet::new();
    let mut tables_checked = std::time::Instant::now();
    let usage_parts = partition_count(&cfg.kafka, &topics.usage)?;
    let rated_parts = partition_count(&cfg.kafka, &topics.rated)?;
    let mut io = StageIo::new(
        &cfg.kafka,
        "rater",
        &cfg.group,
        &[&topics.usage],
        &cfg.member,
    )?;
    let mut probes = Probes::new(&cfg.kafka, "rater", &cfg.member, ctx.metrics.clone())?
        .with_ends(io.partition_ends());
    let m = &ctx.metrics;
    let events_total = m.counter(
        "meterflow_rater_revenue_events_total",
        "Revenue events emitted.",
        &[],
    );
    let adjustments_total = m.counter(
        "meterflow_rater_adjustments_total",
        "Adjustment events for late usage.",
        &[],
    );
    let dup_total = m.counter(
        "meterflow_rater_duplicates_total",
        "Duplicate usage records dropped.",
        &[],
    );
    let dlq_total = m.counter(
        "meterflow_dead_letters_total",
        "Messages sent to the dead-letter topic.",
        &[("stage", "rater")],
    );
    let failed_total = m.counter(
        "meterflow_rater_rule_failures_total",
        "Rule evaluations that failed (rule quarantined).",
        &[],
    );
    let switches_total = m.counter(
        "meterflow_rater_rule_switches_total",
        "Rule sets applied from the control topic without a restart.",
        &[],
    );
    let late_switches_total = m.counter(
        "meterflow_rater_late_switches_total",
        "Rule sets applied after a window they change had closed.",
        &[],
    );
    let mut quarantined: HashSet<usize> = HashSet::new();
    let mut parts: HashMap<i32, PartState> = HashMap::new();
    let mut last_commit = std::time::Instant::now();
    // input taken since progress was last made durable
    let mut uncommitted = false;
    let period = meterflow_types::window::Period::parse(&cfg.billing_period)
        .map_err(|e| anyhow::anyhow!("billing_period: {e}"))?;
    while !ctx.shutdown.is_cancelled() {
        // a rule set applied on the control topic: switch between batches, as a restart
        // would — every partition is read again from its checkpoint, so the open windows
        // are rebuilt under the new set (the checkpoint of the old set is the state at the
        // switch)
        if control_checked.elapsed() >= Duration::from_secs(2) {
            control_checked = std::time::Instant::now();
            let fresh = applied_ruleset(&control.poll()?)
                .filter(|rs| rs.id != active.ruleset && !refused.contains(&rs.id));
            if let Some(rs) = fresh {
                match load_applied(&cfg, &rs).await {
                    Ok(engine) => {
                        let earlier: Vec<String> = std::iter::once(active.ruleset.clone())
                            .chain(rs.previous.clone())
                            .collect();
                        let next = Active::new(engine, &earlier);
                        if rs.previous.as_ref().is_some_and(|p| *p != active.ruleset) {
                            tracing::warn!(ruleset = %rs.id, previous = ?rs.previous, running = %active.ruleset, "the applied rule set was merged from a set this rater was not running");
                        }
                        let late = next.rewind(&io, &topics.usage, &parts, rs.switch_at)?;
                        late_switches_total.add(late);
                        parts.clear();
                        quarantined.clear();
                        tracing::info!(from = %active.ruleset, to = %next.ruleset, switch_at = ?rs.switch_at, rules = next.engine.rules.len(), applied_by = %rs.applied_by, "rule set switched");
                        switches_total.inc();
                        active = next;
                        continue;
                    }
                    Err(e) => {
                        tracing::error!(ruleset = %rs.id, error = format!("{e:#}"), "applied rule set refused: the rater keeps its rules");
                        refused.insert(rs.id.clone());
                    }
                }
            }
        }
        let Active {
            engine,
            ruleset,
            panes,
            distinct,
            sizes,
            lateness,
            geometry,
            keep_labels,
            accept,
        } = &mut active;
        let (keep_labels, nrules) = (*keep_labels, engine.rules.len());
        // with progress not yet durable, wait for input no longer than until it is due
        let mut wait = Duration::from_millis(200);
        if uncommitted {
            wait = wait.min(
                cfg.checkpoint_interval
                    .saturating_sub(last_commit.elapsed()),
            );
        }
        let batch = io.next_batch(cfg.batch_size, wait, &ctx.shutdown).await?;
        uncommitted |= !batch.messages.is_empty();
        let batch_start = std::time::Instant::now();
        probes.refresh();
        for r in &batch.rebalances {
            if let meterflow_kafka::Assignment::Revoked(ps) = r {
                for (_, p) in ps {
                    parts.remove(p);
                }
            }
        }
        // state for partitions assigned or seen for the first time: from their
        // checkpoints, read once for all of them (a read to the end takes a tenth of a
        // second or more: once per partition, as their first messages came, cost the
        // rater a fifth of its time catching up)
        let new: Vec<i32> = batch
            .rebalances
            .iter()
            .flat_map(|r| match r {
                meterflow_kafka::Assignment::Assigned(ps) => ps.iter().map(|(_, p)| *p).collect(),
                meterflow_kafka::Assignment::Revoked(_) => Vec::new(),
            })
            .chain(batch.messages.iter().map(|m| m.partition()))
            .filter(|p| !parts.contains_key(p))
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        if !new.is_empty() {
            let (cps, mut saved_to_date, mut saved_closed) = load_state(&cfg.kafka, accept)?;
            for p in new {
                let cp = cps.get(&p);
                if let Some(c) = cp {
                    tracing::info!(
                        partition = p,
                        resume = c.resume_offset,
                        position = c.position,
                        "resuming from checkpoint"
                    );
                }
                let mut st = PartState::new(nrules, cp);
                for t in saved_to_date.iter_mut().filter(|t| t.partition == p) {
                    let Some(r) = (0..nrules).find(|r| rule_tag(engine, *r) == t.rule) else {
                        continue;
                    };
                    let (Ok(before), Ok(after)) = (
                        <todate::Sums>::try_from(std::mem::take(&mut t.before)),
                        <todate::Sums>::try_from(std::mem::take(&mut t.after)),
                    ) else {
                        continue;
                    };
                    st.to_date[r].restore(
                        t.period_start,
                        std::mem::take(&mut t.entity_id),
                        todate::Entry {
                            last_window: t.last_window,
                            before,
                            after,
                        },
                    );
                }
                // the ids of windows closed before the restart: a copy of a record they
                // counted is still dropped, not billed again as an adjustment
                for c in saved_closed.iter_mut().filter(|c| c.partition == p) {
                    let Some(r) = (0..nrules).find(|r| rule_tag(engine, *r) == c.rule) else {
                        continue;
                    };
                    let ids = sorted_ids(
                        c.ids
                            .chunks_exact(16)
                            .filter_map(|k| k.try_into().ok().map(u128::from_be_bytes)),
                    );
                    let ids = ClosedIds::new(
                        ids,
                        st.closed_ids.iter().filter_map(|m| m.get(&c.window_start)),
                    );
                    st.closed_ids[r].insert(c.window_start, ids);
                }
                // past the horizon already (their tombstones were lost to a crash)
                for r in 0..nrules {
                    for ws in prune_closed(&mut st.closed_ids[r], horizon) {
                        forget_closed(&mut io, &topics.rater_state, engine, (p, r, ws)).await?;
                    }
                }
                parts.insert(p, st);
            }
        }
        // reference tables changed on disk: new contents for the windows that close next
        if tables_checked.elapsed() >= Duration::from_secs(2) {
            tables_checked = std::time::Instant::now();
            let (reloaded, refused) = engine.reload_tables();
            for t in reloaded {
                tracing::info!(table = %t, "reference table reloaded");
            }
            for e in refused {
                tracing::error!(error = %e, "reference table not reloaded");
            }
        }
        // revenue events, each with the probe trail it forwards
        let mut out: Vec<(RatedEvent, Option<Forward>)> = Vec::new();
        let prepared = prepare_batch(&batch.messages, distinct, keep_labels);
        // a merge key per piece and rule, built here (only a new row keeps one)
        let mut merge_key = Vec::with_capacity(64);
        // this record's (geometry, window, key) → taken (not a duplicate): the first
        // rule of a geometry decides in the shared set, the others follow
        let mut decided: Vec<(usize, Millis, u128, bool)> = Vec::new();
        // closed windows that took late usage in this batch (their ids are written again):
        // how many records, from which offsets
        let mut late_taken: BTreeMap<(i32, usize, Millis), (u64, i64, i64)> = BTreeMap::new();
        // copies dropped behind the watermark that closes their window in this batch, and
        // copies of usage in windows closed before it
        let mut behind_close = 0u64;
        let mut behind_closed = 0u64;
        for (msg, prepared) in batch.messages.iter().zip(prepared) {
            decided.clear();
            let p = msg.partition();
            let Some(st) = parts.get_mut(&p) else {
                continue;
            };
            let off = msg.offset();
            st.position = Some(st.position.map_or(off + 1, |x| x.max(off + 1)));
            let replaying = off < st.replay_until;
            match prepared {
                Prepared::Undecodable(e) => {
                    if !replaying {
                        io.dead_letter(msg, e.reason_code(), &e.to_string()).await?;
                        dlq_total.inc();
                    }
                }
                Prepared::Watermark(w) => {
                    if !replaying {
                        st.sources.observe(
                            w.source_partition as usize,
                            w.source_partitions as usize,
                            w.time,
                        );
                    }
                }
                Prepared::Usage {
                    at,
                    id,
                    view,
                    split,
                } => {
                    let trace = match probes.begin("rater.rate", msg) {
                        Trace::None => None,
                        t => Some(std::sync::Arc::new(t)),
                    };
                    if !replaying {
                        io.audit(&topics.usage, "in", at);
                    }
                    let wm = st.sources.min();
                    // the record owned, made once when a window first keeps it as a row
                    // (then shared by every rule that does)
                    let mut owned: Option<std::sync::Arc<Usage>> = None;
                    for r in 0..nrules {
                        if quarantined.contains(&r) {
                            continue;
                        }
                        let header = &engine.rules[r].source.header;
                        let hops = header.hops();
                        let n = split.get(distinct.of_rule[r]).map_or(1, Vec::len);
                        for i in 0..n {
                            // the record whole in its pane, or a piece split from it
                            let (ps, part) = match split.get(distinct.of_rule[r]) {
                                None => (panes[r].start_of(view.interval_start), None),
                                Some(pieces) => (pieces[i].0, Some(&pieces[i].1)),
                            };
                            let part_view = part.map(|p| p.view());
                            let piece = part_view.as_ref().unwrap_or(&view);
                            let own = |owned: &mut Option<std::sync::Arc<Usage>>| match part {
                                Some(p) => p.clone(),
                                None => owned
                                    .get_or_insert_with(|| {
                                        std::sync::Arc::new(view.clone().into_usage())
                                    })
                                    .clone(),
                            };
                            // a pane piece counts once in each window it lies in; its key
                            // in a window is the usage id (and the pane, when hopping)
                            let key = || {
                                if hops == 1 {
                                    piece.id.to_string()
                                } else {
                                    format!("{}@{ps}", piece.id)
                                }
                            };
                            let k = if hops == 1 { id } else { id_key(&key()) };
                            for j in 0..hops {
                                let ws = ps - j * panes[r].size;
                                if !header.applies(ws) {
                                    continue;
                                }
                                if closed(ws + sizes[r], lateness[r], wm) {
                                    if replaying {
                                        continue; // handled before the checkpoint
                                    }
                                    // a window the watermark passed in this batch is
                                    // closed once the batch is read: until then the ids
                                    // it counted are its open ones (a copy right behind
                                    // the closing watermark, in a rater catching up, was
                                    // billed again)
                                    if st
                                        .open_ids
                                        .get(&(geometry[r], ws))
                                        .is_some_and(|ids| ids.contains(&k))
                                    {
                                        dup_total.inc();
                                        behind_close += 1;
                                        continue;
                                    }
                                    let seen = st.closed_ids[r].entry(ws).or_default();
                                    if !seen.insert(k) {
                                        dup_total.inc(); // counted in the window already
                                        behind_closed += 1;
                                        continue;
                                    }
                                    let e = late_taken.entry((p, r, ws)).or_insert((0, off, off));
                                    e.0 += 1;
                                    e.2 = off;
                                    let to_date = if engine.rules[r].reads_to_date {
                                        let ps = period.bounds(ws).0;
                                        vec![(
                                            piece.entity_id.to_string(),
                                            st.to_date[r].current(ps, piece.entity_id),
                                        )]
                                    } else {
                                        Vec::new()
                                    };
                                    match engine
                                        .evaluate_with(
                                            r,
                                            ws,
                                            &[own(&mut owned).as_ref()],
                                            p,
                                            Some(&key()),
                                            &to_date,
                                        )
                                        .await
                                    {
                                        Ok(ev) => {
                                            adjustments_total.add(ev.len() as u64);
                                            let fwd = trace.as_ref().and_then(|t| probes.finish(t));
                                            out.extend(ev.into_iter().map(|e| (e, fwd.clone())));
                                        }
                                        Err(e) => {
                                            failed_total.inc();
                                            quarantined.insert(r);
                                            quarantine(
                                                &mut io,
                                                engine,
                                                r,
                                                &topics.usage,
                                                p,
                                                off,
                                                &e,
                                            )
                                            .await?;
                                        }
                                    }
                                    continue;
                                }
                                let g = geometry[r];
                                let taken = match decided
                                    .iter()
                                    .find(|(dg, dw, dk, _)| (*dg, *dw, *dk) == (g, ws, k))
                                {
                                    Some(d) => d.3,
                                    None => {
                                        let t = st.open_ids.entry((g, ws)).or_default().insert(k);
                                        decided.push((g, ws, k, t));
                                        t
                                    }
                                };
                                let win = st.windows[r].entry(ws).or_default();
                                if taken {
                                    win.records += 1;
                                    if let Some(m) = &engine.rules[r].merge {
                                        let own = || own(&mut owned);
                                        merge_into(win, m, off, piece, own, &mut merge_key);
                                    } else {
                                        win.rows.push((off, own(&mut owned)));
                                    }
                                    if trace.is_some() {
                                        win.trace.clone_from(&trace);
                                    }
                                } else {
                                    dup_total.inc();
                                }
                            }
                        }
                    }
                }
            }
        }
        // close the windows the watermark has passed
        let mut markers: Vec<(i32, Millis)> = Vec::new();
        // windows closed in this batch (their ids) and windows past the dedup horizon
        let mut closed_now: Vec<(i32, usize, Millis)> = Vec::new();
        let mut closed_gone: Vec<(i32, usize, Millis)> = Vec::new();
        for (p, st) in parts.iter_mut() {
            let Some(wm) = st.sources.min() else { continue };
            // a geometry's ids of a window, sorted once for the rules that close it
            let mut closing: FastMap<(usize, Millis), std::sync::Arc<[u128]>> = FastMap::default();
            for r in 0..nrules {
                let due: Vec<Millis> = st.windows[r]
                    .keys()
                    .copied()
                    .filter(|ws| closed(ws + sizes[r], lateness[r], Some(wm)))
                    .collect();
                for ws in due {
                    let Some(win) = st.windows[r].remove(&ws) else {
                        continue;
                    };
                    let g = geometry[r];
                    let counted = closing
                        .entry((g, ws))
                        .or_insert_with(|| {
                            sorted_ids(st.open_ids.remove(&(g, ws)).unwrap_or_default()).into()
                        })
                        .clone();
                    // late usage this batch took after the watermark passed the window
                    // (before it closed here) stays known
                    let late = st.closed_ids[r]
                        .remove(&ws)
                        .map(|c| c.late)
                        .unwrap_or_default();
                    closed_now.push((*p, r, ws));
                    st.closed_ids[r].insert(ws, ClosedIds { counted, late });
                    closed_gone.extend(
                        prune_closed(&mut st.closed_ids[r], horizon)
                            .into_iter()
                            .map(|k| (*p, r, k)),
                    );
                    if quarantined.contains(&r) {
                        continue;
                    }
                    let rows: Vec<&Usage> = win.rows.iter().map(|(_, u)| u.as_ref()).collect();
                    let to_date = if engine.rules[r].reads_to_date {
                        let ps = period.bounds(ws).0;
                        let prev = period.bounds(ps - 1).0;
                        st.to_date[r].prune(prev);
                        st.to_date[r].close_window(ps, ws, &rows)?
                    } else {
                        Vec::new()
                    };
                    match engine
                        .evaluate_merged(r, ws, &rows, win.records, *p, None, &to_date)
                        .await
                    {
                        Ok(ev) => {
                            let fwd = win
                                .trace
                                .as_ref()
                                .and_then(|t| probes.finish_from(t, Some(batch_start)));
                            out.extend(ev.into_iter().map(|e| (e, fwd.clone())));
                        }
                        Err(e) => {
                            failed_total.inc();
                            quarantined.insert(r);
                            let first = win.rows.iter().map(|(o, _)| *o).min().unwrap_or(0);
                            quarantine(&mut io, engine, r, &topics.usage, *p, first, &e).await?;
                        }
                    }
                }
            }
            let through = (0..nrules)
                .map(|r| wm.saturating_sub(lateness[r]))
                .min()
                .unwrap_or(wm);
            if st.last_marker.is_none_or(|l| through > l) {
                markers.push((*p, through));
                st.last_marker = Some(through);
            }
        }
        for (ev, fwd) in &out {
            io.audit(&topics.rated, "out", meterflow_kafka::audit::of_rated(ev));
            io.send_with(
                &topics.rated,
                ev.entity_id.as_bytes(),
                Some(&meterflow_avro::encode(ev)),
                None,
                &fwd.as_ref().map(as_refs).unwrap_or_default(),
            )
            .await?;
        }
        events_total.add(out.len() as u64);
        if engine.rules.len() == quarantined.len() {
            anyhow::bail!("every rule is quarantined");
        }
        if behind_close + behind_closed > 0 {
            // copies that reached this rater after their window's watermark
            tracing::info!(
                in_this_batch = behind_close,
                before = behind_closed,
                "copies of usage counted in closed windows dropped"
            );
        }
        for ((p, r, ws), (records, first, last)) in &late_taken {
            tracing::info!(
                partition = p,
                rule = %rule_tag(engine, *r),
                window_start = %meterflow_types::time::fmt_rfc3339(*ws),
                records,
                offsets = %format!("{first}..={last}"),
                "late usage billed as adjustments"
            );
        }
        // The ids each closed window counted (and the late usage it took as adjustments),
        // sent whether or not progress is due now: acknowledged (with the revenue events)
        // before any checkpoint that passes it, so usage replayed after a crash is still
        // known as counted; a tombstone once past the horizon.
        closed_now.extend(late_taken.into_keys());
        closed_now.sort_unstable();
        closed_now.dedup();
        for (p, r, ws) in closed_now {
            let Some(c) = parts.get(&p).and_then(|st| st.closed_ids[r].get(&ws)) else {
                continue; // past the horizon already (tombstoned below)
            };
            let ids = if c.late.is_empty() {
                id_bytes(&c.counted)
            } else {
                id_bytes(&sorted_ids(c.counted.iter().chain(c.late.iter()).copied()))
            };
            let rec = meterflow_types::RaterClosedWindow {
                partition: p,
                rule: rule_tag(engine, r),
                window_start: ws,
                ids,
            };
            io.send(
                &topics.rater_state,
                closed_key(&rec.rule, p, ws).as_bytes(),
                &meterflow_avro::encode(&rec),
                None,
            )
            .await?;
        }
        for gone in closed_gone {
            forget_closed(&mut io, &topics.rater_state, engine, gone).await?;
        }
        // Durable progress when a window closed (its events, then the markers that say
        // so), on a rebalance or shutdown, and otherwise at most every checkpoint_interval:
        // until then the batch's records are only produced (a replay after a crash
        // re-emits identical ids, which the settler drops).
        let due = !markers.is_empty()
            || !batch.rebalances.is_empty()
            || ctx.shutdown.is_cancelled()
            || last_commit.elapsed() >= cfg.checkpoint_interval;
        if !due {
            continue;
        }
        last_commit = std::time::Instant::now();
        uncommitted = false;
        // The revenue events (adjustments too) and closed windows' ids acknowledged before
        // anything that passes them: the markers that say their windows are complete, and
        // the checkpoints (a replay skips what a checkpoint covers, so an adjustment not
        // yet durable under a durable checkpoint would be lost).
        io.commit(&[])
            .await
            .context("acknowledging revenue events")?;
        for (p, t) in markers {
            let w = Watermark {
                stage: "rater".into(),
                source_partition: p,
                source_partitions: usage_parts,
                time: t,
            };
            let bytes = meterflow_avro::encode(&w);
            for rp in 0..rated_parts {
                io.send(&topics.rated, b"", &bytes, Some(rp)).await?;
            }
        }
        // period-to-date state, then checkpoints, then offsets
        for (p, st) in parts.iter_mut() {
            for (r, t) in st.to_date.iter_mut().enumerate() {
                let rule = rule_tag(engine, r);
                for ((ps, entity), e) in t.take_dirty() {
                    let rec = meterflow_types::RaterToDate {
                        partition: *p,
                        rule: rule.clone(),
                        period_start: ps,
                        entity_id: entity.clone(),
                        last_window: e.last_window,
                        before: e.before.to_vec(),
                        after: e.after.to_vec(),
                    };
                    io.send(
                        &topics.rater_state,
                        format!("todate|{p}|{rule}|{ps}|{entity}").as_bytes(),
                        &meterflow_avro::encode(&rec),
                        None,
                    )
                    .await?;
                }
            }
        }
        // checkpoints, then offsets
        let mut offsets = Vec::new();
        for (p, st) in parts.iter() {
            let (Some(pos), Some(resume)) = (st.position, st.resume_offset()) else {
                continue;
            };
            let cp = RaterCheckpoint {
                ruleset: ruleset.clone(),
                partition: *p,
                resume_offset: resume,
                position: pos.max(st.replay_until),
                source_times: st.sources.to_vec(),
            };
            io.send(
                &topics.rater_state,
                format!("{ruleset}|{p}").as_bytes(),
                &meterflow_avro::encode(&cp),
                None,
            )
            .await?;
            offsets.push((topics.usage.clone(), *p, resume));
        }
        // the checkpoints (and everything before them) acknowledged, then the offsets: one
        // commit does both in that order
        io.commit(&offsets).await?;
    }
    Ok(())
}

/// A rule failed at run time: it is quarantined (the other rules go on) and reported —
/// logged, counted, and a dead-letter record naming the rule, the window's first usage
/// record and the error, with the rule's SQL as the payload.
async fn quarantine(
    io: &mut StageIo,
    engine: &Engine,
    r: usize,
    topic: &str,
    partition: i32,
    offset: i64,
    e: &rules::RuleError,
) -> Result<()> {
    let src = &engine.rules[r].source;
    tracing::error!(rule = %src.header.name, version = src.header.version, error = %e, "rule quarantined: it prices nothing until the rater restarts with a fixed rule set");
    io.dead_letter_at(
        meterflow_kafka::Coordinates {
            topic,
            partition,
            offset,
            key: Some(src.header.name.as_bytes()),
            payload: src.sql.as_bytes(),
        },
        "rule_failed",
        &format!("rule {}@{}: {e}", src.header.name, src.header.version),
    )
    .await
}

/// The rater's durable state, read once: the checkpoint of every usage partition (of the
/// first rule set in `accept` that has one), and every period-to-date entry.
fn load_state(cfg: &KafkaConfig, accept: &[String]) -> Result<SavedState> {
    let mut checkpoints: HashMap<i32, (usize, RaterCheckpoint)> = HashMap::new();
    let mut to_date = Vec::new();
    let mut closed = Vec::new();
    for (k, r) in meterflow_kafka::read_latest(cfg, &cfg.topics.rater_state)? {
        let p = r.payload.unwrap_or_default();
        if k.starts_with(b"todate|") {
            if let Ok(t) = meterflow_avro::decode(&p) {
                to_date.push(t);
            }
        } else if k.starts_with(b"closed|") {
            match meterflow_avro::decode(&p) {
                Ok(c) => closed.push(c),
                Err(e) => {
                    tracing::warn!(offset = r.offset, error = %e, "undecodable closed-window ids skipped")
                }
            }
        } else if let Ok(cp) = meterflow_avro::decode::<RaterCheckpoint>(&p) {
            let Some(rank) = accept.iter().position(|a| *a == cp.ruleset) else {
                continue;
            };
            if checkpoints
                .get(&cp.partition)
                .is_none_or(|(r, _)| rank < *r)
            {
                checkpoints.insert(cp.partition, (rank, cp));
            }
        }
    }
    Ok((
        checkpoints.into_iter().map(|(p, (_, c))| (p, c)).collect(),
        to_date,
        closed,
    ))
}

/// The rater's durable state: checkpoints by usage partition, period-to-date entries,
/// and the ids of recently closed windows.
type SavedState = (
    HashMap<i32, RaterCheckpoint>,
    Vec<meterflow_types::RaterToDate>,
    Vec<meterflow_types::RaterClosedWindow>,
);

/// A rule's `name@version`, as the rater's state records name it.
fn rule_tag(engine: &Engine, r: usize) -> String {
    let h = &engine.rules[r].source.header;
    format!("{}@{}", h.name, h.version)
}

/// Keep the ids of the last `horizon` (event time, by window start) of closed windows;
/// the window starts dropped.
fn prune_closed<T>(closed: &mut BTreeMap<Millis, T>, horizon: Millis) -> Vec<Millis> {
    let Some(newest) = closed.keys().next_back().copied() else {
        return Vec::new();
    };
    let kept = closed.split_off(&(newest - horizon));
    std::mem::replace(closed, kept).into_keys().collect()
}

/// Tombstone a closed window's ids on the state topic (past the horizon).
async fn forget_closed(
    io: &mut StageIo,
    state_topic: &str,
    engine: &Engine,
    (partition, r, window_start): (i32, usize, Millis),
) -> Result<()> {
    let key = closed_key(&rule_tag(engine, r), partition, window_start);
    io.send_with(state_topic, key.as_bytes(), None, None, &[])
        .await
}

/// The state-topic key of a closed window's ids.
fn closed_key(rule: &str, partition: i32, window_start: Millis) -> String {
    format!("closed|{partition}|{rule}|{window_start}")
}

/// A window's id keys (sorted) as `RaterClosedWindow::ids` holds them: the same window
/// always gives the same bytes.
fn id_bytes(sorted: &[u128]) -> Vec<u8> {
    sorted.iter().flat_map(|k| k.to_be_bytes()).collect()
}

/// The rules' distinct panes, and each rule's index among them: a record is split once
/// per pane, not once per rule.
struct Distinct {
    panes: Vec<Tumbling>,
    of_rule: Vec<usize>,
}

impl Distinct {
    fn of(rule_panes: &[Tumbling]) -> Distinct {
        let mut panes: Vec<Tumbling> = Vec::new();
        let of_rule = rule_panes
            .iter()
            .map(|p| match panes.iter().position(|q| q == p) {
                Some(i) => i,
                None => {
                    panes.push(*p);
                    panes.len() - 1
                }
            })
            .collect();
        Distinct { panes, of_rule }
    }
}

/// A usage message as the batch's threads leave it for the main loop.
// Nearly every message is the large variant: boxing it would allocate once a message
// on the hot path to save space in a batch's one vector.
#[allow(clippy::large_enum_variant)]
enum Prepared<'a> {
    Undecodable(meterflow_avro::DecodeError),
    Watermark(Watermark),
    Usage {
        /// What the audit counts of it.
        at: (Millis, Dec),
        /// Its id as a key (`id_key`).
        id: u128,
        /// The record, a view of the message's bytes.
        view: UsageView<'a>,
        /// Its pieces in each distinct pane (`Distinct::panes`); empty when it lies in
        /// one window of every pane, the usual case (then it is owned only if a window
        /// keeps it as a row of its own).
        split: Vec<Pieces>,
    },
}

/// Decode one usage message and split it into its panes' pieces (pure: everything that
/// does not depend on the records before it).
fn prepare<'a>(
    m: &'a meterflow_kafka::OwnedMessage,
    d: &Distinct,
    keep_labels: bool,
) -> Prepared<'a> {
    // labels only if a rule reads them: windows do not hold them otherwise
    let view = match meterflow_avro::decode_usage_view(m.payload().unwrap_or_default(), keep_labels)
    {
        Err(e) => return Prepared::Undecodable(e),
        Ok(UsageViewMsg::Watermark(w)) => return Prepared::Watermark(w),
        Ok(UsageViewMsg::Usage(u)) => u,
    };
    let at = meterflow_kafka::audit::of_usage_view(&view);
    let id = id_key(&view.id);
    let (start, end) = (view.interval_start, view.interval_end);
    let whole = |pane: &Tumbling| end <= start || pane.start_of(start) == pane.start_of(end - 1);
    let split = if d.panes.iter().all(whole) {
        Vec::new()
    } else {
        let u = std::sync::Arc::new(view.clone().into_usage());
        d.panes
            .iter()
            .map(|pane| {
                // a record inside one pane is shared as it is; others are split pro rata
                if whole(pane) {
                    vec![(pane.start_of(start), u.clone())]
                } else {
                    split_usage(&u, *pane)
                        .into_iter()
                        .map(|(ws, piece)| (ws, std::sync::Arc::new(piece)))
                        .collect()
                }
            })
            .collect()
    };
    Prepared::Usage {
        at,
        id,
        view,
        split,
    }
}

/// Every message of a batch prepared, in order; a large batch's second half on a thread
/// of its own (decoding and splitting are pure and were a large part of the main loop's
/// time; windows, duplicates and closing depend on the order).
fn prepare_batch<'a>(
    messages: &'a [meterflow_kafka::OwnedMessage],
    d: &Distinct,
    keep_labels: bool,
) -> Vec<Prepared<'a>> {
    // the decoder never panics on input (fuzzed); were it to, as on the main loop
    meterflow_runtime::map_in_halves(messages, |m| prepare(m, d, keep_labels))
}

/// A usage record's pieces, one per window it overlaps: (window start, piece).
pub(crate) type Pieces = Vec<(Millis, std::sync::Arc<Usage>)>;

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(start: Millis, end: Millis, vcpu: &str) -> Usage {
        Usage {
            id: "u".into(),
            sample_id: "s".into(),
            instance_id: "i".into(),
            entity_id: "e".into(),
            user_id: "u".into(),
            project: None,
            node_id: "n".into(),
            site: "x".into(),
            kind: "vm".into(),
            flavor: None,
            interval_start: start,
            interval_end: end,
            vcpu_seconds: vcpu.parse().expect("dec"),
            cpu_seconds: Dec::ZERO,
            memory_byte_seconds: Dec::from_int(7),
            memory_used_byte_seconds: None,
            net_rx_bytes: Dec::ZERO,
            net_tx_bytes: Dec::from_int(3),
            disk_read_bytes: Dec::ZERO,
            disk_write_bytes: Dec::ZERO,
            labels: Default::default(),
        }
    }

    #[test]
    fn interval_crossing_a_window_boundary_is_split_pro_rata() {
        let u = usage(3_000_000, 4_200_000, "2400");
        let parts = split_usage(&u, Tumbling::new(3_600_000));
        assert_eq!(parts.len(), 2);
        assert_eq!((parts[0].0, parts[1].0), (0, 3_600_000));
        assert_eq!(parts[0].1.vcpu_seconds.to_string(), "1200");
        assert_eq!(parts[1].1.vcpu_seconds.to_string(), "1200");
        assert_eq!(parts[0].1.interval_end, 3_600_000);
        assert_eq!(
            parts[0].1.net_tx_bytes + parts[1].1.net_tx_bytes,
            Dec::from_int(3)
        );
        assert_eq!(
            parts[0].1.memory_byte_seconds + parts[1].1.memory_byte_seconds,
            Dec::from_int(7)
        );
    }

    #[test]
    fn closed_window_ids_are_kept_for_the_horizon_behind_the_newest() {
        let mut closed: BTreeMap<Millis, ClosedIds> = [0, 3_600, 7_200, 10_800]
            .map(|k| (k, ClosedIds::new(vec![k as u128], [])))
            .into();
        assert_eq!(prune_closed(&mut closed, 7_200), vec![0]);
        assert_eq!(
            closed.keys().copied().collect::<Vec<_>>(),
            vec![3_600, 7_200, 10_800]
        );
        assert!(closed[&3_600].contains(3_600));
        assert!(prune_closed(&mut BTreeMap::<Millis, ClosedIds>::new(), 7_200).is_empty());
    }

    #[test]
    fn closed_windows_with_the_same_ids_share_them_and_keep_late_ids_apart() {
        let a = ClosedIds::new(sorted_ids([9, 3, 5, 3]), []);
        assert_eq!(*a.counted, [3, 5, 9]);
        let mut b = ClosedIds::new(vec![3, 5, 9], [&a]);
        assert!(std::sync::Arc::ptr_eq(&a.counted, &b.counted));
        let c = ClosedIds::new(vec![3, 5], [&a, &b]);
        assert!(!std::sync::Arc::ptr_eq(&a.counted, &c.counted));
        // a copy of a counted id is refused; a new one is taken once, by this rule only
        assert!(!b.insert(5));
        assert!(b.insert(7));
        assert!(!b.insert(7));
        assert!(b.contains(7) && !a.contains(7));
        assert_eq!(
            id_bytes(&c.counted),
            [3u128.to_be_bytes(), 5u128.to_be_bytes()].concat()
        );
        assert!(ClosedIds::default().insert(1));
    }

    #[test]
    fn a_window_closes_only_after_end_plus_lateness() {
        assert!(!closed(100, 10, None));
        assert!(!closed(100, 10, Some(109)));
        assert!(closed(100, 10, Some(110)));
    }
}
