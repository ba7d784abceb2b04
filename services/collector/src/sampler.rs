//! Readings → interval samples, with the last acknowledged observation per instance
//! kept in a state file (written atomically after Kafka acknowledged the samples), so a
//! restarted collector neither loses nor repeats usage.

use crate::source::Reading;
use meterflow_types::interval::{next_interval, Cadence, IntervalError, Observation};
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
    /// The final sample was emitted at `time` (stopped or deleted); kept so a return of
    /// the instance continues its sequence instead of reusing ids.
    #[serde(default)]
    ended: bool,
}

/// What the state file holds.
#[derive(Default, Serialize, Deserialize)]
struct State {
    /// The last complete poll.
    polled: Option<Millis>,
    instances: BTreeMap<String, Last>,
}

/// How long an ended instance's last observation is kept (event time).
const ENDED_RETENTION_MS: i64 = 7 * 24 * 3600 * 1000;

#[derive(Default)]
pub struct Sampler {
    node_id: String,
    site: String,
    poll_ms: i64,
    max_gap_ms: i64,
    state: State,
    file: Option<PathBuf>,
}

impl Sampler {
    pub fn new(
        node_id: &str,
        site: &str,
        poll_ms: i64,
        max_gap_ms: i64,
        file: Option<&Path>,
    ) -> anyhow::Result<Sampler> {
        let mut s = Sampler {
            node_id: node_id.into(),
            site: site.into(),
            poll_ms,
            max_gap_ms: max_gap_ms.max(poll_ms),
            state: State::default(),
            file: file.map(Path::to_path_buf),
        };
        if let Some(f) = file {
            if f.exists() {
                let text = std::fs::read_to_string(f)?;
                s.state = serde_json::from_str(&text)
                    .map_err(|e| anyhow::anyhow!("state file {}: {e}", f.display()))?;
            }
        }
        Ok(s)
    }

    /// Last complete poll (where a restarted collector resumes).
    pub fn last_time(&self) -> Option<Millis> {
        self.state
            .polled
            .into_iter()
            .chain(self.state.instances.values().map(|l| l.time))
            .max()
    }

    /// Instances with a live (not ended) observation.
    pub fn live(&self) -> impl Iterator<Item = &str> {
        self.state
            .instances
            .iter()
            .filter(|(_, l)| !l.ended)
            .map(|(k, _)| k.as_str())
    }

    pub fn observe(&mut self, r: &Reading, t: Millis) -> Result<Sample, IntervalError> {
        let cur = Observation {
            incarnation: format!("{}:{}", self.node_id, r.incarnation),
            time: t,
            counters: r.counters,
        };
        let prev = self.state.instances.get(&r.instance_id).map(|l| {
            (
                Observation {
                    incarnation: l.incarnation.clone(),
                    time: l.time,
                    counters: l.counters,
                },
                l.seq,
            )
        });
        let cadence = Cadence {
            previous_poll: self.state.polled,
            poll_ms: self.poll_ms,
            max_gap_ms: self.max_gap_ms,
        };
        let iv = next_interval(prev.as_ref().map(|(o, s)| (o, *s)), &cur, &cadence)?;
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
        self.state.instances.insert(
            r.instance_id.clone(),
            Last {
                incarnation: cur.incarnation.clone(),
                time: t,
                counters: r.counters,
                seq,
                ended: false,
            },
        );
        Ok(Sample {
            id: Sample::make_id(&r.instance_id, &cur.incarnation, seq),
            instance_id: r.instance_id.clone(),
            node_id: self.node_id.clone(),
            site: r.site.clone().unwrap_or_else(|| self.site.clone()),
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
            ended: false,
        })
    }

    /// The final sample of an instance seen stopped or deleted at `t`: `[last, t]` with
    /// zero deltas and zero gauges (nothing after the last observation was measured, so
    /// nothing is billed for it), `ended = true`. None if it has no live observation.
    /// Its id is deterministic: a collector that crashes before `save` re-sends the same.
    pub fn end(&mut self, instance_id: &str, kind: &str, t: Millis) -> Option<Sample> {
        let l = self.state.instances.get_mut(instance_id)?;
        if l.ended || t < l.time {
            return None;
        }
        let start = l.time;
        l.seq += 1;
        l.time = t;
        l.ended = true;
        Some(Sample {
            id: Sample::make_id(instance_id, &l.incarnation, l.seq),
            instance_id: instance_id.to_string(),
            node_id: self.node_id.clone(),
            site: self.site.clone(),
            kind: kind.to_string(),
            incarnation: l.incarnation.clone(),
            seq: l.seq,
            interval_start: start,
            interval_end: t,
            counters: l.counters,
            deltas: Counters::default(),
            vcpu_millis: 0,
            memory_alloc_bytes: 0,
            memory_used_bytes: None,
            owner_hint: None,
            ended: true,
        })
    }

    /// Record a complete poll at `t` and forget instances that ended long ago.
    pub fn polled(&mut self, t: Millis) {
        self.state.polled = Some(self.state.polled.map_or(t, |p| p.max(t)));
        self.state
            .instances
            .retain(|_, l| !l.ended || t - l.time <= ENDED_RETENTION_MS);
    }

    /// Persist the observations (call only after the samples were acknowledged).
    pub fn save(&self) -> anyhow::Result<()> {
        let Some(f) = &self.file else { return Ok(()) };
        let tmp = f.with_extension("tmp");
        {
            use std::io::Write;
            let mut w = std::fs::File::create(&tmp)?;
            w.write_all(serde_json::to_string(&self.state)?.as_bytes())?;
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
            ..Default::default()
        }
        .model()[0];
        let mut a = Sampler::new("n1", "s", 10_000, 60_000, Some(&file)).expect("new");
        let s0 = a.observe(&inst.reading(0), 1000).expect("ok");
        a.polled(1000);
        let s1 = a.observe(&inst.reading(10_000), 11_000).expect("ok");
        a.polled(11_000);
        a.save().expect("save");
        assert_eq!((s0.seq, s1.seq), (0, 1));
        // a second collector process picks up where the first stopped
        let mut b = Sampler::new("n1", "s", 10_000, 60_000, Some(&file)).expect("load");
        let s2 = b.observe(&inst.reading(20_000), 21_000).expect("ok");
        assert_eq!(
            (s2.seq, s2.interval_start, s2.interval_end),
            (2, 11_000, 21_000)
        );
        assert_eq!(s2.deltas.cpu_time_ns, inst.cpu_ns_per_ms * 10_000);
        // repeating the same observation after a crash before save yields the same id
        let mut c = Sampler::new("n1", "s", 10_000, 60_000, Some(&file)).expect("load");
        assert_eq!(
            c.observe(&inst.reading(20_000), 21_000).expect("ok").id,
            s2.id
        );
    }

    fn one() -> crate::fleet::SimInstance {
        FleetConfig {
            instances: 1,
            entities: 1,
            seed: 5,
            ..Default::default()
        }
        .model()
        .remove(0)
    }

    #[test]
    fn a_deleted_instance_gets_one_final_sample_and_a_return_continues_its_ids() {
        let inst = one();
        let mut a = Sampler::new("n1", "s", 10_000, 60_000, None).expect("new");
        a.observe(&inst.reading(0), 0).expect("baseline");
        a.polled(0);
        let s1 = a.observe(&inst.reading(10_000), 10_000).expect("ok");
        a.polled(10_000);
        assert_eq!(
            a.live().collect::<Vec<_>>(),
            vec![inst.instance_id.as_str()]
        );
        let fin = a.end(&inst.instance_id, "vm", 20_000).expect("final");
        assert!(fin.ended);
        assert_eq!(
            (fin.seq, fin.interval_start, fin.interval_end),
            (2, 10_000, 20_000)
        );
        assert_eq!(fin.deltas, Counters::default());
        assert_eq!((fin.vcpu_millis, fin.memory_alloc_bytes), (0, 0));
        assert_ne!(fin.id, s1.id);
        assert!(
            a.end(&inst.instance_id, "vm", 30_000).is_none(),
            "only once"
        );
        assert_eq!(a.live().count(), 0);
        a.polled(30_000);
        // the same incarnation returns: its counters continue, its ids do not repeat
        let back = a.observe(&inst.reading(40_000), 40_000).expect("ok");
        assert_eq!((back.seq, back.interval_start), (3, 20_000));
        assert_eq!(back.deltas.cpu_time_ns, inst.cpu_ns_per_ms * 30_000);
    }

    #[test]
    fn an_instance_arriving_mid_run_bills_from_the_previous_poll() {
        let inst = one();
        let mut b = Sampler::new("n2", "s", 10_000, 60_000, None).expect("new");
        b.polled(0); // an empty poll: the instance is not here yet
        let mut arriving = inst.reading(10_000);
        arriving.incarnation = "migrated".into();
        let s = b.observe(&arriving, 10_000).expect("ok");
        assert_eq!((s.seq, s.interval_start, s.interval_end), (1, 0, 10_000));
        assert_eq!(s.deltas, arriving.counters, "everything it measured here");
        assert!(!s.ended);
    }
}
