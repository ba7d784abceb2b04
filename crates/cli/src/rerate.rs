//! `meterflow usage export` (the usage topic → a Parquet file) and `meterflow rerate`
//! (rules applied to recorded usage in batch: the stream's windows and ids, see
//! `meterflow_rater::batch`).

use anyhow::{Context, Result};
use meterflow_avro::UsageMsg;
use meterflow_kafka::KafkaConfig;
use meterflow_rater::batch::{
    count_rows, rerate_files, usage_files, RatedWriter, Row, UsageWriter,
};
use meterflow_rater::rules::Engine;
use meterflow_types::window::Period;
use meterflow_types::Dec;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(clap::Subcommand)]
pub enum UsageCmd {
    /// Write the usage records on the usage topic (with their partitions, and the
    /// enricher's watermark markers in place) to a Parquet file, for `meterflow rerate`
    /// and `meterflow rules diff`.
    Export {
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        range: TopicRange,
    },
}

/// A range of the usage topic: every partition whole, or the offset ranges named.
#[derive(clap::Args, Clone, Debug)]
pub struct TopicRange {
    /// `<partition>:<from>..<to>` (to exclusive; `<partition>:<from>..` to the end),
    /// repeatable; partitions not named are left out. Default: the whole topic.
    #[arg(long = "offsets", value_parser = parse_range)]
    pub offsets: Vec<(i32, i64, Option<i64>)>,
    #[arg(long, default_value = "127.0.0.1:9092")]
    pub brokers: String,
}

fn parse_range(s: &str) -> Result<(i32, i64, Option<i64>), String> {
    let bad = || format!("{s:?}: expected <partition>:<from>..<to> or <partition>:<from>..");
    let (p, r) = s.split_once(':').ok_or_else(bad)?;
    let (from, to) = r.split_once("..").ok_or_else(bad)?;
    let p: i32 = p.parse().map_err(|_| bad())?;
    let from: i64 = from.parse().map_err(|_| bad())?;
    let to: Option<i64> = if to.is_empty() {
        None
    } else {
        Some(to.parse().map_err(|_| bad())?)
    };
    if p < 0 || from < 0 || to.is_some_and(|t| t < from) {
        return Err(bad());
    }
    Ok((p, from, to))
}

impl TopicRange {
    fn contains(&self, partition: i32, offset: i64) -> bool {
        self.offsets.is_empty()
            || self.offsets.iter().any(|(p, from, to)| {
                *p == partition && offset >= *from && to.is_none_or(|t| offset < t)
            })
    }
    fn start(&self, partition: i32) -> i64 {
        self.offsets
            .iter()
            .filter(|(p, _, _)| *p == partition)
            .map(|(_, f, _)| *f)
            .min()
            .unwrap_or(0)
    }
}

/// Record a range of the usage topic as a Parquet file: (usage records, markers,
/// undecodable records skipped).
pub fn export_range(range: &TopicRange, out: &std::path::Path) -> Result<(u64, u64, u64)> {
    let cfg = KafkaConfig {
        brokers: range.brokers.clone(),
        ..Default::default()
    };
    let mut w = UsageWriter::create(out)?;
    let mut bad = 0u64;
    let mut markers = 0u64;
    let mut err = None;
    meterflow_kafka::scan_topic_from(
        &cfg,
        &cfg.topics.usage,
        |p| range.start(p),
        Duration::from_secs(3600),
        |r| {
            if err.is_some() || !range.contains(r.partition, r.offset) {
                return;
            }
            let row =
                match meterflow_avro::decode_usage_msg(r.payload.as_deref().unwrap_or_default()) {
                    Ok(UsageMsg::Usage(u)) => Row::Usage(r.partition, u),
                    Ok(UsageMsg::Watermark(m)) => {
                        markers += 1;
                        Row::Marker(r.partition, m)
                    }
                    Err(_) => {
                        bad += 1;
                        return;
                    }
                };
            if let Err(e) = w.push(row) {
                err = Some(e);
            }
        },
    )?;
    if let Some(e) = err {
        return Err(e);
    }
    Ok((w.finish()?, markers, bad))
}

pub fn export(cmd: UsageCmd) -> Result<()> {
    let UsageCmd::Export { out, range } = cmd;
    let (n, markers, bad) = export_range(&range, &out)?;
    println!(
        "{n} usage records and {markers} watermark markers written to {} ({bad} undecodable records skipped)",
        out.display()
    );
    Ok(())
}

/// Where the usage to replay comes from: Parquet files, or a range of the usage topic
/// (recorded first into a file of this process).
#[derive(clap::Args, Clone, Debug)]
pub struct UsageInput {
    /// Usage Parquet files, or directories of them (`meterflow usage export` writes one).
    #[arg(long, num_args = 1.., required_unless_present = "usage_topic")]
    pub usage: Vec<PathBuf>,
    /// Replay the usage topic itself (`--offsets` to choose ranges, `--brokers`).
    #[arg(long, conflicts_with = "usage")]
    pub usage_topic: bool,
    #[command(flatten)]
    pub range: TopicRange,
}

impl UsageInput {
    /// The Parquet files to read.
    pub fn files(&self) -> Result<Vec<PathBuf>> {
        if !self.usage_topic {
            return usage_files(&self.usage);
        }
        let dir = std::env::temp_dir().join(format!("meterflow-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let file = dir.join("usage-topic.parquet");
        let (n, markers, _) = tokio::task::block_in_place(|| export_range(&self.range, &file))?;
        eprintln!("recorded {n} usage records and {markers} markers from the usage topic");
        Ok(vec![file])
    }
}

#[derive(clap::Args)]
pub struct RerateArgs {
    #[command(flatten)]
    pub input: UsageInput,
    /// The rules (and reference tables) to apply.
    #[arg(long)]
    pub rules: PathBuf,
    /// Where `rated.parquet` goes.
    #[arg(long)]
    pub out: PathBuf,
    /// For files without watermark markers: how far usage may be out of event-time order;
    /// windows close once the input is this far past their end. (A recorded topic's
    /// markers close windows exactly as the stream did.)
    #[arg(long, default_value = "1d", value_parser = humantime::parse_duration)]
    pub max_disorder: Duration,
    /// Memory pool of the rule engine, in MiB.
    #[arg(long, default_value = "1024")]
    pub memory_mb: usize,
    /// As the rater's `billing_period`: what `usage_to_date` counts within.
    #[arg(long, default_value = "month")]
    pub billing_period: String,
    /// As the rater's `dedup_horizon`: how long usage ids of closed windows are kept to
    /// drop duplicates instead of pricing them as adjustments (recorded topics only).
    #[arg(long, default_value = "2h", value_parser = humantime::parse_duration)]
    pub dedup_horizon: Duration,
}

/// Totals of a re-rating: events, and Σ amount per (entity, currency).
pub struct Rerated {
    pub usage: u64,
    pub duplicates: u64,
    pub events: u64,
    pub totals: BTreeMap<(String, String), Dec>,
}

/// Add revenue events' amounts to their (entity, currency) totals.
fn add_amounts(
    totals: &mut BTreeMap<(String, String), Dec>,
    ev: &[meterflow_types::RatedEvent],
) -> Result<()> {
    for e in ev {
        let t = totals
            .entry((e.entity_id.clone(), e.currency.clone()))
            .or_insert(Dec::ZERO);
        *t = t.checked_add(e.amount)?;
    }
    Ok(())
}

/// One rule engine per core, for as many workers.
pub(crate) async fn engines(rules: &std::path::Path, memory_mb: usize) -> Result<Vec<Engine>> {
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(
            Engine::load(rules, memory_mb << 20, Duration::from_secs(600))
                .await
                .with_context(|| format!("rules in {}", rules.display()))?,
        );
    }
    Ok(v)
}

pub async fn rerate(a: &RerateArgs, progress: bool) -> Result<Rerated> {
    let engines = engines(&a.rules, a.memory_mb).await?;
    let files = a.input.files()?;
    let total = count_rows(&files)?;
    std::fs::create_dir_all(&a.out)?;
    let mut writer = RatedWriter::create(&a.out.join("rated.parquet"))?;
    let bar = if progress {
        let b = indicatif::ProgressBar::new(total);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{bar:40}] {human_pos}/{human_len} usage records ({per_sec}, {eta} left)",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut totals: BTreeMap<(String, String), Dec> = BTreeMap::new();
    let (usage, duplicates) = tokio::task::block_in_place(|| {
        rerate_files(
            &engines,
            Period::parse(&a.billing_period).map_err(anyhow::Error::msg)?,
            &files,
            a.max_disorder.as_millis() as i64,
            a.dedup_horizon.as_millis() as i64,
            |n| bar.inc(n),
            |ev| {
                add_amounts(&mut totals, ev)?;
                writer.write(ev)
            },
        )
    })?;
    let events = writer.finish()?;
    bar.finish_and_clear();
    Ok(Rerated {
        usage,
        duplicates,
        events,
        totals,
    })
}

pub async fn run(a: RerateArgs) -> Result<()> {
    let t = Instant::now();
    let r = rerate(&a, true).await.context("rerate failed")?;
    println!(
        "{} usage records ({} duplicates dropped) → {} revenue events in {} ({:.1} s)",
        r.usage,
        r.duplicates,
        r.events,
        a.out.join("rated.parquet").display(),
        t.elapsed().as_secs_f64()
    );
    println!(
        "{:<24} {:<8} {:>24}",
        "entity", "currency", "amount (unrounded)"
    );
    for ((e, c), amount) in &r.totals {
        println!("{e:<24} {c:<8} {:>24}", amount.to_string());
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct DiffArgs {
    /// The rules (and reference tables) proposed.
    #[arg(long)]
    pub candidate: PathBuf,
    /// The rules in force (default: the shipped `rules/`).
    #[arg(long, default_value = "rules", conflicts_with = "applied")]
    pub active: PathBuf,
    /// The rules in force are the set applied on the control topic (`--brokers`).
    #[arg(long)]
    pub applied: bool,
    #[command(flatten)]
    pub input: UsageInput,
    #[arg(long, default_value = "1d", value_parser = humantime::parse_duration)]
    pub max_disorder: Duration,
    /// As the rater's `billing_period`.
    #[arg(long, default_value = "month")]
    pub billing_period: String,
    /// One JSON document instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Σ amount per (entity, currency) of a rule set over recorded usage.
async fn totals(
    rules: &std::path::Path,
    files: &[PathBuf],
    max_disorder: Duration,
    period: Period,
) -> Result<BTreeMap<(String, String), Dec>> {
    let engines = engines(rules, 1024).await?;
    let mut t: BTreeMap<(String, String), Dec> = BTreeMap::new();
    tokio::task::block_in_place(|| {
        rerate_files(
            &engines,
            period,
            files,
            max_disorder.as_millis() as i64,
            2 * 3600 * 1000,
            |_| {},
            |ev| add_amounts(&mut t, ev),
        )
    })?;
    Ok(t)
}

/// `meterflow rules diff`: the revenue difference per entity between two rule sets on the
/// same recorded usage. Exit code 0 either way: a difference is the answer, not an error.
pub async fn diff(a: DiffArgs) -> Result<()> {
    let files = a.input.files()?;
    let period = Period::parse(&a.billing_period).map_err(anyhow::Error::msg)?;
    let active_rules = if a.applied {
        let cfg = KafkaConfig {
            brokers: a.input.range.brokers.clone(),
            ..Default::default()
        };
        anyhow::ensure!(
            crate::apply::applied(&cfg)?.is_some(),
            "--applied: no rule set has been applied on {}",
            cfg.topics.control
        );
        crate::apply::resolve(&cfg, None)?
    } else {
        a.active.clone()
    };
    let active = totals(&active_rules, &files, a.max_disorder, period).await?;
    let candidate = totals(&a.candidate, &files, a.max_disorder, period).await?;
    let keys: std::collections::BTreeSet<&(String, String)> =
        active.keys().chain(candidate.keys()).collect();
    let mut rows = Vec::new();
    for k in keys {
        let x = active.get(k).copied().unwrap_or(Dec::ZERO);
        let y = candidate.get(k).copied().unwrap_or(Dec::ZERO);
        let d = y.checked_sub(x)?;
        rows.push((k.0.clone(), k.1.clone(), x, y, d));
    }
    if a.json {
        let v: Vec<serde_json::Value> = rows
            .iter()
            .map(|(e, c, x, y, d)| {
                serde_json::json!({"entity_id": e, "currency": c, "active": x.to_string(),
                    "candidate": y.to_string(), "difference": d.to_string()})
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "{:<24} {:<8} {:>20} {:>20} {:>20}",
        "entity", "currency", "active", "candidate", "difference"
    );
    for (e, c, x, y, d) in &rows {
        println!(
            "{e:<24} {c:<8} {:>20} {:>20} {:>20}",
            x.to_string(),
            y.to_string(),
            d.to_string()
        );
    }
    let changed = rows.iter().filter(|r| r.4 != Dec::ZERO).count();
    println!("{changed} of {} entities change", rows.len());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offset_ranges_parse_and_select() {
        assert_eq!(parse_range("2:10..20"), Ok((2, 10, Some(20))));
        assert_eq!(parse_range("0:5.."), Ok((0, 5, None)));
        for bad in ["2:20..10", "x:1..2", "1:..", "1-2", "-1:0.."] {
            assert!(parse_range(bad).is_err(), "{bad}");
        }
        let r = TopicRange {
            offsets: vec![(1, 10, Some(20)), (3, 0, None)],
            brokers: String::new(),
        };
        assert!(r.contains(1, 10) && !r.contains(1, 20) && !r.contains(1, 9));
        assert!(r.contains(3, 1_000_000) && !r.contains(0, 0));
        assert_eq!((r.start(1), r.start(3), r.start(0)), (10, 0, 0));
        let all = TopicRange {
            offsets: Vec::new(),
            brokers: String::new(),
        };
        assert!(all.contains(7, 7));
    }
}
