//! The collector's half of on-demand metering (`meterflow_query`): a local log of the
//! samples this node published, and the answer to a request — live values from a fresh
//! read of the sources, usage over the range from the log.
//!
//! The log holds each acknowledged sample's interval, deltas and allocation (72 bytes an
//! entry in memory) for `query_retention` of event time, and, with a state file, in
//! `<state_file>.samples`: one line per sample, appended after the samples were
//! acknowledged and rewritten when a third of it has aged out, so a restarted collector
//! still answers for the time before its restart.

use crate::source::Reading;
use anyhow::{Context, Result};
use meterflow_types::{
    Counters, InstanceAnswer, Labels, MeteringReply, MeteringRequest, Millis, Sample,
};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// What a query needs of a sample.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    end: Millis,
    ms: i64,
    deltas: Counters,
    vcpu_millis: i64,
    memory_alloc_bytes: i64,
}

#[derive(Default)]
pub struct SampleLog {
    file: Option<PathBuf>,
    retention_ms: i64,
    by_instance: BTreeMap<String, Vec<Entry>>,
    /// (instance id, kind) last seen, for instances asked about after they ended.
    kinds: BTreeMap<String, String>,
    lines: usize,
    pruned_since_rewrite: usize,
}

fn line(instance: &str, kind: &str, e: &Entry) -> String {
    let d = &e.deltas;
    format!(
        "{instance} {kind} {} {} {} {} {} {} {} {} {}\n",
        e.end,
        e.ms,
        d.cpu_time_ns,
        d.net_rx_bytes,
        d.net_tx_bytes,
        d.disk_read_bytes,
        d.disk_write_bytes,
        e.vcpu_millis,
        e.memory_alloc_bytes
    )
}

fn parse(l: &str) -> Option<(String, String, Entry)> {
    let f: Vec<&str> = l.split(' ').collect();
    if f.len() != 11 {
        return None;
    }
    let n = |i: usize| f[i].parse::<i64>().ok();
    Some((
        f[0].to_string(),
        f[1].to_string(),
        Entry {
            end: n(2)?,
            ms: n(3)?,
            deltas: Counters {
                cpu_time_ns: n(4)?,
                net_rx_bytes: n(5)?,
                net_tx_bytes: n(6)?,
                disk_read_bytes: n(7)?,
                disk_write_bytes: n(8)?,
            },
            vcpu_millis: n(9)?,
            memory_alloc_bytes: n(10)?,
        },
    ))
}

impl SampleLog {
    /// Open the log (reading what a previous run left; a torn last line is skipped).
    pub fn open(file: Option<&Path>, retention: std::time::Duration) -> Result<SampleLog> {
        let mut log = SampleLog {
            file: file.map(Path::to_path_buf),
            retention_ms: retention.as_millis() as i64,
            ..SampleLog::default()
        };
        if let Some(f) = file.filter(|f| f.exists()) {
            let text = std::fs::read_to_string(f)
                .with_context(|| format!("reading the sample log {}", f.display()))?;
            for l in text.lines() {
                if let Some((id, kind, e)) = parse(l) {
                    log.kinds.insert(id.clone(), kind);
                    log.by_instance.entry(id).or_default().push(e);
                    log.lines += 1;
                }
            }
        }
        Ok(log)
    }

    /// Record acknowledged samples (the baseline and final samples measure nothing and
    /// are kept too, so counts match the samples topic).
    pub fn append(&mut self, samples: &[Sample]) -> Result<()> {
        if samples.is_empty() {
            return Ok(());
        }
        let mut text = String::new();
        for s in samples {
            let e = Entry {
                end: s.interval_end,
                ms: s.interval_ms(),
                deltas: s.deltas,
                vcpu_millis: s.vcpu_millis,
                memory_alloc_bytes: s.memory_alloc_bytes,
            };
            text.push_str(&line(&s.instance_id, &s.kind, &e));
            self.kinds.insert(s.instance_id.clone(), s.kind.clone());
            self.by_instance
                .entry(s.instance_id.clone())
                .or_default()
                .push(e);
        }
        self.lines += samples.len();
        if let Some(f) = &self.file {
            let mut out = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(f)
                .with_context(|| format!("appending to {}", f.display()))?;
            out.write_all(text.as_bytes())?;
        }
        Ok(())
    }

    /// Drop entries that ended before `now - retention`; rewrite the file when a third
    /// of its lines are gone.
    pub fn prune(&mut self, now: Millis) -> Result<()> {
        let cut = now.saturating_sub(self.retention_ms);
        let mut dropped = 0;
        self.by_instance.retain(|_, v| {
            let before = v.len();
            v.retain(|e| e.end >= cut);
            dropped += before - v.len();
            !v.is_empty()
        });
        self.lines -= dropped;
        self.pruned_since_rewrite += dropped;
        if self.pruned_since_rewrite * 2 > self.lines.max(1) {
            self.rewrite()?;
        }
        Ok(())
    }

    fn rewrite(&mut self) -> Result<()> {
        self.pruned_since_rewrite = 0;
        let Some(f) = &self.file else {
            return Ok(());
        };
        let mut text = String::new();
        for (id, v) in &self.by_instance {
            let kind = self.kinds.get(id).map_or("vm", String::as_str);
            for e in v {
                text.push_str(&line(id, kind, e));
            }
        }
        let tmp = f.with_extension("samples.tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, f)?;
        Ok(())
    }

    /// The oldest sample end still held.
    pub fn oldest(&self) -> Option<Millis> {
        self.by_instance
            .values()
            .filter_map(|v| v.first().map(|e| e.end))
            .min()
    }

    /// Usage of an instance over (from, to], and how many samples it sums.
    fn usage(
        &self,
        instance: &str,
        from: Option<Millis>,
        to: Option<Millis>,
        metrics: &[String],
    ) -> (Labels, i64) {
        let samples: Vec<Sample> = self
            .by_instance
            .get(instance)
            .into_iter()
            .flatten()
            .map(|e| Sample {
                instance_id: instance.to_string(),
                interval_start: e.end - e.ms,
                interval_end: e.end,
                deltas: e.deltas,
                vcpu_millis: e.vcpu_millis,
                memory_alloc_bytes: e.memory_alloc_bytes,
                ..Sample::default()
            })
            .filter(|s| meterflow_query::in_range(s, from, to))
            .collect();
        (
            meterflow_query::usage_of(&samples, metrics),
            samples.len() as i64,
        )
    }
}

fn wants(metrics: &[String], m: &str) -> bool {
    metrics.is_empty() || metrics.iter().any(|x| x == m)
}

/// Live values of a reading, for the metrics asked.
fn live(r: &Reading, metrics: &[String]) -> Labels {
    let mut l = Labels::new();
    let c = &r.counters;
    if wants(metrics, "cpu") {
        l.insert("cpu_time_ns".into(), c.cpu_time_ns.to_string());
    }
    if wants(metrics, "vcpu") {
        l.insert(
            "vcpus".into(),
            meterflow_types::Dec::from_raw(r.vcpu_millis as i128 * 1_000_000).to_string(),
        );
    }
    if wants(metrics, "memory") {
        l.insert(
            "memory_alloc_bytes".into(),
            r.memory_alloc_bytes.to_string(),
        );
        if let Some(u) = r.memory_used_bytes {
            l.insert("memory_used_bytes".into(), u.to_string());
        }
    }
    if wants(metrics, "network") {
        l.insert("net_rx_bytes".into(), c.net_rx_bytes.to_string());
        l.insert("net_tx_bytes".into(), c.net_tx_bytes.to_string());
    }
    if wants(metrics, "disk") {
        l.insert("disk_read_bytes".into(), c.disk_read_bytes.to_string());
        l.insert("disk_write_bytes".into(), c.disk_write_bytes.to_string());
    }
    l
}

/// This node's answer: every matching instance read live now, and every matching
/// instance with usage in the range (one that is gone answers with state `gone`).
pub fn answer(
    req: &MeteringRequest,
    node: (&str, &str),
    live_time: Millis,
    readings: &[Reading],
    errors: Vec<String>,
    log: &SampleLog,
) -> MeteringReply {
    let mut instances = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for r in readings
        .iter()
        .filter(|r| meterflow_query::matches(req, &r.instance_id))
    {
        seen.insert(r.instance_id.as_str());
        let (usage, samples) = log.usage(&r.instance_id, req.from, req.to, &req.metrics);
        instances.push(InstanceAnswer {
            instance_id: r.instance_id.clone(),
            name: r.name.clone(),
            kind: r.kind.to_string(),
            state: r.state.clone(),
            owner_hint: r
                .owner
                .as_ref()
                .map(|o| format!("{}/{}", o.user_id, o.entity_id)),
            live: live(r, &req.metrics),
            usage,
            samples,
        });
    }
    for id in log.by_instance.keys() {
        if seen.contains(id.as_str()) || !meterflow_query::matches(req, id) {
            continue;
        }
        let (usage, samples) = log.usage(id, req.from, req.to, &req.metrics);
        if samples == 0 {
            continue;
        }
        instances.push(InstanceAnswer {
            instance_id: id.clone(),
            name: String::new(),
            kind: log.kinds.get(id).cloned().unwrap_or_default(),
            state: "gone".into(),
            owner_hint: None,
            live: Labels::new(),
            usage,
            samples,
        });
    }
    MeteringReply {
        request_id: req.id.clone(),
        node_id: node.0.to_string(),
        site: node.1.to_string(),
        answered_at: meterflow_kafka::now_ms(),
        live_time,
        log_from: log.oldest(),
        errors,
        instances,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(id: &str, end: Millis) -> Sample {
        Sample {
            instance_id: id.into(),
            kind: "vm".into(),
            interval_start: end - 10_000,
            interval_end: end,
            deltas: Counters {
                cpu_time_ns: 2_000_000_000,
                ..Counters::default()
            },
            vcpu_millis: 1_000,
            memory_alloc_bytes: 100,
            ..Sample::default()
        }
    }

    #[test]
    fn the_log_survives_a_restart_ages_out_and_answers_ranges_exactly() {
        let d = tempfile::tempdir().expect("tmp");
        let f = d.path().join("c.state.samples");
        let retention = std::time::Duration::from_secs(60);
        let mut log = SampleLog::open(Some(&f), retention).expect("open");
        log.append(&[
            sample("a", 10_000),
            sample("a", 20_000),
            sample("b", 20_000),
        ])
        .expect("append");
        // a torn last line (a crash mid-append) is skipped
        std::fs::OpenOptions::new()
            .append(true)
            .open(&f)
            .expect("f")
            .write_all(b"a vm 30000 10")
            .expect("torn");
        let log = SampleLog::open(Some(&f), retention).expect("reopen");
        let req = MeteringRequest {
            id: "q".into(),
            reply_topic: String::new(),
            sent_at: 0,
            deadline: 0,
            instances: vec!["a".into()],
            all_instances: false,
            metrics: vec!["cpu".into()],
            from: Some(10_000),
            to: Some(20_000),
        };
        let r = answer(&req, ("n", "s"), 25_000, &[], Vec::new(), &log);
        assert_eq!(r.instances.len(), 1);
        let a = &r.instances[0];
        assert_eq!((a.state.as_str(), a.samples), ("gone", 1));
        assert_eq!(a.usage["cpu_seconds"], "2");
        assert_eq!(r.log_from, Some(10_000));
        // entries older than the retention go, from memory and from the file
        let mut log = log;
        log.prune(75_000).expect("prune");
        assert_eq!(log.oldest(), Some(20_000));
        // the file is rewritten once a large part of it has aged out
        let mut again = SampleLog::open(Some(&f), retention).expect("reopen");
        assert_eq!(
            again.lines, 3,
            "one line of three aged out: not rewritten yet"
        );
        again.prune(80_000).expect("prune");
        assert_eq!(again.oldest(), Some(20_000));
        log.prune(81_000).expect("prune");
        assert_eq!(log.oldest(), None);
        let empty = SampleLog::open(Some(&f), retention).expect("reopen");
        assert_eq!((empty.lines, empty.oldest()), (0, None));
    }
}
