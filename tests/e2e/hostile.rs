//! Hostile input: a generated corpus of more than 10,000 bad messages across every data
//! input topic, mixed into a running pipeline's good traffic. Nothing crashes, every bad
//! message lands in the dead-letter topic with the reason code expected for it and its
//! original bytes, no good message does, and the good traffic's bill stays exact.

use meterflow_avro::DecodeError;
use meterflow_collector::fleet::FleetConfig;
use meterflow_kafka::TableRecord;
use meterflow_tests::expect::{FleetRun, DAY};
use meterflow_tests::pipeline::{block_on, Pipeline};
use meterflow_tests::settled::Settled;
use meterflow_tests::Rng;
use meterflow_types::{DlqRecord, Sample};
use rdkafka::producer::FutureRecord;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

/// How the stage reading `topic` decodes a message.
fn decoder(p: &Pipeline, topic: &str) -> fn(&[u8]) -> Result<(), DecodeError> {
    let t = &p.kafka.topics;
    if topic == t.samples {
        |b| meterflow_avro::decode_samples_msg(b).map(|_| ())
    } else if topic == t.instances {
        |b| meterflow_avro::decode_instances_msg(b).map(|_| ())
    } else if topic == t.ownership {
        |b| meterflow_avro::decode::<meterflow_types::Ownership>(b).map(|_| ())
    } else if topic == t.usage {
        |b| meterflow_avro::decode_usage_msg(b).map(|_| ())
    } else {
        |b| meterflow_avro::decode_rated_msg(b).map(|_| ())
    }
}

/// One bad message: (topic, payload, expected reason code, category).
type Bad = (String, Vec<u8>, &'static str, &'static str);

/// The corpus, generated from real records of the running pipeline (`real`: per topic).
fn corpus(p: &Pipeline, real: &BTreeMap<String, Vec<Vec<u8>>>, rng: &mut Rng) -> Vec<Bad> {
    let t = p.kafka.topics.clone();
    let topics = [&t.samples, &t.instances, &t.ownership, &t.usage, &t.rated];
    let mut out: Vec<Bad> = Vec::new();
    for (i, topic) in topics.iter().enumerate() {
        let decode = decoder(p, topic);
        let mine = &real[*topic];
        // a record of the next topic's type: the wrong schema here
        let other = &real[topics[(i + 1) % topics.len()]];
        let kept = |bytes: Vec<u8>, category, out: &mut Vec<Bad>| {
            // only what the stage must refuse: a mutation that still decodes would be
            // a (garbage) good record
            if let Err(e) = decode(&bytes) {
                out.push((topic.to_string(), bytes, e.reason_code(), category));
                true
            } else {
                false
            }
        };
        let mut n = 0;
        while n < 700 {
            let r = &mine[rng.below(mine.len())];
            let cut = rng.below(r.len());
            n += usize::from(kept(r[..cut].to_vec(), "truncated", &mut out));
        }
        let mut n = 0;
        while n < 700 {
            let mut r = mine[rng.below(mine.len())].clone();
            if r.len() <= 10 {
                continue;
            }
            for _ in 0..1 + rng.below(4) {
                let at = 10 + rng.below(r.len() - 10);
                r[at] = rng.next_u64() as u8;
            }
            if rng.below(3) == 0 {
                r.extend((0..rng.below(64)).map(|_| rng.next_u64() as u8));
            }
            n += usize::from(kept(r, "fuzzed", &mut out));
        }
        let mut n = 0;
        while n < 300 {
            let r = other[rng.below(other.len())].clone();
            n += usize::from(kept(r, "wrong_schema", &mut out));
        }
        let mut n = 0;
        while n < 300 {
            let len = rng.below(200);
            let junk: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
            n += usize::from(kept(junk, "garbage", &mut out));
        }
        for _ in 0..3 {
            let mut big = mine[0].clone();
            big.resize(
                meterflow_avro::MAX_MESSAGE_BYTES + 1 + rng.below(1000),
                b'x',
            );
            assert!(kept(big, "oversized", &mut out));
        }
    }
    // samples that decode but must not be billed
    let template: Sample = real[&t.samples]
        .iter()
        .find_map(|b| meterflow_avro::decode::<Sample>(b).ok())
        .expect("a sample");
    let now = meterflow_kafka::now_ms();
    for i in 0..1_500 {
        let mut s = template.clone();
        s.id = format!("hostile-sample-{i}");
        s.seq = 1_000_000 + i as i64;
        let code = match i % 6 {
            0 => {
                s.deltas.cpu_time_ns = -1 - rng.below(1 << 40) as i64;
                "negative_counter"
            }
            1 => {
                s.deltas.cpu_time_ns = i64::MAX - rng.below(1000) as i64;
                "implausible_counter"
            }
            2 => {
                s.deltas.net_tx_bytes = (1 << 55) + rng.below(1 << 20) as i64;
                "implausible_counter"
            }
            3 => {
                s.interval_end = now + 30 * DAY + rng.below(1 << 30) as i64;
                s.interval_start = s.interval_end - 300_000;
                "future_timestamp"
            }
            4 => {
                s.interval_start = rng.below(1 << 40) as i64; // around 1970 to 2004
                s.interval_end = s.interval_start + 300_000;
                "ancient_timestamp"
            }
            _ => {
                s.interval_end = s.interval_start - 1 - rng.below(300_000) as i64;
                "bad_interval"
            }
        };
        out.push((
            t.samples.clone(),
            meterflow_avro::encode(&s),
            code,
            "invalid_sample",
        ));
    }
    out
}

/// Send `bad` (keys `hostile-<n>`): their coordinates → (code, bytes).
fn send(p: &Pipeline, bad: &[Bad]) -> HashMap<(String, i32, i64), (&'static str, Vec<u8>)> {
    let mut kafka = p.kafka.clone();
    kafka
        .client
        .insert("message.max.bytes".into(), "4000000".into());
    let producer = meterflow_kafka::producer(&kafka, "hostile", None).expect("producer");
    block_on(async {
        let mut pending = Vec::new();
        for (n, (topic, bytes, code, _)) in bad.iter().enumerate() {
            let key = format!("hostile-{n}");
            let f = producer
                .send_result(FutureRecord::to(topic).key(&key).payload(bytes))
                .map_err(|(e, _)| e)
                .expect("queued");
            pending.push((f, topic.clone(), *code, bytes.clone()));
        }
        let mut sent = HashMap::new();
        for (f, topic, code, bytes) in pending {
            let d = f.await.expect("delivered").expect("acknowledged");
            sent.insert((topic, d.partition, d.offset), (code, bytes));
        }
        sent
    })
}

fn real_records(p: &Pipeline) -> BTreeMap<String, Vec<Vec<u8>>> {
    let t = p.kafka.topics.clone();
    let mut out = BTreeMap::new();
    for topic in [&t.samples, &t.instances, &t.ownership, &t.usage, &t.rated] {
        let decode = decoder(p, topic);
        let recs: Vec<Vec<u8>> = p
            .read(topic)
            .into_iter()
            // data records only (markers have no key)
            .filter(|r: &TableRecord| r.key.as_deref().is_some_and(|k| !k.is_empty()))
            .filter_map(|r| r.payload)
            .filter(|b| decode(b).is_ok())
            .take(2_000)
            .collect();
        assert!(!recs.is_empty(), "no records on {topic} yet");
        out.insert(topic.clone(), recs);
    }
    out
}

#[test]
fn ten_thousand_hostile_inputs_mixed_with_good_traffic_all_land_in_the_dlq_and_the_bill_stays_exact(
) {
    let run = FleetRun {
        fleet: FleetConfig {
            instances: 9,
            entities: 3,
            seed: 91,
            ..Default::default()
        },
        start: meterflow_types::time::parse_rfc3339("2026-03-01T00:00:00Z").expect("time"),
        poll_ms: 300_000,
        polls: 2 * 288 + 1,
        reassign: Vec::new(),
    };
    let mut p = Pipeline::start(run.clone(), 7_200, "day");
    p.start_collector();
    let rated = p.kafka.topics.rated.clone();
    p.wait_for(Duration::from_secs(120), "revenue events", |p| {
        p.messages(&rated) >= 40
    });
    let real = real_records(&p);
    let mut rng = Rng(0x5eed);
    let bad = corpus(&p, &real, &mut rng);
    assert!(bad.len() >= 10_000, "{} bad inputs", bad.len());
    let mut categories: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    for (topic, _, _, c) in &bad {
        *categories.entry((topic.as_str(), c)).or_default() += 1;
    }
    eprintln!("hostile corpus: {} messages {categories:?}", bad.len());
    // in two halves, into a pipeline in full flow
    let half = bad.len() / 2;
    let mut sent = send(&p, &bad[..half]);
    // and duplicates of good samples: dropped by id, never dead-lettered
    let dups: Vec<(Vec<u8>, Vec<u8>, Option<i32>)> = p
        .read(&p.kafka.topics.samples)
        .into_iter()
        .filter(|r| {
            r.payload
                .as_deref()
                .is_some_and(|b| meterflow_avro::decode::<Sample>(b).is_ok())
        })
        .take(500)
        .map(|r| {
            (
                r.key.unwrap_or_default(),
                r.payload.unwrap_or_default(),
                Some(r.partition),
            )
        })
        .collect();
    p.produce(&p.kafka.topics.samples.clone(), &dups);
    sent.extend(send(&p, &bad[half..]));
    assert_eq!(sent.len(), bad.len());
    p.drain(
        Duration::from_secs(600),
        super::tansu::all_periods_settled(&run),
    );

    let mut got: HashMap<(String, i32, i64), DlqRecord> = HashMap::new();
    for r in p.read(&p.kafka.topics.dlq) {
        let d: DlqRecord =
            meterflow_avro::decode(r.payload.as_deref().unwrap_or_default()).expect("dlq record");
        got.insert((d.topic.clone(), d.partition, d.offset), d);
    }
    let mut missing: BTreeMap<(String, &str), usize> = BTreeMap::new();
    for (at, (code, bytes)) in &sent {
        match got.get(at) {
            None => *missing.entry((at.0.clone(), *code)).or_default() += 1,
            Some(d) => {
                assert_eq!(d.reason_code, *code, "{at:?}: {}", d.reason);
                assert!(!d.reason.is_empty());
                if bytes.len() <= meterflow_kafka::DLQ_PAYLOAD_MAX {
                    assert_eq!(&d.payload, bytes, "{at:?}: the original bytes");
                } else {
                    // too big for the dead-letter topic: its first bytes, and where the
                    // whole message is, with its size and hash
                    assert_eq!(d.payload, bytes[..meterflow_kafka::DLQ_PAYLOAD_MAX]);
                    let hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(bytes));
                    assert!(
                        d.reason.contains(&hash)
                            && d.reason.contains(&bytes.len().to_string())
                            && d.reason.contains(&format!("{}/{}/{}", at.0, at.1, at.2)),
                        "{}",
                        d.reason
                    );
                }
            }
        }
    }
    assert!(missing.is_empty(), "bad inputs not in the dlq: {missing:?}");
    let good_dead: Vec<_> = got.keys().filter(|k| !sent.contains_key(*k)).collect();
    assert!(
        good_dead.is_empty(),
        "good records dead-lettered: {good_dead:?}"
    );
    Settled::read(&p.out).assert_matches(&run, DAY);
    // nothing crashed: every stage still runs in its first process
    p.assert_services_alive();
    for proc in p.procs() {
        assert_eq!(proc.starts, 1, "{} restarted", proc.name);
    }
    p.stop();
}
