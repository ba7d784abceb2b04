//! `meterflow query`: on-demand metering over the bus (see `meterflow_query`).

use anyhow::Result;
use meterflow_kafka::KafkaConfig;
use std::time::Duration;

#[derive(clap::Args)]
pub struct QueryArgs {
    /// An instance id (repeat for several).
    #[arg(long = "instance")]
    pub instances: Vec<String>,
    /// Every instance this user owns.
    #[arg(long)]
    pub user: Option<String>,
    /// Every instance this billing entity owns.
    #[arg(long)]
    pub entity: Option<String>,
    /// Comma-separated: cpu, vcpu, memory, network, disk (default: all).
    #[arg(long, value_delimiter = ',')]
    pub metrics: Vec<String>,
    /// Usage of the samples ending after this time (RFC 3339).
    #[arg(long)]
    pub from: Option<String>,
    /// ... and at or before this one (RFC 3339; default: now).
    #[arg(long)]
    pub to: Option<String>,
    /// Seconds to wait for every node.
    #[arg(long, default_value = "10")]
    pub timeout: f64,
    /// Print the merged answer as JSON.
    #[arg(long)]
    pub json: bool,
    #[arg(long, default_value = "127.0.0.1:9092")]
    pub brokers: String,
}

fn time(s: &Option<String>) -> Result<Option<meterflow_types::Millis>> {
    s.as_deref()
        .map(meterflow_types::time::parse_rfc3339)
        .transpose()
        .map_err(anyhow::Error::msg)
}

/// Exit code 0 when every node answered, 3 when some did not (the answer is printed
/// either way).
pub async fn run(a: QueryArgs) -> Result<i32> {
    let cfg = KafkaConfig {
        brokers: a.brokers.clone(),
        ..KafkaConfig::default()
    };
    anyhow::ensure!(
        a.timeout.is_finite() && a.timeout > 0.0,
        "--timeout must be a positive number of seconds"
    );
    let q = meterflow_query::Query {
        instances: a.instances.clone(),
        user: a.user.clone(),
        entity: a.entity.clone(),
        metrics: a.metrics.clone(),
        from: time(&a.from)?,
        to: time(&a.to)?,
        timeout: Duration::from_secs_f64(a.timeout),
    };
    let ans = meterflow_query::ask(&cfg, &q).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&ans)?);
    } else {
        println!(
            "{:<10} {:<10} {:<38} {:<10} {:<9} {:>6}  usage",
            "user", "entity", "instance", "node", "state", "samples"
        );
        for r in &ans.rows {
            let usage: Vec<String> = r.usage.iter().map(|(k, v)| format!("{k}={v}")).collect();
            println!(
                "{:<10} {:<10} {:<38} {:<10} {:<9} {:>6}  {}",
                r.user_id.as_deref().unwrap_or("-"),
                r.entity_id.as_deref().unwrap_or("-"),
                r.instance_id,
                r.node_id,
                r.state,
                r.samples,
                usage.join(" ")
            );
        }
        println!(
            "\n{} of {} node(s) answered{}",
            ans.answered.len(),
            ans.nodes.len(),
            if ans.missing.is_empty() {
                String::new()
            } else {
                format!("; no answer from: {}", ans.missing.join(", "))
            }
        );
        for (node, errs) in &ans.errors {
            for e in errs {
                println!("{node}: could not read live: {e}");
            }
        }
    }
    Ok(if ans.missing.is_empty() { 0 } else { 3 })
}
