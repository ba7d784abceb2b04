//! The rule engine against a hand-written Rust aggregation of the same rule on the same
//! data, in the same run: the shipped `vcpu_hours` rule over one window of usage rows.
//!
//! `cargo run --release -p meterflow-rater --bin bench-rules -- [rows] [entities] [rounds]`
//!
//! Both sides start from the same `&[&Usage]` a closing window holds and end with the
//! per-entity quantity and amount at 9 decimals; the run checks they agree exactly.

use meterflow_rater::rules::{parse_rule, Engine};
use meterflow_types::{Dec, Usage};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const RULE: &str = include_str!("../../../../rules/vcpu_hours.sql");

fn usage(i: usize, entities: usize) -> Usage {
    let d = |v: i64| Dec::from_int(v);
    Usage {
        id: format!("{i:032x}"),
        sample_id: format!("s{i}"),
        instance_id: format!("i-{}", i % 1000),
        entity_id: format!("entity-{}", i % entities),
        user_id: "u".into(),
        project: None,
        node_id: "n".into(),
        site: "s".into(),
        kind: "vm".into(),
        flavor: None,
        interval_start: 0,
        interval_end: 10_000,
        vcpu_seconds: Dec::from_scaled(((i % 8) as i128 + 1) * 10_000 + (i % 7) as i128, 3)
            .unwrap_or(Dec::ZERO),
        cpu_seconds: d(3),
        memory_byte_seconds: d(1 << 30),
        memory_used_byte_seconds: None,
        net_rx_bytes: d(1000),
        net_tx_bytes: d(2000),
        disk_read_bytes: d(0),
        disk_write_bytes: d(0),
        labels: Default::default(),
    }
}

/// vcpu_hours by hand: Σ vcpu_seconds per entity; quantity = Σ / 3600 and
/// amount = Σ × 0.00001, each rounded half to even at 9 decimals.
fn by_hand(rows: &[&Usage]) -> BTreeMap<String, (Dec, Dec)> {
    let mut sums: BTreeMap<&str, i128> = BTreeMap::new();
    for u in rows {
        *sums.entry(u.entity_id.as_str()).or_default() += u.vcpu_seconds.raw();
    }
    let div = |n: i128, d: i128| {
        let (q, r) = (n.div_euclid(d), n.rem_euclid(d));
        match (2 * r).cmp(&d) {
            std::cmp::Ordering::Greater => q + 1,
            std::cmp::Ordering::Equal if q % 2 != 0 => q + 1,
            _ => q,
        }
    };
    sums.into_iter()
        .map(|(e, s)| {
            (
                e.to_string(),
                (Dec::from_raw(div(s, 3600)), Dec::from_raw(div(s, 100_000))),
            )
        })
        .collect()
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let n: usize = args
        .first()
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(200_000);
    let entities: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(100);
    let rounds: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(20);
    let owned: Vec<Usage> = (0..n).map(|i| usage(i, entities)).collect();
    let rows: Vec<&Usage> = owned.iter().collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let src = parse_rule(std::path::Path::new("vcpu_hours.sql"), RULE)?;
    let engine = rt.block_on(Engine::new(vec![src], 1 << 30, Duration::from_secs(60)))?;

    // correctness first: both sides agree to the nano
    let events = rt.block_on(engine.evaluate(0, 0, &rows, 0, None))?;
    let got: BTreeMap<String, (Dec, Dec)> = events
        .iter()
        .map(|e| (e.entity_id.clone(), (e.quantity, e.amount)))
        .collect();
    anyhow::ensure!(got == by_hand(&rows), "engine and hand-written disagree");

    let t = Instant::now();
    let mut sink = 0usize;
    for _ in 0..rounds {
        sink += by_hand(&rows).len();
    }
    let hand = t.elapsed().as_secs_f64() / rounds as f64;
    let t = Instant::now();
    for _ in 0..rounds {
        sink += rt.block_on(engine.evaluate(0, 0, &rows, 0, None))?.len();
    }
    let eng = t.elapsed().as_secs_f64() / rounds as f64;
    std::hint::black_box(sink);
    println!("| vcpu_hours over one window: {n} usage rows, {entities} entities ({rounds} rounds, one thread) | ms/window | rows/s | vs hand-written |");
    println!("|---|---:|---:|---:|");
    println!(
        "| hand-written Rust aggregation (baseline) | {:.2} | {:.0} | 1.00 |",
        hand * 1e3,
        n as f64 / hand
    );
    println!("| rule engine (DataFusion plan built once, rows → Arrow → SQL → revenue events) | {:.2} | {:.0} | {:.2} |", eng * 1e3, n as f64 / eng, hand / eng);
    Ok(())
}
