//! The only crate that knows rdkafka: client configuration, topic creation, a stage's
//! consume → produce → commit loop with the delivery model as a type, the dead-letter
//! helper, compacted-table reads and the embedded (mock) broker for `meterflow up`.

pub mod audit;
mod config;
mod outbox;
pub mod probe;
mod stage;
mod table;

pub use config::{Delivery, KafkaConfig, Topics};
pub use outbox::{Acks, CountingProducer, Outbox};
pub use rdkafka::message::{Message, OwnedMessage};
pub use stage::{default_member, dlq_record, now_ms, parse_commit_log, DLQ_PAYLOAD_MAX};
pub use stage::{Assignment, Batch, Coordinates, StageIo};
pub use table::{
    high_watermarks, read_latest, read_table, read_table_each, scan_topic, scan_topic_from,
    TableRecord, Tail,
};

use anyhow::{Context, Result};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::FutureProducer;
use std::time::Duration;

pub fn client_config(cfg: &KafkaConfig, client_id: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers)
        .set("client.id", client_id)
        .set("broker.address.family", "v4")
        .set("log_level", "3");
    for (k, v) in &cfg.client {
        c.set(k, v);
    }
    c
}

/// An idempotent producer: ordered per partition, no duplicates from retries.
pub fn producer(
    cfg: &KafkaConfig,
    client_id: &str,
    transactional_id: Option<&str>,
) -> Result<FutureProducer> {
    producer_config(cfg, client_id, transactional_id)
        .create()
        .context("creating Kafka producer")
}

/// The same producer with its delivery reports counted, for an [`Outbox`].
pub fn counting_producer(
    cfg: &KafkaConfig,
    client_id: &str,
    transactional_id: Option<&str>,
) -> Result<outbox::CountingProducer> {
    let p = producer_config(cfg, client_id, transactional_id)
        .create_with_context(outbox::Acks::default())
        .context("creating Kafka producer")?;
    outbox::CountingProducer::new(p).context("starting the producer's polling thread")
}

fn producer_config(
    cfg: &KafkaConfig,
    client_id: &str,
    transactional_id: Option<&str>,
) -> ClientConfig {
    let mut c = client_config(cfg, client_id);
    // Java-compatible key hashing, so keys land where other Kafka clients put them
    c.set("partitioner", "murmur2_random")
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", cfg.linger_ms.to_string())
        .set("message.timeout.ms", "120000")
        .set("queue.buffering.max.messages", "500000");
    if let Some(t) = transactional_id {
        // a message may not outlive the transaction it belongs to
        c.set("transactional.id", t)
            .set("transaction.timeout.ms", "60000")
            .set("message.timeout.ms", "60000");
    }
    for (k, v) in &cfg.client {
        c.set(k, v);
    }
    c
}

/// Every topic meterflow uses: (name, partitions, compacted).
pub fn topic_specs(cfg: &KafkaConfig) -> Vec<(String, i32, bool)> {
    let t = &cfg.topics;
    let n = cfg.partitions;
    [
        (&t.samples, n, false),
        (&t.instances, n, true),
        (&t.ownership, n, true),
        (&t.usage, n, false),
        (&t.rated, n, false),
        (&t.dlq, 1, false),
        (&t.control, 1, true),
        (&t.rater_state, 1, true),
        (&t.parked, n, true),
        (&t.enricher_state, 1, true),
        (&t.settlements, n, false),
        (&t.settler_state, 1, true),
        (&t.requests, 1, false),
        (&t.replies, n, false),
        (&t.audit, 1, false),
    ]
    .into_iter()
    .map(|(name, p, c)| (name.clone(), p, c))
    .collect()
}

/// Create the topics meterflow uses if they do not exist (compacted where the brief says so).
pub async fn ensure_topics(cfg: &KafkaConfig) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = client_config(cfg, "meterflow-admin")
        .create()
        .context("creating Kafka admin client")?;
    let specs = topic_specs(cfg);
    let compact = [("cleanup.policy", "compact")];
    let plain: [(&str, &str); 0] = [];
    let existing = topic_names(cfg, METADATA_WAIT)?;
    let new: Vec<NewTopic<'_>> = specs
        .iter()
        .filter(|(name, _, _)| !existing.iter().any(|e| e == name))
        .map(|(name, parts, compacted)| {
            let mut nt = NewTopic::new(name, *parts, TopicReplication::Fixed(cfg.replication));
            let conf: &[(&str, &str)] = if *compacted { &compact } else { &plain };
            for (k, v) in conf.iter() {
                nt = nt.set(k, v);
            }
            nt
        })
        .collect();
    if new.is_empty() {
        return Ok(());
    }
    let res = admin
        .create_topics(
            new.iter(),
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(20))),
        )
        .await
        .context("creating topics")?;
    for r in res {
        match r {
            Ok(_) => {}
            Err((name, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {
                tracing::debug!(topic = %name, "topic exists")
            }
            Err((name, code)) => anyhow::bail!("creating topic {name}: {code}"),
        }
    }
    // Wait until every topic is visible in metadata with its partitions.
    for _ in 0..100 {
        let names = topic_names(cfg, METADATA_WAIT)?;
        if specs.iter().all(|(n, _, _)| names.iter().any(|e| e == n)) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("topics did not appear in metadata")
}

/// How long a metadata request may wait for the brokers.
const METADATA_WAIT: Duration = Duration::from_secs(10);

fn topic_names(cfg: &KafkaConfig, wait: Duration) -> Result<Vec<String>> {
    let c: BaseConsumer = client_config(cfg, "meterflow-meta").create()?;
    let md = c.fetch_metadata(None, wait).context("fetching metadata")?;
    Ok(md
        .topics()
        .iter()
        .filter(|t| !t.partitions().is_empty())
        .map(|t| t.name().to_string())
        .collect())
}

/// Wait until the brokers answer, as a service does at start-up: a broker that is not
/// up yet (started after the services, restarting, not resolvable yet) is retried with a
/// backoff from 1 s doubling to 30 s, each failure logged with the brokers and the
/// error. `Ok(false)` if `shutdown` came first (the service stops cleanly, at once).
pub async fn await_brokers(
    cfg: &KafkaConfig,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Result<bool> {
    let mut backoff = Duration::from_secs(1);
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let c = cfg.clone();
        // bounded, so a stop during the probe is not held up long
        let probe = tokio::task::spawn_blocking(move || topic_names(&c, Duration::from_secs(3)));
        let answered = tokio::select! {
            r = probe => r.context("metadata probe")?,
            _ = shutdown.cancelled() => return Ok(false),
        };
        match answered {
            Ok(_) => {
                if attempt > 1 {
                    tracing::info!(brokers = %cfg.brokers, attempt, "Kafka reachable");
                }
                return Ok(true);
            }
            Err(e) => tracing::warn!(
                brokers = %cfg.brokers,
                attempt,
                retry_in = ?backoff,
                error = format!("{e:#}"),
                "Kafka not reachable yet"
            ),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.cancelled() => return Ok(false),
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// Number of partitions of a topic.
pub fn partition_count(cfg: &KafkaConfig, topic: &str) -> Result<i32> {
    let c: BaseConsumer = client_config(cfg, "meterflow-meta").create()?;
    let md = c
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .context("fetching metadata")?;
    let n = md
        .topics()
        .first()
        .map(|t| t.partitions().len())
        .unwrap_or(0);
    anyhow::ensure!(n > 0, "topic {topic} has no partitions (does it exist?)");
    Ok(n as i32)
}

/// The in-process broker for `meterflow up` and fault-injection tests: librdkafka's mock
/// cluster. Ephemeral: everything is gone when the process exits.
pub struct EmbeddedBroker {
    cluster: rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
}

impl EmbeddedBroker {
    pub fn start() -> Result<EmbeddedBroker> {
        let cluster =
            rdkafka::mocking::MockCluster::new(1).context("starting the embedded mock broker")?;
        Ok(EmbeddedBroker { cluster })
    }
    pub fn bootstrap_servers(&self) -> String {
        self.cluster.bootstrap_servers()
    }
    pub fn create_topic(&self, name: &str, partitions: i32) -> Result<()> {
        self.cluster
            .create_topic(name, partitions, 1)
            .context("creating topic on the embedded broker")
    }
    /// Fault injection: the next requests of `api` fail with `errors`, in order.
    pub fn inject_errors(
        &self,
        api: rdkafka::types::RDKafkaApiKey,
        errors: &[rdkafka::types::RDKafkaRespErr],
    ) {
        self.cluster.request_errors(api, errors);
    }
}
