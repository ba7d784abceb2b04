//! `usage_to_date`: each entity's usage so far in the current billing period, for rules
//! that price tiers across a period (the first 1,000 vCPU-hours of the month at one
//! price, the rest at another). For a tumbling rule, the period-to-date of a window is the
//! sum of the usage of that rule's earlier windows of the same period, as they closed.
//!
//! Re-closing a window (a replay after a crash, before the checkpoint that recorded it)
//! gives the same answer: each entry keeps the totals before and after the last window
//! it took in. Late usage (adjustments) is priced at the position reached so far and does
//! not move it, so a replayed adjustment cannot count twice.

use anyhow::{bail, Result};
use meterflow_types::{Dec, Millis, Usage};
use std::collections::{HashMap, HashSet};

/// The usage quantity columns, in `Usage` field order.
pub const QUANTITIES: [&str; 8] = [
    "vcpu_seconds",
    "cpu_seconds",
    "memory_byte_seconds",
    "memory_used_byte_seconds",
    "net_rx_bytes",
    "net_tx_bytes",
    "disk_read_bytes",
    "disk_write_bytes",
];

/// The usage quantities, in `Usage` field order (`memory_used_byte_seconds` absent = 0).
pub type Sums = [Dec; 8];

pub const ZERO: Sums = [Dec::ZERO; 8];

pub fn sums_of(u: &Usage) -> Sums {
    [
        u.vcpu_seconds,
        u.cpu_seconds,
        u.memory_byte_seconds,
        u.memory_used_byte_seconds.unwrap_or(Dec::ZERO),
        u.net_rx_bytes,
        u.net_tx_bytes,
        u.disk_read_bytes,
        u.disk_write_bytes,
    ]
}

fn add(a: &Sums, b: &Sums) -> Result<Sums> {
    let mut out = ZERO;
    for i in 0..8 {
        out[i] = a[i].checked_add(b[i])?;
    }
    Ok(out)
}

/// One entity's period-to-date for one rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Start of the last window taken in.
    pub last_window: Millis,
    /// Totals before and after that window.
    pub before: Sums,
    pub after: Sums,
}

/// Period-to-date state of one rule on one usage partition, keyed by (period start, entity).
#[derive(Clone, Debug, Default)]
pub struct ToDate {
    pub entries: HashMap<(Millis, String), Entry>,
    dirty: HashSet<(Millis, String)>,
}

impl ToDate {
    /// The period-to-date of every entity of the window starting at `ws` (before it), in
    /// entity order, and the state advanced past the window.
    pub fn close_window(
        &mut self,
        period_start: Millis,
        ws: Millis,
        rows: &[&Usage],
    ) -> Result<Vec<(String, Sums)>> {
        let mut window: std::collections::BTreeMap<&str, Sums> = Default::default();
        for u in rows {
            let s = window.entry(u.entity_id.as_str()).or_insert(ZERO);
            *s = add(s, &sums_of(u))?;
        }
        let mut out = Vec::with_capacity(window.len());
        for (entity, sums) in window {
            let key = (period_start, entity.to_string());
            let base = match self.entries.get(&key) {
                None => ZERO,
                Some(e) if e.last_window == ws => e.before,
                Some(e) if e.last_window < ws => e.after,
                Some(e) => bail!(
                    "window {ws} of entity {entity} closes after window {} already did",
                    e.last_window
                ),
            };
            let after = add(&base, &sums)?;
            self.entries.insert(
                key.clone(),
                Entry {
                    last_window: ws,
                    before: base,
                    after,
                },
            );
            self.dirty.insert(key);
            out.push((entity.to_string(), base));
        }
        Ok(out)
    }

    /// An entity's period-to-date so far (for pricing late usage).
    pub fn current(&self, period_start: Millis, entity: &str) -> Sums {
        self.entries
            .get(&(period_start, entity.to_string()))
            .map_or(ZERO, |e| e.after)
    }

    /// Entries changed since the last call (to persist).
    pub fn take_dirty(&mut self) -> Vec<((Millis, String), Entry)> {
        let keys: Vec<_> = self.dirty.drain().collect();
        keys.into_iter()
            .filter_map(|k| self.entries.get(&k).cloned().map(|e| (k, e)))
            .collect()
    }

    /// Forget periods starting before `keep_from`.
    pub fn prune(&mut self, keep_from: Millis) {
        self.entries.retain(|(p, _), _| *p >= keep_from);
        self.dirty.retain(|(p, _)| *p >= keep_from);
    }

    /// Restore a persisted entry.
    pub fn restore(&mut self, period_start: Millis, entity: String, e: Entry) {
        self.entries.insert((period_start, entity), e);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u(entity: &str, vcpu: i64) -> Usage {
        Usage {
            entity_id: entity.into(),
            vcpu_seconds: Dec::from_int(vcpu),
            ..crate::batch::empty_usage()
        }
    }

    #[test]
    fn windows_accumulate_and_a_replayed_window_sees_the_same_past() {
        let mut t = ToDate::default();
        let (a1, b1) = (u("a", 10), u("b", 5));
        let first = t.close_window(0, 0, &[&a1, &b1, &a1]).expect("w0");
        assert_eq!(first, vec![("a".into(), ZERO), ("b".into(), ZERO)]);
        let second = t.close_window(0, 3600, &[&a1]).expect("w1");
        assert_eq!(second[0].1[0], Dec::from_int(20));
        // a crash before the checkpoint: the same window closes again, same answer
        let again = t.close_window(0, 3600, &[&a1]).expect("w1 again");
        assert_eq!(again, second);
        assert_eq!(t.current(0, "a")[0], Dec::from_int(30));
        assert_eq!(t.current(0, "b")[0], Dec::from_int(5));
        // a new period starts from zero
        assert_eq!(
            t.close_window(86_400, 86_400, &[&a1]).expect("p2")[0].1,
            ZERO
        );
        assert_eq!(t.take_dirty().len(), 3);
        assert!(t.take_dirty().is_empty());
        assert!(t.close_window(0, 0, &[&a1]).is_err(), "out of order");
        t.prune(86_400);
        assert_eq!(t.entries.len(), 1);
    }
}
