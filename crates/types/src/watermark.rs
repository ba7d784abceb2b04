//! Watermarks. Every stage broadcasts progress markers to all partitions of its output;
//! a consumer partition is complete through the minimum over all source partitions.

use crate::time::END_OF_TIME;
use crate::Millis;
use std::collections::BTreeMap;

/// Latest marker time per source partition, as seen in one input partition.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SourceTimes {
    times: Vec<Option<Millis>>,
}

impl SourceTimes {
    pub fn from_vec(v: &[i64]) -> SourceTimes {
        SourceTimes {
            times: v
                .iter()
                .map(|t| if *t == i64::MIN { None } else { Some(*t) })
                .collect(),
        }
    }
    pub fn to_vec(&self) -> Vec<i64> {
        self.times.iter().map(|t| t.unwrap_or(i64::MIN)).collect()
    }
    /// Record a marker; markers never move a source backwards.
    pub fn observe(&mut self, source: usize, sources: usize, t: Millis) {
        if self.times.len() < sources {
            self.times.resize(sources, None);
        }
        if let Some(slot) = self.times.get_mut(source) {
            *slot = Some(slot.map_or(t, |old| old.max(t)));
        }
    }
    /// Complete through this time, once every source has reported.
    pub fn min(&self) -> Option<Millis> {
        if self.times.is_empty() {
            return None;
        }
        self.times
            .iter()
            .try_fold(Millis::MAX, |acc, t| t.map(|t| acc.min(t)))
    }
}

/// Progress of the nodes that publish into one samples partition (from poll markers).
#[derive(Clone, Debug, Default)]
pub struct NodeProgress {
    nodes: BTreeMap<String, (Millis, bool)>,
}

impl NodeProgress {
    pub fn observe(&mut self, node: &str, t: Millis, retired: bool) {
        let e = self.nodes.entry(node.to_string()).or_insert((t, retired));
        e.0 = e.0.max(t);
        e.1 = retired;
    }
    /// All live nodes have published through this time, in this partition.
    ///
    /// `registry` is the node table (latest heartbeat time, retired) from the compacted
    /// instances topic: a registered live node must have been seen in this partition
    /// before the partition counts as complete anywhere, so a stage that restarts in the
    /// middle of the log waits for every node instead of racing ahead of a slow one.
    /// Nodes silent for longer than `timeout` behind the most advanced node are left out
    /// (and reported by `missing`). Retired nodes are complete forever.
    /// `None` until the partition's nodes have reported.
    pub fn complete_through(
        &self,
        timeout: Millis,
        registry: &BTreeMap<String, (Millis, bool)>,
    ) -> Option<Millis> {
        let max = self
            .nodes
            .values()
            .filter(|(_, r)| !r)
            .map(|(t, _)| *t)
            .chain(registry.values().filter(|(_, r)| !r).map(|(t, _)| *t))
            .max();
        let Some(max) = max else {
            return if self.nodes.is_empty() {
                None
            } else {
                Some(END_OF_TIME)
            };
        };
        let mut min: Option<Millis> = None;
        for (node, (t, retired)) in &self.nodes {
            if *retired {
                continue;
            }
            let last = registry.get(node).map_or(*t, |(rt, _)| (*rt).max(*t));
            if max - last > timeout {
                continue; // silent: missing, not waited for
            }
            min = Some(min.map_or(*t, |m: Millis| m.min(*t)));
        }
        for (node, (rt, retired)) in registry {
            if *retired || self.nodes.contains_key(node) || max - rt > timeout {
                continue;
            }
            return None; // a live node has not reported in this partition yet
        }
        Some(min.unwrap_or(END_OF_TIME))
    }
    pub fn missing(&self, timeout: Millis) -> Vec<String> {
        let max = self
            .nodes
            .values()
            .filter(|(_, r)| !r)
            .map(|(t, _)| *t)
            .max()
            .unwrap_or(0);
        self.nodes
            .iter()
            .filter(|(_, (t, r))| !r && max - t > timeout)
            .map(|(n, _)| n.clone())
            .collect()
    }
}

/// Live nodes of the node table (latest heartbeat, retired) silent for longer than
/// `timeout` behind the most advanced live node, with their last heartbeat, by id.
pub fn missing_nodes(
    registry: &BTreeMap<String, (Millis, bool)>,
    timeout: Millis,
) -> Vec<(String, Millis)> {
    let Some(max) = registry.values().filter(|(_, r)| !r).map(|(t, _)| *t).max() else {
        return Vec::new();
    };
    registry
        .iter()
        .filter(|(_, (t, r))| !r && max - t > timeout)
        .map(|(n, (t, _))| (n.clone(), *t))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn partition_is_complete_only_when_every_source_reported() {
        let mut s = SourceTimes::default();
        s.observe(0, 3, 100);
        s.observe(2, 3, 50);
        assert_eq!(s.min(), None);
        s.observe(1, 3, 70);
        assert_eq!(s.min(), Some(50));
        s.observe(2, 3, 40); // never backwards
        assert_eq!(s.min(), Some(50));
        s.observe(2, 3, 90);
        assert_eq!(s.min(), Some(70));
        assert_eq!(SourceTimes::from_vec(&s.to_vec()), s);
    }

    #[test]
    fn slow_node_holds_the_watermark_until_it_times_out() {
        let mut n = NodeProgress::default();
        let none = BTreeMap::new();
        assert_eq!(n.complete_through(1000, &none), None);
        n.observe("a", 5000, false);
        n.observe("b", 4500, false);
        assert_eq!(n.complete_through(1000, &none), Some(4500));
        n.observe("a", 6000, false);
        assert_eq!(n.complete_through(1000, &none), Some(6000));
        assert_eq!(n.missing(1000), vec!["b".to_string()]);
        n.observe("a", 6000, true);
        assert_eq!(n.complete_through(1000, &none), Some(4500));
        n.observe("b", 4500, true);
        assert_eq!(n.complete_through(1000, &none), Some(END_OF_TIME));
    }

    #[test]
    fn silent_live_nodes_are_reported_missing() {
        let mut registry = BTreeMap::new();
        registry.insert("a".to_string(), (9000, false));
        registry.insert("b".to_string(), (8500, false));
        registry.insert("gone".to_string(), (1000, true));
        registry.insert("silent".to_string(), (100, false));
        assert_eq!(
            missing_nodes(&registry, 1000),
            vec![("silent".to_string(), 100)]
        );
        assert!(missing_nodes(&BTreeMap::new(), 1000).is_empty());
    }

    #[test]
    fn restarted_reader_waits_for_every_registered_node() {
        let mut registry = BTreeMap::new();
        registry.insert("a".to_string(), (9000, false));
        registry.insert("b".to_string(), (9000, false));
        registry.insert("gone".to_string(), (1000, true));
        registry.insert("silent".to_string(), (100, false));
        let mut n = NodeProgress::default();
        n.observe("a", 5000, false);
        assert_eq!(
            n.complete_through(1000, &registry),
            None,
            "b is registered but not yet seen here"
        );
        n.observe("b", 4000, false);
        assert_eq!(n.complete_through(1000, &registry), Some(4000));
    }
}
