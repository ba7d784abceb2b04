//! Producing with acknowledgement tracking: queue records, then `flush` waits until every
//! one of them is acknowledged by the broker (or fails loudly).

use anyhow::{bail, Result};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::ClientContext;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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

/// A producer whose delivery reports are counted (see [`Acks`]), served by a polling
/// thread of its own that sleeps until librdkafka has an event for it.
///
/// rdkafka's `ThreadedProducer` polls with a 100 ms deadline; the remaining time becomes
/// a whole number of milliseconds, rounded down, so in the last millisecond of each
/// deadline its thread polls with a 0 ms wait over and over, reading the clock: about
/// 1 % of a core in every process, idle or not (measured in session 30). Here
/// librdkafka writes a byte to a socket when the producer's queue stops being empty
/// (`rd_kafka_queue_io_event_enable`); the thread blocks reading it (at most 100 ms,
/// to look at its stop flag), then serves the queue until it is empty.
pub struct CountingProducer {
    // dropped in this order, after `drop` joined the poller: the queue reference and
    // the wake-up registration go before the client they belong to
    wake: Wake,
    poller: Option<std::thread::JoinHandle<()>>,
    producer: Arc<BaseProducer<Acks>>,
}

impl CountingProducer {
    pub fn new(producer: BaseProducer<Acks>) -> std::io::Result<CountingProducer> {
        let producer = Arc::new(producer);
        let (rx, tx) = UnixStream::pair()?;
        rx.set_read_timeout(Some(Duration::from_millis(100)))?;
        tx.set_nonblocking(true)?;
        let wake = Wake::enable(&producer, tx);
        let poller = {
            let (producer, stop, queue) = (producer.clone(), wake.stop.clone(), wake.queue);
            std::thread::Builder::new()
                .name("producer poller".into())
                .spawn(move || serve(&producer, &stop, queue, rx))?
        };
        Ok(CountingProducer {
            wake,
            poller: Some(poller),
            producer,
        })
    }
}

impl std::ops::Deref for CountingProducer {
    type Target = BaseProducer<Acks>;
    fn deref(&self) -> &BaseProducer<Acks> {
        &self.producer
    }
}

impl Drop for CountingProducer {
    fn drop(&mut self) {
        self.wake.stop.store(true, Ordering::Release);
        let _ = (&self.wake.tx).write(&[1]);
        if let Some(p) = self.poller.take() {
            let _ = p.join();
        }
        // then the fields: `wake` (librdkafka stops writing to the socket before it
        // closes, the queue reference is released), then the producer (its drop purges
        // and flushes, serving the queue itself)
    }
}

/// The producer's queue (librdkafka's main queue, where a producer's events go) and the
/// socket librdkafka writes to when it stops being empty.
struct Wake {
    queue: Queue,
    tx: UnixStream,
    stop: Arc<AtomicBool>,
}

/// A reference to a librdkafka queue, released on drop.
#[derive(Clone, Copy)]
struct Queue(*mut rdkafka::bindings::rd_kafka_queue_t);
// SAFETY: librdkafka's queue calls are thread-safe.
#[allow(unsafe_code)]
unsafe impl Send for Queue {}
// SAFETY: as above; the pointer is only passed to librdkafka.
#[allow(unsafe_code)]
unsafe impl Sync for Queue {}

#[allow(unsafe_code)]
impl Wake {
    fn enable(producer: &BaseProducer<Acks>, tx: UnixStream) -> Wake {
        // SAFETY: the client handle is valid while `producer` lives, and `Wake` is
        // dropped before the producer (field order in `CountingProducer`, after the
        // poller is joined; in `CountingProducer::new`, declared after it); the queue
        // reference taken here is released in `drop`, after librdkafka was told to
        // stop writing to `tx`, which lives until then.
        let queue = unsafe {
            let q = rdkafka::bindings::rd_kafka_queue_get_main(producer.client().native_ptr());
            let byte = [1u8];
            rdkafka::bindings::rd_kafka_queue_io_event_enable(
                q,
                tx.as_raw_fd(),
                byte.as_ptr().cast(),
                byte.len(),
            );
            Queue(q)
        };
        Wake {
            queue,
            tx,
            stop: Arc::new(AtomicBool::new(false)),
        }
    }
}

#[allow(unsafe_code)]
impl Drop for Wake {
    fn drop(&mut self) {
        // SAFETY: see `enable`; fd -1 disables the writes before the socket closes.
        unsafe {
            rdkafka::bindings::rd_kafka_queue_io_event_enable(
                self.queue.0,
                -1,
                std::ptr::null(),
                0,
            );
            rdkafka::bindings::rd_kafka_queue_destroy(self.queue.0);
        }
    }
}

/// The polling thread: serve every event queued (delivery reports, errors, logs), then
/// sleep until librdkafka writes that there are more, or 100 ms pass.
fn serve(producer: &BaseProducer<Acks>, stop: &AtomicBool, queue: Queue, mut rx: UnixStream) {
    let mut buf = [0u8; 64];
    while !stop.load(Ordering::Acquire) {
        // (bounded: should the queue ever hold what a poll does not take, the thread
        // still sleeps between rounds instead of spinning)
        for _ in 0..100_000 {
            // SAFETY: the queue reference outlives this thread (`Wake` is dropped after
            // it is joined).
            #[allow(unsafe_code)]
            if unsafe { rdkafka::bindings::rd_kafka_queue_length(queue.0) } == 0 {
                break;
            }
            // a zero deadline serves one event without waiting
            producer.poll(Duration::ZERO);
        }
        match rx.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                tracing::warn!(error = %e, "producer poller: wake-up socket failed; polling every 100 ms");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_record_is_reported_by_the_poller_and_a_dropped_producer_stops_it() {
        let broker = crate::EmbeddedBroker::start().expect("mock broker");
        broker.create_topic("t", 3).expect("topic");
        let cfg = crate::KafkaConfig {
            brokers: broker.bootstrap_servers(),
            ..Default::default()
        };
        // a flush waits for reports the poller serves: one that does not, fails here
        async fn flush(out: &mut Outbox) -> Result<()> {
            tokio::time::timeout(Duration::from_secs(30), out.flush())
                .await
                .expect("delivery reports are served")
        }
        for round in 0..3 {
            let mut out = Outbox::connect(&cfg, "outbox-test").expect("producer");
            // one record, then a burst: each is reported, none is missed between a
            // drained queue and the poller's sleep
            out.send("t", b"k", b"first", None).await.expect("send");
            flush(&mut out).await.expect("flush");
            assert_eq!(out.pending(), 0);
            for i in 0..5_000u32 {
                out.send("t", &i.to_be_bytes(), b"v", None)
                    .await
                    .expect("send");
            }
            flush(&mut out).await.expect("flush");
            assert_eq!(out.pending(), 0, "round {round}");
            let reported = out.producer.context().reported.load(Ordering::Acquire);
            assert_eq!(reported, 5_001);
            // a failure reported by the poller reaches the next flush
            out.send("no-such-topic", b"k", b"v", Some(7))
                .await
                .expect("queued");
            let e = flush(&mut out)
                .await
                .expect_err("an unknown partition fails");
            assert!(e.to_string().contains("no-such-topic"), "{e}");
            // the producer (and its poller) is dropped here, at the end of the round: a
            // poller that did not stop would hang the test
        }
    }
}
