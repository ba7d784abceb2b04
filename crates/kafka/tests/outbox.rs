//! The outbox's acknowledgement tracking on librdkafka's mock cluster: `flush` returns once
//! every queued record is acknowledged, and a record the broker refuses fails it loudly
//! (the broker's refusal injected: a mock is for faults, the happy path is on Tansu too).

use meterflow_kafka::{read_table, EmbeddedBroker, KafkaConfig, Outbox};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use std::collections::HashMap;
use std::time::Duration;

fn setup() -> (EmbeddedBroker, KafkaConfig) {
    let b = EmbeddedBroker::start().expect("mock cluster");
    b.create_topic("out", 2).expect("topic");
    b.create_topic("other", 1).expect("topic");
    let cfg = KafkaConfig {
        brokers: b.bootstrap_servers(),
        ..KafkaConfig::default()
    };
    (b, cfg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_returns_once_every_queued_record_is_on_the_topic() {
    let (_b, cfg) = setup();
    let mut out = Outbox::connect(&cfg, "outbox-test").expect("producer");
    for i in 0..3000 {
        let (k, v) = (format!("k{i}"), format!("v{i}"));
        out.send("out", k.as_bytes(), v.as_bytes(), None)
            .await
            .expect("queued");
    }
    assert!(out.pending() > 0, "nothing was pending before the flush");
    out.flush().await.expect("every record acknowledged");
    assert_eq!(out.pending(), 0);
    // a second round on the same producer counts from where the first left off
    for i in 3000..3500 {
        let (k, v) = (format!("k{i}"), format!("v{i}"));
        out.send("out", k.as_bytes(), v.as_bytes(), Some(1))
            .await
            .expect("queued");
    }
    out.flush().await.expect("every record acknowledged");
    let read = tokio::task::spawn_blocking(move || {
        read_table(&cfg, &["out"], &HashMap::new(), Duration::from_secs(30))
    })
    .await
    .expect("join")
    .expect("read back");
    assert_eq!(read.len(), 3500);
    let mut values: Vec<String> = read
        .iter()
        .map(|r| String::from_utf8_lossy(r.payload.as_deref().unwrap_or_default()).into_owned())
        .collect();
    values.sort();
    values.dedup();
    assert_eq!(values.len(), 3500, "every record once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_the_broker_refuses_fails_the_flush_that_waits_for_it() {
    let (b, cfg) = setup();
    let mut out = Outbox::connect(&cfg, "outbox-test").expect("producer");
    // the producer is connected and has delivered once before the refusal
    out.send("out", b"k", b"first", Some(0))
        .await
        .expect("queued");
    out.flush().await.expect("delivered");
    b.inject_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED],
    );
    out.send("out", b"k", b"refused", Some(0))
        .await
        .expect("queued");
    let e = out
        .flush()
        .await
        .expect_err("a refused record must fail the flush");
    let msg = format!("{e:#}");
    assert!(msg.contains("delivery failed"), "{msg}");
    assert!(
        msg.contains("out [0]"),
        "names the topic and partition: {msg}"
    );
    assert_eq!(out.pending(), 0, "the failed record was reported on");
    // the failure is reported once: the next flush stands on its own records (on another
    // topic: librdkafka refuses records for a topic the broker denied until it refreshes
    // its metadata)
    out.send("other", b"k", b"after", None)
        .await
        .expect("queued");
    out.flush().await.expect("delivered after the refusal");
}
