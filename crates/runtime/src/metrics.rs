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

type Key = (String, Vec<(String, String)>);

#[derive(Default)]
pub struct Metrics {
    counters: Mutex<BTreeMap<Key, (String, Counter)>>,
    gauges: Mutex<BTreeMap<Key, (String, Gauge)>>,
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
}
