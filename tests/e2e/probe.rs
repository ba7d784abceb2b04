//! Measurement points switched on and off mid-stream through the control topic: the
//! running stages (separate processes on Tansu, never restarted) start adding their trail
//! entries to the messages they forward, and stop again.

use meterflow_collector::fleet::FleetConfig;
use meterflow_kafka::probe::{trace_id, trail_of, TRACEPARENT, TRAIL};
use meterflow_kafka::TableRecord;
use meterflow_tests::expect::FleetRun;
use meterflow_tests::meterflow_ok;
use meterflow_tests::pipeline::Pipeline;
use std::io::{Read, Write};
use std::time::Duration;

fn has_trail(r: &TableRecord) -> bool {
    r.headers
        .iter()
        .any(|(k, _)| k == TRAIL || k == TRACEPARENT)
}

/// The data records of `topic` (no watermark markers, no poll markers of node-a), in
/// (partition, offset) order.
fn data(p: &Pipeline, topic: &str) -> Vec<TableRecord> {
    let mut v: Vec<TableRecord> = p
        .read(topic)
        .into_iter()
        .filter(|r| {
            r.key
                .as_deref()
                .is_some_and(|k| !k.is_empty() && k != b"node-a")
        })
        .collect();
    v.sort_by_key(|r| (r.partition, r.offset));
    v
}

fn traceparents(r: &TableRecord) -> Vec<String> {
    r.headers
        .iter()
        .filter(|(k, _)| k == TRACEPARENT)
        .map(|(_, v)| String::from_utf8_lossy(v).to_string())
        .collect()
}

/// Every partition of `recs` ends with at least `n` records without a trail.
fn trail_free_tail(recs: &[TableRecord], n: usize) -> bool {
    let mut parts: std::collections::BTreeMap<i32, Vec<&TableRecord>> = Default::default();
    for r in recs {
        parts.entry(r.partition).or_default().push(r);
    }
    !parts.is_empty()
        && parts
            .values()
            .all(|v| v.len() >= n && v[v.len() - n..].iter().all(|r| !has_trail(r)))
}

fn http_get(port: u16, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    out
}

#[test]
fn probes_added_mid_stream_show_up_in_forwarded_messages_and_go_when_removed() {
    // a steady stream: 9 instances, a 5-minute poll every 100 ms of wall time
    let run = FleetRun {
        fleet: FleetConfig {
            instances: 9,
            entities: 3,
            seed: 77,
            ..Default::default()
        },
        start: meterflow_types::time::parse_rfc3339("2026-03-01T00:00:00Z").expect("time"),
        poll_ms: 300_000,
        polls: 20_000,
        reassign: Vec::new(),
    };
    let mut p = Pipeline::start_stages(run, 3_000, "day", &["rater", "settler"]);
    let port = meterflow_tests::free_port();
    p.launch_with(
        "enricher",
        &format!("[http]\nlisten = \"127.0.0.1:{port}\"\n"),
    );
    p.start_collector();
    let topics = p.kafka.topics.clone();
    p.wait_for(Duration::from_secs(120), "revenue events", |p| {
        data(p, &topics.rated).len() >= 20
    });
    // nothing carries a trail while every probe is off
    for t in [&topics.samples, &topics.usage, &topics.rated] {
        assert!(!data(&p, t).iter().any(has_trail), "{t} has a trail");
    }
    let brokers = p.kafka.brokers.clone();
    let points = ["collector.publish", "enricher.join", "rater.rate"];
    for point in points {
        meterflow_ok(&[
            "probe",
            "add",
            point,
            "--measure",
            "all",
            "--brokers",
            &brokers,
        ]);
    }
    let listed: serde_json::Value = serde_json::from_str(&meterflow_ok(&[
        "probe",
        "list",
        "--json",
        "--brokers",
        &brokers,
    ]))
    .expect("json");
    assert_eq!(
        listed
            .as_array()
            .expect("list")
            .iter()
            .map(|s| s["point"].as_str().unwrap_or_default().to_string())
            .collect::<Vec<_>>(),
        points
    );
    // the running stages pick the probes up: a revenue event arrives whose trail names
    // the three components in order
    let mut whole: Option<TableRecord> = None;
    p.wait_for(
        Duration::from_secs(120),
        "a revenue event with the whole trail",
        |p| {
            whole = data(p, &topics.rated).into_iter().find(|r| {
                let t = trail_of(&r.headers);
                t.iter().map(|e| e.point.as_str()).collect::<Vec<_>>() == points
            });
            whole.is_some()
        },
    );
    let rated = whole.expect("found");
    let trail = trail_of(&rated.headers);
    assert_eq!(
        trail.iter().map(|e| e.stage.as_str()).collect::<Vec<_>>(),
        ["collector", "enricher", "rater"]
    );
    assert_eq!(trail[0].member, "node-a");
    assert_eq!(trail[1].member, "enricher-1");
    for e in &trail[1..] {
        assert!(
            e.hop_latency_ms.is_some() && e.queue_dwell_ms.is_some() && e.processing_us.is_some(),
            "{e:?}"
        );
        assert!(e.lag.is_some_and(|l| l >= 0), "{e:?}");
    }
    assert!(trail[2].window_wait_ms.is_some(), "{:?}", trail[2]);
    assert!(trail.windows(2).all(|w| w[0].at <= w[1].at), "{trail:?}");
    // one traceparent, and the same trace from the sample through the usage record
    let tp = traceparents(&rated);
    assert_eq!(tp.len(), 1, "{tp:?}");
    let trace = trace_id(&tp[0]).expect("valid traceparent").to_string();
    let usage = data(&p, &topics.usage);
    let samples = data(&p, &topics.samples);
    for (what, recs) in [("usage", &usage), ("samples", &samples)] {
        let same: Vec<&TableRecord> = recs
            .iter()
            .filter(|r| {
                let tps = traceparents(r);
                assert!(tps.len() <= 1, "{what}: {tps:?}");
                tps.first().and_then(|t| trace_id(t)) == Some(trace.as_str())
            })
            .collect();
        assert!(!same.is_empty(), "no {what} record of trace {trace}");
        assert!(
            same.iter().all(|r| traceparents(r) != tp),
            "a span of each stage's own"
        );
    }
    // the stream before the probes went on still has no trail: the first trailed sample
    // comes after untrailed ones on its partition
    let p0: Vec<&TableRecord> = samples.iter().filter(|r| r.partition == 0).collect();
    let first = p0
        .iter()
        .position(|r| has_trail(r))
        .expect("trailed sample");
    assert!(first > 0, "the stream started before the probe");
    // the enricher's values are Prometheus histograms too
    let metrics = http_get(port, "/metrics");
    for h in [
        "meterflow_probe_hop_latency_seconds_bucket{point=\"enricher.join\",le=\"+Inf\"}",
        "meterflow_probe_queue_dwell_seconds_count{point=\"enricher.join\"}",
        "meterflow_probe_processing_seconds_sum{point=\"enricher.join\"}",
        "meterflow_probe_lag_records_count{point=\"enricher.join\"}",
    ] {
        assert!(metrics.contains(h), "{h} missing:\n{metrics}");
    }
    // removed: new messages stop carrying trails, on every topic
    for point in points {
        meterflow_ok(&["probe", "remove", point, "--brokers", &brokers]);
    }
    assert!(meterflow_ok(&["probe", "list", "--brokers", &brokers]).contains("no probes enabled"));
    p.wait_for(
        Duration::from_secs(120),
        "trail-free messages after the removal",
        |p| {
            trail_free_tail(&data(p, &topics.samples), 30)
                && trail_free_tail(&data(p, &topics.usage), 30)
                && trail_free_tail(&data(p, &topics.rated), 3)
        },
    );
    // no stage was restarted for any of it
    p.assert_services_alive();
    for proc in p.procs() {
        assert_eq!(proc.starts, 1, "{} restarted", proc.name);
    }
    p.stop();
}
