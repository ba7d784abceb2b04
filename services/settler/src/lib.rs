//! The settler: deduplicates revenue events by id and, when the rater's markers show a
//! billing period complete, writes per-entity settlement files (see `files`). The
//! settlement directory is its durable state: a replay after a crash finds the periods
//! already written and skips the events they hold; events that arrive for a period
//! already written become a correction version holding only the delta.

pub mod files;

use anyhow::Result;
use meterflow_avro::RatedMsg;
use meterflow_kafka::{ensure_topics, KafkaConfig, Message, StageIo};
use meterflow_runtime::{Ctx, HasHttp, HttpConfig};
use meterflow_types::watermark::SourceTimes;
use meterflow_types::window::Period;
use meterflow_types::Settlement;
use meterflow_types::{Millis, RatedEvent};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

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
    pub out_dir: PathBuf,
    /// `month` (calendar, UTC), `day`, `week`, or a duration such as `6h`.
    pub period: String,
    pub batch_size: usize,
    /// Also write each file set's lines as FOCUS (`focus.csv`, FinOps Open Cost and Usage
    /// Specification columns), listed and checksummed in the manifest.
    pub focus: bool,
}

impl Default for SettlerConfig {
    fn default() -> SettlerConfig {
        SettlerConfig {
            kafka: KafkaConfig::default(),
            http: HttpConfig::default(),
            group: "meterflow-settler".into(),
            member: meterflow_kafka::default_member(),
            out_dir: PathBuf::from("settlements"),
            period: "month".into(),
            batch_size: 5000,
            focus: false,
        }
    }
}

impl HasHttp for SettlerConfig {
    fn http(&self) -> &HttpConfig {
        &self.http
    }
}

type Key = (Millis, String);

#[derive(Default)]
struct Open {
    events: Vec<(i32, i64, RatedEvent)>,
    ids: HashSet<String>,
}

#[derive(Default)]
struct PartState {
    sources: SourceTimes,
    position: Option<i64>,
}

/// The file beside a version's manifest that says its settlements record was
/// acknowledged.
fn announced_marker(root: &std::path::Path, m: &files::Manifest) -> std::path::PathBuf {
    files::entity_dir(root, &m.period, &m.entity_id)
        .join(files::version_name(m.version, "announced"))
}

/// Send a written version's record to the settlements topic (acknowledged with the next
/// commit; its marker is written after that).
async fn announce(
    io: &mut StageIo,
    topic: &str,
    root: &std::path::Path,
    m: &files::Manifest,
) -> Result<()> {
    let dir = files::entity_dir(root, &m.period, &m.entity_id);
    let rec = Settlement {
        entity_id: m.entity_id.clone(),
        period: m.period.clone(),
        period_start: meterflow_types::time::parse_rfc3339(&m.period_start)
            .map_err(anyhow::Error::msg)?,
        period_end: meterflow_types::time::parse_rfc3339(&m.period_end)
            .map_err(anyhow::Error::msg)?,
        version: m.version as i32,
        directory: dir.strip_prefix(root).unwrap_or(&dir).display().to_string(),
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

pub async fn run(cfg: SettlerConfig, ctx: Ctx) -> Result<()> {
    let period = Period::parse(&cfg.period).map_err(anyhow::Error::msg)?;
    ensure_topics(&cfg.kafka).await?;
    let topics = cfg.kafka.topics.clone();
    std::fs::create_dir_all(&cfg.out_dir)?;
    let mut io = StageIo::new(
        &cfg.kafka,
        "settler",
        &cfg.group,
        &[&topics.rated],
        &cfg.member,
    )?;
    let m = &ctx.metrics;
    // versions written but not yet announced (a crash between the files and the record)
    let mut to_mark: Vec<std::path::PathBuf> = Vec::new();
    for man in tokio::task::block_in_place(|| files::all_manifests(&cfg.out_dir))? {
        let marker = announced_marker(&cfg.out_dir, &man);
        if !marker.exists() {
            announce(&mut io, &topics.settlements, &cfg.out_dir, &man).await?;
            to_mark.push(marker);
        }
    }
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
    // per rated partition: its open periods
    let mut parts: HashMap<i32, PartState> = HashMap::new();
    let mut open: HashMap<i32, BTreeMap<Key, Open>> = HashMap::new();
    // ids already in written files, per (period start, entity), loaded on demand
    let mut written: HashMap<Key, HashSet<String>> = HashMap::new();
    while !ctx.shutdown.is_cancelled() {
        let batch = io
            .next_batch(cfg.batch_size, Duration::from_millis(200), &ctx.shutdown)
            .await?;
        for r in &batch.rebalances {
            if let meterflow_kafka::Assignment::Revoked(ps) = r {
                for (_, p) in ps {
                    parts.remove(p);
                    open.remove(p);
                }
            }
        }
        let mut corrections: BTreeMap<Key, Vec<(i32, i64, RatedEvent)>> = BTreeMap::new();
        for msg in &batch.messages {
            let p = msg.partition();
            let st = parts.entry(p).or_default();
            st.position = Some(msg.offset() + 1);
            match meterflow_avro::decode_rated_msg(msg.payload().unwrap_or_default()) {
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
                    let (ps, pe) = period.bounds(e.window_start);
                    let key = (ps, e.entity_id.clone());
                    let label = period.label(ps);
                    let done = written.entry(key.clone()).or_insert_with(|| {
                        let dir = files::entity_dir(&cfg.out_dir, &label, &e.entity_id);
                        files::existing(&dir)
                            .unwrap_or_default()
                            .into_iter()
                            .flat_map(|m| m.ids)
                            .collect()
                    });
                    let closed_before =
                        !done.is_empty() || st.sources.min().is_some_and(|t| t >= pe);
                    if done.contains(&e.id) {
                        dup_total.inc();
                    } else if closed_before && !done.is_empty() {
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
                        }
                    }
                }
            }
        }
        // close periods the markers show complete
        for (p, st) in parts.iter() {
            let Some(through) = st.sources.min() else {
                continue;
            };
            let Some(periods) = open.get_mut(p) else {
                continue;
            };
            let due: Vec<Key> = periods
                .keys()
                .filter(|(ps, _)| period.bounds(*ps).1 <= through)
                .cloned()
                .collect();
            for key in due {
                let Some(o) = periods.remove(&key) else {
                    continue;
                };
                let label = period.label(key.0);
                let ids: HashSet<String> = o.ids.clone();
                let man = tokio::task::block_in_place(|| {
                    files::write_version(
                        &cfg.out_dir,
                        &label,
                        period.bounds(key.0),
                        &key.1,
                        o.events,
                        cfg.focus,
                    )
                })?;
                tracing::info!(period = %label, entity = %key.1, lines = man.line_count, totals = ?man.totals, "settled");
                announce(&mut io, &topics.settlements, &cfg.out_dir, &man).await?;
                to_mark.push(announced_marker(&cfg.out_dir, &man));
                files_total.inc();
                written.entry(key).or_default().extend(ids);
            }
        }
        for (key, evs) in corrections {
            let label = period.label(key.0);
            let man = tokio::task::block_in_place(|| {
                files::write_version(
                    &cfg.out_dir,
                    &label,
                    period.bounds(key.0),
                    &key.1,
                    evs,
                    cfg.focus,
                )
            })?;
            tracing::info!(period = %label, entity = %key.1, version = man.version, "correction written");
            announce(&mut io, &topics.settlements, &cfg.out_dir, &man).await?;
            to_mark.push(announced_marker(&cfg.out_dir, &man));
            corrections_total.inc();
        }
        // commit: never past an event of a period not yet written
        let offsets: Vec<(String, i32, i64)> = parts
            .iter()
            .filter_map(|(p, st)| {
                let first_open = open.get(p).and_then(|m| {
                    m.values()
                        .flat_map(|o| o.events.iter().map(|(_, off, _)| *off))
                        .min()
                });
                first_open
                    .or(st.position)
                    .map(|o| (topics.rated.clone(), *p, o))
            })
            .collect();
        if !offsets.is_empty() || !to_mark.is_empty() {
            io.commit(&offsets).await?;
        }
        // the records are acknowledged: mark their versions announced
        for marker in to_mark.drain(..) {
            std::fs::write(&marker, b"")?;
        }
    }
    Ok(())
}
