//! The stages' consumer on a real broker: each record of an assignment once, in order,
//! from the beginning and from a committed offset (which it starts `resume_rewind`
//! records before, dropping what lies below). The 1M chaos runs saw the client hand
//! records over again right after assignments (RELIABILITY.md, session 37); this plain
//! setup does not provoke that; the unit test of `Owned::admit` covers the drop.

use meterflow_kafka::Message;
use meterflow_kafka::{Assignment, KafkaConfig, StageIo};
use meterflow_tests::pipeline::block_on;
use meterflow_tests::Tansu;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

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
    let ends: BTreeMap<i32, i64> = meterflow_kafka::high_watermarks(&cfg, &topic)
        .expect("ends")
        .into_iter()
        .collect();
    assert!(ends.values().all(|e| *e == 20_000), "{ends:?}");
    // from the beginning, then again from a committed offset mid-log (the stage's rewind
    // starts before it), as a restarted stage resumes
    let check = |got: &[(i32, i64)], from: i64| {
        for p in 0..4 {
            let offs: Vec<i64> = got
                .iter()
                .filter(|(q, _)| *q == p)
                .map(|(_, o)| *o)
                .collect();
            let want: Vec<i64> = (from..20_000).collect();
            assert_eq!(offs, want, "partition {p}: each offset once, in order");
        }
    };
    check(&read_all(&cfg, &topic, &ends, 14_437), 0);
    check(&read_all(&cfg, &topic, &ends, 20_000), 14_437);
    drop(broker);
}
