//! The pipeline as five separate processes on a real Kafka-protocol broker (Tansu):
//! exact to the cent against the fleet's closed-form bill, through SIGKILLs, and with
//! undecodable bytes on every input topic.

use meterflow_avro::header_of;
use meterflow_collector::fleet::FleetConfig;
use meterflow_kafka::read_table;
use meterflow_tests::expect::{FleetRun, DAY};
use meterflow_tests::pipeline::{block_on, Pipeline};
use meterflow_tests::settled::Settled;
use meterflow_types::{DlqRecord, InstanceState, Ownership, RatedEvent, Sample, Usage};
use rdkafka::producer::FutureRecord;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

/// Two days of a nine-instance fleet of three entities at five-minute polls.
fn two_days(seed: u64) -> FleetRun {
    FleetRun {
        fleet: FleetConfig {
            instances: 9,
            entities: 3,
            seed,
        },
        start: meterflow_types::time::parse_rfc3339("2026-03-01T00:00:00Z").expect("time"),
        poll_ms: 300_000,
        polls: 2 * 288 + 1,
        reassign: Vec::new(),
    }
}

/// Every expected (period, entity) has a manifest.
fn all_periods_settled(run: &FleetRun) -> impl FnMut(&std::path::Path) -> bool {
    let want = run.totals(DAY).len();
    move |out| {
        meterflow_settler::files::all_manifests(out)
            .map(|m| m.len() >= want)
            .unwrap_or(false)
    }
}

#[test]
fn a_known_fleet_settles_to_the_cent_on_tansu() {
    let run = two_days(11);
    let mut p = Pipeline::start(run.clone(), 36_000, "day");
    p.start_collector();
    p.drain(Duration::from_secs(300), all_periods_settled(&run));
    let s = Settled::read(&p.out);
    let sets: Vec<_> = s
        .manifests
        .iter()
        .map(|m| {
            (
                m.period.as_str(),
                m.entity_id.as_str(),
                m.version,
                m.line_count,
            )
        })
        .collect();
    assert_eq!(
        sets.len(),
        6,
        "2 days × 3 entities, one version each: {sets:?}"
    );
    s.assert_matches(&run, DAY);
    p.stop();
}

#[test]
fn sigkill_of_enricher_and_rater_mid_run_changes_nothing() {
    let run = two_days(12);
    // about 25 s of collection at this speed, so both kills land mid-run
    let mut p = Pipeline::start(run.clone(), 7_200, "day");
    p.start_collector();
    let usage = p.kafka.topics.usage.clone();
    let rated = p.kafka.topics.rated.clone();
    p.wait_for(Duration::from_secs(120), "usage to flow", |p| {
        p.messages(&usage) >= 600
    });
    p.enricher.kill9();
    p.enricher.restart();
    p.wait_for(Duration::from_secs(120), "revenue events to flow", |p| {
        p.messages(&rated) >= 150
    });
    p.rater.kill9();
    p.rater.restart();
    let collecting = p.collector.as_mut().map(|c| c.exited().is_none());
    assert_eq!(
        collecting,
        Some(true),
        "both kills must land while the collector still runs{}",
        p.logs()
    );
    p.drain(Duration::from_secs(300), all_periods_settled(&run));
    assert_eq!((p.enricher.starts, p.rater.starts), (2, 2));
    let s = Settled::read(&p.out);
    s.assert_matches(&run, DAY);
    p.stop();
}

/// Poison for one topic: (payload, reason code expected in the dlq).
fn poison(right_header: [u8; 10]) -> Vec<(Vec<u8>, &'static str)> {
    let foreign = meterflow_avro::encode(&DlqRecord {
        id: "x".into(),
        stage: "test".into(),
        topic: "t".into(),
        partition: 0,
        offset: 0,
        reason_code: "r".into(),
        reason: "a record of the wrong schema".into(),
        key: None,
        payload: vec![1, 2, 3],
        time: 0,
    });
    let mut bad_body = right_header.to_vec();
    bad_body.extend_from_slice(&[0xFF, 0xFF, 0xFF]);
    vec![
        (b"this is not avro".to_vec(), "undecodable"),
        (foreign, "wrong_schema"),
        (bad_body, "undecodable"),
        (vec![0xC3, 0x01], "undecodable"),
    ]
}

fn inject(p: &Pipeline, round: u32) -> HashMap<(String, i32, i64), (&'static str, Vec<u8>)> {
    let t = p.kafka.topics.clone();
    let targets = [
        (t.samples.clone(), header_of::<Sample>()),
        (t.instances.clone(), header_of::<InstanceState>()),
        (t.ownership.clone(), header_of::<Ownership>()),
        (t.usage.clone(), header_of::<Usage>()),
        (t.rated.clone(), header_of::<RatedEvent>()),
    ];
    let producer = meterflow_kafka::producer(&p.kafka, "poisoner", None).expect("producer");
    let mut sent = HashMap::new();
    block_on(async {
        for (topic, header) in targets {
            for (i, (bytes, code)) in poison(header).into_iter().enumerate() {
                let key = format!("poison-{round}-{i}");
                let d = producer
                    .send(
                        FutureRecord::to(&topic).key(&key).payload(&bytes),
                        Duration::from_secs(10),
                    )
                    .await
                    .map_err(|(e, _)| e)
                    .expect("poison produced");
                sent.insert((topic.clone(), d.partition, d.offset), (code, bytes));
            }
        }
    });
    sent
}

#[test]
fn undecodable_bytes_on_every_input_topic_land_in_the_dlq_with_a_reason() {
    let run = two_days(13);
    let mut p = Pipeline::start(run.clone(), 18_000, "day");
    let mut sent = inject(&p, 0);
    p.start_collector();
    let usage = p.kafka.topics.usage.clone();
    p.wait_for(Duration::from_secs(120), "usage to flow", |p| {
        p.messages(&usage) >= 300
    });
    sent.extend(inject(&p, 1)); // again, into stages that are busy
    p.drain(Duration::from_secs(300), all_periods_settled(&run));

    let dlq = read_table(
        &p.kafka,
        &[&p.kafka.topics.dlq],
        &HashMap::new(),
        Duration::from_secs(30),
    )
    .expect("reading the dlq");
    let mut got: BTreeMap<(String, i32, i64), DlqRecord> = BTreeMap::new();
    for r in dlq {
        let d: DlqRecord =
            meterflow_avro::decode(r.payload.as_deref().unwrap_or_default()).expect("dlq record");
        got.insert((d.topic.clone(), d.partition, d.offset), d);
    }
    for (at, (code, bytes)) in &sent {
        let d = got.get(at).unwrap_or_else(|| {
            panic!(
                "poison at {at:?} not in the dlq ({} records){}",
                got.len(),
                p.logs()
            )
        });
        assert_eq!(d.reason_code, *code, "reason code for {at:?}: {}", d.reason);
        assert!(!d.reason.is_empty());
        assert_eq!(&d.payload, bytes, "the dlq keeps the original bytes");
        let stage = if at.0 == p.kafka.topics.usage {
            "rater"
        } else if at.0 == p.kafka.topics.rated {
            "settler"
        } else {
            "enricher"
        };
        assert_eq!(d.stage, stage, "{at:?}");
    }
    let unexpected: Vec<_> = got.keys().filter(|k| !sent.contains_key(*k)).collect();
    assert!(
        unexpected.is_empty(),
        "good records dead-lettered: {unexpected:?}"
    );
    // and the stages kept running: the bill is still exact
    let s = Settled::read(&p.out);
    s.assert_matches(&run, DAY);
    p.stop();
}

#[test]
fn a_second_enricher_joins_mid_run_and_the_group_rebalances_totals_stay_exact() {
    let run = two_days(14);
    let mut p = Pipeline::start(run.clone(), 5_000, "day");
    p.start_collector();
    let usage = p.kafka.topics.usage.clone();
    p.wait_for(Duration::from_secs(120), "usage to flow", |p| {
        p.messages(&usage) >= 600
    });
    p.start_replica("enricher"); // the group rebalances over two processes
    let collecting = p.collector.as_mut().map(|c| c.exited().is_none());
    assert_eq!(
        collecting,
        Some(true),
        "the rebalance must land mid-run{}",
        p.logs()
    );
    p.drain(Duration::from_secs(300), all_periods_settled(&run));
    // both processes ended up with partitions and both did work
    for log in [p.enricher.log(), p.replicas[0].log()] {
        let got_some = log
            .lines()
            .any(|l| l.contains("partitions assigned") && l.contains("meterflow.samples"));
        assert!(got_some, "each enricher was assigned partitions:\n{log}");
    }
    let l = p
        .lag("meterflow-enricher", &p.kafka.topics.samples)
        .expect("lag");
    assert!(l.iter().all(|(_, end, c)| *c == Some(*end)), "{l:?}");
    Settled::read(&p.out).assert_matches(&run, DAY);
    p.stop();
}

#[test]
fn an_explicit_reassignment_moves_the_usage_from_its_valid_from_on() {
    let mut run = two_days(15);
    let from = run.start + DAY + 6 * meterflow_tests::expect::HOUR;
    run.reassign = vec![("sim-0004".into(), from, "acme-reassigned".into())];
    let mut p = Pipeline::start(run.clone(), 36_000, "day");
    // as an operator would: before the usage flows, over the CLI
    let st = std::process::Command::new(meterflow_tests::bin("meterflow"))
        .args([
            "ownership",
            "set",
            "sim-0004",
            "--user",
            "carol",
            "--entity",
            "acme-reassigned",
            "--valid-from",
            &meterflow_types::time::fmt_rfc3339(from),
            "--brokers",
            &p.kafka.brokers,
        ])
        .env("METERFLOW_LOG", "warn")
        .output()
        .expect("runs");
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    p.start_collector();
    p.drain(Duration::from_secs(300), all_periods_settled(&run));
    let s = Settled::read(&p.out);
    // the fleet's own owner record (metadata) would keep sim-0004 on its entity; the
    // explicit assignment wins from its valid_from on, to the cent
    assert!(s.lines.iter().any(|l| l.entity == "acme-reassigned"));
    s.assert_matches(&run, DAY);
    p.stop();
}

#[test]
fn samples_sent_again_after_their_windows_closed_are_not_billed_twice() {
    let run = two_days(16);
    let mut p = Pipeline::start(run.clone(), 36_000, "day");
    p.start_collector();
    p.drain(Duration::from_secs(300), all_periods_settled(&run));
    // a collector that lost its acknowledgements resends: the same bytes again, for the
    // last hour of the run, long after those windows closed and were settled
    let t = p.kafka.topics.clone();
    let again: Vec<(Vec<u8>, Vec<u8>)> = read_table(
        &p.kafka,
        &[&t.samples],
        &HashMap::new(),
        Duration::from_secs(30),
    )
    .expect("samples")
    .into_iter()
    .filter_map(|r| {
        let bytes = r.payload?;
        let s: Sample = meterflow_avro::decode(&bytes).ok()?;
        (s.interval_start >= run.end() - meterflow_tests::expect::HOUR)
            .then(|| (r.key.unwrap_or_default(), bytes))
    })
    .collect();
    assert!(again.len() >= 9 * 12, "{} samples to resend", again.len());
    let producer = meterflow_kafka::producer(&p.kafka, "resender", None).expect("producer");
    block_on(async {
        for (k, v) in &again {
            producer
                .send(
                    FutureRecord::to(&t.samples).key(k).payload(v),
                    Duration::from_secs(10),
                )
                .await
                .map_err(|(e, _)| e)
                .expect("resent");
        }
    });
    p.drain(Duration::from_secs(120), all_periods_settled(&run));
    let s = Settled::read(&p.out);
    assert!(
        s.manifests.iter().all(|m| m.version == 1),
        "no correction versions: {:?}",
        s.manifests
            .iter()
            .map(|m| (&m.entity_id, m.version))
            .collect::<Vec<_>>()
    );
    s.assert_matches(&run, DAY);
    p.stop();
}
