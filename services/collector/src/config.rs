use meterflow_kafka::KafkaConfig;
use meterflow_runtime::{HasHttp, HttpConfig};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CollectorConfig {
    pub kafka: KafkaConfig,
    pub http: HttpConfig,
    /// This node's id (default: the host name).
    pub node_id: String,
    pub site: String,
    /// Event time between polls.
    #[serde(with = "humantime_serde")]
    pub poll_interval: std::time::Duration,
    /// A reset or a new instance after a gap longer than this (event time) bills its
    /// counters over the last poll interval only, never allocation over the unobserved
    /// gap (ARCHITECTURE.md, "Intervals"). At least `poll_interval`.
    #[serde(with = "humantime_serde")]
    pub max_gap: std::time::Duration,
    /// Deadline of each libvirt call: a call that takes longer costs its instance this
    /// poll (and later polls, until the call returns), never the other instances.
    #[serde(with = "humantime_serde")]
    pub libvirt_call_timeout: std::time::Duration,
    /// Re-register every instance on the instances topic at least this often (event time).
    #[serde(with = "humantime_serde")]
    pub registration_interval: std::time::Duration,
    /// libvirt connection URI, e.g. `qemu:///system` or `test:///default`; none = no VMs.
    pub libvirt_uri: Option<String>,
    /// Containers: the cgroup v2 root to walk (e.g. `/sys/fs/cgroup`); none = no containers.
    pub cgroup_root: Option<PathBuf>,
    /// Where `/proc` is mounted (container network counters come from `/proc/<pid>/net/dev`).
    pub proc_root: PathBuf,
    /// Where the host's root is mounted: container labels and owners come from the
    /// runtimes' records under it (`var/lib/docker`, `run/containerd`,
    /// `var/lib/containers/storage`).
    pub runtime_root: PathBuf,
    /// A deterministic simulated fleet (demos, tests, load).
    pub fleet: Option<crate::fleet::FleetConfig>,
    pub clock: ClockConfig,
    /// Stop after this many polls (the first poll is the baseline).
    pub polls: Option<u64>,
    /// On exit, tell downstream this node is retired (complete forever). For bounded runs.
    pub retire_on_exit: bool,
    /// Where the last acknowledged observation of every instance is kept. The log of
    /// published samples that on-demand queries read is kept beside it
    /// (`<state_file>.samples`).
    pub state_file: Option<PathBuf>,
    /// Answer on-demand metering queries (`meterflow query`) from the requests topic.
    pub answer_queries: bool,
    /// How long (event time) the published samples stay in the local log for queries.
    #[serde(with = "humantime_serde")]
    pub query_retention: std::time::Duration,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClockConfig {
    /// Event-time milliseconds per wall-clock millisecond (1 = real time; 3600 = an hour a second).
    pub speed: u32,
    /// Event time of the first poll (RFC 3339); default: now.
    pub start: Option<String>,
}

impl Default for ClockConfig {
    fn default() -> ClockConfig {
        ClockConfig {
            speed: 1,
            start: None,
        }
    }
}

impl Default for CollectorConfig {
    fn default() -> CollectorConfig {
        CollectorConfig {
            kafka: KafkaConfig::default(),
            http: HttpConfig::default(),
            node_id: hostname(),
            site: "default".into(),
            poll_interval: std::time::Duration::from_secs(10),
            registration_interval: std::time::Duration::from_secs(300),
            max_gap: std::time::Duration::from_secs(900),
            libvirt_call_timeout: std::time::Duration::from_secs(5),
            libvirt_uri: None,
            cgroup_root: None,
            proc_root: PathBuf::from("/proc"),
            runtime_root: PathBuf::from("/"),
            fleet: None,
            clock: ClockConfig::default(),
            polls: None,
            retire_on_exit: false,
            state_file: None,
            answer_queries: true,
            query_retention: std::time::Duration::from_secs(6 * 3600),
        }
    }
}

impl HasHttp for CollectorConfig {
    fn http(&self) -> &HttpConfig {
        &self.http
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "node".into())
}
