//! Producing with acknowledgement tracking: queue records, then `flush` waits until every
//! one of them is acknowledged by the broker (or fails loudly).

use anyhow::{bail, Result};
use rdkafka::producer::future_producer::DeliveryFuture;
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::time::Duration;

pub struct Outbox {
    pub producer: FutureProducer,
    pending: Vec<DeliveryFuture>,
    /// Fault injection (tests): the next flush reports this delivery failure.
    refused: Option<String>,
}

impl Outbox {
    pub fn new(producer: FutureProducer) -> Outbox {
        Outbox {
            producer,
            pending: Vec::new(),
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
            let mut rec: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).key(key);
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
            match self.producer.send_result(rec) {
                Ok(f) => {
                    self.pending.push(f);
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
        if !self.pending.is_empty() {
            // The caller waits from here on: what lingers (`linger.ms`, there to batch
            // records while the stage goes on producing) goes out now.
            let p = self.producer.clone();
            let _ = tokio::task::spawn_blocking(move || send_lingering(&p)).await;
        }
        for f in self.pending.drain(..) {
            match f.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => bail!("delivery failed: {e}"),
                Err(_) => bail!("delivery canceled (producer gone)"),
            }
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

    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}

/// librdkafka's `rd_kafka_flush`: while it runs, queued records are sent without waiting
/// out `linger.ms`; it returns once every record of the producer is acknowledged (their
/// delivery reports served by the producer's polling thread) or after a second, whichever
/// is first. (rdkafka's `flush` calls it with no wait in a loop, so the broker threads may
/// wake after it returned and linger anyway.) Blocking: run it off the async threads.
#[allow(unsafe_code)]
fn send_lingering(p: &FutureProducer) {
    use rdkafka::producer::Producer;
    // SAFETY: the client handle is valid while `p` lives (it is borrowed for the call);
    // librdkafka's producer calls are thread-safe, and with delivery reports as events
    // (as rdkafka sets them) `rd_kafka_flush` only waits for the in-flight count to fall.
    unsafe {
        rdkafka::bindings::rd_kafka_flush(p.client().native_ptr(), 1000);
    }
}
