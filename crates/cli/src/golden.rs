//! `meterflow rules test <dir>`: every rule `<name>.sql` is run on the usage in its
//! golden file `<name>.golden.json` and must produce exactly the expected events.
//!
//! ```json
//! { "window_start": "2026-01-01T00:00:00Z",
//!   "usage": [ { "entity_id": "acme", "vcpu_seconds": "7200" } ],
//!   "expect": [ { "entity_id": "acme", "quantity": "2", "amount": "0.072" } ] }
//! ```
//! Usage fields left out default to empty strings and zero quantities; the interval
//! defaults to the whole window. Rules reading `usage_to_date` get it from an optional
//! `"usage_to_date": [ { "entity_id": "acme", "vcpu_seconds": "3600000" } ]`.

use anyhow::{Context, Result};
use meterflow_rater::rules::Engine;
use meterflow_types::{Dec, Usage};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Golden {
    window_start: String,
    usage: Vec<GoldenUsage>,
    /// For rules reading `usage_to_date`: each entity's usage earlier in the period.
    #[serde(default)]
    usage_to_date: Vec<GoldenUsage>,
    expect: Vec<Expected>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct GoldenUsage {
    entity_id: String,
    user_id: String,
    project: Option<String>,
    instance_id: String,
    node_id: String,
    site: String,
    kind: String,
    flavor: Option<String>,
    vcpu_seconds: Dec,
    cpu_seconds: Dec,
    memory_byte_seconds: Dec,
    memory_used_byte_seconds: Option<Dec>,
    net_rx_bytes: Dec,
    net_tx_bytes: Dec,
    disk_read_bytes: Dec,
    disk_write_bytes: Dec,
    labels: meterflow_types::Labels,
}

impl GoldenUsage {
    /// The usage record, over the whole window `[ws, we)`.
    fn into_usage(self, i: usize, ws: i64, we: i64) -> Usage {
        Usage {
            id: format!("golden-{i}"),
            sample_id: format!("golden-{i}"),
            instance_id: self.instance_id,
            entity_id: self.entity_id,
            user_id: self.user_id,
            project: self.project,
            node_id: self.node_id,
            site: self.site,
            kind: self.kind,
            flavor: self.flavor,
            interval_start: ws,
            interval_end: we,
            vcpu_seconds: self.vcpu_seconds,
            cpu_seconds: self.cpu_seconds,
            memory_byte_seconds: self.memory_byte_seconds,
            memory_used_byte_seconds: self.memory_used_byte_seconds,
            net_rx_bytes: self.net_rx_bytes,
            net_tx_bytes: self.net_tx_bytes,
            disk_read_bytes: self.disk_read_bytes,
            disk_write_bytes: self.disk_write_bytes,
            labels: self.labels,
        }
    }
}

#[derive(Deserialize, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[serde(deny_unknown_fields)]
struct Expected {
    entity_id: String,
    quantity: Dec,
    amount: Dec,
}

/// Runs every golden file; returns the number of rules checked, or an error that names
/// each rule that failed and why.
pub async fn run(dir: &Path) -> Result<usize> {
    let engine = Engine::load(dir, 256 << 20, Duration::from_secs(10)).await?;
    let paths: Vec<_> = engine.rules.iter().map(|r| r.source.path.clone()).collect();
    let mut failures = Vec::new();
    for (idx, path) in paths.iter().enumerate() {
        let name = path.display().to_string();
        let golden_path = path.with_extension("golden.json");
        let golden: Golden = match std::fs::read_to_string(&golden_path) {
            Err(_) => {
                failures.push(format!("{name}: no golden file {}", golden_path.display()));
                continue;
            }
            Ok(t) => {
                serde_json::from_str(&t).with_context(|| format!("{}", golden_path.display()))?
            }
        };
        let ws = meterflow_types::time::parse_rfc3339(&golden.window_start)
            .map_err(anyhow::Error::msg)?;
        let we = ws + engine.rules[idx].source.header.window;
        let usage = |(i, g): (usize, GoldenUsage)| g.into_usage(i, ws, we);
        let rows: Vec<Usage> = golden.usage.into_iter().enumerate().map(usage).collect();
        let refs: Vec<&Usage> = rows.iter().collect();
        let to_date: Vec<(String, meterflow_rater::todate::Sums)> = golden
            .usage_to_date
            .into_iter()
            .enumerate()
            .map(usage)
            .map(|u| (u.entity_id.clone(), meterflow_rater::todate::sums_of(&u)))
            .collect();
        let events = engine
            .evaluate_with(idx, ws, &refs, 0, None, &to_date)
            .await?;
        let mut got: Vec<Expected> = events
            .into_iter()
            .map(|e| Expected {
                entity_id: e.entity_id,
                quantity: e.quantity,
                amount: e.amount,
            })
            .collect();
        got.sort();
        let mut want = golden.expect;
        want.sort();
        if got == want {
            println!("ok    {name} ({} events)", got.len());
        } else {
            // per entity: a rule may emit several events for one (tiers, shortfalls)
            let by_entity = |v: &[Expected]| {
                let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
                for e in v {
                    m.entry(e.entity_id.clone())
                        .or_default()
                        .push(format!("quantity {} amount {}", e.quantity, e.amount));
                }
                m
            };
            let (g, w) = (by_entity(&got), by_entity(&want));
            let before = failures.len();
            for k in g
                .keys()
                .chain(w.keys())
                .collect::<std::collections::BTreeSet<_>>()
            {
                match (g.get(k), w.get(k)) {
                    (Some(a), Some(b)) if a != b => failures.push(format!(
                        "{name}: entity {k}: got [{}], expected [{}]",
                        a.join("; "),
                        b.join("; ")
                    )),
                    (Some(_), None) => {
                        failures.push(format!("{name}: entity {k}: unexpected event"))
                    }
                    (None, Some(_)) => {
                        failures.push(format!("{name}: entity {k}: expected event missing"))
                    }
                    _ => {}
                }
            }
            if failures.len() == before {
                failures.push(format!("{name}: events differ"));
            }
        }
    }
    if failures.is_empty() {
        Ok(paths.len())
    } else {
        for f in &failures {
            println!("FAIL  {f}");
        }
        anyhow::bail!("{} golden check(s) failed", failures.len())
    }
}
