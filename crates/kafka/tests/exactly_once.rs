//! The exactly-once delivery path on librdkafka's mock cluster. The mock accepts
//! transactions but keeps no transactional offsets and writes no commit markers, so this
//! proves the call sequence (init, begin, produce, send offsets, commit — batch after
//! batch) and that an injected transaction failure surfaces as an error instead of an
//! offset commit; exactness itself rests on the deterministic ids (see the Tansu tests).

use meterflow_kafka::{read_table, Delivery, EmbeddedBroker, KafkaConfig, Message, StageIo};
use rdkafka::producer::FutureRecord;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use std::collections::HashMap;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

async fn setup(n: usize) -> (EmbeddedBroker, KafkaConfig) {
    let b = EmbeddedBroker::start().expect("mock cluster");
    b.create_topic("in", 2).expect("topic");
    b.create_topic("out", 2).expect("topic");
    b.create_topic("meterflow.dlq", 1).expect("topic");
    let cfg = KafkaConfig {
        brokers: b.bootstrap_servers(),
        delivery: Delivery::ExactlyOnce,
        ..KafkaConfig::default()
    };
    let p = meterflow_kafka::producer(&cfg, "feed", None).expect("producer");
    for i in 0..n {
        let k = format!("k{i}");
        let v = format!("v{i}");
        p.send(
            FutureRecord::to("in").key(&k).payload(&v),
            Duration::from_secs(5),
        )
        .await
        .map_err(|(e, _)| e)
        .expect("fed");
    }
    (b, cfg)
}

/// Relay `in` → `out` in transactions until `n` records went through.
async fn relay(io: &mut StageIo, n: usize) -> anyhow::Result<usize> {
    let stop = CancellationToken::new();
    let mut done = 0;
    let mut batches = 0;
    let t0 = std::time::Instant::now();
    while done < n {
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(60),
            "relay stalled at {done}"
        );
        let b = io.next_batch(40, Duration::from_millis(200), &stop).await?;
        if b.messages.is_empty() {
            continue;
        }
        let mut offsets: HashMap<i32, i64> = HashMap::new();
        for m in &b.messages {
            io.send(
                "out",
                m.key().unwrap_or_default(),
                m.payload().unwrap_or_default(),
                None,
            )
            .await?;
            offsets.insert(m.partition(), m.offset() + 1);
        }
        done += b.messages.len();
        let o: Vec<_> = offsets
            .into_iter()
            .map(|(p, o)| ("in".to_string(), p, o))
            .collect();
        io.commit(&o).await?;
        batches += 1;
    }
    Ok(batches)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_commit_batch_after_batch() {
    let (_b, cfg) = setup(200).await;
    let mut io = StageIo::new(&cfg, "relay", "g", &["in"], "m1").expect("init_transactions");
    let batches = relay(&mut io, 200)
        .await
        .expect("every transaction commits");
    assert!(batches >= 5, "several transactions ({batches})");
    let out = read_table(&cfg, &["out"], &HashMap::new(), Duration::from_secs(20)).expect("read");
    let mut vals: Vec<String> = out
        .iter()
        .map(|r| String::from_utf8_lossy(r.payload.as_deref().unwrap_or_default()).into_owned())
        .collect();
    vals.sort();
    vals.dedup();
    assert_eq!(vals.len(), 200, "every record relayed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_transaction_commit_is_an_error_not_a_silent_offset_commit() {
    let (b, cfg) = setup(50).await;
    let mut io = StageIo::new(&cfg, "relay", "g2", &["in"], "m2").expect("init_transactions");
    b.inject_errors(
        RDKafkaApiKey::EndTxn,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_TXN_STATE],
    );
    let r = relay(&mut io, 50).await;
    let e = r.expect_err("the stage must stop when its transaction cannot commit");
    assert!(format!("{e:#}").contains("commit_transaction"), "{e:#}");
}
