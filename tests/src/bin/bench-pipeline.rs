//! Throughput of the whole pipeline on Tansu against a bare relay of the same messages
//! through the same broker, in the same run — and, by mode, the other pipeline figures of
//! BENCHMARKS.md (the modes live in `meterflow_tests::bench`).
//!
//! `bench-pipeline [instances] [polls]`: the whole pipeline. The collector publishes
//! `instances × polls` samples of a simulated fleet as fast as it can (clock unpaced),
//! while the enricher, rater and settler (release binaries, separate processes) turn them
//! into settlement files; the clock stops when every stage has committed everything and
//! every expected file set exists. Relay: the same sample payloads produced again to a
//! fresh topic while a consumer built on the stages' own Kafka I/O (`StageIo`: batch,
//! produce, commit after ack) copies them to another topic.
//!
//! `bench-pipeline stages [instances] [polls]`: each stage alone vs a relay of its input
//! topic as it lies there (and, for comparison, vs a relay of a copy of it written in
//! large batches, the baseline before session 34).
//! `bench-pipeline chain [instances] [polls]`: the three stages together on samples that
//! are all on the topic, vs a relay of that topic.
//! `bench-pipeline enricher [instances] [polls]`: the enricher alone.
//! `bench-pipeline settler-ab [instances] [polls] [rounds] [period]`: the settler by
//! `period` (default `month`, the settler's default), the builds listed in `METERFLOW_BENCH_AB`
//! (`/path/a:/path/b`) alternated on the same revenue events, each against its own relay.
//! `bench-pipeline enricher-ab [instances] [polls] [rounds]` and `rater-ab …`: likewise
//! for the enricher on the same samples and the rater on the same usage (with one build,
//! the same stage `rounds` times: the median of repeated runs, each against its relay).
//! `bench-pipeline probes [instances] [polls]`: the enricher with its probe off and on.
//! `bench-pipeline latency [instances] [polls] [poll_s] [speed]`: end-to-end latency of a
//! paced fleet against the moment each window could close.
//! `bench-pipeline rater-memory [instances] [hours] [speed]`: the rater's peak RSS with
//! the same open windows and 1× / 10× the events in them.

/// The relays (the baselines) run in this process: they allocate as the enricher does
/// (mimalloc, see its `main.rs`). The rater and settler run on glibc's malloc, so their
/// relays have the faster allocator of the two.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use meterflow_kafka::read_table;
use meterflow_tests::bench::{
    drained, fleet, joined, prefilled, relay, relay_here, relay_topic, topic_messages,
};
use meterflow_tests::expect::{FleetRun, DAY};
use meterflow_tests::pipeline::{block_on, Pipeline};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The builds an `-ab` mode alternates: `METERFLOW_BENCH_AB=/path/a:/path/b`, else this
/// build's `program` run again and again.
fn ab_builds(program: &str) -> Vec<std::path::PathBuf> {
    match std::env::var("METERFLOW_BENCH_AB") {
        Ok(v) => std::env::split_paths(&v).collect(),
        Err(_) => vec![meterflow_tests::bin(program)],
    }
}

fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mode = match args.first() {
        Some(a) if a.parse::<u64>().is_err() => args.remove(0),
        _ => String::new(),
    };
    let num = |i: usize, default: i64| -> anyhow::Result<i64> {
        Ok(args
            .get(i)
            .map(|s| s.parse())
            .transpose()?
            .unwrap_or(default))
    };
    match mode.as_str() {
        "latency" => {
            let run = fleet(num(0, 200)? as u32, num(1, 1200)?, num(2, 60)? * 1000)?;
            return meterflow_tests::bench::latency(run, num(3, 300)? as u32);
        }
        "rater-memory" => {
            return meterflow_tests::bench::rater_memory(
                num(0, 200)? as u32,
                num(1, 8)?,
                num(2, 720)? as u32,
            );
        }
        "" | "stages" | "chain" | "enricher" | "probes" | "settler-ab" | "enricher-ab"
        | "rater-ab" => {}
        other => anyhow::bail!("unknown mode {other}"),
    }
    let instances = num(0, 200)? as u32;
    let polls = num(1, 1001)?;
    let run = fleet(instances, polls, 300_000)?;
    let expected_sets = run.totals(DAY).len();
    let samples = instances as i64 * polls;
    eprintln!("pipeline: {samples} samples ({instances} instances × {polls} polls)");
    match mode.as_str() {
        "stages" => return meterflow_tests::bench::stages(run),
        "settler-ab" => {
            let builds = ab_builds("meterflow-settler");
            let period = args.get(3).map_or("month", String::as_str);
            return meterflow_tests::bench::settler_ab(run, &builds, num(2, 3)? as usize, period);
        }
        "enricher-ab" => {
            let builds = ab_builds("meterflow-enricher");
            return meterflow_tests::bench::enricher_ab(run, &builds, num(2, 3)? as usize);
        }
        "rater-ab" => {
            let builds = ab_builds("meterflow-rater");
            return meterflow_tests::bench::rater_ab(run, &builds, num(2, 3)? as usize);
        }
        "chain" => return meterflow_tests::bench::chain(run),
        "enricher" => return enricher(run, samples),
        "probes" => return probes(run),
        _ => {}
    }

    // ---- the pipeline
    let mut p = Pipeline::start(run.clone(), 1_000_000_000, "day");
    joined(&mut p)?; // the clock starts with every stage in its group
    let t0 = Instant::now();
    p.start_collector();
    // the collector exits before the end: its peak is sampled while it runs
    let mut collector_rss = 0;
    let pipeline_secs = loop {
        if let Some(c) = p.collector.as_ref() {
            collector_rss = collector_rss.max(c.peak_rss_kib().unwrap_or(0));
        }
        p.assert_services_alive();
        if p.collector.as_mut().and_then(|c| c.exited()).is_some() && drained(&p, expected_sets) {
            break t0.elapsed().as_secs_f64();
        }
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(1800),
            "pipeline did not drain"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let t = p.kafka.topics.clone();
    // the bill must still be exact, or the figure means nothing
    meterflow_tests::settled::Settled::read(&p.out).assert_matches(&run, DAY);
    let usage = p.messages(&t.usage);
    let rated = p.messages(&t.rated);

    // ---- the bare relay of the same messages through the same broker
    let (n, relay_secs) = relay_samples(&p, false)?;
    let peaks = meterflow_tests::bench::stage_peaks(&p);
    p.stop();

    let pr = samples as f64 / pipeline_secs;
    let rr = n as f64 / relay_secs;
    println!("| run | messages in | seconds | messages/s | vs relay |");
    println!("|---|---:|---:|---:|---:|");
    println!("| bare relay (StageIo consume → produce → commit) | {n} | {relay_secs:.2} | {rr:.0} | 1.00 |");
    println!(
        "| whole pipeline (samples → files; +{usage} usage, +{rated} rated msgs) | {samples} samples | {pipeline_secs:.2} | {pr:.0} | {:.2} |",
        pr / rr
    );
    println!(
        "\npeak RSS (MiB): {peaks}, collector {:.0}",
        collector_rss as f64 / 1024.0
    );
    Ok(())
}

/// The enricher alone: the samples are on the topic before it starts; the clock runs
/// from its partition assignment until it has committed every sample (each one joined,
/// produced as usage and acknowledged first).
fn enricher(run: FleetRun, samples: i64) -> anyhow::Result<()> {
    let mut p = prefilled(run)?;
    let t = p.kafka.topics.clone();
    let (_, (copy_secs, _, copy_broker)) = relay_topic(&p, &t.samples, "samples")?;
    let (n, (relay_secs, _, relay_broker)) = relay_here(&p, &t.samples, "samples-here")?;
    let run = meterflow_tests::bench::stage_alone(&mut p, "enricher", &t.samples, |_| true)?;
    let (secs, peak) = (run.secs, run.rss_kib);
    let usage = p.messages(&t.usage);
    p.stop();
    let (er, rr) = (n as f64 / secs, n as f64 / relay_secs);
    println!("| run | messages in | seconds | messages/s | vs relay | broker CPU s |");
    println!("|---|---:|---:|---:|---:|---:|");
    println!("| bare relay of the samples topic as it lies there (StageIo consume → produce → commit) | {n} | {relay_secs:.2} | {rr:.0} | 1.00 | {relay_broker:.2} |");
    println!(
        "| bare relay of a copy of it, written in large batches | {n} | {copy_secs:.2} | {:.0} | {:.2} | {copy_broker:.2} |",
        n as f64 / copy_secs,
        relay_secs / copy_secs
    );
    println!(
        "| enricher ({samples} samples + markers → {usage} usage + markers) | {n} | {secs:.2} | {er:.0} | {:.2} | {:.2} |",
        er / rr,
        run.broker_cpu
    );
    println!("\nenricher peak RSS: {:.0} MiB", peak as f64 / 1024.0);
    Ok(())
}

/// The enricher with the `enricher.join` probe off and on (every measure, every message),
/// alternating three times each, each run a fresh group with its own output topics; the
/// bare relay first. Prints every run and the medians.
fn probes(run: FleetRun) -> anyhow::Result<()> {
    let mut p = prefilled(run)?;
    let t = p.kafka.topics.clone();
    let (n, relay_secs) = relay_samples(&p, true)?;
    let rr = n as f64 / relay_secs;
    println!("| run | messages in | seconds | messages/s | vs relay |");
    println!("|---|---:|---:|---:|---:|");
    println!(
        "| bare relay of the samples topic as it lies there | {n} | {relay_secs:.2} | {rr:.0} | 1.00 |"
    );
    let key = format!("{}enricher.join", meterflow_kafka::probe::KEY_PREFIX);
    let spec = meterflow_types::ProbeSpec {
        point: "enricher.join".into(),
        measures: meterflow_kafka::probe::MEASURES
            .iter()
            .map(|m| m.to_string())
            .collect(),
        sample_rate: "1".into(),
        added_at: meterflow_kafka::now_ms(),
        added_by: "bench".into(),
    };
    let mut ratios: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for i in 1..=6 {
        let on = i % 2 == 0;
        let payload = on.then(|| meterflow_avro::encode(&spec));
        block_on(async {
            let mut out = meterflow_kafka::Outbox::connect(&p.kafka, "bench")?;
            out.send_with(&t.control, key.as_bytes(), payload.as_deref(), None, &[])
                .await?;
            out.flush().await
        })?;
        let group = format!("bench-enricher-{i}");
        let usage = format!("bench.usage-{i}");
        let extra = format!(
            "group = \"{group}\"\n[kafka.topics]\nusage = \"{usage}\"\n\
             enricher_state = \"bench.enricher-state-{i}\"\nparked = \"bench.parked-{i}\"\n\
             audit = \"bench.audit-{i}\"\n"
        );
        let assigned = p.enricher.log().matches("partitions assigned").count();
        p.enricher.kill9(); // the previous run's (exited) process
        p.launch_with("enricher", &extra);
        let joined = Instant::now();
        while p.enricher.log().matches("partitions assigned").count() <= assigned {
            anyhow::ensure!(joined.elapsed() < Duration::from_secs(120), "no assignment");
            std::thread::sleep(Duration::from_millis(5));
        }
        let t0 = Instant::now();
        let mut peak = 0;
        while !p.caught_up(&group, &t.samples) {
            p.assert_services_alive();
            peak = peak.max(p.enricher.peak_rss_kib().unwrap_or(0));
            anyhow::ensure!(
                t0.elapsed() < Duration::from_secs(1800),
                "enricher did not drain"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let secs = t0.elapsed().as_secs_f64();
        p.enricher.terminate(Duration::from_secs(30));
        // the figure counts only if the probe did (or did not) measure every usage record
        let recs = read_table(
            &p.kafka,
            &[&usage],
            &HashMap::new(),
            Duration::from_secs(120),
        )?;
        let data: Vec<_> = recs
            .iter()
            .filter(|r| r.key.as_deref().is_some_and(|k| !k.is_empty()))
            .collect();
        let trailed = data
            .iter()
            .filter(|r| r.header(meterflow_kafka::probe::TRAIL).is_some())
            .count();
        anyhow::ensure!(
            trailed == if on { data.len() } else { 0 },
            "run {i}: {trailed} of {} usage records carry a trail",
            data.len()
        );
        let er = n as f64 / secs;
        println!(
            "| enricher, probe enricher.join {} ({} usage records{}) | {n} | {secs:.2} | {er:.0} | {:.2} |",
            if on { "on: all measures, rate 1" } else { "off" },
            data.len(),
            if on { ", each with its trail entry" } else { "" },
            er / rr
        );
        eprintln!("run {i}: enricher peak RSS {:.0} MiB", peak as f64 / 1024.0);
        ratios[usize::from(on)].push(er / rr);
    }
    p.stop();
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (off, on) = (median(&mut ratios[0]), median(&mut ratios[1]));
    println!(
        "\nmedian vs relay: probe off {off:.2}, probe on {on:.2} (on/off {:.2})",
        on / off
    );
    Ok(())
}

/// The samples topic's messages relayed through the same broker: (count, seconds). From
/// the topic itself when the samples are all on it (`prefill`); otherwise produced again,
/// while the relay runs, as the collector produces them while the pipeline runs.
fn relay_samples(p: &Pipeline, prefill: bool) -> anyhow::Result<(usize, f64)> {
    if prefill {
        let (n, (secs, _, _)) = relay_here(p, &p.kafka.topics.samples, "samples-here")?;
        return Ok((n, secs));
    }
    let msgs = topic_messages(&p.kafka, &p.kafka.topics.samples)?;
    let n = msgs.len();
    let (secs, _, _) = block_on(relay(&p.kafka, msgs, false, "samples", None))?;
    meterflow_tests::bench::relayed_all(p, "samples", n)?;
    Ok((n, secs))
}
