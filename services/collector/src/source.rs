use meterflow_types::{Counters, Labels};
use serde::Serialize;

/// Owner fields found on the node (domain metadata, labels).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct OwnerMeta {
    pub user_id: String,
    pub entity_id: String,
    pub project: Option<String>,
}

/// One instance as read from its source in one poll.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Reading {
    pub instance_id: String,
    pub name: String,
    pub kind: &'static str,
    pub hypervisor: String,
    /// Changes when the counters restart from zero.
    pub incarnation: String,
    /// "running", "paused", "shutoff", ...
    pub state: String,
    pub counters: Counters,
    /// Allocated CPU in thousandths of a vCPU (a VM's vCPUs × 1000, a container's
    /// `cpu.max`); 0 = no allocation known (no limit).
    pub vcpu_millis: i64,
    pub memory_alloc_bytes: i64,
    pub memory_used_bytes: Option<i64>,
    pub flavor: Option<String>,
    /// The instance's site when its metadata names one (else the node's).
    pub site: Option<String>,
    pub owner: Option<OwnerMeta>,
    /// Labels found on the node (domain metadata, container labels).
    pub labels: Labels,
}

impl Reading {
    /// Only running instances use resources; others are registered, not sampled.
    pub fn is_running(&self) -> bool {
        self.state == "running" || self.state == "paused"
    }
}

/// A source failure for one instance: it is skipped for this poll, the rest go on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceError {
    pub instance: String,
    pub reason: String,
}
