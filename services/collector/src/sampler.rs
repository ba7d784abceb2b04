//! Readings → interval samples, with the last acknowledged observation per instance
//! kept in a state file (written atomically after Kafka acknowledged the samples), so a
//! restarted collector neither loses nor repeats usage.

use crate::source::Reading;
use meterflow_types::interval::{next_interval, IntervalError, Observation};
use meterflow_types::{Counters, Millis, Sample};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Last {
    incarnation: String,
    time: Millis,
    counters: Counters,
    seq: i64,
}

#[derive(Default)]
pub struct Sampler {
    node_id: String,
    site: String,
    last: BTreeMap<String, Last>,
    file: Option<PathBuf>,
}

impl Sampler {
    pub fn new(node_id: &str, site: &str, file: Option<&Path>) -> anyhow::Result<Sampler> {
        let mut s = Sampler {
            node_id: node_id.into(),
            site: site.into(),
            last: BTreeMap::new(),
            file: file.map(Path::to_path_buf),
        };
        if let Some(f) = file {
            if f.exists() {
                let text = std::fs::read_to_string(f)?;
                s.last = serde_json::from_str(&text)
                    .map_err(|e| anyhow::anyhow!("state file {}: {e}", f.display()))?;
            }
        }
        Ok(s)
    }

    /// Last event time observed for any instance (where a restarted collector resumes).
    pub fn last_time(&self) -> Option<Millis> {
        self.last.values().map(|l| l.time).max()
    }

    pub fn observe(&mut self, r: &Reading, t: Millis) -> Result<Sample, IntervalError> {
        let cur = Observation {
            incarnation: format!("{}:{}", self.node_id, r.incarnation),
            time: t,
            counters: r.counters,
        };
        let prev = self.last.get(&r.instance_id).map(|l| {
            (
                Observation {
                    incarnation: l.incarnation.clone(),
                    time: l.time,
                    counters: l.counters,
                },
                l.seq,
            )
        });
        let iv = next_interval(prev.as_ref().map(|(o, s)| (o, *s)), &cur)?;
        // a new incarnation restarts the sequence so ids stay unique per incarnation
        let seq = if iv.reset
            && prev
                .as_ref()
                .map(|(o, _)| o.incarnation != cur.incarnation)
                .unwrap_or(false)
        {
            1
        } else {
            iv.seq
        };
        self.last.insert(
            r.instance_id.clone(),
            Last {
                incarnation: cur.incarnation.clone(),
                time: t,
                counters: r.counters,
                seq,
            },
        );
        Ok(Sample {
            id: Sample::make_id(&r.instance_id, &cur.incarnation, seq),
            instance_id: r.instance_id.clone(),
            node_id: self.node_id.clone(),
            site: self.site.clone(),
            kind: r.kind.to_string(),
            incarnation: cur.incarnation,
            seq,
            interval_start: iv.start,
            interval_end: iv.end,
            counters: r.counters,
            deltas: iv.deltas,
            vcpu_millis: r.vcpu_millis,
            memory_alloc_bytes: r.memory_alloc_bytes,
            memory_used_bytes: r.memory_used_bytes,
            owner_hint: r.owner.as_ref().map(|o| o.entity_id.clone()),
        })
    }

    /// Persist the observations (call only after the samples were acknowledged).
    pub fn save(&self) -> anyhow::Result<()> {
        let Some(f) = &self.file else { return Ok(()) };
        let tmp = f.with_extension("tmp");
        {
            use std::io::Write;
            let mut w = std::fs::File::create(&tmp)?;
            w.write_all(serde_json::to_string(&self.last)?.as_bytes())?;
            w.sync_all()?;
        }
        std::fs::rename(&tmp, f)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::FleetConfig;

    #[test]
    fn restart_from_state_file_neither_loses_nor_repeats() {
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("state.json");
        let inst = &FleetConfig {
            instances: 1,
            entities: 1,
            seed: 3,
        }
        .model()[0];
        let mut a = Sampler::new("n1", "s", Some(&file)).expect("new");
        let s0 = a.observe(&inst.reading(0), 1000).expect("ok");
        let s1 = a.observe(&inst.reading(10_000), 11_000).expect("ok");
        a.save().expect("save");
        assert_eq!((s0.seq, s1.seq), (0, 1));
        // a second collector process picks up where the first stopped
        let mut b = Sampler::new("n1", "s", Some(&file)).expect("load");
        let s2 = b.observe(&inst.reading(20_000), 21_000).expect("ok");
        assert_eq!(
            (s2.seq, s2.interval_start, s2.interval_end),
            (2, 11_000, 21_000)
        );
        assert_eq!(s2.deltas.cpu_time_ns, inst.cpu_ns_per_ms * 10_000);
        // repeating the same observation after a crash before save yields the same id
        let mut c = Sampler::new("n1", "s", Some(&file)).expect("load");
        assert_eq!(
            c.observe(&inst.reading(20_000), 21_000).expect("ok").id,
            s2.id
        );
    }
}
