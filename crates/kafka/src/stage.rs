//! One stage's Kafka I/O: consume a batch, produce its output, commit the input offsets
//! only after the output is acknowledged (at-least-once) or inside the same transaction
//! (exactly-once). The caller decides *which* offsets are safe to commit.

use crate::outbox::Outbox;
use crate::{client_config, producer, Delivery, KafkaConfig};
use anyhow::{Context, Result};
use meterflow_types::{id, DlqRecord};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::{FutureProducer, Producer};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// A partition assignment change, seen between batches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Assignment {
    Assigned(Vec<(String, i32)>),
    Revoked(Vec<(String, i32)>),
}

#[derive(Default)]
pub struct Ctx {
    events: Mutex<Vec<Assignment>>,
}

fn parts(tpl: &TopicPartitionList) -> Vec<(String, i32)> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_string(), e.partition()))
        .collect()
}

impl ClientContext for Ctx {}
impl ConsumerContext for Ctx {
    fn pre_rebalance(&self, _c: &BaseConsumer<Self>, r: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = r {
            if let Ok(mut ev) = self.events.lock() {
                ev.push(Assignment::Revoked(parts(tpl)));
            }
        }
    }
    fn post_rebalance(&self, _c: &BaseConsumer<Self>, r: &Rebalance<'_>) {
        match r {
            Rebalance::Assign(tpl) => {
                if let Ok(mut ev) = self.events.lock() {
                    ev.push(Assignment::Assigned(parts(tpl)));
                }
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
            Rebalance::Revoke(_) => {}
        }
    }
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
    pub dead_lettered: u64,
}

const TXN_TIMEOUT: Duration = Duration::from_secs(30);

impl StageIo {
    /// `member` must be unique per running process (it names the transactional id).
    pub fn new(
        cfg: &KafkaConfig,
        stage: &str,
        group: &str,
        topics: &[&str],
        member: &str,
    ) -> Result<StageIo> {
        let mut c = client_config(cfg, &format!("{stage}-{member}"));
        c.set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("isolation.level", "read_committed")
            .set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "1000")
            .set("max.poll.interval.ms", "300000");
        let consumer: StreamConsumer<Ctx> = c
            .create_with_context(Ctx::default())
            .context("creating Kafka consumer")?;
        consumer.subscribe(topics).context("subscribing")?;
        let txn_id = format!("{group}-{member}");
        let producer = match cfg.delivery {
            Delivery::AtLeastOnce => producer(cfg, &format!("{stage}-{member}"), None)?,
            Delivery::ExactlyOnce => {
                let p = producer(cfg, &format!("{stage}-{member}"), Some(&txn_id))?;
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
            dead_lettered: 0,
        })
    }

    pub fn stage(&self) -> &str {
        &self.stage
    }

    /// Up to `max` messages, waiting at most `max_wait` after the first one (or for the
    /// first one). Returns early, empty, on shutdown.
    pub async fn next_batch(
        &mut self,
        max: usize,
        max_wait: Duration,
        shutdown: &CancellationToken,
    ) -> Result<Batch> {
        let mut messages = Vec::new();
        let deadline = Instant::now() + max_wait;
        while messages.len() < max {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                r = tokio::time::timeout(left, self.consumer.recv()) => match r {
                    Err(_) => break,
                    Ok(Ok(m)) => messages.push(m.detach()),
                    Ok(Err(e)) => {
                        tracing::warn!(stage = %self.stage, error = %e, "consumer error");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
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
        if self.delivery == Delivery::ExactlyOnce && !self.in_txn {
            self.out
                .producer
                .begin_transaction()
                .context("begin_transaction")?;
            self.in_txn = true;
        }
        self.out.send(topic, key, payload, partition).await
    }

    /// Send a message that could not be handled to the dead-letter topic, with its
    /// original bytes and a reason code. The caller then counts it as handled.
    pub async fn dead_letter(
        &mut self,
        m: &OwnedMessage,
        reason_code: &str,
        reason: &str,
    ) -> Result<()> {
        tracing::warn!(stage = %self.stage, topic = m.topic(), partition = m.partition(), offset = m.offset(), reason_code, reason, "dead-lettered");
        let rec = DlqRecord {
            id: id::derive(
                "dlq",
                &[
                    m.topic(),
                    &m.partition().to_string(),
                    &m.offset().to_string(),
                ],
            ),
            stage: self.stage.clone(),
            topic: m.topic().to_string(),
            partition: m.partition(),
            offset: m.offset(),
            reason_code: reason_code.to_string(),
            reason: reason.to_string(),
            key: m.key().map(|k| k.to_vec()),
            payload: m.payload().map(|p| p.to_vec()).unwrap_or_default(),
            time: now_ms(),
        };
        let bytes = meterflow_avro::encode(&rec);
        let topic = self.dlq_topic.clone();
        self.dead_lettered += 1;
        self.send(&topic, rec.id.as_bytes(), &bytes, None).await
    }

    /// Wait until everything sent so far is acknowledged (and, in exactly-once mode,
    /// commit it together with `offsets`); then commit `offsets` (next offset to read).
    pub async fn commit(&mut self, offsets: &[(String, i32, i64)]) -> Result<()> {
        let mut tpl = TopicPartitionList::new();
        for (t, p, o) in offsets {
            tpl.add_partition_offset(t, *p, Offset::Offset(*o))
                .context("offset list")?;
        }
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
        Ok(())
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

    pub fn producer(&self) -> &FutureProducer {
        &self.out.producer
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
