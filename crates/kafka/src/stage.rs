//! One stage's Kafka I/O: consume a batch, produce its output, commit the input offsets
//! only after the output is acknowledged (at-least-once) or inside the same transaction
//! (exactly-once). The caller decides *which* offsets are safe to commit.

use crate::outbox::Outbox;
use crate::{client_config, counting_producer, Delivery, KafkaConfig};
use anyhow::{Context, Result};
use futures::{FutureExt, StreamExt};
use meterflow_types::{id, Dec, DlqRecord, Millis};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::Producer;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// A partition assignment change, seen between batches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Assignment {
    Assigned(Vec<(String, i32)>),
    Revoked(Vec<(String, i32)>),
}

/// The consumer's context: records assignment changes for the stage, and on every
/// assignment starts each partition `rewind` records before its committed offset.
///
/// Why rewind: Kafka serves a fetch from the record batch that *contains* the requested
/// offset, but Tansu 0.6's in-memory storage serves it from the first batch whose base
/// offset is at or after it — a consumer resuming mid-batch would silently skip the rest
/// of that batch (and be handed copies of the partition's last record instead:
/// RELIABILITY.md, session 45).
/// Starting up to `rewind` records earlier (no producer batch holds more: librdkafka's
/// `batch.num.messages` caps it at 10 000) reaches a batch boundary on any broker;
/// `next_batch` then drops every record below the committed offset, so the stage sees
/// exactly the records after it, as it would on Kafka.
pub struct Ctx {
    events: Mutex<Vec<Assignment>>,
    /// Told of every assignment change (`next_batch` returns to the stage at once).
    changed: tokio::sync::Notify,
    /// The partitions this member owns now. Records of other partitions (fetched before a
    /// revoke) are dropped and their offsets never committed: a member that lost a
    /// partition must not commit over its new owner's progress.
    owned: Mutex<HashMap<(String, i32), Owned>>,
    rewind: i64,
    /// Partition ends from the client's statistics, for the probes' `lag`.
    ends: crate::probe::PartitionEnds,
}

/// What a member holds of a partition it owns.
#[derive(Clone, Copy, Debug, Default)]
struct Owned {
    /// Records below it are dropped: the committed offset at assignment (0 when none),
    /// or a rewind's offset.
    floor: i64,
    /// The offsets handed to the stage since then, as one range `[first, next)`: a record
    /// inside it is one the client delivered again, dropped (a stage sees each record of
    /// an assignment once).
    handed: Option<(i64, i64)>,
}

impl Owned {
    fn from(floor: i64) -> Owned {
        Owned {
            floor,
            handed: None,
        }
    }

    /// Whether the record at `offset` goes to the stage (then it is counted as handed
    /// over): `None` below the floor, `Some(false)` if handed over already.
    fn admit(&mut self, offset: i64) -> Option<bool> {
        if offset < self.floor {
            return None;
        }
        Some(match &mut self.handed {
            Some((first, next)) if *first <= offset && offset < *next => false,
            Some((_, next)) => {
                *next = (*next).max(offset + 1);
                true
            }
            None => {
                self.handed = Some((offset, offset + 1));
                true
            }
        })
    }
}

fn parts(tpl: &TopicPartitionList) -> Vec<(String, i32)> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_string(), e.partition()))
        .collect()
}

impl ClientContext for Ctx {
    fn stats(&self, s: rdkafka::Statistics) {
        if let Ok(mut ends) = self.ends.lock() {
            for (topic, t) in s.topics {
                for (p, part) in t.partitions {
                    if p >= 0 && part.hi_offset >= 0 {
                        ends.insert((topic.clone(), p), part.hi_offset);
                    }
                }
            }
        }
    }
}
impl ConsumerContext for Ctx {
    fn rebalance(&self, c: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let mut floors = Vec::new();
                if self.rewind > 0 {
                    match c.committed_offsets(tpl.clone(), Duration::from_secs(10)) {
                        Ok(committed) => {
                            for e in committed.elements() {
                                // never committed (answered without error): from the
                                // beginning (`auto.offset.reset` = earliest) at once —
                                // left unset, librdkafka asks the broker again and
                                // waits a 100 ms backoff before it fetches
                                if e.offset() == Offset::Invalid && e.error().is_ok() {
                                    let _ = tpl.set_partition_offset(
                                        e.topic(),
                                        e.partition(),
                                        Offset::Beginning,
                                    );
                                }
                                if let Offset::Offset(o) = e.offset() {
                                    let from = (o - self.rewind).max(0);
                                    if tpl
                                        .set_partition_offset(
                                            e.topic(),
                                            e.partition(),
                                            Offset::Offset(from),
                                        )
                                        .is_ok()
                                    {
                                        floors.push(((e.topic().to_string(), e.partition()), o));
                                    }
                                }
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "committed offsets unknown at assignment; resuming without rewind")
                        }
                    }
                }
                if let Ok(mut owned) = self.owned.lock() {
                    owned.extend(parts(tpl).into_iter().map(|k| (k, Owned::from(0))));
                    owned.extend(floors.into_iter().map(|(k, o)| (k, Owned::from(o))));
                }
                if let Err(e) = c.assign(tpl) {
                    tracing::error!(error = %e, "assigning partitions");
                }
                tracing::info!(partitions = ?parts(tpl), "partitions assigned");
                if let Ok(mut ev) = self.events.lock() {
                    ev.push(Assignment::Assigned(parts(tpl)));
                }
                self.changed.notify_one();
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                tracing::info!(partitions = ?parts(tpl), "partitions revoked");
                if let Ok(mut owned) = self.owned.lock() {
                    for k in parts(tpl) {
                        owned.remove(&k);
                    }
                }
                if let Ok(mut ev) = self.events.lock() {
                    ev.push(Assignment::Revoked(parts(tpl)));
                }
                self.changed.notify_one();
                if let Err(e) = c.unassign() {
                    tracing::error!(error = %e, "unassigning partitions");
                }
            }
            other => {
                let code: rdkafka::types::RDKafkaErrorCode = other.into();
                tracing::warn!(error = %code, "rebalance error");
                if let Ok(mut owned) = self.owned.lock() {
                    owned.clear();
                }
                let _ = c.unassign();
            }
        }
    }
}

/// Where a record came from, for the dead-letter topic.
#[derive(Clone, Copy, Debug)]
pub struct Coordinates<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<&'a [u8]>,
    pub payload: &'a [u8],
}

pub struct Batch {
    pub messages: Vec<OwnedMessage>,
    pub rebalances: Vec<Assignment>,
}

pub struct StageIo {
    consumer: Arc<StreamConsumer<Ctx>>,
    out: Outbox,
    delivery: Delivery,
    in_txn: bool,
    stage: String,
    dlq_topic: String,
    audit_topic: String,
    ledger: crate::audit::Ledger,
    /// Time spent waiting for acknowledgements and offset commits since the last logged
    /// commit (reported with it: a stage's stalls, for diagnosis).
    waited: Duration,
    /// Reused for every record `send_record` encodes (the producer copies the bytes).
    scratch: Vec<u8>,
}

const TXN_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a batch waits for one more message once it has some (see `next_batch`).
pub const BATCH_GAP: Duration = Duration::from_millis(10);

/// At most this many messages' room is taken for a batch before its first message: a
/// batch larger than this grows as it fills.
const MAX_BATCH_ROOM: usize = 16_384;

/// The longest a fetch waits at the broker for data (librdkafka's default is 500 ms, which
/// every hop would add to a window's latency when traffic is light); `[kafka.client]`
/// `fetch.wait.max.ms` overrides it.
pub const FETCH_WAIT_MS: &str = "50";

/// How long the fetcher pauses once the local queue is full (librdkafka's default is a
/// whole second, which a stage catching up on a backlog stalled for as soon as it spent
/// longer on a batch than the prefetch took to fill); `[kafka.client]` overrides it.
pub const FETCH_QUEUE_BACKOFF_MS: &str = "20";

impl StageIo {
    /// `member` names this replica: stable across restarts, unique among running
    /// replicas (static membership and transactional id).
    pub fn new(
        cfg: &KafkaConfig,
        stage: &str,
        group: &str,
        topics: &[&str],
        member: &str,
    ) -> Result<StageIo> {
        let mut c = client_config(cfg, &format!("{stage}-{member}"));
        if !cfg.client.contains_key("fetch.wait.max.ms") {
            c.set("fetch.wait.max.ms", FETCH_WAIT_MS);
        }
        if !cfg.client.contains_key("fetch.queue.backoff.ms") {
            c.set("fetch.queue.backoff.ms", FETCH_QUEUE_BACKOFF_MS);
        }
        c.set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("isolation.level", "read_committed")
            .set(
                "session.timeout.ms",
                cfg.session_timeout
                    .as_millis()
                    .clamp(1, i32::MAX as u128)
                    .to_string(),
            )
            .set("heartbeat.interval.ms", "1000")
            .set("max.poll.interval.ms", "300000")
            // partition ends for the probes' lag, once a second
            .set("statistics.interval.ms", "1000");
        if cfg.static_membership && !member.is_empty() {
            c.set("group.instance.id", format!("{stage}-{member}"));
        }
        let consumer: StreamConsumer<Ctx> = c
            .create_with_context(Ctx {
                events: Mutex::new(Vec::new()),
                changed: tokio::sync::Notify::new(),
                owned: Mutex::new(HashMap::new()),
                rewind: cfg.resume_rewind,
                ends: Default::default(),
            })
            .context("creating Kafka consumer")?;
        consumer.subscribe(topics).context("subscribing")?;
        let txn_id = format!("{group}-{member}");
        let producer = match cfg.delivery {
            Delivery::AtLeastOnce => counting_producer(cfg, &format!("{stage}-{member}"), None)?,
            Delivery::ExactlyOnce => {
                let p = counting_producer(cfg, &format!("{stage}-{member}"), Some(&txn_id))?;
                p.init_transactions(TXN_TIMEOUT)
                    .context("init_transactions (does the broker support transactions?)")?;
                p
            }
        };
        Ok(StageIo {
            consumer: Arc::new(consumer),
            out: Outbox::new(producer),
            delivery: cfg.delivery,
            in_txn: false,
            stage: stage.to_string(),
            dlq_topic: cfg.topics.dlq.clone(),
            audit_topic: cfg.topics.audit.clone(),
            ledger: crate::audit::Ledger::new(stage, member),
            waited: Duration::ZERO,
            scratch: Vec::with_capacity(1024),
        })
    }

    /// Up to `max` messages: waits at most `max_wait` for the first one, then takes what
    /// keeps arriving — a backlog fills the batch, a trickle ends it after a gap of
    /// `BATCH_GAP` (so a lone message, a window-closing marker say, is not held back for
    /// the whole `max_wait`). Returns early, empty, on shutdown, and on an assignment
    /// change while it has no message yet (the stage takes up its new partitions, reading
    /// their state, while the client fetches their first records).
    pub async fn next_batch(
        &mut self,
        max: usize,
        max_wait: Duration,
        shutdown: &CancellationToken,
    ) -> Result<Batch> {
        // room for a whole batch at once: grown by pushes, a batch of thousands was
        // copied a dozen times, into freshly faulted pages (a profile of the enricher,
        // BENCHMARKS.md, session 43)
        let mut messages = Vec::with_capacity(max.min(MAX_BATCH_ROOM));
        let deadline = Instant::now() + max_wait;
        // one stream for the whole batch (each `recv` registers a waker slot of its own)
        let mut stream = self.consumer.stream();
        while messages.len() < max {
            if !messages.is_empty() {
                // what the client holds already is taken as it is, without a timer and
                // a clock read per message (most of a backlog's batch)
                match stream.next().now_or_never() {
                    Some(Some(Ok(m))) => {
                        messages.push(m.detach());
                        continue;
                    }
                    Some(Some(Err(e))) => {
                        tracing::warn!(stage = %self.stage, error = %e, "consumer error");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                    Some(None) | None => {}
                }
            }
            let mut left = deadline.saturating_duration_since(Instant::now());
            if !messages.is_empty() {
                left = left.min(BATCH_GAP);
            }
            if left.is_zero() {
                break;
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.consumer.context().changed.notified(), if messages.is_empty() => break,
                r = tokio::time::timeout(left, stream.next()) => match r {
                    Err(_) | Ok(None) => break,
                    Ok(Some(Ok(m))) => messages.push(m.detach()),
                    Ok(Some(Err(e))) => {
                        tracing::warn!(stage = %self.stage, error = %e, "consumer error");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }
        drop(stream);
        // only partitions owned now, nothing below the committed offset (rewind), and each
        // record once: the client can hand a range over again (seen on Tansu 0.6 as a
        // restarted rater caught up; RELIABILITY.md, session 37)
        if let Ok(mut owned) = self.consumer.context().owned.lock() {
            let mut again: Vec<(i32, i64)> = Vec::new();
            messages.retain(|m| {
                // a member owns a few partitions: a scan, with no key to build per message
                let admitted = owned
                    .iter_mut()
                    .find(|((t, p), _)| *p == m.partition() && t == m.topic())
                    .and_then(|(_, o)| o.admit(m.offset()));
                if admitted == Some(false) {
                    again.push((m.partition(), m.offset()));
                }
                admitted == Some(true)
            });
            if !again.is_empty() {
                let (lo, hi) = again.iter().fold((i64::MAX, i64::MIN), |(lo, hi), (_, o)| {
                    (lo.min(*o), hi.max(*o))
                });
                tracing::warn!(
                    stage = %self.stage,
                    records = again.len(),
                    partitions = ?again.iter().map(|(p, _)| *p).collect::<std::collections::BTreeSet<_>>(),
                    offsets = %format!("{lo}..={hi}"),
                    "records delivered again by the client dropped"
                );
            }
        }
        let rebalances = std::mem::take(
            &mut *self
                .consumer
                .context()
                .events
                .lock()
                .map_err(|_| anyhow::anyhow!("poisoned"))?,
        );
        Ok(Batch {
            messages,
            rebalances,
        })
    }

    /// Queue one output record. `partition = None` partitions by key.
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

    /// Queue one output record with headers; `payload = None` is a tombstone.
    pub async fn send_with(
        &mut self,
        topic: &str,
        key: &[u8],
        payload: Option<&[u8]>,
        partition: Option<i32>,
        headers: &[(&str, &[u8])],
    ) -> Result<()> {
        if self.delivery == Delivery::ExactlyOnce && !self.in_txn {
            self.out
                .producer
                .begin_transaction()
                .context("begin_transaction")?;
            self.in_txn = true;
        }
        self.out
            .send_with(topic, key, payload, partition, headers)
            .await
    }

    /// Encode `record` (Avro single-object) and queue it, with headers.
    pub async fn send_record<R: meterflow_avro::Record>(
        &mut self,
        topic: &str,
        key: &[u8],
        record: &R,
        partition: Option<i32>,
        headers: &[(&str, &[u8])],
    ) -> Result<()> {
        let mut buf = std::mem::take(&mut self.scratch);
        buf.clear();
        meterflow_avro::encode_into(record, &mut buf);
        let sent = self
            .send_with(topic, key, Some(&buf), partition, headers)
            .await;
        self.scratch = buf;
        sent
    }

    /// Count a record for the audit (see `audit`): `in` read, `out` sent, `dup` dropped.
    pub fn audit(&mut self, topic: &str, direction: &'static str, at: (Millis, Dec)) {
        self.ledger.count(topic, direction, at);
    }

    /// Send a message that could not be handled to the dead-letter topic, with its
    /// original bytes and a reason code. The caller then counts it as handled.
    pub async fn dead_letter(
        &mut self,
        m: &OwnedMessage,
        reason_code: &str,
        reason: &str,
    ) -> Result<()> {
        let at = Coordinates {
            topic: m.topic(),
            partition: m.partition(),
            offset: m.offset(),
            key: m.key(),
            payload: m.payload().unwrap_or_default(),
        };
        self.dead_letter_at(at, reason_code, reason).await
    }

    /// Dead-letter a record read outside the consumer group (e.g. a table topic). The
    /// DLQ id derives from the source coordinates, so a record dead-lettered again after
    /// a restart or by another replica carries the same id.
    pub async fn dead_letter_at(
        &mut self,
        at: Coordinates<'_>,
        reason_code: &str,
        reason: &str,
    ) -> Result<()> {
        let rec = dlq_record(&self.stage, at, reason_code, reason);
        let bytes = meterflow_avro::encode(&rec);
        let topic = self.dlq_topic.clone();
        self.send(&topic, rec.id.as_bytes(), &bytes, None).await
    }

    /// Wait until everything sent so far is acknowledged (and, in exactly-once mode,
    /// commit it together with `offsets`); then commit `offsets` (next offset to read).
    pub async fn commit(&mut self, offsets: &[(String, i32, i64)]) -> Result<()> {
        // the audit counts since the last commit travel with it
        for (key, rec) in self.ledger.drain() {
            let topic = self.audit_topic.clone();
            self.send(&topic, key.as_bytes(), &meterflow_avro::encode(&rec), None)
                .await?;
        }
        let mut tpl = TopicPartitionList::new();
        if let Ok(owned) = self.consumer.context().owned.lock() {
            for (t, p, o) in offsets {
                if owned.contains_key(&(t.clone(), *p)) {
                    tpl.add_partition_offset(t, *p, Offset::Offset(*o))
                        .context("offset list")?;
                }
            }
        }
        let started = Instant::now();
        match self.delivery {
            Delivery::AtLeastOnce => {
                self.out.flush().await?;
                if tpl.count() > 0 {
                    self.consumer
                        .commit(&tpl, rdkafka::consumer::CommitMode::Sync)
                        .context("committing offsets")?;
                }
            }
            Delivery::ExactlyOnce => {
                if !self.in_txn && tpl.count() == 0 {
                    return Ok(()); // nothing produced, nothing to commit
                }
                if !self.in_txn {
                    self.out
                        .producer
                        .begin_transaction()
                        .context("begin_transaction")?;
                    self.in_txn = true;
                }
                self.out.producer.flush(TXN_TIMEOUT).context("flush")?;
                self.out.flush().await?;
                if tpl.count() > 0 {
                    let gm = self.consumer.group_metadata().context("group metadata")?;
                    self.out
                        .producer
                        .send_offsets_to_transaction(&tpl, &gm, TXN_TIMEOUT)
                        .context("send_offsets_to_transaction")?;
                }
                self.out
                    .producer
                    .commit_transaction(TXN_TIMEOUT)
                    .context("commit_transaction")?;
                self.in_txn = false;
            }
        }
        self.waited += started.elapsed();
        if tpl.count() > 0 {
            log_commit(&tpl, std::mem::take(&mut self.waited));
        }
        Ok(())
    }

    /// Fault injection (tests): the next commit's flush fails with `why` after every
    /// record sent so far was delivered, as when the broker refused one record of many.
    pub fn refuse_next_flush(&mut self, why: String) {
        self.out.refuse_next_flush(why);
    }

    /// Read `partition` of `topic` again from `offset`, as after an assignment: the fetch
    /// starts `resume_rewind` records earlier (see [`Ctx`]) and `next_batch` drops what
    /// lies below `offset`. For a partition this member owns and has fetched from.
    pub fn rewind_to(&self, topic: &str, partition: i32, offset: i64) -> Result<()> {
        let ctx = self.consumer.context();
        if let Ok(mut owned) = ctx.owned.lock() {
            match owned.get_mut(&(topic.to_string(), partition)) {
                // read again from `offset` on purpose: nothing counts as handed over
                Some(o) => *o = Owned::from(offset),
                None => return Ok(()), // not ours (any more): nothing to re-read
            }
        }
        let from = (offset - ctx.rewind).max(0);
        self.consumer
            .seek(
                topic,
                partition,
                Offset::Offset(from),
                Duration::from_secs(10),
            )
            .with_context(|| format!("seeking {topic}/{partition} to {from}"))
    }

    /// Committed offsets of the given partitions (None = nothing committed yet).
    pub fn committed(&self, partitions: &[(String, i32)]) -> Result<Vec<Option<i64>>> {
        let mut tpl = TopicPartitionList::new();
        for (t, p) in partitions {
            tpl.add_partition(t, *p);
        }
        let got = self
            .consumer
            .committed_offsets(tpl, Duration::from_secs(10))
            .context("committed offsets")?;
        Ok(partitions
            .iter()
            .map(
                |(t, p)| match got.find_partition(t, *p).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) => Some(o),
                    _ => None,
                },
            )
            .collect())
    }

    /// The latest known end of every partition this member reads (from the client's
    /// statistics, refreshed every second), for [`crate::probe::Probes::with_ends`].
    pub fn partition_ends(&self) -> crate::probe::PartitionEnds {
        self.consumer.context().ends.clone()
    }
}

/// The most of a message's bytes a dead-letter record carries: a larger message (it is
/// dead-lettered for its size, or it would not fit the dead-letter topic) keeps its first
/// bytes here, and the reason names its size, SHA-256 and coordinates, where the whole
/// message stays.
pub const DLQ_PAYLOAD_MAX: usize = 256 * 1024;

/// The dead-letter record of a message (logged as it is made). Its id derives from the
/// source coordinates, so the same message dead-lettered twice carries one id.
pub fn dlq_record(stage: &str, at: Coordinates<'_>, reason_code: &str, reason: &str) -> DlqRecord {
    let (payload, reason) = if at.payload.len() > DLQ_PAYLOAD_MAX {
        (
            &at.payload[..DLQ_PAYLOAD_MAX],
            format!(
                "{reason} [payload: first {DLQ_PAYLOAD_MAX} of {} bytes, sha256 {}; the whole message is {}/{}/{}]",
                at.payload.len(),
                id::sha256_hex(at.payload),
                at.topic,
                at.partition,
                at.offset
            ),
        )
    } else {
        (at.payload, reason.to_string())
    };
    let reason = reason.as_str();
    tracing::warn!(
        stage,
        topic = at.topic,
        partition = at.partition,
        offset = at.offset,
        reason_code,
        reason,
        "dead-lettered"
    );
    DlqRecord {
        id: id::derive(
            "dlq",
            &[at.topic, &at.partition.to_string(), &at.offset.to_string()],
        ),
        stage: stage.to_string(),
        topic: at.topic.to_string(),
        partition: at.partition,
        offset: at.offset,
        reason_code: reason_code.to_string(),
        reason: reason.to_string(),
        key: at.key.map(<[u8]>::to_vec),
        payload: payload.to_vec(),
        time: now_ms(),
    }
}

/// A replica's default name: the host name (stable per machine or pod).
pub fn default_member() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "meterflow".into())
}

/// At debug on target `meterflow::commit`: each commit once the broker has taken it,
/// with the wall time (`at_ms`) and the offsets as `topic/partition=next`. Off by default;
/// the stage benchmark enables it to stop a stage's clock at the commit that reaches the
/// end of its input, without asking the broker over and over.
/// `waited`: how long the stage waited for acknowledgements and commits since the last
/// logged commit, this one's included.
fn log_commit(tpl: &TopicPartitionList, waited: Duration) {
    if tpl.count() == 0 || !tracing::enabled!(target: "meterflow::commit", tracing::Level::DEBUG) {
        return;
    }
    let offsets: Vec<String> = tpl
        .elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) => Some(format!("{}/{}={o}", e.topic(), e.partition())),
            _ => None,
        })
        .collect();
    tracing::debug!(
        target: "meterflow::commit",
        at_ms = now_ms(),
        offsets = %offsets.join(","),
        waited_us = waited.as_micros() as u64,
        "committed"
    );
}

/// A commit as `log_commit` wrote it: (`at_ms`, [(topic, partition, next offset)]).
pub type LoggedCommit = (i64, Vec<(String, i32, i64)>);

/// A line `log_commit` wrote, read back (None for any other line).
pub fn parse_commit_log(line: &str) -> Option<LoggedCommit> {
    const AT: &str = "committed at_ms=";
    let rest = &line[line.find(AT)? + AT.len()..];
    let (at, rest) = rest.split_once(' ')?;
    // the offsets are one field without spaces; what follows them is not theirs
    let offsets = rest.strip_prefix("offsets=")?.split_whitespace().next()?;
    let parsed = offsets
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|e| {
            let (tp, next) = e.rsplit_once('=')?;
            let (topic, part) = tp.rsplit_once('/')?;
            Some((topic.to_string(), part.parse().ok()?, next.parse().ok()?))
        })
        .collect::<Option<Vec<_>>>()?;
    Some((at.parse().ok()?, parsed))
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod commit_log_tests {
    use super::*;
    use std::io::Write;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("buffer").extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn logged(filter: &str, tpl: &TopicPartitionList) -> String {
        let buf = Buf::default();
        let w = buf.clone();
        let sub = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_ansi(false)
            .with_writer(move || w.clone())
            .finish();
        tracing::subscriber::with_default(sub, || log_commit(tpl, Duration::from_micros(1500)));
        let out = buf.0.lock().expect("buffer").clone();
        String::from_utf8(out).expect("utf-8")
    }

    #[test]
    fn a_commit_logged_by_the_service_formatter_parses_back() {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset("meterflow.usage", 0, Offset::Offset(17))
            .expect("offset");
        tpl.add_partition_offset("meterflow.usage", 3, Offset::Offset(0))
            .expect("offset");
        let before = now_ms();
        let out = logged("info,meterflow::commit=debug", &tpl);
        let (at, offsets) = out
            .lines()
            .find_map(parse_commit_log)
            .unwrap_or_else(|| panic!("no commit line in {out:?}"));
        assert!(at >= before && at <= now_ms(), "at_ms {at}");
        assert!(out.contains("waited_us=1500"), "{out}");
        assert_eq!(
            offsets,
            vec![
                ("meterflow.usage".to_string(), 0, 17),
                ("meterflow.usage".to_string(), 3, 0)
            ]
        );
        // off unless asked for
        assert_eq!(logged("info", &tpl), "");
        assert_eq!(parse_commit_log("INFO committed 3 records"), None);
    }
}

#[cfg(test)]
mod owned_tests {
    use super::*;

    #[test]
    fn a_range_handed_over_again_is_dropped_once_and_only_it() {
        let mut o = Owned::from(100);
        let take = |o: &mut Owned, offs: &[i64]| -> Vec<Option<bool>> {
            offs.iter().map(|x| o.admit(*x)).collect()
        };
        // below the floor (the committed offset): dropped, not counted
        assert_eq!(take(&mut o, &[98, 99]), [None, None]);
        assert_eq!(take(&mut o, &[100, 101, 102]), [Some(true); 3]);
        // the client hands 101..=102 over again (one of them twice) with what follows
        assert_eq!(
            take(&mut o, &[101, 102, 102, 103, 104]),
            [
                Some(false),
                Some(false),
                Some(false),
                Some(true),
                Some(true)
            ]
        );
        // offsets past a gap (transaction markers, compaction) are new
        assert_eq!(take(&mut o, &[110]), [Some(true)]);
        assert_eq!(take(&mut o, &[105, 110]), [Some(false), Some(false)]);
        // a new assignment (or a rewind) starts again: all of it once more
        let mut o = Owned::from(100);
        assert_eq!(take(&mut o, &[100, 101]), [Some(true); 2]);
        // with no committed offset (floor 0), a first record past the start: earlier ones
        // arriving later were not handed over, and go to the stage
        let mut o = Owned::from(0);
        assert_eq!(
            take(&mut o, &[50, 49, 50]),
            [Some(true), Some(true), Some(false)]
        );
    }
}
