//! `meterflow rules apply <dir>`: publish a rule set to the control topic; every rater
//! switches to it between two batches, without a restart, and the switch takes effect in
//! event time at a window boundary (`--at`). `meterflow rules get`: the applied set, as
//! files. See `meterflow_rater::ruleset` for how a candidate is merged with the active
//! set and what is refused.

use anyhow::{bail, Context, Result};
use meterflow_kafka::{read_latest, KafkaConfig, Outbox};
use meterflow_rater::rules::Engine;
use meterflow_rater::ruleset::{self, Files};
use meterflow_types::time::{fmt_rfc3339, parse_rfc3339};
use meterflow_types::{Millis, RaterCheckpoint, RuleSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(clap::Args)]
pub struct ApplyArgs {
    /// The candidate rules (and reference tables).
    pub dir: PathBuf,
    /// Event time of the switch (RFC 3339): a window start of every rule that changes,
    /// later than the raters' watermark. Default: the first such boundary after it.
    #[arg(long)]
    pub at: Option<String>,
    /// The rules the raters run now, for the first apply (afterwards the control topic
    /// holds them).
    #[arg(long)]
    pub active: Option<PathBuf>,
    /// Print what would change and publish nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[arg(long, default_value = "127.0.0.1:9092")]
    pub brokers: String,
}

#[derive(clap::Args)]
pub struct GetArgs {
    /// Where to write the applied rule set's files.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value = "127.0.0.1:9092")]
    pub brokers: String,
}

pub(crate) fn kafka(brokers: &str) -> KafkaConfig {
    KafkaConfig {
        brokers: brokers.to_string(),
        ..KafkaConfig::default()
    }
}

/// The rule set on the control topic, if one was applied.
pub fn applied(cfg: &KafkaConfig) -> Result<Option<RuleSet>> {
    let latest = tokio::task::block_in_place(|| read_latest(cfg, &cfg.topics.control))?;
    let Some((_, r)) = latest.into_iter().find(|(k, _)| k == ruleset::KEY) else {
        return Ok(None);
    };
    let rs = meterflow_avro::decode(r.payload.as_deref().unwrap_or_default())
        .context("the rule set on the control topic does not decode")?;
    Ok(Some(rs))
}

/// The rules to re-rate with: `explicit` if given, else the applied set (written to a
/// directory of this process), else `rules/`.
pub fn resolve(cfg: &KafkaConfig, explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    match applied(cfg)? {
        Some(rs) => {
            let dir = std::env::temp_dir()
                .join(format!("meterflow-cli-{}", std::process::id()))
                .join(&rs.id);
            ruleset::materialize(&ruleset::files_of(&rs), &dir).map_err(anyhow::Error::msg)?;
            Ok(dir)
        }
        None => Ok(PathBuf::from("rules")),
    }
}

async fn compile(dir: &Path) -> Result<Engine> {
    Engine::load(dir, 256 << 20, Duration::from_secs(10))
        .await
        .with_context(|| format!("rules in {}", dir.display()))
}

/// How far the raters have got: the highest watermark among their checkpoints.
fn raters_watermark(cfg: &KafkaConfig) -> Result<Option<Millis>> {
    let state = tokio::task::block_in_place(|| read_latest(cfg, &cfg.topics.rater_state))?;
    Ok(state
        .into_iter()
        .filter(|(k, _)| !k.starts_with(b"todate|"))
        .filter_map(|(_, r)| meterflow_avro::decode::<RaterCheckpoint>(&r.payload?).ok())
        .filter_map(|cp| meterflow_types::watermark::SourceTimes::from_vec(&cp.source_times).min())
        .max())
}

fn gcd(a: i64, b: i64) -> i64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

pub async fn apply(a: ApplyArgs) -> Result<()> {
    let cfg = kafka(&a.brokers);
    meterflow_kafka::ensure_topics(&cfg).await?;
    let candidate_engine = compile(&a.dir).await?;
    let candidate = ruleset::read_dir(&a.dir).map_err(anyhow::Error::msg)?;
    let (active, previous): (Files, String) = match (applied(&cfg)?, &a.active) {
        (Some(_), Some(_)) => bail!(
            "a rule set is applied already: the control topic holds the active rules (drop --active)"
        ),
        (Some(rs), None) => (ruleset::files_of(&rs), rs.id),
        (None, Some(dir)) => (
            ruleset::read_dir(dir).map_err(anyhow::Error::msg)?,
            compile(dir).await?.ruleset_id(),
        ),
        (None, None) => bail!(
            "no rule set on the control topic yet: name the rules the raters run now with --active <dir>"
        ),
    };
    let watermark = raters_watermark(&cfg)?;
    let at = match &a.at {
        Some(t) => {
            let at = parse_rfc3339(t).map_err(|e| anyhow::anyhow!("--at {t:?}: {e}"))?;
            if let Some(wm) = watermark.filter(|wm| at <= *wm) {
                bail!(
                    "the raters' watermark is at {} already: windows from {t} on may have closed under the active rules. Pick a later --at",
                    fmt_rfc3339(wm)
                );
            }
            at
        }
        None => {
            // the first boundary after the watermark (or now) common to every rule
            let step = candidate_engine
                .rules
                .iter()
                .map(|r| r.source.header.window)
                .chain(
                    ruleset::headers(&active)
                        .map_err(anyhow::Error::msg)?
                        .iter()
                        .map(|h| h.window),
                )
                .fold(0, |acc, w| if acc == 0 { w } else { acc / gcd(acc, w) * w });
            let from = watermark.unwrap_or_else(meterflow_kafka::now_ms);
            (from.div_euclid(step) + 1) * step
        }
    };
    let (merged, changes) = ruleset::merge(&active, &candidate, at).map_err(anyhow::Error::msg)?;
    let check_dir = std::env::temp_dir()
        .join(format!("meterflow-cli-{}", std::process::id()))
        .join("merged");
    ruleset::materialize(&merged, &check_dir).map_err(anyhow::Error::msg)?;
    let engine = compile(&check_dir).await.context("the merged rule set")?;
    let _ = std::fs::remove_dir_all(&check_dir);
    let id = engine.ruleset_id();
    if id == previous {
        println!("nothing to apply: the candidate is the active rule set ({id})");
        return Ok(());
    }
    println!(
        "rule set {previous} → {id}, switching at {} (raters' watermark: {})",
        fmt_rfc3339(at),
        watermark.map_or("none yet".to_string(), fmt_rfc3339)
    );
    for c in &changes {
        println!("  {c}");
    }
    for r in &engine.rules {
        let h = &r.source.header;
        println!(
            "  = {}@{} [{}, {})",
            h.name,
            h.version,
            h.valid_from.map_or("-∞".into(), fmt_rfc3339),
            h.valid_to.map_or("∞".into(), fmt_rfc3339)
        );
    }
    if a.dry_run {
        println!("dry run: nothing published");
        return Ok(());
    }
    let rs = RuleSet {
        id: id.clone(),
        previous: Some(previous),
        switch_at: Some(at),
        applied_at: meterflow_kafka::now_ms(),
        applied_by: format!(
            "{}@{}",
            std::env::var("USER").unwrap_or_else(|_| "unknown".into()),
            meterflow_kafka::default_member()
        ),
        files: merged.into_iter().collect(),
    };
    let mut out = Outbox::connect(&cfg, "meterflow-rules")?;
    out.send(
        &cfg.topics.control,
        ruleset::KEY,
        &meterflow_avro::encode(&rs),
        None,
    )
    .await?;
    out.flush().await?;
    println!("applied: rule set {id} on {}", cfg.topics.control);
    Ok(())
}

pub async fn get(a: GetArgs) -> Result<()> {
    let cfg = kafka(&a.brokers);
    let Some(rs) = applied(&cfg)? else {
        bail!("no rule set has been applied on {}", cfg.topics.control);
    };
    std::fs::create_dir_all(&a.out)?;
    for (name, bytes) in &rs.files {
        anyhow::ensure!(
            !name.contains('/') && !name.starts_with('.'),
            "file name {name:?} is not a plain name"
        );
        std::fs::write(a.out.join(name), bytes)?;
    }
    println!(
        "rule set {} ({} files, switch at {}, applied by {} at {}) written to {}",
        rs.id,
        rs.files.len(),
        rs.switch_at.map_or("-".into(), fmt_rfc3339),
        rs.applied_by,
        fmt_rfc3339(rs.applied_at),
        a.out.display()
    );
    Ok(())
}
