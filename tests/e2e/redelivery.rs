//! The stages' consumer on a real broker: each record of an assignment once, in order,
//! from the beginning and from a committed offset (which it starts `resume_rewind`
//! records before, dropping what lies below). The 1M chaos runs saw the client hand
//! records over again right after assignments (RELIABILITY.md, session 37): Tansu 0.6's
//! answer to a fetch from inside a record batch (session 44), provoked here by batches
//! of unequal sizes; the unit test of `Owned::admit` covers the drop.

use meterflow_kafka::Message;
use meterflow_kafka::{Assignment, KafkaConfig, StageIo};
use meterflow_tests::pipeline::block_on;
use meterflow_tests::Tansu;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Every partition's end (high watermark).
fn ends_of(cfg: &KafkaConfig, topic: &str) -> BTreeMap<i32, i64> {
    meterflow_kafka::high_watermarks(cfg, topic)
        .expect("ends")
        .into_iter()
        .collect()
}

/// Each of the four partitions handed over every offset of `range` once, in order.
fn each_once(got: &[(i32, i64)], range: std::ops::Range<i64>) {
    for p in 0..4 {
        let offs: Vec<i64> = got
            .iter()
            .filter(|(q, _)| *q == p)
            .map(|(_, o)| *o)
            .collect();
        let want: Vec<i64> = range.clone().collect();
        assert_eq!(offs, want, "partition {p}: each offset once, in order");
    }
}

/// Read `topic` as a stage until every partition's end is reached: the (partition,
/// offset) of every record handed over, in order. Commits `commit_at` for each
/// partition on the way out.
fn read_all(
    cfg: &KafkaConfig,
    topic: &str,
    ends: &BTreeMap<i32, i64>,
    commit_at: i64,
) -> Vec<(i32, i64)> {
    block_on(async {
        let mut io = StageIo::new(cfg, "test", "redelivery", &[topic], "m1").expect("stage io");
        let stop = tokio_util::sync::CancellationToken::new();
        let mut got = Vec::new();
        let mut at: BTreeMap<i32, i64> = BTreeMap::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while ends
            .iter()
            .any(|(p, e)| at.get(p).copied().unwrap_or(-1) + 1 < *e)
        {
            assert!(
                Instant::now() < deadline,
                "not read to the end: {at:?} of {ends:?}"
            );
            let b = io
                .next_batch(1_000, Duration::from_millis(200), &stop)
                .await
                .expect("batch");
            for r in &b.rebalances {
                assert!(matches!(r, Assignment::Assigned(_)), "{r:?}");
            }
            for m in &b.messages {
                got.push((m.partition(), m.offset()));
                let e = at.entry(m.partition()).or_insert(-1);
                *e = (*e).max(m.offset());
            }
        }
        let offsets: Vec<(String, i32, i64)> = ends
            .keys()
            .map(|p| (topic.to_string(), *p, commit_at))
            .collect();
        io.commit(&offsets).await.expect("commit");
        got
    })
}

#[test]
fn a_stage_takes_each_record_of_an_assignment_once_and_in_order() {
    let dir = tempfile::tempdir().expect("tmp");
    let broker = Tansu::start(dir.path());
    let cfg = broker.with_topics();
    let topic = cfg.topics.usage.clone();
    // many producer batches per partition, as the enricher writes them
    let mut out = meterflow_kafka::Outbox::connect(&cfg, "test-producer").expect("producer");
    block_on(async {
        for round in 0..200 {
            for i in 0..400u32 {
                let p = (i % 4) as i32;
                // about a usage record's size: a fetch holds a few thousand
                let v = format!("{round}-{i}-{}", "x".repeat(400));
                out.send(&topic, b"k", v.as_bytes(), Some(p)).await?;
            }
            out.flush().await?;
        }
        anyhow::Ok(())
    })
    .expect("produce");
    let ends = ends_of(&cfg, &topic);
    assert!(ends.values().all(|e| *e == 20_000), "{ends:?}");
    // from the beginning, then again from a committed offset mid-log (the stage's rewind
    // starts before it), as a restarted stage resumes
    each_once(&read_all(&cfg, &topic, &ends, 14_437), 0..20_000);
    each_once(&read_all(&cfg, &topic, &ends, 20_000), 14_437..20_000);
    drop(broker);
}

/// What Tansu 0.6 answers a fetch that starts inside a record batch, and that a stage
/// still takes each record once (RELIABILITY.md, session 44). Read with a plain client
/// (no group, no rewind, no drop), a fetch from offset F inside a batch leaves out the
/// K records from F to the next batch boundary and hands over the partition's last
/// record K more times — the copies the chaos runs saw after every resumption. A stage
/// resuming from a committed offset whose rewind lands inside a batch gets every record
/// from that offset once, in order: the left-out records lie below it, the copies are
/// dropped. Batches of 120 records and of one, as a collector's poll writes them. (Both
/// halves are the broker's: its fetch loop counts on from the offset asked for, so it
/// asks its storage K records short of the end K more times, and gets the last batch of
/// one record each time — unless the answer spent its byte budget first: then no copies;
/// RELIABILITY.md, session 45.)
#[test]
fn a_fetch_from_inside_a_batch_leaves_records_out_and_repeats_the_last_one_and_a_stage_takes_each_once(
) {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{ClientConfig, Offset, TopicPartitionList};
    let dir = tempfile::tempdir().expect("tmp");
    let broker = Tansu::start(dir.path());
    let cfg = broker.with_topics();
    let topic = cfg.topics.usage.clone();
    let polls = 200i64;
    let end = polls * 121;
    let mut out = meterflow_kafka::Outbox::connect(&cfg, "test-producer").expect("producer");
    block_on(async {
        for round in 0..polls {
            for p in 0..4 {
                for i in 0..120u32 {
                    let v = format!("{round}-{i}-{}", "x".repeat(170));
                    out.send(&topic, b"k", v.as_bytes(), Some(p)).await?;
                }
            }
            out.flush().await?;
            for p in 0..4 {
                out.send(&topic, b"m", b"marker", Some(p)).await?;
            }
            out.flush().await?;
        }
        anyhow::Ok(())
    })
    .expect("produce");
    let ends = ends_of(&cfg, &topic);
    assert!(ends.values().all(|e| *e == end), "{ends:?}");
    // a plain client: what the broker's answers hand over
    let plain = |from: i64, fetch_bytes: Option<&str>| -> Vec<(i64, Vec<u8>)> {
        let mut cc = ClientConfig::new();
        cc.set("bootstrap.servers", cfg.brokers.as_str())
            .set("group.id", "plain")
            .set("enable.auto.commit", "false");
        if let Some(b) = fetch_bytes {
            cc.set("fetch.max.bytes", b).set("message.max.bytes", b);
        }
        let c: BaseConsumer = cc.create().expect("consumer");
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, 0, Offset::Offset(from))
            .expect("tpl");
        c.assign(&tpl).expect("assign");
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut quiet = Instant::now();
        while Instant::now() < deadline && quiet.elapsed() < Duration::from_secs(2) {
            if let Some(m) = c.poll(Duration::from_millis(100)) {
                let m = m.expect("message");
                got.push((m.offset(), m.payload().unwrap_or_default().to_vec()));
                quiet = Instant::now();
            }
        }
        got
    };
    // 43 records into the 93rd poll's batch of 120 (11,175; its boundary 11,252)
    let batch = 92 * 121;
    let (from, boundary) = (batch + 43, batch + 120);
    let got = plain(from, None);
    let offsets: Vec<i64> = got.iter().map(|(o, _)| *o).collect();
    let left_out = boundary - from;
    let mut want: Vec<i64> = (boundary..end).collect();
    want.extend(std::iter::repeat_n(end - 1, left_out as usize));
    assert_eq!(
        offsets.first(),
        Some(&boundary),
        "served from the next batch boundary"
    );
    assert_eq!(
        offsets.len() as i64,
        end - from,
        "as many records as the range holds"
    );
    assert_eq!(offsets, want, "the last record {left_out} more times");
    let last: std::collections::BTreeSet<&[u8]> = got
        .iter()
        .filter(|(o, _)| *o == end - 1)
        .map(|(_, p)| p.as_slice())
        .collect();
    assert_eq!(last.len(), 1, "copies of one record");
    // The copies come from the broker's fetch loop going on after its storage answered
    // the whole range: with a fetch budget (64 KiB, ~330 records) far smaller than the
    // range, the first answer spends it, the loop stops there, and every later fetch
    // starts on a boundary — the same K records left out, and no record twice.
    let budgeted: Vec<i64> = plain(from, Some("65536")).iter().map(|(o, _)| *o).collect();
    assert_eq!(
        budgeted,
        (boundary..end).collect::<Vec<i64>>(),
        "from the boundary, each record once"
    );
    // a stage resuming from 21,175 (a first read commits it): its rewind (10,000)
    // starts the fetch at 11,175
    let committed = from + cfg.resume_rewind;
    read_all(&cfg, &topic, &ends, committed);
    each_once(&read_all(&cfg, &topic, &ends, committed), committed..end);
    drop(broker);
}
