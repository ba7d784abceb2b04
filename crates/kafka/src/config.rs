use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// How a stage makes its output exact.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Delivery {
    /// Offsets committed only after the output was acknowledged; deterministic ids make
    /// every downstream stage drop the duplicates a replay produces. Works on any broker.
    #[default]
    AtLeastOnce,
    /// Kafka transactions: output and input offsets commit atomically (read_committed).
    /// Needs a broker with transactions; the ids keep it exact either way.
    ExactlyOnce,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Topics {
    pub samples: String,
    pub instances: String,
    pub ownership: String,
    pub usage: String,
    pub rated: String,
    pub dlq: String,
    pub control: String,
    pub rater_state: String,
    /// Usage waiting for an owner (compacted, key = sample id; a tombstone on release).
    pub parked: String,
    /// The enricher's duplicate-detection checkpoints (compacted).
    pub enricher_state: String,
    /// One record per settlement file set written, for downstream consumers.
    pub settlements: String,
    /// Settler members' progress per rated partition, for the master's period index
    /// (compacted).
    pub settler_state: String,
    /// On-demand metering queries; every collector reads every request.
    pub requests: String,
    /// Collectors' answers to them, key = request id.
    pub replies: String,
    /// Per-stage counts and quantity sums per event-time bucket (`meterflow audit --from`).
    pub audit: String,
}

impl Default for Topics {
    fn default() -> Topics {
        Topics {
            samples: "meterflow.samples".into(),
            instances: "meterflow.instances".into(),
            ownership: "meterflow.ownership".into(),
            usage: "meterflow.usage".into(),
            rated: "meterflow.rated".into(),
            dlq: "meterflow.dlq".into(),
            control: "meterflow.control".into(),
            rater_state: "meterflow.rater-state".into(),
            parked: "meterflow.parked".into(),
            enricher_state: "meterflow.enricher-state".into(),
            settlements: "meterflow.settlements".into(),
            settler_state: "meterflow.settler-state".into(),
            requests: "meterflow.requests".into(),
            replies: "meterflow.replies".into(),
            audit: "meterflow.audit".into(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Comma-separated bootstrap servers.
    pub brokers: String,
    pub delivery: Delivery,
    pub topics: Topics,
    /// Partitions for topics meterflow creates.
    pub partitions: i32,
    pub replication: i32,
    /// Producer linger (batching) in milliseconds.
    pub linger_ms: u32,
    /// On partition assignment, start this many records before the committed offset and
    /// drop what lies below it: exact resumption on brokers that serve fetches by batch
    /// base offset (Tansu 0.6). 0 turns it off (fine on Apache Kafka).
    pub resume_rewind: i64,
    /// Static group membership (`group.instance.id` = stage + member): a restarted
    /// replica takes its own partitions back at once, and a broker that does not expire
    /// static members (Tansu 0.6) never hands a dead member's partitions to another.
    /// `false`: dynamic membership — a member that dies is replaced by the others after
    /// the session timeout.
    pub static_membership: bool,
    /// How long the group coordinator waits for a silent member before it rebalances
    /// (`session.timeout.ms`). 45 s, Apache Kafka's default: a static member restarted
    /// within it takes its partitions back without a rebalance. Tansu 0.6 needs it to
    /// cover a restart: a static member whose new incarnation first heartbeats more than
    /// this after the old one's last is dropped, and its group can be left with a leader
    /// that no longer exists, never completing a rebalance again (ARCHITECTURE.md).
    #[serde(with = "humantime_serde")]
    pub session_timeout: std::time::Duration,
    /// Raw librdkafka properties, applied last.
    pub client: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> KafkaConfig {
        KafkaConfig {
            brokers: "127.0.0.1:9092".into(),
            delivery: Delivery::AtLeastOnce,
            topics: Topics::default(),
            partitions: 4,
            replication: 1,
            linger_ms: 5,
            resume_rewind: 10_000,
            static_membership: true,
            session_timeout: std::time::Duration::from_secs(45),
            client: BTreeMap::new(),
        }
    }
}
