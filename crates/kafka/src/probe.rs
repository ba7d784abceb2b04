//! Measurement points enabled at run time (`meterflow probe add|remove|list`).
//!
//! A probe is a record on the compacted control topic, key `probe|<stage>.<point>`; every
//! stage tails that topic and applies a change between batches, within about a second and
//! without a restart. At an enabled point the stage reads the *measurement trail* the
//! message carries in its headers (one `meterflow-trail` header per component that measured
//! it, a small JSON object each, in order), computes its own values from what it knows
//! locally, appends its entry, replaces the W3C `traceparent` (same trace id, its own span
//! id) and forwards the result on every record it produces from that message. A message
//! without a trail starts one at the point's sample rate (chosen from its topic, partition
//! and offset, so a replay decides the same); a message with a trail is always measured, so
//! trails stay whole. At a point that is off, a trail and `traceparent` pass through
//! untouched. With no probe and no trail the cost is one header lookup per message.
//!
//! Each measured value also goes to a Prometheus histogram labelled with the point.

use crate::{KafkaConfig, TableRecord, Tail};
use anyhow::Result;
use meterflow_runtime::metrics::{Histogram, Metrics, RECORDS, SECONDS};
use meterflow_types::{id, Millis, ProbeSpec};
use rdkafka::message::{Headers, Message, OwnedMessage};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One header per measuring component, in trail order.
pub const TRAIL: &str = "meterflow-trail";
/// W3C trace context, one header, replaced at every enabled point.
pub const TRACEPARENT: &str = "traceparent";
/// Control-topic key prefix of a probe.
pub const KEY_PREFIX: &str = "probe|";

/// The points a probe can be put on: (`<stage>.<point>`, what it measures).
pub const POINTS: &[(&str, &str)] = &[
    (
        "collector.publish",
        "a sample as it is published; starts the trail (processing_time: reading the sources to sending)",
    ),
    ("enricher.join", "a sample in, its usage records out"),
    (
        "rater.rate",
        "usage in, revenue events out; a revenue event carries the trail of the last usage record its window received",
    ),
    (
        "settler.settle",
        "revenue events in; the end of the trail (histograms only)",
    ),
];

/// What a point can measure.
pub const MEASURES: &[&str] = &["hop_latency", "queue_dwell", "processing_time", "lag"];

/// An enabled point: which measures, and the share of trail-less messages it starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Enabled {
    pub measures: u8,
    /// Parts per million.
    pub rate_ppm: u32,
}

fn measure_bit(name: &str) -> Option<u8> {
    MEASURES.iter().position(|m| *m == name).map(|i| 1u8 << i)
}
const HOP: u8 = 1;
const DWELL: u8 = 2;
const PROC: u8 = 4;
const LAG: u8 = 8;

/// Parse `r` in (0, 1] into parts per million.
pub fn parse_rate(r: &str) -> Result<u32, String> {
    let v: f64 = r
        .trim()
        .parse()
        .map_err(|_| format!("sample rate {r:?} is not a number"))?;
    if !(v > 0.0 && v <= 1.0) {
        return Err(format!("sample rate {r} is not in (0, 1]"));
    }
    Ok(((v * 1e6).round() as u32).max(1))
}

/// Check a probe's point and measures; `all` stands for every measure.
pub fn validate(point: &str, measures: &[String], rate: &str) -> Result<Vec<String>, String> {
    if !POINTS.iter().any(|(p, _)| *p == point) {
        let known: Vec<&str> = POINTS.iter().map(|(p, _)| *p).collect();
        return Err(format!(
            "unknown point {point:?}; the points are {}",
            known.join(", ")
        ));
    }
    let mut out: Vec<String> = Vec::new();
    for m in measures.iter().flat_map(|m| m.split(',')).map(str::trim) {
        if m == "all" {
            out.extend(MEASURES.iter().map(|m| m.to_string()));
        } else if measure_bit(m).is_some() {
            out.push(m.to_string());
        } else if !m.is_empty() {
            return Err(format!(
                "unknown measure {m:?}; the measures are {} (or all)",
                MEASURES.join(", ")
            ));
        }
    }
    if out.is_empty() {
        return Err("no measure given".into());
    }
    out.sort_by_key(|m| measure_bit(m));
    out.dedup();
    parse_rate(rate)?;
    Ok(out)
}

impl Enabled {
    pub fn of(spec: &ProbeSpec) -> Result<Enabled, String> {
        let mut measures = 0;
        for m in &spec.measures {
            measures |= measure_bit(m).ok_or_else(|| format!("unknown measure {m:?}"))?;
        }
        Ok(Enabled {
            measures,
            rate_ppm: parse_rate(&spec.sample_rate)?,
        })
    }
}

/// One component's entry in a trail (the JSON of one `meterflow-trail` header).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub stage: String,
    pub member: String,
    pub host: String,
    pub point: String,
    /// Wall-clock milliseconds when this component forwarded the message.
    pub at: Millis,
    /// From the previous component's `at` to this component's receipt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hop_latency_ms: Option<i64>,
    /// From the broker timestamp of the record read to its receipt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_dwell_ms: Option<i64>,
    /// This component's own time on the message (receipt, or the start of the batch that
    /// produced the output, to forwarding), in microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processing_us: Option<i64>,
    /// Records behind the partition's end when it was read (as of the client's last
    /// statistics, at most a second old).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag: Option<i64>,
    /// The rater only: from receipt of the usage record to its window's revenue event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_wait_ms: Option<i64>,
}

/// The trail of a message as read from its headers.
pub fn trail_of(headers: &[(String, Vec<u8>)]) -> Vec<Entry> {
    headers
        .iter()
        .filter(|(k, _)| k == TRAIL)
        .filter_map(|(_, v)| serde_json::from_slice(v).ok())
        .collect()
}

/// The headers a stage forwards: carried trail entries, then (when measured) its own, then
/// one `traceparent`.
pub type Forward = Vec<(String, Vec<u8>)>;

/// What a message carries of ours.
#[derive(Clone, Debug, Default)]
struct Carried {
    trail: Vec<Vec<u8>>,
    traceparent: Option<String>,
}

impl Carried {
    fn read(msg: &OwnedMessage) -> Option<Carried> {
        let hs = msg.headers()?;
        let mut c = Carried::default();
        for h in hs.iter() {
            match (h.key, h.value) {
                (TRAIL, Some(v)) => c.trail.push(v.to_vec()),
                (TRACEPARENT, Some(v)) => {
                    c.traceparent = std::str::from_utf8(v).ok().map(str::to_string)
                }
                _ => {}
            }
        }
        (!c.trail.is_empty() || c.traceparent.is_some()).then_some(c)
    }

    fn last_at(&self) -> Option<Millis> {
        let last = self.trail.last()?;
        serde_json::from_slice::<Entry>(last).ok().map(|e| e.at)
    }

    fn forward(self, own: Option<Vec<u8>>, traceparent: Option<String>) -> Forward {
        let mut out: Forward = self.trail.into_iter().map(|v| (TRAIL.into(), v)).collect();
        if let Some(e) = own {
            out.push((TRAIL.into(), e));
        }
        if let Some(t) = traceparent.or(self.traceparent) {
            out.push((TRACEPARENT.into(), t.into_bytes()));
        }
        out
    }
}

/// The trace id of a valid W3C `traceparent` (version 00), if it is one.
pub fn trace_id(tp: &str) -> Option<&str> {
    let parts: Vec<&str> = tp.split('-').collect();
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    match parts.as_slice() {
        [v, t, p, f]
            if *v == "00"
                && hex(t, 32)
                && hex(p, 16)
                && hex(f, 2)
                && t.bytes().any(|b| b != b'0')
                && p.bytes().any(|b| b != b'0') =>
        {
            Some(t)
        }
        _ => None,
    }
}

/// A message being measured or carried through one point.
#[derive(Clone, Debug)]
pub enum Trace {
    /// Nothing of ours on it and the point is off (or not sampled).
    None,
    /// A trail passing through a point that is off.
    Carry(Box<CarryOnly>),
    /// Measured here.
    Measure(Box<Hop>),
}

#[derive(Clone, Debug)]
pub struct CarryOnly(Carried);

#[derive(Clone, Debug)]
pub struct Hop {
    point: &'static str,
    on: Enabled,
    carried: Carried,
    /// Seed of a new trace when the message had no valid `traceparent`.
    seed: String,
    received: Instant,
    received_ms: Millis,
    hop_latency_ms: Option<i64>,
    queue_dwell_ms: Option<i64>,
    lag: Option<i64>,
}

/// The probes of one stage member: what is enabled (from the control topic) and the
/// histograms of what it measured.
pub struct Probes {
    stage: String,
    member: String,
    host: String,
    tail: Option<Tail>,
    checked: Option<Instant>,
    enabled: BTreeMap<String, Enabled>,
    metrics: Arc<Metrics>,
    histograms: Mutex<HashMap<&'static str, [Histogram; 5]>>,
    /// Partition ends from the consumer's statistics (for `lag`).
    ends: Option<PartitionEnds>,
}

/// The latest known end offset of every partition a consumer reads (from librdkafka's
/// statistics, so reading it costs nothing per message).
pub type PartitionEnds = Arc<Mutex<HashMap<(String, i32), i64>>>;

fn hash_ppm(parts: &[&[u8]]) -> u32 {
    // FNV-1a: stable across runs and processes
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in *p {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % 1_000_000) as u32
}

impl Probes {
    /// A stage's probes, tailing `cfg`'s control topic from its beginning.
    pub fn new(
        cfg: &KafkaConfig,
        stage: &str,
        member: &str,
        metrics: Arc<Metrics>,
    ) -> Result<Probes> {
        let mut p = Probes::offline(stage, member, metrics);
        p.tail = Some(Tail::new(cfg, &cfg.topics.control)?);
        p.refresh();
        Ok(p)
    }

    /// Probes without a control topic (tests and benchmarks set them with `apply`).
    pub fn offline(stage: &str, member: &str, metrics: Arc<Metrics>) -> Probes {
        Probes {
            stage: stage.to_string(),
            member: member.to_string(),
            host: crate::default_member(),
            tail: None,
            checked: None,
            enabled: BTreeMap::new(),
            metrics,
            histograms: Mutex::new(HashMap::new()),
            ends: None,
        }
    }

    /// Use these partition ends for `lag` (see [`crate::StageIo::partition_ends`]).
    pub fn with_ends(mut self, ends: PartitionEnds) -> Probes {
        self.ends = Some(ends);
        self
    }

    /// Apply what arrived on the control topic, at most once a second.
    pub fn refresh(&mut self) {
        if self
            .checked
            .is_some_and(|c| c.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        self.checked = Some(Instant::now());
        let Some(tail) = &self.tail else { return };
        match tail.poll() {
            Ok(records) => self.apply(&records),
            Err(e) => tracing::warn!(error = %e, "control topic not read; probes unchanged"),
        }
    }

    /// Apply control records in order (other keys are ignored).
    pub fn apply(&mut self, records: &[TableRecord]) {
        for r in records {
            let Some(point) = r
                .key
                .as_deref()
                .and_then(|k| std::str::from_utf8(k).ok())
                .and_then(|k| k.strip_prefix(KEY_PREFIX))
            else {
                continue;
            };
            if !point.starts_with(&format!("{}.", self.stage)) {
                continue;
            }
            match r.payload.as_deref() {
                None => {
                    if self.enabled.remove(point).is_some() {
                        tracing::info!(point, "probe removed");
                    }
                }
                Some(bytes) => match meterflow_avro::decode::<ProbeSpec>(bytes)
                    .map_err(|e| e.to_string())
                    .and_then(|s| Enabled::of(&s).map(|e| (s, e)))
                {
                    Ok((spec, on)) => {
                        tracing::info!(point, measures = ?spec.measures, sample_rate = %spec.sample_rate, added_by = %spec.added_by, "probe enabled");
                        self.enabled.insert(point.to_string(), on);
                    }
                    Err(e) => {
                        tracing::error!(point, offset = r.offset, error = %e, "probe record refused")
                    }
                },
            }
        }
    }

    pub fn is_enabled(&self, point: &str) -> bool {
        self.enabled.contains_key(point)
    }

    fn sampled(on: &Enabled, key: &[&[u8]]) -> bool {
        on.rate_ppm >= 1_000_000 || hash_ppm(key) < on.rate_ppm
    }

    /// A message read at `point`: measured, carried, or nothing.
    pub fn begin(&self, point: &'static str, msg: &OwnedMessage) -> Trace {
        let carried = Carried::read(msg);
        let Some(on) = self.enabled.get(point) else {
            return match carried {
                Some(c) => Trace::Carry(Box::new(CarryOnly(c))),
                None => Trace::None,
            };
        };
        let (partition, offset) = (msg.partition().to_be_bytes(), msg.offset().to_be_bytes());
        let key: [&[u8]; 3] = [msg.topic().as_bytes(), &partition, &offset];
        let has_trail = carried.as_ref().is_some_and(|c| !c.trail.is_empty());
        if !has_trail && !Self::sampled(on, &key) {
            return match carried {
                Some(c) => Trace::Carry(Box::new(CarryOnly(c))),
                None => Trace::None,
            };
        }
        let carried = carried.unwrap_or_default();
        let now = crate::now_ms();
        let m = |bit: u8| on.measures & bit != 0;
        let lag = if m(LAG) {
            self.ends.as_ref().and_then(|e| {
                let ends = e.lock().ok()?;
                let end = ends.get(&(msg.topic().to_string(), msg.partition()))?;
                Some((end - msg.offset() - 1).max(0))
            })
        } else {
            None
        };
        Trace::Measure(Box::new(Hop {
            point,
            on: on.clone(),
            hop_latency_ms: if m(HOP) {
                carried.last_at().map(|at| (now - at).max(0))
            } else {
                None
            },
            queue_dwell_ms: if m(DWELL) {
                msg.timestamp().to_millis().map(|t| (now - t).max(0))
            } else {
                None
            },
            lag,
            carried,
            seed: format!("{}/{}/{}", msg.topic(), msg.partition(), msg.offset()),
            received: Instant::now(),
            received_ms: now,
        }))
    }

    /// A message that starts here (the collector): measured at the point's sample rate,
    /// chosen from `key`; `started` is when the work that produced it began.
    pub fn start(&self, point: &'static str, key: &str, started: Instant) -> Trace {
        let Some(on) = self.enabled.get(point) else {
            return Trace::None;
        };
        if !Self::sampled(on, &[key.as_bytes()]) {
            return Trace::None;
        }
        Trace::Measure(Box::new(Hop {
            point,
            on: on.clone(),
            carried: Carried::default(),
            seed: key.to_string(),
            received: started,
            received_ms: crate::now_ms(),
            hop_latency_ms: None,
            queue_dwell_ms: None,
            lag: None,
        }))
    }

    fn histograms(&self, point: &'static str) -> [Histogram; 5] {
        let mut hs = self.histograms.lock().unwrap_or_else(|p| p.into_inner());
        hs.entry(point)
            .or_insert_with(|| {
                let l = [("point", point)];
                let m = &self.metrics;
                [
                    m.histogram("meterflow_probe_hop_latency_seconds", "From the previous component's forwarding to receipt here, at enabled probe points.", &l, SECONDS),
                    m.histogram("meterflow_probe_queue_dwell_seconds", "From the broker timestamp of a record to its receipt, at enabled probe points.", &l, SECONDS),
                    m.histogram("meterflow_probe_processing_seconds", "A component's own time on a message, at enabled probe points.", &l, SECONDS),
                    m.histogram("meterflow_probe_lag_records", "Records behind the partition end when a message was read, at enabled probe points.", &l, RECORDS),
                    m.histogram("meterflow_probe_window_wait_seconds", "From receipt of a usage record to its window's revenue event (rater).", &l, SECONDS),
                ]
            })
            .clone()
    }

    /// The headers to forward with every record produced from the message, measured as
    /// of now; `None` when there is nothing to forward.
    pub fn finish(&self, t: &Trace) -> Option<Forward> {
        self.finish_from(t, None)
    }

    /// As [`Probes::finish`], for output produced later than the message's receipt (the
    /// rater's window): processing time counts from `batch_start`, and the wait from
    /// receipt to then is reported as `window_wait_ms`.
    pub fn finish_from(&self, t: &Trace, batch_start: Option<Instant>) -> Option<Forward> {
        match t {
            Trace::None => None,
            Trace::Carry(c) => Some(c.0.clone().forward(None, None)),
            Trace::Measure(h) => {
                let m = |bit: u8| h.on.measures & bit != 0;
                let from = batch_start.unwrap_or(h.received).max(h.received);
                let processing = from.elapsed();
                let wait = batch_start.map(|b| b.saturating_duration_since(h.received));
                let at = crate::now_ms();
                let entry = Entry {
                    stage: self.stage.clone(),
                    member: self.member.clone(),
                    host: self.host.clone(),
                    point: h.point.to_string(),
                    at,
                    hop_latency_ms: h.hop_latency_ms,
                    queue_dwell_ms: h.queue_dwell_ms,
                    processing_us: m(PROC).then_some(processing.as_micros() as i64),
                    lag: h.lag,
                    window_wait_ms: if m(PROC) {
                        wait.map(|w| w.as_millis() as i64)
                    } else {
                        None
                    },
                };
                let [hop, dwell, proc_, lag, ww] = self.histograms(h.point);
                let ms = |v: i64| v as f64 / 1000.0;
                if let Some(v) = entry.hop_latency_ms {
                    hop.observe(ms(v));
                }
                if let Some(v) = entry.queue_dwell_ms {
                    dwell.observe(ms(v));
                }
                if entry.processing_us.is_some() {
                    proc_.observe(processing.as_secs_f64());
                }
                if let Some(v) = entry.lag {
                    lag.observe(v as f64);
                }
                if let Some(w) = wait.filter(|_| m(PROC)) {
                    ww.observe(w.as_secs_f64());
                }
                // same trace, a span of our own
                let trace = h
                    .carried
                    .traceparent
                    .as_deref()
                    .and_then(trace_id)
                    .map(str::to_string)
                    .unwrap_or_else(|| id::derive("trace", &[&h.seed])[..32].to_string());
                let span = &id::derive(
                    "span",
                    &[
                        &trace,
                        &self.stage,
                        &self.member,
                        &h.received_ms.to_string(),
                    ],
                )[..16];
                let tp = format!("00-{trace}-{span}-01");
                let own = serde_json::to_vec(&entry).ok();
                Some(h.carried.clone().forward(own, Some(tp)))
            }
        }
    }
}

/// Borrow forwarded headers as the producer API wants them.
pub fn as_refs(f: &Forward) -> Vec<(&str, &[u8])> {
    f.iter().map(|(k, v)| (k.as_str(), v.as_slice())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::{Header, OwnedHeaders, Timestamp};

    fn msg(offset: i64, headers: Option<OwnedHeaders>) -> OwnedMessage {
        OwnedMessage::new(
            Some(b"x".to_vec()),
            Some(b"k".to_vec()),
            "meterflow.samples".into(),
            Timestamp::CreateTime(crate::now_ms() - 40),
            0,
            offset,
            headers,
        )
    }

    fn spec(point: &str, measures: &[&str], rate: &str) -> TableRecord {
        let s = ProbeSpec {
            point: point.into(),
            measures: measures.iter().map(|m| m.to_string()).collect(),
            sample_rate: rate.into(),
            added_at: 0,
            added_by: "test".into(),
        };
        TableRecord {
            topic: "meterflow.control".into(),
            partition: 0,
            offset: 0,
            key: Some(format!("{KEY_PREFIX}{point}").into_bytes()),
            payload: Some(meterflow_avro::encode(&s)),
            headers: vec![],
        }
    }

    fn headers(f: &Forward) -> OwnedHeaders {
        f.iter().fold(OwnedHeaders::new(), |h, (k, v)| {
            h.insert(Header {
                key: k,
                value: Some(v),
            })
        })
    }

    #[test]
    fn an_enabled_point_appends_its_entry_and_replaces_the_traceparent() {
        let metrics = Arc::new(Metrics::default());
        let mut collector = Probes::offline("collector", "n1", metrics.clone());
        let mut enricher = Probes::offline("enricher", "e1", metrics.clone());
        // off: nothing added, nothing measured
        assert!(collector
            .finish(&collector.start("collector.publish", "s1", Instant::now()))
            .is_none());
        assert!(enricher
            .finish(&enricher.begin("enricher.join", &msg(1, None)))
            .is_none());
        collector.apply(&[spec("collector.publish", &["processing_time"], "1")]);
        enricher.apply(&[spec(
            "enricher.join",
            &["hop_latency", "queue_dwell", "processing_time", "lag"],
            "1",
        )]);
        // another stage's probe is not this stage's
        enricher.apply(&[spec("rater.rate", &["lag"], "1")]);
        assert!(!enricher.is_enabled("rater.rate"));
        let first = collector
            .finish(&collector.start("collector.publish", "s1", Instant::now()))
            .expect("measured");
        let second = enricher
            .finish(&enricher.begin("enricher.join", &msg(2, Some(headers(&first)))))
            .expect("measured");
        let trail = trail_of(&second);
        assert_eq!(
            trail.iter().map(|e| e.point.as_str()).collect::<Vec<_>>(),
            ["collector.publish", "enricher.join"]
        );
        assert!(trail[0].hop_latency_ms.is_none() && trail[0].processing_us.is_some());
        assert!(trail[1].hop_latency_ms.is_some());
        assert!(trail[1].queue_dwell_ms.is_some_and(|d| d >= 40));
        let tps: Vec<&Vec<u8>> = second
            .iter()
            .filter(|(k, _)| k == TRACEPARENT)
            .map(|(_, v)| v)
            .collect();
        assert_eq!(tps.len(), 1, "one traceparent, never two");
        let tp1 = first.iter().find(|(k, _)| k == TRACEPARENT).map(|(_, v)| v);
        let tp1 = std::str::from_utf8(tp1.expect("tp")).expect("utf8");
        let tp2 = std::str::from_utf8(tps[0]).expect("utf8");
        assert_eq!(trace_id(tp1), trace_id(tp2), "same trace");
        assert_ne!(tp1, tp2, "a span of its own");
        let text = metrics.render();
        assert!(
            text.contains("meterflow_probe_hop_latency_seconds_count{point=\"enricher.join\"} 1"),
            "{text}"
        );
        // removed: the trail passes through untouched, nothing appended
        let mut tomb = spec("enricher.join", &[], "1");
        tomb.payload = None;
        enricher.apply(&[tomb]);
        let carried = enricher
            .finish(&enricher.begin("enricher.join", &msg(3, Some(headers(&first)))))
            .expect("carried");
        assert_eq!(carried, first);
    }

    #[test]
    fn sampling_is_a_stable_share_and_a_trail_is_always_measured() {
        let metrics = Arc::new(Metrics::default());
        let mut p = Probes::offline("enricher", "e1", metrics);
        p.apply(&[spec("enricher.join", &["lag"], "0.1")]);
        let measured = (0..10_000)
            .filter(|o| matches!(p.begin("enricher.join", &msg(*o, None)), Trace::Measure(_)))
            .count();
        assert!((800..1200).contains(&measured), "{measured}");
        // the same offsets decide the same way
        let again = (0..10_000)
            .filter(|o| matches!(p.begin("enricher.join", &msg(*o, None)), Trace::Measure(_)))
            .count();
        assert_eq!(measured, again);
        let entry = Entry {
            stage: "collector".into(),
            member: "n".into(),
            host: "h".into(),
            point: "collector.publish".into(),
            at: 1,
            hop_latency_ms: None,
            queue_dwell_ms: None,
            processing_us: Some(1),
            lag: None,
            window_wait_ms: None,
        };
        let with_trail = vec![(TRAIL.to_string(), serde_json::to_vec(&entry).expect("json"))];
        assert!((0..100).all(|o| matches!(
            p.begin("enricher.join", &msg(o, Some(headers(&with_trail)))),
            Trace::Measure(_)
        )));
    }

    #[test]
    fn bad_probe_specs_are_refused() {
        assert!(validate("enricher.join", &["all".into()], "1").is_ok());
        assert_eq!(
            validate("enricher.join", &["lag,hop_latency".into()], "0.5"),
            Ok(vec!["hop_latency".to_string(), "lag".to_string()])
        );
        assert!(validate("enricher.nowhere", &["lag".into()], "1").is_err());
        assert!(validate("enricher.join", &["speed".into()], "1").is_err());
        assert!(validate("enricher.join", &["lag".into()], "0").is_err());
        assert!(validate("enricher.join", &["lag".into()], "1.5").is_err());
        assert!(validate("enricher.join", &["lag".into()], "NaN").is_err());
        assert!(trace_id("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01").is_some());
        assert!(trace_id("00-00000000000000000000000000000000-b7ad6b7169203331-01").is_none());
        assert!(trace_id("garbage").is_none());
    }
}
