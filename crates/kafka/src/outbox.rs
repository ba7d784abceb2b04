//! Producing with acknowledgement tracking: queue records, then `flush` waits until every
//! one of them is acknowledged by the broker (or fails loudly).

use anyhow::{bail, Result};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The producer's delivery reports, counted (served by its polling thread): a record's
/// report is a counter increment, not a channel and a future of its own.
#[derive(Default)]
pub struct Acks {
    /// Reports received: delivered or failed.
    reported: AtomicU64,
    /// The first failure since the last flush took it, and how many there were.
    failed: Mutex<Option<(String, u64)>>,
    reported_more: tokio::sync::Notify,
}

impl ClientContext for Acks {}
impl ProducerContext for Acks {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, m)) = result {
            use rdkafka::Message;
            if let Ok(mut f) = self.failed.lock() {
                let why = format!("{e} ({} [{}])", m.topic(), m.partition());
                let (_, n) = f.get_or_insert((why, 0));
                *n += 1;
            }
        }
        self.reported.fetch_add(1, Ordering::Release);
        // a permit if nobody waits: a flush that checks then waits misses no report
        self.reported_more.notify_one();
    }
}

/// A producer whose delivery reports are counted (see [`Acks`]).
pub type CountingProducer = ThreadedProducer<Acks>;

pub struct Outbox {
    pub producer: Arc<CountingProducer>,
    /// Records queued (each gets exactly one delivery report).
    queued: u64,
    /// Fault injection (tests): the next flush reports this delivery failure.
    refused: Option<String>,
}

impl Outbox {
    /// An idempotent producer's outbox (see [`crate::producer`]).
    pub fn connect(cfg: &crate::KafkaConfig, client_id: &str) -> Result<Outbox> {
        Ok(Outbox::new(crate::counting_producer(cfg, client_id, None)?))
    }

    pub fn new(producer: CountingProducer) -> Outbox {
        Outbox {
            producer: Arc::new(producer),
            queued: 0,
            refused: None,
        }
    }

    /// Queue one record; `partition = None` partitions by key (murmur2, as Java clients do).
    pub async fn send(
        &mut self,
        topic: &str,
        key: &[u8],
        payload: &[u8],
        partition: Option<i32>,
    ) -> Result<()> {
        self.send_with(topic, key, Some(payload), partition, &[])
            .await
    }

    /// A tombstone (null payload) for `key` on a compacted topic, with headers saying who
    /// wrote it.
    pub async fn send_tombstone(
        &mut self,
        topic: &str,
        key: &[u8],
        headers: &[(&str, &[u8])],
    ) -> Result<()> {
        self.send_with(topic, key, None, None, headers).await
    }

    pub async fn send_with(
        &mut self,
        topic: &str,
        key: &[u8],
        payload: Option<&[u8]>,
        partition: Option<i32>,
        headers: &[(&str, &[u8])],
    ) -> Result<()> {
        loop {
            let mut rec: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic).key(key);
            if let Some(p) = payload {
                rec = rec.payload(p);
            }
            if let Some(p) = partition {
                rec = rec.partition(p);
            }
            if !headers.is_empty() {
                let mut h = rdkafka::message::OwnedHeaders::new_with_capacity(headers.len());
                for (k, v) in headers {
                    h = h.insert(rdkafka::message::Header {
                        key: k,
                        value: Some(*v),
                    });
                }
                rec = rec.headers(h);
            }
            match self.producer.send(rec) {
                Ok(()) => {
                    self.queued += 1;
                    return Ok(());
                }
                Err((
                    rdkafka::error::KafkaError::MessageProduction(
                        rdkafka::types::RDKafkaErrorCode::QueueFull,
                    ),
                    _,
                )) => {
                    self.flush().await?;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => bail!("producing to {topic}: {e}"),
            }
        }
    }

    /// Wait for every queued record's acknowledgement.
    pub async fn flush(&mut self) -> Result<()> {
        if self.pending() > 0 {
            // The caller waits from here on: what lingers (`linger.ms`, there to batch
            // records while the stage goes on producing) goes out now.
            let p = self.producer.clone();
            let _ = tokio::task::spawn_blocking(move || send_lingering(&p)).await;
        }
        let acks = self.producer.context();
        // every record gets its report (a failure at the latest after message.timeout.ms)
        while acks.reported.load(Ordering::Acquire) < self.queued {
            let _ = tokio::time::timeout(Duration::from_millis(100), acks.reported_more.notified())
                .await;
        }
        let failed = acks.failed.lock().ok().and_then(|mut f| f.take());
        if let Some((why, n)) = failed {
            bail!("delivery failed: {why} ({n} record(s))");
        }
        if let Some(why) = self.refused.take() {
            bail!("delivery failed: {why}");
        }
        Ok(())
    }

    /// Fault injection (tests): the next flush fails with `why` after every record
    /// queued so far was delivered, as when the broker refused one record of many.
    pub fn refuse_next_flush(&mut self, why: String) {
        self.refused = Some(why);
    }

    /// Records queued and not yet reported on.
    pub fn pending(&self) -> usize {
        let reported = self.producer.context().reported.load(Ordering::Acquire);
        self.queued.saturating_sub(reported) as usize
    }
}

/// librdkafka's `rd_kafka_flush`: while it runs, queued records are sent without waiting
/// out `linger.ms`; it returns once every record of the producer is acknowledged (their
/// delivery reports served by the producer's polling thread) or after a second, whichever
/// is first. (rdkafka's `flush` calls it with no wait in a loop, so the broker threads may
/// wake after it returned and linger anyway.) Blocking: run it off the async threads.
#[allow(unsafe_code)]
fn send_lingering(p: &CountingProducer) {
    // SAFETY: the client handle is valid while `p` lives (it is borrowed for the call);
    // librdkafka's producer calls are thread-safe, and with delivery reports as events
    // (as rdkafka sets them) `rd_kafka_flush` only waits for the in-flight count to fall.
    unsafe {
        rdkafka::bindings::rd_kafka_flush(p.client().native_ptr(), 1000);
    }
}
