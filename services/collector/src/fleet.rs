//! A seeded simulated fleet with known, exact usage: every counter grows at an integer
//! rate per millisecond, so the usage of any interval is known in closed form. Used by
//! `meterflow up`, the end-to-end tests (which compute expected bills from this model
//! independently of the pipeline) and load tests.

use crate::source::{OwnerMeta, Reading};
use meterflow_types::{Counters, Millis};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FleetConfig {
    pub instances: u32,
    pub entities: u32,
    pub seed: u64,
    /// Migration, source side: the instances are on this node up to and including this
    /// many ms after the fleet started, then gone.
    pub present_until_ms: Option<Millis>,
    /// Migration, destination side: the instances arrive this many ms after the fleet
    /// started (a live migration: new incarnation, counters restart from zero there).
    pub present_after_ms: Option<Millis>,
}

impl Default for FleetConfig {
    fn default() -> FleetConfig {
        FleetConfig {
            instances: 20,
            entities: 4,
            seed: 1,
            present_until_ms: None,
            present_after_ms: None,
        }
    }
}

/// The closed-form model of one simulated instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimInstance {
    pub instance_id: String,
    pub entity_id: String,
    pub user_id: String,
    pub vcpus: i32,
    pub memory_alloc_bytes: i64,
    /// CPU nanoseconds used per millisecond of wall time.
    pub cpu_ns_per_ms: i64,
    pub net_rx_per_ms: i64,
    pub net_tx_per_ms: i64,
    pub disk_read_per_ms: i64,
    pub disk_write_per_ms: i64,
}

const GIB: i64 = 1 << 30;

fn mix(mut z: u64) -> u64 {
    // splitmix64
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl FleetConfig {
    /// The fleet's readings on this node `elapsed` ms after it started: none outside the
    /// node's presence; after a migration in, counters counted from the arrival.
    pub fn readings(&self, model: &[SimInstance], elapsed: Millis) -> Vec<Reading> {
        if self.present_until_ms.is_some_and(|u| elapsed > u)
            || self.present_after_ms.is_some_and(|a| elapsed <= a)
        {
            return Vec::new();
        }
        model
            .iter()
            .map(|m| {
                let mut r = m.reading(elapsed);
                if let Some(a) = self.present_after_ms {
                    let base = m.counters_at(a);
                    let c = &mut r.counters;
                    c.cpu_time_ns -= base.cpu_time_ns;
                    c.net_rx_bytes -= base.net_rx_bytes;
                    c.net_tx_bytes -= base.net_tx_bytes;
                    c.disk_read_bytes -= base.disk_read_bytes;
                    c.disk_write_bytes -= base.disk_write_bytes;
                    r.incarnation = format!("sim-arrived-{a}");
                }
                r
            })
            .collect()
    }

    pub fn model(&self) -> Vec<SimInstance> {
        (0..self.instances)
            .map(|i| {
                let r = mix(self.seed ^ (i as u64).wrapping_mul(0x1000_0000_01B3));
                let vcpus = 1 + (r % 8) as i32;
                let util_pct = 5 + (r >> 8) % 91; // 5..=95 %
                SimInstance {
                    instance_id: format!("sim-{:04}", i),
                    entity_id: format!("entity-{}", i % self.entities.max(1)),
                    user_id: format!("user-{}", i % (self.entities.max(1) * 3)),
                    vcpus,
                    memory_alloc_bytes: (1 + ((r >> 16) % 16) as i64) * GIB,
                    cpu_ns_per_ms: vcpus as i64 * util_pct as i64 * 10_000,
                    net_rx_per_ms: 100 + ((r >> 24) % 5000) as i64,
                    net_tx_per_ms: 50 + ((r >> 32) % 20_000) as i64,
                    disk_read_per_ms: ((r >> 40) % 3000) as i64,
                    disk_write_per_ms: ((r >> 48) % 1500) as i64,
                }
            })
            .collect()
    }
}

impl SimInstance {
    /// Cumulative counters `elapsed` ms after the fleet started.
    pub fn counters_at(&self, elapsed: Millis) -> Counters {
        Counters {
            cpu_time_ns: self.cpu_ns_per_ms * elapsed,
            net_rx_bytes: self.net_rx_per_ms * elapsed,
            net_tx_bytes: self.net_tx_per_ms * elapsed,
            disk_read_bytes: self.disk_read_per_ms * elapsed,
            disk_write_bytes: self.disk_write_per_ms * elapsed,
        }
    }

    pub fn reading(&self, elapsed: Millis) -> Reading {
        Reading {
            instance_id: self.instance_id.clone(),
            name: self.instance_id.clone(),
            kind: "vm",
            hypervisor: "simulated".into(),
            incarnation: "sim-0".into(),
            state: "running".into(),
            counters: self.counters_at(elapsed),
            vcpu_millis: self.vcpus as i64 * 1000,
            memory_alloc_bytes: self.memory_alloc_bytes,
            memory_used_bytes: Some(self.memory_alloc_bytes / 2),
            flavor: Some(format!(
                "sim.{}c{}g",
                self.vcpus,
                self.memory_alloc_bytes / GIB
            )),
            site: None,
            owner: Some(OwnerMeta {
                user_id: self.user_id.clone(),
                entity_id: self.entity_id.clone(),
                project: None,
            }),
            labels: [("env".to_string(), "simulated".to_string())].into(),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_fleet_is_deterministic_and_varied() {
        let f = super::FleetConfig {
            instances: 50,
            entities: 5,
            seed: 7,
            ..Default::default()
        };
        assert_eq!(f.model(), f.model());
        let m = f.model();
        assert!(m.iter().any(|i| i.vcpus != m[0].vcpus));
        assert_eq!(m[7].entity_id, "entity-2");
        assert_eq!(m[3].counters_at(10).cpu_time_ns, m[3].cpu_ns_per_ms * 10);
    }
}
