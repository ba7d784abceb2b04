//! One Rust type per wire schema in `schemas/*.avsc`. Field order here is the schema's
//! field order; `meterflow-avro` converts and its tests check the two agree.

use crate::{id, Dec, Millis};
use serde::{Deserialize, Serialize};

/// Free-form key/value labels, sorted by key (deterministic encoding).
pub type Labels = std::collections::BTreeMap<String, String>;

/// Cumulative counters of one instance, as read from the hypervisor or cgroup.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub cpu_time_ns: i64,
    pub net_rx_bytes: i64,
    pub net_tx_bytes: i64,
    pub disk_read_bytes: i64,
    pub disk_write_bytes: i64,
}

impl Counters {
    pub fn fields(&self) -> [(&'static str, i64); 5] {
        [
            ("cpu_time_ns", self.cpu_time_ns),
            ("net_rx_bytes", self.net_rx_bytes),
            ("net_tx_bytes", self.net_tx_bytes),
            ("disk_read_bytes", self.disk_read_bytes),
            ("disk_write_bytes", self.disk_write_bytes),
        ]
    }
}

/// `meterflow.samples`, key = instance_id: one instance's usage over one poll interval.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    /// derive("sample", instance_id, incarnation, seq)
    pub id: String,
    pub instance_id: String,
    pub node_id: String,
    pub site: String,
    /// "vm" or "container"
    pub kind: String,
    /// Changes when the instance's counters restart from zero (reboot, migration, re-created cgroup).
    pub incarnation: String,
    /// Per-incarnation poll sequence, starting at 0 for the baseline observation.
    pub seq: i64,
    pub interval_start: Millis,
    pub interval_end: Millis,
    /// Cumulative counters at interval_end.
    pub counters: Counters,
    /// Counter increase over the interval (never negative).
    pub deltas: Counters,
    /// Gauges at interval_end.
    /// Allocated CPU in thousandths of a vCPU; 0 = no allocation (no limit).
    pub vcpu_millis: i64,
    pub memory_alloc_bytes: i64,
    /// Used memory when the source reports it (balloon stats, cgroup working set); never invented.
    pub memory_used_bytes: Option<i64>,
    /// Owner fields discovered on the node (domain metadata, pod labels), if any.
    pub owner_hint: Option<String>,
    /// The final sample of this incarnation on this node: the instance was seen stopped
    /// or deleted at `interval_end`. Zero deltas and gauges: nothing after the last
    /// observation is measured, so nothing is billed for it.
    pub ended: bool,
}

impl Sample {
    pub fn make_id(instance_id: &str, incarnation: &str, seq: i64) -> String {
        id::derive("sample", &[instance_id, incarnation, &seq.to_string()])
    }
    pub fn interval_ms(&self) -> i64 {
        self.interval_end - self.interval_start
    }

    /// The sample as a view (what the enricher works on).
    pub fn view(&self) -> SampleView<'_> {
        SampleView {
            id: &self.id,
            instance_id: &self.instance_id,
            node_id: &self.node_id,
            site: &self.site,
            kind: &self.kind,
            incarnation: &self.incarnation,
            seq: self.seq,
            interval_start: self.interval_start,
            interval_end: self.interval_end,
            counters: self.counters,
            deltas: self.deltas,
            vcpu_millis: self.vcpu_millis,
            memory_alloc_bytes: self.memory_alloc_bytes,
            memory_used_bytes: self.memory_used_bytes,
            owner_hint: self.owner_hint.as_deref(),
            ended: self.ended,
        }
    }
}

/// A `Sample` whose text borrows from elsewhere — the message it was decoded from
/// (`meterflow_avro::decode_samples_view`), or a `Sample` (`Sample::view`): the enricher
/// decodes every sample of a batch as a view of its message and keeps one whole only
/// when it parks it. Same fields, same meaning.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SampleView<'a> {
    pub id: &'a str,
    pub instance_id: &'a str,
    pub node_id: &'a str,
    pub site: &'a str,
    pub kind: &'a str,
    pub incarnation: &'a str,
    pub seq: i64,
    pub interval_start: Millis,
    pub interval_end: Millis,
    pub counters: Counters,
    pub deltas: Counters,
    pub vcpu_millis: i64,
    pub memory_alloc_bytes: i64,
    pub memory_used_bytes: Option<i64>,
    pub owner_hint: Option<&'a str>,
    pub ended: bool,
}

impl SampleView<'_> {
    pub fn interval_ms(&self) -> i64 {
        self.interval_end - self.interval_start
    }

    /// The sample, owned.
    pub fn to_sample(&self) -> Sample {
        Sample {
            id: self.id.to_string(),
            instance_id: self.instance_id.to_string(),
            node_id: self.node_id.to_string(),
            site: self.site.to_string(),
            kind: self.kind.to_string(),
            incarnation: self.incarnation.to_string(),
            seq: self.seq,
            interval_start: self.interval_start,
            interval_end: self.interval_end,
            counters: self.counters,
            deltas: self.deltas,
            vcpu_millis: self.vcpu_millis,
            memory_alloc_bytes: self.memory_alloc_bytes,
            memory_used_bytes: self.memory_used_bytes,
            owner_hint: self.owner_hint.map(str::to_string),
            ended: self.ended,
        }
    }
}

/// Poll marker, written by every collector to every partition of the samples topic after
/// each complete poll: "this node has published everything up to `time`". Also the node
/// heartbeat (silent vs idle). `retired` = the node will publish nothing more.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeHeartbeat {
    pub node_id: String,
    pub site: String,
    pub version: String,
    pub time: Millis,
    pub instances: i32,
    pub retired: bool,
}

/// `meterflow.instances`, key = instance_id (compacted): cluster state + registration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceState {
    pub instance_id: String,
    pub node_id: String,
    pub site: String,
    pub kind: String,
    pub name: String,
    pub state: String,
    pub hypervisor: String,
    pub flavor: Option<String>,
    /// Allocated CPU in thousandths of a vCPU; 0 = no allocation (no limit).
    pub vcpu_millis: i64,
    pub memory_alloc_bytes: i64,
    pub first_seen: Millis,
    pub last_seen: Millis,
    /// Labels found on the node (domain metadata `<label>` elements, container labels).
    pub labels: Labels,
}

/// `meterflow.ownership`, key = `<instance_id>|<valid_from>` (compacted, so every
/// version of an instance's ownership history survives compaction).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ownership {
    pub instance_id: String,
    pub user_id: String,
    pub entity_id: String,
    pub project: Option<String>,
    pub valid_from: Millis,
    /// "cli", "import", "metadata", "fleet"
    pub source: String,
}

impl Ownership {
    pub fn key(&self) -> String {
        format!("{}|{}|{}", self.instance_id, self.valid_from, self.source)
    }
}

/// `meterflow.usage`, key = entity_id: a sample joined with its owner and instance
/// state; quantities integrated over the interval, decimal (scale 9).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// derive("usage", sample_id, entity_id, interval_start)
    pub id: String,
    pub sample_id: String,
    pub instance_id: String,
    pub entity_id: String,
    pub user_id: String,
    pub project: Option<String>,
    pub node_id: String,
    pub site: String,
    pub kind: String,
    pub flavor: Option<String>,
    pub interval_start: Millis,
    pub interval_end: Millis,
    pub vcpu_seconds: Dec,
    pub cpu_seconds: Dec,
    pub memory_byte_seconds: Dec,
    pub memory_used_byte_seconds: Option<Dec>,
    pub net_rx_bytes: Dec,
    pub net_tx_bytes: Dec,
    pub disk_read_bytes: Dec,
    pub disk_write_bytes: Dec,
    /// The instance's labels at the time of the join.
    pub labels: Labels,
}

impl Usage {
    pub fn make_id(sample_id: &str, entity_id: &str, interval_start: Millis) -> String {
        id::derive(
            "usage",
            &[sample_id, entity_id, &interval_start.to_string()],
        )
    }

    /// The record as a view (what the encoder writes).
    pub fn view(&self) -> UsageView<'_> {
        UsageView {
            id: std::borrow::Cow::Borrowed(&self.id),
            sample_id: &self.sample_id,
            instance_id: &self.instance_id,
            entity_id: &self.entity_id,
            user_id: &self.user_id,
            project: self.project.as_deref(),
            node_id: &self.node_id,
            site: &self.site,
            kind: &self.kind,
            flavor: self.flavor.as_deref(),
            interval_start: self.interval_start,
            interval_end: self.interval_end,
            vcpu_seconds: self.vcpu_seconds,
            cpu_seconds: self.cpu_seconds,
            memory_byte_seconds: self.memory_byte_seconds,
            memory_used_byte_seconds: self.memory_used_byte_seconds,
            net_rx_bytes: self.net_rx_bytes,
            net_tx_bytes: self.net_tx_bytes,
            disk_read_bytes: self.disk_read_bytes,
            disk_write_bytes: self.disk_write_bytes,
            labels: std::borrow::Cow::Borrowed(&self.labels),
        }
    }
}

/// A usage record whose text fields borrow from the sample, owner and instance state it
/// was joined from: the enricher encodes it straight to the wire, with no `Usage` (about
/// twenty allocations and frees per record) in between; and the rater decodes it from
/// the message's bytes, making a `Usage` only for a record a window keeps as a row of
/// its own. Field for field a `Usage`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageView<'a> {
    /// Made by the join (`Usage::make_id`), or borrowed from a `Usage`.
    pub id: std::borrow::Cow<'a, str>,
    pub sample_id: &'a str,
    pub instance_id: &'a str,
    pub entity_id: &'a str,
    pub user_id: &'a str,
    pub project: Option<&'a str>,
    pub node_id: &'a str,
    pub site: &'a str,
    pub kind: &'a str,
    pub flavor: Option<&'a str>,
    pub interval_start: Millis,
    pub interval_end: Millis,
    pub vcpu_seconds: Dec,
    pub cpu_seconds: Dec,
    pub memory_byte_seconds: Dec,
    pub memory_used_byte_seconds: Option<Dec>,
    pub net_rx_bytes: Dec,
    pub net_tx_bytes: Dec,
    pub disk_read_bytes: Dec,
    pub disk_write_bytes: Dec,
    pub labels: std::borrow::Cow<'a, Labels>,
}

impl UsageView<'_> {
    /// The record, owned.
    pub fn into_usage(self) -> Usage {
        Usage {
            id: self.id.into_owned(),
            sample_id: self.sample_id.to_string(),
            instance_id: self.instance_id.to_string(),
            entity_id: self.entity_id.to_string(),
            user_id: self.user_id.to_string(),
            project: self.project.map(str::to_string),
            node_id: self.node_id.to_string(),
            site: self.site.to_string(),
            kind: self.kind.to_string(),
            flavor: self.flavor.map(str::to_string),
            interval_start: self.interval_start,
            interval_end: self.interval_end,
            vcpu_seconds: self.vcpu_seconds,
            cpu_seconds: self.cpu_seconds,
            memory_byte_seconds: self.memory_byte_seconds,
            memory_used_byte_seconds: self.memory_used_byte_seconds,
            net_rx_bytes: self.net_rx_bytes,
            net_tx_bytes: self.net_tx_bytes,
            disk_read_bytes: self.disk_read_bytes,
            disk_write_bytes: self.disk_write_bytes,
            labels: self.labels.into_owned(),
        }
    }
}

/// No labels (an instance whose registration is not used).
pub static NO_LABELS: Labels = Labels::new();

/// `meterflow.rated`, key = entity_id: one revenue event, the public rated-usage contract.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RatedEvent {
    /// derive("rated", rule_id, rule_version, window_start, entity_id, unit, resource_id[, usage_id for adjustments])
    pub id: String,
    pub rule_id: String,
    pub rule_version: i32,
    pub entity_id: String,
    pub resource_id: String,
    pub window_start: Millis,
    pub window_end: Millis,
    pub unit: String,
    pub quantity: Dec,
    pub unit_price: Dec,
    pub amount: Dec,
    pub currency: String,
    /// A correction for a window that had already closed (late usage).
    pub adjustment: bool,
    /// Number of usage records this event was computed from.
    pub usage_records: i64,
    /// Usage partition whose records produced the event.
    pub source_partition: i32,
}

/// Progress marker broadcast to every partition of a stage's output topic:
/// "everything from my input partition `source_partition` (of `source_partitions`)
/// up to event time `time` has been written and acknowledged".
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Watermark {
    pub stage: String,
    pub source_partition: i32,
    pub source_partitions: i32,
    pub time: Millis,
}

/// `meterflow.dlq`: bad input, with a reason code and the original bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DlqRecord {
    /// derive("dlq", topic, partition, offset)
    pub id: String,
    pub stage: String,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub reason_code: String,
    pub reason: String,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub time: Millis,
}

/// The rater's durable progress for one usage partition, written to its state topic
/// after the outputs it covers were acknowledged and before the offset commit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaterCheckpoint {
    pub ruleset: String,
    pub partition: i32,
    /// Replay from here: the first offset of any record in a still-open window.
    pub resume_offset: i64,
    /// Everything before this offset has been handled.
    pub position: i64,
    /// Latest marker time per source (enricher input) partition, index = partition.
    pub source_times: Vec<i64>,
}

/// The usage ids one closed window of a rule counted (rater state), so a copy arriving
/// after a restart is dropped instead of billed again as an adjustment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaterClosedWindow {
    pub partition: i32,
    /// `name@version`
    pub rule: String,
    pub window_start: Millis,
    /// The 128-bit id keys, 16 bytes each, big-endian, concatenated.
    pub ids: Vec<u8>,
}

/// One instance incarnation's last billed sample.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeenSample {
    pub instance_id: String,
    pub incarnation: String,
    pub seq: i64,
    pub interval_end: Millis,
}

/// The enricher's duplicate-detection state for one samples partition, written to its
/// state topic before the offsets it covers are committed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnricherCheckpoint {
    pub partition: i32,
    pub seen: Vec<SeenSample>,
}

/// One entity's period-to-date usage for a rule reading `usage_to_date` (rater state).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaterToDate {
    pub partition: i32,
    /// `name@version`
    pub rule: String,
    pub period_start: Millis,
    pub entity_id: String,
    pub last_window: Millis,
    /// The eight usage quantities before and after `last_window`.
    pub before: Vec<Dec>,
    pub after: Vec<Dec>,
}

/// `meterflow.settlements`, key = entity_id: one settlement file set written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settlement {
    pub entity_id: String,
    pub period: String,
    pub period_start: Millis,
    pub period_end: Millis,
    pub version: i32,
    /// Relative to the settlement root: `period=<p>/entity=<e>`.
    pub directory: String,
    pub manifest: String,
    pub line_count: i64,
    /// Currency → sum of the rounded lines.
    pub totals: Labels,
    /// File name → SHA-256.
    pub files: Labels,
}

/// `meterflow.control`, key = `ruleset`: the rule set the raters run (`meterflow rules
/// apply`), with the history they need to price every window by event time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleSet {
    pub id: String,
    /// The id of the set this one was merged from.
    pub previous: Option<String>,
    /// Event time of the switch.
    pub switch_at: Option<Millis>,
    pub applied_at: Millis,
    pub applied_by: String,
    /// (file name, content): `<rule>@<version>.sql` and reference tables.
    pub files: Vec<(String, Vec<u8>)>,
}

/// `meterflow.settler-state`, key = `progress|<partition>`: the periods a settler member
/// has closed on a rated partition (for the master's period index).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettlerProgress {
    pub partition: i32,
    pub partitions: i32,
    pub member: String,
    /// Every period ending at or before this is written for the partition's entities.
    pub closed_through: Millis,
    /// Labels of periods given a correction version since the previous record.
    pub corrected: Vec<String>,
}

/// `meterflow.requests`: an on-demand metering query that every collector answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeteringRequest {
    /// Correlation id.
    pub id: String,
    pub reply_topic: String,
    /// Wall-clock milliseconds.
    pub sent_at: Millis,
    /// Wall clock after which nobody waits for an answer (a collector skips it).
    pub deadline: Millis,
    pub instances: Vec<String>,
    /// False: only `instances` (an empty list matches none).
    pub all_instances: bool,
    /// `cpu`, `vcpu`, `memory`, `network`, `disk`; empty = all.
    pub metrics: Vec<String>,
    /// Usage of the samples ending in (from, to], event time.
    pub from: Option<Millis>,
    pub to: Option<Millis>,
}

/// `meterflow.replies`, key = request id: one collector's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeteringReply {
    pub request_id: String,
    pub node_id: String,
    pub site: String,
    pub answered_at: Millis,
    /// Event time of the live reading.
    pub live_time: Millis,
    /// The oldest sample end still in the collector's local log.
    pub log_from: Option<Millis>,
    /// Sources or instances that could not be read live.
    pub errors: Vec<String>,
    pub instances: Vec<InstanceAnswer>,
}

/// One instance in a [`MeteringReply`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceAnswer {
    pub instance_id: String,
    pub name: String,
    pub kind: String,
    pub state: String,
    /// `user/entity` from the instance's metadata, if it names them.
    pub owner_hint: Option<String>,
    /// Gauges and cumulative counters read now, as decimal text.
    pub live: Labels,
    /// Usage over the range, as decimal text.
    pub usage: Labels,
    /// Samples the usage sums.
    pub samples: i64,
}

/// `meterflow.audit`: one stage member's count and quantity for one topic, direction and
/// event-time bucket since its previous record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditCount {
    pub stage: String,
    pub member: String,
    pub topic: String,
    /// `in`, `out` or `dup`.
    pub direction: String,
    pub bucket_start: Millis,
    pub bucket_ms: i64,
    pub count: i64,
    /// Decimal text.
    pub quantity: String,
    pub sent_at: Millis,
}

/// `meterflow.control`, key = `probe|<stage>.<point>`: a measurement point enabled at run
/// time (`meterflow probe add`); a tombstone removes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeSpec {
    /// `<stage>.<point>`.
    pub point: String,
    /// `hop_latency`, `queue_dwell`, `processing_time`, `lag`.
    pub measures: Vec<String>,
    /// Decimal text in (0, 1].
    pub sample_rate: String,
    pub added_at: Millis,
    pub added_by: String,
}
