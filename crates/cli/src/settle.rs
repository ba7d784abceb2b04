//! `meterflow settle --period <p> [--entity <e>] --from <settlements> --out <dir>`:
//! rebuild a period's settlement files from the rated topic. Each version is rebuilt from
//! exactly the revenue events its manifest lists (first occurrence on the topic, as the
//! settler took them), so a healthy settlement regenerates byte for byte; the command
//! compares every file with the original and exits non-zero on any difference or on an
//! event the topic no longer holds.

use anyhow::{bail, Context, Result};
use meterflow_avro::RatedMsg;
use meterflow_kafka::KafkaConfig;
use meterflow_settler::files::{entity_dir, manifests, write_version, Manifest};
use meterflow_settler::store::{blocking, Store};
use meterflow_types::RatedEvent;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

#[derive(clap::Args)]
pub struct SettleArgs {
    /// The period label, as in `period=<label>` directories (e.g. 2026-03, 20260301T0000Z).
    #[arg(long)]
    pub period: String,
    /// Only this billing entity.
    #[arg(long)]
    pub entity: Option<String>,
    /// The settlement location (directory or s3://bucket/prefix) whose manifests say
    /// which events each version holds.
    #[arg(long)]
    pub from: String,
    /// Where the rebuilt files go (a fresh directory or location).
    #[arg(long)]
    pub out: String,
    #[arg(long, default_value = "127.0.0.1:9092")]
    pub brokers: String,
}

pub fn run(a: SettleArgs) -> Result<()> {
    let none = BTreeMap::new();
    let (from, out) = (Store::open(&a.from, &none)?, Store::open(&a.out, &none)?);
    let manifests: Vec<Manifest> = blocking(manifests(&from))?
        .into_iter()
        .filter(|m| m.period == a.period)
        .filter(|m| a.entity.as_ref().is_none_or(|e| &m.entity_id == e))
        .collect();
    if manifests.is_empty() {
        bail!(
            "no settlement of period {} in {}{}",
            a.period,
            from,
            a.entity
                .as_ref()
                .map(|e| format!(" for entity {e}"))
                .unwrap_or_default()
        );
    }
    let wanted: HashMap<&str, ()> = manifests
        .iter()
        .flat_map(|m| m.ids.iter().map(|i| (i.as_str(), ())))
        .collect();
    let cfg = KafkaConfig {
        brokers: a.brokers.clone(),
        ..Default::default()
    };
    let total: i64 = meterflow_kafka::high_watermarks(&cfg, &cfg.topics.rated)?
        .iter()
        .map(|(_, h)| *h)
        .sum();
    let bar = indicatif::ProgressBar::new(total.max(0) as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:40}] {human_pos}/{human_len} rated-topic records ({eta} left)",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut found: HashMap<String, (i32, i64, RatedEvent)> = HashMap::new();
    meterflow_kafka::scan_topic(&cfg, &cfg.topics.rated, Duration::from_secs(3600), |r| {
        bar.inc(1);
        let Ok(RatedMsg::Rated(e)) =
            meterflow_avro::decode_rated_msg(r.payload.as_deref().unwrap_or_default())
        else {
            return;
        };
        if wanted.contains_key(e.id.as_str()) && !found.contains_key(&e.id) {
            found.insert(e.id.clone(), (r.partition, r.offset, e));
        }
    })?;
    bar.finish_and_clear();
    let mut by_entity: BTreeMap<&str, Vec<&Manifest>> = BTreeMap::new();
    for m in &manifests {
        by_entity.entry(&m.entity_id).or_default().push(m);
    }
    let mut differences = Vec::new();
    let mut files = 0;
    for (entity, mut versions) in by_entity {
        versions.sort_by_key(|m| m.version);
        for m in versions {
            let mut events = Vec::with_capacity(m.ids.len());
            for id in &m.ids {
                match found.get(id) {
                    Some(e) => events.push(e.clone()),
                    None => differences.push(format!(
                        "{entity} v{}: event {id} is no longer on the rated topic",
                        m.version
                    )),
                }
            }
            let bounds = (
                meterflow_types::time::parse_rfc3339(&m.period_start)
                    .map_err(anyhow::Error::msg)?,
                meterflow_types::time::parse_rfc3339(&m.period_end).map_err(anyhow::Error::msg)?,
            );
            let opts = meterflow_settler::files::VersionOpts::of(m)?;
            let rebuilt = blocking(write_version(
                &out, &m.period, bounds, entity, events, &opts,
            ))
            .with_context(|| format!("rebuilding {entity} v{}", m.version))?;
            let dir = entity_dir(&m.period, entity);
            let manifest = meterflow_settler::files::version_name(m.version, "manifest.json");
            for f in rebuilt.files.keys().chain(std::iter::once(&manifest)) {
                files += 1;
                let path = format!("{dir}/{f}");
                let (x, y) = (blocking(from.get(&path))?, blocking(out.get(&path))?);
                match (x, y) {
                    (Some(x), Some(y)) if x == y => {}
                    (Some(_), Some(_)) => differences.push(format!("{entity}: {f} differs")),
                    (x, _) => differences.push(format!(
                        "{entity}: {f} missing ({})",
                        if x.is_none() { "original" } else { "rebuilt" }
                    )),
                }
            }
        }
    }
    if differences.is_empty() {
        println!(
            "period {}: {} file(s) of {} settlement version(s) rebuilt from the rated topic into {}, byte-identical",
            a.period,
            files,
            manifests.len(),
            out
        );
        Ok(())
    } else {
        for d in &differences {
            println!("DIFF  {d}");
        }
        bail!("{} difference(s)", differences.len())
    }
}
