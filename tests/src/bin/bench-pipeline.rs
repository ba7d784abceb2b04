//! Throughput of the whole pipeline on Tansu against a bare relay of the same messages
//! through the same broker, in the same run.
//!
//! `cargo run --release -p meterflow-tests --bin bench-pipeline -- [instances] [polls]`
//!
//! Pipeline: the collector publishes `instances × polls` samples of a simulated fleet as
//! fast as it can (clock unpaced), while the enricher, rater and settler (release
//! binaries, separate processes) turn them into settlement files; the clock stops when
//! every stage has committed everything and every expected file set exists.
//! Relay: the same sample payloads produced again to a fresh topic while a consumer
//! built on the stages' own Kafka I/O (`StageIo`: batch, produce, commit after ack)
//! copies them to another topic; the clock stops when it has committed them all.

use meterflow_collector::fleet::FleetConfig;
use meterflow_kafka::{read_table, StageIo};
use meterflow_tests::expect::{FleetRun, DAY};
use meterflow_tests::pipeline::{block_on, Pipeline};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::message::Message;
use rdkafka::producer::FutureRecord;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let enricher_only = args.first().is_some_and(|a| a == "enricher");
    let probes_mode = args.first().is_some_and(|a| a == "probes");
    if enricher_only || probes_mode {
        args.remove(0);
    }
    let instances: u32 = args.first().map(|s| s.parse()).transpose()?.unwrap_or(200);
    let polls: i64 = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(1001);
    let run = FleetRun {
        fleet: FleetConfig {
            instances,
            entities: 20.min(instances),
            seed: 7,
            ..Default::default()
        },
        start: meterflow_types::time::parse_rfc3339("2026-01-05T00:00:00Z")
            .map_err(anyhow::Error::msg)?,
        poll_ms: 300_000,
        polls,
        reassign: Vec::new(),
    };
    let expected_sets = run.totals(DAY).len();
    let samples = instances as i64 * polls;
    eprintln!("pipeline: {samples} samples ({instances} instances × {polls} polls)");

    if enricher_only {
        return enricher(run, samples);
    }
    if probes_mode {
        return probes(run);
    }

    // ---- the pipeline
    let mut p = Pipeline::start(run.clone(), 1_000_000_000, "day");
    std::thread::sleep(Duration::from_secs(3)); // let the stages join their groups
    let t0 = Instant::now();
    p.start_collector();
    let mut rss: HashMap<&str, u64> = HashMap::new();
    let t = p.kafka.topics.clone();
    let pipeline_secs = loop {
        for (name, proc) in [
            ("enricher", &p.enricher),
            ("rater", &p.rater),
            ("settler", &p.settler),
        ] {
            if let Some(k) = proc.peak_rss_kib() {
                rss.insert(name, k);
            }
        }
        if let Some(c) = p.collector.as_ref() {
            if let Some(k) = c.peak_rss_kib() {
                rss.insert("collector", k);
            }
        }
        p.assert_services_alive();
        let done = p.collector.as_mut().and_then(|c| c.exited()).is_some()
            && meterflow_settler::files::all_manifests(&p.out)
                .map(|m| m.len() >= expected_sets)
                .unwrap_or(false)
            && p.caught_up("meterflow-enricher", &t.samples)
            && p.caught_up("meterflow-rater", &t.usage)
            && p.caught_up("meterflow-settler", &t.rated);
        if done {
            break t0.elapsed().as_secs_f64();
        }
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(1800),
            "pipeline did not drain"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // the bill must still be exact, or the figure means nothing
    meterflow_tests::settled::Settled::read(&p.out).assert_matches(&run, DAY);
    let usage = p.messages(&t.usage);
    let rated = p.messages(&t.rated);

    // ---- the bare relay of the same messages through the same broker
    let (n, relay_secs) = relay_samples(&p, false)?;
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
    let mut r: Vec<_> = rss.into_iter().collect();
    r.sort();
    println!(
        "\npeak RSS (MiB): {}",
        r.iter()
            .map(|(k, v)| format!("{k} {:.0}", *v as f64 / 1024.0))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

/// A broker with the fleet's samples all on the topic, and no stage running.
fn prefilled(run: FleetRun) -> anyhow::Result<Pipeline> {
    let mut p = Pipeline::start_stages(run, 1_000_000_000, "day", &[]);
    p.start_collector();
    let st = p
        .collector
        .as_mut()
        .and_then(|c| c.wait(Duration::from_secs(1800)))
        .ok_or_else(|| anyhow::anyhow!("collector did not finish"))?;
    anyhow::ensure!(st.success(), "collector failed");
    Ok(p)
}

/// The enricher alone: the samples are on the topic before it starts; the clock runs
/// from its partition assignment until it has committed every sample (each one joined,
/// produced as usage and acknowledged first).
fn enricher(run: FleetRun, samples: i64) -> anyhow::Result<()> {
    let mut p = prefilled(run)?;
    let t = p.kafka.topics.clone();
    p.enricher.launch();
    let joined = Instant::now();
    while !p.enricher.log().contains("partitions assigned") {
        anyhow::ensure!(joined.elapsed() < Duration::from_secs(120), "no assignment");
        std::thread::sleep(Duration::from_millis(5));
    }
    let t0 = Instant::now();
    let mut peak = 0;
    while !p.caught_up("meterflow-enricher", &t.samples) {
        p.assert_services_alive();
        peak = peak.max(p.enricher.peak_rss_kib().unwrap_or(0));
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(1800),
            "enricher did not drain"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let secs = t0.elapsed().as_secs_f64();
    let usage = p.messages(&t.usage);
    let (n, relay_secs) = relay_samples(&p, true)?;
    p.stop();
    let (er, rr) = (n as f64 / secs, n as f64 / relay_secs);
    println!("| run | messages in | seconds | messages/s | vs relay |");
    println!("|---|---:|---:|---:|---:|");
    println!("| bare relay, input on the topic beforehand (StageIo consume → produce → commit) | {n} | {relay_secs:.2} | {rr:.0} | 1.00 |");
    println!(
        "| enricher ({samples} samples + markers → {usage} usage + markers) | {n} | {secs:.2} | {er:.0} | {:.2} |",
        er / rr
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
        "| bare relay, input on the topic beforehand | {n} | {relay_secs:.2} | {rr:.0} | 1.00 |"
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
            let mut out =
                meterflow_kafka::Outbox::new(meterflow_kafka::producer(&p.kafka, "bench", None)?);
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

/// The samples topic's messages relayed through the same broker: (count, seconds).
fn relay_samples(p: &Pipeline, prefill: bool) -> anyhow::Result<(usize, f64)> {
    let msgs: Vec<(Option<Vec<u8>>, Vec<u8>)> = read_table(
        &p.kafka,
        &[&p.kafka.topics.samples],
        &HashMap::new(),
        Duration::from_secs(120),
    )?
    .into_iter()
    .map(|r| (r.key, r.payload.unwrap_or_default()))
    .collect();
    let n = msgs.len();
    Ok((n, block_on(relay(&p.kafka, msgs, prefill))?))
}

/// `prefill`: the input is all on the topic before the clock starts (as for a stage
/// measured alone); otherwise it is produced while the relay runs (as in the pipeline).
async fn relay(
    kafka: &meterflow_kafka::KafkaConfig,
    msgs: Vec<(Option<Vec<u8>>, Vec<u8>)>,
    prefill: bool,
) -> anyhow::Result<f64> {
    let (src, dst) = ("bench.relay-in", "bench.relay-out");
    let admin: AdminClient<DefaultClientContext> =
        meterflow_kafka::client_config(kafka, "bench-admin").create()?;
    let topics = [
        NewTopic::new(src, kafka.partitions, TopicReplication::Fixed(1)),
        NewTopic::new(dst, kafka.partitions, TopicReplication::Fixed(1)),
    ];
    admin.create_topics(&topics, &AdminOptions::new()).await?;
    let n = msgs.len();
    let mut io = StageIo::new(kafka, "relay", "bench-relay", &[src], "relay-1")?;
    let stop = CancellationToken::new();
    // join the group before the clock starts, as the pipeline's stages did
    let join = Instant::now();
    while join.elapsed() < Duration::from_secs(3) {
        io.next_batch(1, Duration::from_millis(100), &stop).await?;
    }
    let producer = meterflow_kafka::producer(kafka, "bench-feed", None)?;
    let mut t0 = Instant::now();
    let feed = tokio::spawn(async move {
        let mut pending = Vec::with_capacity(n);
        for (k, v) in &msgs {
            let mut rec = FutureRecord::to(src).payload(v);
            if let Some(k) = k {
                rec = rec.key(k);
            }
            pending.push(producer.send_result(rec).map_err(|(e, _)| e)?);
        }
        for d in pending {
            d.await?.map_err(|(e, _)| e)?;
        }
        anyhow::Ok(())
    });
    let mut feed = Some(feed);
    if prefill {
        if let Some(f) = feed.take() {
            f.await??;
        }
        t0 = Instant::now();
    }
    let mut done = 0usize;
    while done < n {
        let b = io
            .next_batch(5000, Duration::from_millis(50), &stop)
            .await?;
        let mut offsets: HashMap<i32, i64> = HashMap::new();
        for m in &b.messages {
            io.send(
                dst,
                m.key().unwrap_or_default(),
                m.payload().unwrap_or_default(),
                None,
            )
            .await?;
            offsets.insert(m.partition(), m.offset() + 1);
        }
        done += b.messages.len();
        let o: Vec<(String, i32, i64)> = offsets
            .into_iter()
            .map(|(p, o)| (src.to_string(), p, o))
            .collect();
        io.commit(&o).await?;
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(1800),
            "relay stalled at {done}/{n}"
        );
    }
    let secs = t0.elapsed().as_secs_f64();
    if let Some(f) = feed {
        f.await??;
    }
    Ok(secs)
}
