//! Reading topics without a consumer group: whole compacted tables, and end offsets.
//!
//! "The end" of a partition is where the broker's *fetch* responses say it is (the
//! partition-EOF event), never the ListOffsets answer alone: Tansu 0.6 answers ListOffsets
//! "latest" with the base offset of the newest record batch + 1, which is short of the
//! true end whenever that batch holds more than one record. A reader that trusted it
//! would silently miss records (it did: an owner lost, its usage billed as unallocated).
//!
//! Nor is the partition-EOF event enough alone: it fires only when a fetch finds nothing
//! new, and a partition written to more often than a fetch waits (node heartbeats at an
//! accelerated clock, say) may never give one; a reader waiting for it waited the whole
//! run, and the enricher billed usage without the instances' labels meanwhile. So a
//! partition's end is also reached at the high watermark of the first fetch answer of the
//! read: the true end at a moment after the read began (a record-batch boundary), which
//! is all a read to the end promises.

use crate::{client_config, KafkaConfig};
use anyhow::{Context, Result};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientContext;
use rdkafka::{Offset, TopicPartitionList};
use std::collections::HashMap;
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct TableRecord {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl TableRecord {
    /// The value of header `name`, if present.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
    }
}

/// The table reader's client context: partition EOF is how it finds the end, not an error.
struct Quiet;
impl ClientContext for Quiet {
    fn error(&self, error: KafkaError, reason: &str) {
        let eof = match &error {
            KafkaError::PartitionEOF(_) => true,
            KafkaError::Global(code) => *code == RDKafkaErrorCode::PartitionEOF,
            _ => false,
        };
        if !eof {
            tracing::error!(%error, reason, "librdkafka error (table reader)");
        }
    }
}
impl ConsumerContext for Quiet {}

/// A consumer error the client does not recover from by itself. Everything else (brokers
/// down, transport failures, a coordinator moving) librdkafka retries, so a reader waits.
fn is_fatal(e: &KafkaError) -> bool {
    e.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal)
}

fn reader(cfg: &KafkaConfig, client_id: &str) -> Result<BaseConsumer<Quiet>> {
    let mut c = client_config(cfg, client_id);
    c.set("group.id", "meterflow-table-reader")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", "20")
        .set("isolation.level", "read_committed");
    c.create_with_context(Quiet)
        .context("creating table reader")
}

/// Read every partition of `topic` from `start(p)` until each has reached the end the
/// broker reported in a fetch; `on_record` sees every record on the way. Returns the
/// next offset of every partition (its end at the time it was reached).
fn read_to_end(
    cfg: &KafkaConfig,
    topic: &str,
    start: impl Fn(i32) -> i64,
    deadline: Instant,
    mut on_record: impl FnMut(TableRecord),
) -> Result<Vec<(i32, i64)>> {
    let consumer = reader(cfg, "meterflow-table")?;
    // the partition count from the reader's own connection (no second client)
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .context("fetching metadata")?;
    let n = md.topics().first().map_or(0, |t| t.partitions().len()) as i32;
    anyhow::ensure!(n > 0, "topic {topic} has no partitions (does it exist?)");
    let mut tpl = TopicPartitionList::new();
    let mut next: HashMap<i32, i64> = HashMap::new();
    for p in 0..n {
        let s = start(p);
        tpl.add_partition_offset(topic, p, Offset::Offset(s))
            .context("offset list")?;
        next.insert(p, s);
    }
    consumer
        .assign(&tpl)
        .context("assigning table partitions")?;
    let mut pending: Vec<i32> = (0..n).collect();
    // per partition, the high watermark of the first fetch answer of this read
    let mut target: HashMap<i32, i64> = HashMap::new();
    let mut last_error = None;
    // records read per partition, for the report of a read that timed out
    let mut read: HashMap<i32, u64> = HashMap::new();
    while !pending.is_empty() {
        if target.len() < n as usize {
            for &p in &pending {
                if target.contains_key(&p) {
                    continue;
                }
                // a fresh client: the watermark it caches comes from its own fetches
                if let Some(hi) = cached_high_watermark(&consumer, topic, p) {
                    target.insert(p, hi);
                }
            }
            pending.retain(|p| match (target.get(p), next.get(p)) {
                (Some(t), Some(at)) => at < t,
                _ => true,
            });
            if pending.is_empty() {
                break;
            }
        }
        if Instant::now() >= deadline {
            let why =
                last_error.map_or(String::new(), |e: KafkaError| format!("; last error: {e}"));
            let position = consumer.position().ok();
            let stuck: Vec<String> = pending
                .iter()
                .map(|p| {
                    let at = position
                        .as_ref()
                        .and_then(|l| l.find_partition(topic, *p))
                        .map(|e| e.offset());
                    describe_pending(*p, start(*p), &next, &read, at, target.get(p).copied())
                })
                .collect();
            anyhow::bail!(
                "timed out reading {topic} to the end (partitions {pending:?} never reached it: {}){why}",
                stuck.join("; ")
            );
        }
        // short waits: the end is known from the watermark the first fetch answer leaves
        // in the client's cache, which no event announces (an empty partition gives none)
        match consumer.poll(Duration::from_millis(10)) {
            None => {
                // records at the end that are never delivered (transaction markers): the
                // client's position passes them
                if let Ok(pos) = consumer.position() {
                    pending.retain(|p| {
                        let at = pos.find_partition(topic, *p).map(|e| e.offset());
                        match (target.get(p), at) {
                            (Some(t), Some(Offset::Offset(o))) => o < *t,
                            _ => true,
                        }
                    });
                }
            }
            Some(Err(KafkaError::PartitionEOF(p))) => {
                // the position is the end the fetch reported
                if let Ok(pos) = consumer.position() {
                    if let Some(Offset::Offset(o)) =
                        pos.find_partition(topic, p).map(|e| e.offset())
                    {
                        let e = next.entry(p).or_default();
                        *e = (*e).max(o);
                    }
                }
                pending.retain(|x| *x != p);
            }
            Some(Err(e)) if is_fatal(&e) => return Err(e).context("reading table"),
            // the client reconnects by itself (a broker restart, say): keep reading until
            // the deadline
            Some(Err(e)) => last_error = Some(e),
            Some(Ok(m)) => {
                let p = m.partition();
                next.insert(p, m.offset() + 1);
                *read.entry(p).or_default() += 1;
                on_record(to_record(topic, &m));
                // the last record of the batch that ends at the target (batches are
                // delivered whole: the reader never stops inside one)
                if target.get(&p).is_some_and(|t| m.offset() + 1 >= *t) {
                    pending.retain(|x| *x != p);
                }
            }
        }
    }
    close_later(consumer);
    let mut v: Vec<(i32, i64)> = next.into_iter().collect();
    v.sort_unstable();
    Ok(v)
}

/// Where a partition that never reached its end stood when the read gave up: what a
/// report needs to tell a slow broker (records still coming) from a partition whose end
/// the fetches announce but never deliver (no records, no end-of-partition event).
fn describe_pending(
    p: i32,
    start: i64,
    next: &HashMap<i32, i64>,
    read: &HashMap<i32, u64>,
    position: Option<Offset>,
    target: Option<i64>,
) -> String {
    let position = match position {
        Some(Offset::Offset(o)) => o.to_string(),
        Some(other) => format!("{other:?}"),
        None => "unknown".into(),
    };
    let target = target.map_or("none (no fetch answered)".into(), |t| t.to_string());
    format!(
        "partition {p}: from {start}, {} records read, next {}, fetch position {position}, end per first fetch {target}",
        read.get(&p).copied().unwrap_or(0),
        next.get(&p).copied().unwrap_or(start),
    )
}

/// Drop a client on a thread of its own. Closing one waits for its threads and its group
/// coordinator's state to wind down (about 100 ms for a table reader on Tansu), which a
/// read's caller need not wait for: a stage reading its state on an assignment went on
/// with its first batch that much later.
fn close_later<C: Send + 'static>(client: C) {
    // if no thread can be started, the closure (and the client) is dropped here, at once
    let _ = std::thread::Builder::new()
        .name("meterflow-close".into())
        .spawn(move || drop(client));
}

/// The high watermark of `topic`/`p` in the client's latest fetch answer, `None` before
/// the first one (librdkafka's `rd_kafka_get_watermark_offsets`, which rdkafka does not
/// wrap; unlike `fetch_watermarks` it asks the broker nothing).
#[allow(unsafe_code)]
fn cached_high_watermark(c: &BaseConsumer<Quiet>, topic: &str, p: i32) -> Option<i64> {
    let topic = std::ffi::CString::new(topic).ok()?;
    let (mut lo, mut hi) = (-1i64, -1i64);
    // SAFETY: the client handle is valid while `c` lives (it is borrowed for the call);
    // `topic` is a NUL-terminated string that outlives the call; `lo` and `hi` are valid
    // for writes. The function only reads the partition's cached offsets under its lock.
    let err = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(
            c.client().native_ptr(),
            topic.as_ptr(),
            p,
            &mut lo,
            &mut hi,
        )
    };
    (err == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && hi >= 0)
        .then_some(hi)
}

fn to_record(topic: &str, m: &rdkafka::message::BorrowedMessage<'_>) -> TableRecord {
    TableRecord {
        topic: topic.to_string(),
        partition: m.partition(),
        offset: m.offset(),
        key: m.key().map(|k| k.to_vec()),
        payload: m.payload().map(|p| p.to_vec()),
        headers: m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
                    .collect()
            })
            .unwrap_or_default(),
    }
}

/// A long-lived reader of a (small, compacted) topic from its beginning: each `poll`
/// returns what arrived since, without waiting. For control records a running stage
/// must notice within seconds, at no cost per batch.
pub struct Tail {
    consumer: BaseConsumer<Quiet>,
    topic: String,
}

impl Tail {
    pub fn new(cfg: &KafkaConfig, topic: &str) -> Result<Tail> {
        Tail::starting(cfg, topic, |_| Offset::Beginning)
    }

    /// A tail of what is written from now on (each partition from its current end).
    pub fn at_end(cfg: &KafkaConfig, topic: &str) -> Result<Tail> {
        let ends: HashMap<i32, i64> = high_watermarks(cfg, topic)?.into_iter().collect();
        Tail::starting(cfg, topic, |p| {
            Offset::Offset(ends.get(&p).copied().unwrap_or(0))
        })
    }

    fn starting(cfg: &KafkaConfig, topic: &str, start: impl Fn(i32) -> Offset) -> Result<Tail> {
        let consumer = reader(cfg, "meterflow-tail")?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..crate::partition_count(cfg, topic)? {
            tpl.add_partition_offset(topic, p, start(p))
                .context("offset list")?;
        }
        consumer.assign(&tpl).context("assigning tail partitions")?;
        Ok(Tail {
            consumer,
            topic: topic.to_string(),
        })
    }

    /// The records that arrived since the last call (none if nothing did).
    pub fn poll(&self) -> Result<Vec<TableRecord>> {
        let mut out = Vec::new();
        while let Some(r) = self.consumer.poll(Duration::ZERO) {
            match r {
                Ok(m) => out.push(to_record(&self.topic, &m)),
                Err(KafkaError::PartitionEOF(_)) => {}
                Err(e) if is_fatal(&e) => return Err(e).context("reading tail"),
                // the client reconnects by itself (a broker restart, say): what arrived so
                // far now, the rest at a later call
                Err(e) => {
                    tracing::warn!(topic = %self.topic, error = %e, "tail not read to the end; retried at the next poll");
                    break;
                }
            }
        }
        Ok(out)
    }
}

/// Every record of `topic` from the beginning to the end, handed to `on_record` one at a
/// time (nothing is held): for exports of whole topics.
pub fn scan_topic(
    cfg: &KafkaConfig,
    topic: &str,
    timeout: Duration,
    on_record: impl FnMut(TableRecord),
) -> Result<Vec<(i32, i64)>> {
    read_to_end(cfg, topic, |_| 0, Instant::now() + timeout, on_record)
}

/// Like [`scan_topic`], each partition from `start(p)`.
pub fn scan_topic_from(
    cfg: &KafkaConfig,
    topic: &str,
    start: impl Fn(i32) -> i64,
    timeout: Duration,
    on_record: impl FnMut(TableRecord),
) -> Result<Vec<(i32, i64)>> {
    read_to_end(cfg, topic, start, Instant::now() + timeout, on_record)
}

/// End offset (next offset to be written) of every partition of `topic`.
pub fn high_watermarks(cfg: &KafkaConfig, topic: &str) -> Result<Vec<(i32, i64)>> {
    let c = reader(cfg, "meterflow-hwm")?;
    let n = crate::partition_count(cfg, topic)?;
    // ListOffsets as a starting point only: it may be short of the end (Tansu: the last
    // batch's base + 1), never past it; one record back is a batch base on every broker
    let mut listed = HashMap::new();
    for p in 0..n {
        let (_, hi) = c
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .context("fetching watermarks")?;
        listed.insert(p, (hi - 1).max(0));
    }
    close_later(c);
    read_to_end(
        cfg,
        topic,
        |p| listed.get(&p).copied().unwrap_or(0),
        Instant::now() + Duration::from_secs(30),
        |_| {},
    )
}

/// Read `topics` to their ends, starting each partition at `from` where given (used to
/// tail incrementally) and at the beginning otherwise.
pub fn read_table(
    cfg: &KafkaConfig,
    topics: &[&str],
    from: &HashMap<(String, i32), i64>,
    timeout: Duration,
) -> Result<Vec<TableRecord>> {
    let mut out = Vec::new();
    read_table_each(cfg, topics, from, timeout, |r| out.push(r))?;
    Ok(out)
}

/// `read_table`, handing each record to `each` as it is read (topic by topic, each
/// partition in offset order) instead of holding them all: for a reader that keeps only
/// the latest state of each key, memory in proportion to the keys, not the topic.
pub fn read_table_each(
    cfg: &KafkaConfig,
    topics: &[&str],
    from: &HashMap<(String, i32), i64>,
    timeout: Duration,
    mut each: impl FnMut(TableRecord),
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    for t in topics {
        read_to_end(
            cfg,
            t,
            |p| from.get(&(t.to_string(), p)).copied().unwrap_or(0),
            deadline,
            &mut each,
        )?;
    }
    Ok(())
}

/// The latest value of every key of a compacted `topic` (tombstones remove keys), read
/// from the beginning to the end; from async code, on a blocking-allowed thread.
pub fn read_latest(cfg: &KafkaConfig, topic: &str) -> Result<Vec<(Vec<u8>, TableRecord)>> {
    let recs = tokio::task::block_in_place(|| {
        read_table(cfg, &[topic], &HashMap::new(), Duration::from_secs(60))
    })?;
    let mut latest: HashMap<Vec<u8>, TableRecord> = HashMap::new();
    let mut order: Vec<Vec<u8>> = Vec::new();
    for r in recs {
        let Some(k) = r.key.clone() else { continue };
        if r.payload.is_none() {
            latest.remove(&k);
            continue;
        }
        if !latest.contains_key(&k) {
            order.push(k.clone());
        }
        latest.insert(k, r);
    }
    Ok(order
        .into_iter()
        .filter_map(|k| latest.remove(&k).map(|r| (k, r)))
        .collect())
}
