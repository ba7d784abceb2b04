//! `meterflow probe add|remove|list`: measurement points enabled at run time, through the
//! compacted control topic (key `probe|<stage>.<point>`). Every running stage applies a
//! change between batches, within about a second, without a restart.

use crate::apply::kafka;
use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use meterflow_kafka::probe::{self, KEY_PREFIX, MEASURES, POINTS};
use meterflow_kafka::{ensure_topics, read_latest, KafkaConfig, Outbox};
use meterflow_types::time::fmt_rfc3339;
use meterflow_types::ProbeSpec;

#[derive(Subcommand)]
pub enum ProbeCmd {
    /// Enable (or change) a measurement point: `<stage>.<point>`.
    Add(AddArgs),
    /// Disable a measurement point.
    Remove(RemoveArgs),
    /// The points enabled now (or, with --points, every point there is).
    List(ListArgs),
}

#[derive(Args)]
pub struct AddArgs {
    /// `<stage>.<point>`, e.g. enricher.join (see `probe list --points`).
    pub point: String,
    /// Comma-separated: hop_latency, queue_dwell, processing_time, lag, or all.
    #[arg(long, default_value = "all")]
    pub measure: Vec<String>,
    /// Share of messages without a trail that start one here, in (0, 1]. A message that
    /// already carries a trail is always measured.
    #[arg(long, default_value = "1")]
    pub sample_rate: String,
    #[arg(long, default_value = "127.0.0.1:9092")]
    pub brokers: String,
}

#[derive(Args)]
pub struct RemoveArgs {
    pub point: String,
    #[arg(long, default_value = "127.0.0.1:9092")]
    pub brokers: String,
}

#[derive(Args)]
pub struct ListArgs {
    /// Every point a probe can be put on, with what it measures (no broker needed).
    #[arg(long)]
    pub points: bool,
    #[arg(long)]
    pub json: bool,
    #[arg(long, default_value = "127.0.0.1:9092")]
    pub brokers: String,
}

/// The probes on the control topic now.
pub fn enabled(cfg: &KafkaConfig) -> Result<Vec<ProbeSpec>> {
    let mut out = Vec::new();
    for (k, r) in read_latest(cfg, &cfg.topics.control)? {
        if !k.starts_with(KEY_PREFIX.as_bytes()) {
            continue;
        }
        match meterflow_avro::decode::<ProbeSpec>(r.payload.as_deref().unwrap_or_default()) {
            Ok(s) => out.push(s),
            Err(e) => tracing::warn!(offset = r.offset, error = %e, "undecodable probe record"),
        }
    }
    out.sort_by(|a, b| a.point.cmp(&b.point));
    Ok(out)
}

pub async fn run(cmd: ProbeCmd) -> Result<()> {
    match cmd {
        ProbeCmd::Add(a) => {
            let measures = probe::validate(&a.point, &a.measure, &a.sample_rate)
                .map_err(anyhow::Error::msg)?;
            let cfg = kafka(&a.brokers);
            ensure_topics(&cfg).await?;
            let spec = ProbeSpec {
                point: a.point.clone(),
                measures,
                sample_rate: a.sample_rate.trim().to_string(),
                added_at: meterflow_kafka::now_ms(),
                added_by: format!(
                    "{}@{}",
                    std::env::var("USER").unwrap_or_else(|_| "unknown".into()),
                    meterflow_kafka::default_member()
                ),
            };
            send(&cfg, &a.point, Some(&meterflow_avro::encode(&spec))).await?;
            println!(
                "probe {} on: {} at sample rate {}",
                spec.point,
                spec.measures.join(","),
                spec.sample_rate
            );
        }
        ProbeCmd::Remove(a) => {
            let cfg = kafka(&a.brokers);
            if !enabled(&cfg)?.iter().any(|s| s.point == a.point) {
                bail!("no probe on {} (see meterflow probe list)", a.point);
            }
            send(&cfg, &a.point, None).await?;
            println!("probe {} off", a.point);
        }
        ProbeCmd::List(a) if a.points => {
            if a.json {
                let v: Vec<_> = POINTS
                    .iter()
                    .map(|(p, what)| serde_json::json!({"point": p, "measures": MEASURES, "what": what}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for (p, what) in POINTS {
                    println!("{p:<18} {what}");
                }
                println!("measures: {}", MEASURES.join(", "));
            }
        }
        ProbeCmd::List(a) => {
            let specs = enabled(&kafka(&a.brokers))?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&specs)?);
            } else if specs.is_empty() {
                println!("no probes enabled");
            } else {
                println!("{:<18} {:<48} {:>6}  added", "point", "measures", "rate");
                for s in specs {
                    println!(
                        "{:<18} {:<48} {:>6}  {} by {}",
                        s.point,
                        s.measures.join(","),
                        s.sample_rate,
                        fmt_rfc3339(s.added_at),
                        s.added_by
                    );
                }
            }
        }
    }
    Ok(())
}

async fn send(cfg: &KafkaConfig, point: &str, payload: Option<&[u8]>) -> Result<()> {
    let mut out = Outbox::connect(cfg, "meterflow-probe")?;
    let key = format!("{KEY_PREFIX}{point}");
    out.send_with(&cfg.topics.control, key.as_bytes(), payload, None, &[])
        .await?;
    out.flush().await
}
