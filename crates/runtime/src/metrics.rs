//! A small metrics registry rendered in the Prometheus text format. Names follow
//! `meterflow_<name>_<unit>[_total]`; labels are low-cardinality (stage, reason, topic).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Clone, Default)]
pub struct Counter(Arc<AtomicU64>);
impl Counter {
    pub fn inc(&self) {
        self.add(1)
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Clone, Default)]
pub struct Gauge(Arc<AtomicI64>);
impl Gauge {
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed)
    }
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A Prometheus histogram with fixed upper bounds (cumulative on render). The sum is kept
/// in millionths of the unit, so it adds exactly.
#[derive(Clone)]
pub struct Histogram(Arc<HistInner>);
struct HistInner {
    bounds: &'static [f64],
    /// One per bound, then +Inf.
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
}
impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram(Arc::new(HistInner {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
        }))
    }
    /// Record one observation (negative values count as 0).
    pub fn observe(&self, v: f64) {
        let v = if v.is_finite() { v.max(0.0) } else { 0.0 };
        let i = self.0.bounds.partition_point(|b| *b < v);
        self.0.counts[i].fetch_add(1, Ordering::Relaxed);
        self.0
            .sum_micros
            .fetch_add((v * 1e6).round() as u64, Ordering::Relaxed);
    }
    pub fn count(&self) -> u64 {
        self.0
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }
}

/// Upper bounds for durations in seconds: 100 µs … 60 s.
pub const SECONDS: &[f64] = &[
    0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];
/// Upper bounds for counts of records (consumer lag).
pub const RECORDS: &[f64] = &[
    0.0,
    1.0,
    10.0,
    100.0,
    1_000.0,
    10_000.0,
    100_000.0,
    1_000_000.0,
];

type Key = (String, Vec<(String, String)>);

#[derive(Default)]
pub struct Metrics {
    counters: Mutex<BTreeMap<Key, (String, Counter)>>,
    gauges: Mutex<BTreeMap<Key, (String, Gauge)>>,
    histograms: Mutex<BTreeMap<Key, (String, Histogram)>>,
}

fn key(name: &str, labels: &[(&str, &str)]) -> Key {
    (
        name.to_string(),
        labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

impl Metrics {
    pub fn counter(&self, name: &str, help: &str, labels: &[(&str, &str)]) -> Counter {
        let mut m = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(key(name, labels))
            .or_insert_with(|| (help.to_string(), Counter::default()))
            .1
            .clone()
    }
    pub fn gauge(&self, name: &str, help: &str, labels: &[(&str, &str)]) -> Gauge {
        let mut m = self.gauges.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(key(name, labels))
            .or_insert_with(|| (help.to_string(), Gauge::default()))
            .1
            .clone()
    }
    /// A histogram with the given upper bounds (the first registration's bounds win).
    pub fn histogram(
        &self,
        name: &str,
        help: &str,
        labels: &[(&str, &str)],
        bounds: &'static [f64],
    ) -> Histogram {
        let mut m = self.histograms.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(key(name, labels))
            .or_insert_with(|| (help.to_string(), Histogram::new(bounds)))
            .1
            .clone()
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut last = String::new();
        let fmt_labels = |l: &[(String, String)]| {
            if l.is_empty() {
                String::new()
            } else {
                let inner: Vec<String> = l
                    .iter()
                    .map(|(k, v)| {
                        format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""))
                    })
                    .collect();
                format!("{{{}}}", inner.join(","))
            }
        };
        for ((name, labels), (help, c)) in self
            .counters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            if *name != last {
                out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} counter\n"));
                last = name.clone();
            }
            out.push_str(&format!("{name}{} {}\n", fmt_labels(labels), c.get()));
        }
        for ((name, labels), (help, g)) in
            self.gauges.lock().unwrap_or_else(|p| p.into_inner()).iter()
        {
            if *name != last {
                out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} gauge\n"));
                last = name.clone();
            }
            out.push_str(&format!("{name}{} {}\n", fmt_labels(labels), g.get()));
        }
        for ((name, labels), (help, h)) in self
            .histograms
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            if *name != last {
                out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} histogram\n"));
                last = name.clone();
            }
            let mut cumulative = 0;
            let les =
                h.0.bounds
                    .iter()
                    .map(|b| b.to_string())
                    .chain(std::iter::once("+Inf".to_string()));
            for (le, c) in les.zip(&h.0.counts) {
                cumulative += c.load(Ordering::Relaxed);
                let mut l = labels.clone();
                l.push(("le".into(), le));
                out.push_str(&format!("{name}_bucket{} {cumulative}\n", fmt_labels(&l)));
            }
            let micros = h.0.sum_micros.load(Ordering::Relaxed);
            out.push_str(&format!(
                "{name}_sum{} {}.{:06}\n{name}_count{} {cumulative}\n",
                fmt_labels(labels),
                micros / 1_000_000,
                micros % 1_000_000,
                fmt_labels(labels)
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn renders_prometheus_text() {
        let m = super::Metrics::default();
        m.counter(
            "meterflow_records_total",
            "Records.",
            &[("stage", "enricher")],
        )
        .add(3);
        m.counter(
            "meterflow_records_total",
            "Records.",
            &[("stage", "enricher")],
        )
        .inc();
        m.gauge("meterflow_watermark_ms", "Watermark.", &[]).set(-5);
        let t = m.render();
        assert!(t.contains("# TYPE meterflow_records_total counter\nmeterflow_records_total{stage=\"enricher\"} 4\n"), "{t}");
        assert!(t.contains("meterflow_watermark_ms -5\n"), "{t}");
    }

    #[test]
    fn histograms_render_cumulative_buckets_sum_and_count() {
        let m = super::Metrics::default();
        let h = m.histogram(
            "meterflow_probe_hop_latency_seconds",
            "Hop latency.",
            &[("point", "enricher.join")],
            super::SECONDS,
        );
        h.observe(0.003);
        h.observe(0.2);
        h.observe(120.0);
        let t = m.render();
        let line = |le: &str| {
            format!(
                "meterflow_probe_hop_latency_seconds_bucket{{point=\"enricher.join\",le=\"{le}\"}}"
            )
        };
        assert!(
            t.contains("# TYPE meterflow_probe_hop_latency_seconds histogram\n"),
            "{t}"
        );
        assert!(t.contains(&format!("{} 0\n", line("0.001"))), "{t}");
        assert!(t.contains(&format!("{} 1\n", line("0.005"))), "{t}");
        assert!(t.contains(&format!("{} 2\n", line("0.25"))), "{t}");
        assert!(t.contains(&format!("{} 2\n", line("60"))), "{t}");
        assert!(t.contains(&format!("{} 3\n", line("+Inf"))), "{t}");
        assert!(
            t.contains(
                "meterflow_probe_hop_latency_seconds_sum{point=\"enricher.join\"} 120.203000\n"
            ),
            "{t}"
        );
        assert!(
            t.contains("meterflow_probe_hop_latency_seconds_count{point=\"enricher.join\"} 3\n"),
            "{t}"
        );
    }
}
