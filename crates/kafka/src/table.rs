//! Reading topics without a consumer group: whole compacted tables, and high watermarks.

use crate::{client_config, KafkaConfig};
use anyhow::{Context, Result};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
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
}

/// High watermark (next offset) of every partition of `topic`.
pub fn high_watermarks(cfg: &KafkaConfig, topic: &str) -> Result<Vec<(i32, i64)>> {
    let c: BaseConsumer = client_config(cfg, "meterflow-hwm").create()?;
    let n = crate::partition_count(cfg, topic)?;
    (0..n)
        .map(|p| {
            let (_, hi) = c
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .context("fetching watermarks")?;
            Ok((p, hi))
        })
        .collect()
}

/// Read `topics` from the beginning up to their high watermarks at the time of the call,
/// starting each partition at `from` offsets where given (used to tail incrementally).
pub fn read_table(
    cfg: &KafkaConfig,
    topics: &[&str],
    from: &HashMap<(String, i32), i64>,
    timeout: Duration,
) -> Result<Vec<TableRecord>> {
    let mut c = client_config(cfg, "meterflow-table");
    c.set("group.id", "meterflow-table-reader")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("isolation.level", "read_committed");
    let consumer: BaseConsumer = c.create().context("creating table reader")?;
    let mut tpl = TopicPartitionList::new();
    let mut remaining: HashMap<(String, i32), i64> = HashMap::new();
    for t in topics {
        for (p, hi) in high_watermarks(cfg, t)? {
            let start = from.get(&(t.to_string(), p)).copied().unwrap_or(0);
            if hi > start {
                tpl.add_partition_offset(t, p, Offset::Offset(start))
                    .context("offset list")?;
                remaining.insert((t.to_string(), p), hi);
            }
        }
    }
    let mut out = Vec::new();
    if remaining.is_empty() {
        return Ok(out);
    }
    consumer
        .assign(&tpl)
        .context("assigning table partitions")?;
    let deadline = Instant::now() + timeout;
    while !remaining.is_empty() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "timed out reading {topics:?} to the end"
        );
        let Some(r) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let m = r.context("reading table")?;
        let k = (m.topic().to_string(), m.partition());
        out.push(TableRecord {
            topic: k.0.clone(),
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(|k| k.to_vec()),
            payload: m.payload().map(|p| p.to_vec()),
        });
        if let Some(hi) = remaining.get(&k) {
            if m.offset() + 1 >= *hi {
                remaining.remove(&k);
            }
        }
    }
    Ok(out)
}
