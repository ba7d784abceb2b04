//! What a bounded run of the simulated fleet must bill, computed here from the fleet's
//! closed-form model and the shipped rules' prices with integer arithmetic only —
//! independently of the pipeline's code paths (no sampler, no enricher, no DataFusion).
//!
//! Prices (rules/*.sql): vCPU 0.00001 USD per vCPU-second; memory 1.25e-15 USD per
//! byte-second of allocation; egress 9e-11 USD per byte sent. The rater rounds an
//! amount half-to-even to 9 places; the settler rounds each line half-to-even to cents.

use meterflow_collector::fleet::FleetConfig;
use meterflow_types::window::Period;
use meterflow_types::Millis;
use std::collections::BTreeMap;

pub const HOUR: Millis = 3_600_000;
pub const DAY: Millis = 24 * HOUR;

/// A bounded collector run: polls at `start + k·poll_ms` for k in 0..polls (the first is
/// the baseline), so usage covers `[start, start + (polls−1)·poll_ms)`.
#[derive(Clone, Debug)]
pub struct FleetRun {
    pub fleet: FleetConfig,
    pub start: Millis,
    pub poll_ms: Millis,
    pub polls: i64,
    /// Explicit reassignments `(instance, from, entity)` (from on a poll boundary).
    pub reassign: Vec<(String, Millis, String)>,
}

/// Round `num / den` half to even (den > 0).
pub fn div_half_even(num: i128, den: i128) -> i128 {
    let q = num.div_euclid(den);
    let r = num.rem_euclid(den);
    match (2 * r).cmp(&den) {
        std::cmp::Ordering::Greater => q + 1,
        std::cmp::Ordering::Equal if q % 2 != 0 => q + 1,
        _ => q,
    }
}

/// Expected line: amount in 10⁻⁹ USD as the rater emits it, and in cents as settled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expected {
    pub nano: i128,
    pub cents: i128,
}

impl FleetRun {
    pub fn end(&self) -> Millis {
        self.start + (self.polls - 1) * self.poll_ms
    }

    /// (entity, rule id, window start) → amount, for the shipped one-hour rules.
    pub fn lines(&self) -> BTreeMap<(String, String, Millis), Expected> {
        assert!(
            HOUR % self.poll_ms == 0 && self.start % HOUR == 0,
            "the expectation assumes polls that tile the hour windows"
        );
        // per (entity, window): vCPU-ms, byte-ms of memory, bytes sent
        let mut acc: BTreeMap<(String, Millis), (i128, i128, i128)> = BTreeMap::new();
        let model = self.fleet.model();
        for k in 1..self.polls {
            let from = self.start + (k - 1) * self.poll_ms;
            let w = from.div_euclid(HOUR) * HOUR;
            for i in &model {
                let entity = self
                    .reassign
                    .iter()
                    .filter(|(inst, t, _)| *inst == i.instance_id && *t <= from)
                    .max_by_key(|(_, t, _)| *t)
                    .map(|(_, _, e)| e.clone())
                    .unwrap_or_else(|| i.entity_id.clone());
                let a = acc.entry((entity, w)).or_default();
                let ms = self.poll_ms as i128;
                a.0 += i.vcpus as i128 * ms;
                a.1 += i.memory_alloc_bytes as i128 * ms;
                a.2 += i.net_tx_per_ms as i128 * ms;
            }
        }
        let mut out = BTreeMap::new();
        for ((e, w), (vcpu_ms, mem_byte_ms, tx)) in acc {
            // 0.00001 USD/vCPU-s = 10 nano-USD per vCPU-ms
            let vcpu = vcpu_ms * 10;
            // 1.25e-15 USD per byte-s = 1.25e-9 nano-USD per byte-ms
            let mem = div_half_even(mem_byte_ms * 125, 100_000_000_000);
            // 9e-11 USD per byte = 0.09 nano-USD per byte
            let net = div_half_even(tx * 9, 100);
            for (rule, nano) in [
                ("vcpu_hours", vcpu),
                ("memory_gb_hours", mem),
                ("network_egress_gb", net),
            ] {
                let cents = div_half_even(nano, 10_000_000);
                out.insert((e.clone(), rule.to_string(), w), Expected { nano, cents });
            }
        }
        out
    }

    /// (period start, entity) → total in cents, for fixed-length periods.
    pub fn totals(&self, period_ms: Millis) -> BTreeMap<(Millis, String), i128> {
        self.totals_by(|w| w.div_euclid(period_ms) * period_ms)
    }

    /// (period start, entity) → total in cents, for any billing period the settler
    /// takes (calendar months, weeks and days as well as fixed lengths).
    pub fn totals_in(&self, period: &Period) -> BTreeMap<(Millis, String), i128> {
        self.totals_by(|w| period.bounds(w).0)
    }

    /// (period start, entity) → total in cents, the period given by its start.
    fn totals_by(&self, start_of: impl Fn(Millis) -> Millis) -> BTreeMap<(Millis, String), i128> {
        let mut t = BTreeMap::new();
        for ((e, _, w), x) in self.lines() {
            *t.entry((start_of(w), e)).or_default() += x.cents;
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_even() {
        assert_eq!(div_half_even(25, 10), 2);
        assert_eq!(div_half_even(35, 10), 4);
        assert_eq!(div_half_even(26, 10), 3);
        assert_eq!(div_half_even(-25, 10), -2);
    }

    #[test]
    fn a_full_hour_of_one_instance_costs_its_vcpus_times_0_036() {
        let run = FleetRun {
            fleet: FleetConfig {
                instances: 1,
                entities: 1,
                seed: 3,
                ..Default::default()
            },
            start: 0,
            poll_ms: 600_000,
            polls: 7,
            reassign: Vec::new(),
        };
        let v = run.fleet.model()[0].vcpus as i128;
        let l = run.lines();
        let x = l[&("entity-0".to_string(), "vcpu_hours".to_string(), 0)];
        assert_eq!(x.nano, v * 36_000_000);
        assert_eq!(x.cents, v * 36 / 10 + i128::from(v * 36 % 10 > 5));
        assert_eq!(l.len(), 3);
    }

    #[test]
    fn calendar_month_totals_split_at_the_month_and_sum_the_daily_ones() {
        // 2026-01-30T00:00Z, three days of hourly polls: January and February
        let run = FleetRun {
            fleet: FleetConfig {
                instances: 4,
                entities: 2,
                seed: 5,
                ..Default::default()
            },
            start: 1_769_731_200_000,
            poll_ms: HOUR,
            polls: 73,
            reassign: Vec::new(),
        };
        let month = Period::parse("month").expect("month");
        let feb = 1_769_904_000_000; // 2026-02-01T00:00Z
        let months = run.totals_in(&month);
        let days = run.totals(DAY);
        assert_eq!(months.len(), 4, "two entities × January and February");
        for ((start, e), cents) in &months {
            let want: i128 = days
                .iter()
                .filter(|((d, de), _)| de == e && (*d >= feb) == (*start == feb))
                .map(|(_, c)| c)
                .sum();
            assert!(*start == feb || *start == feb - 31 * DAY, "{start}");
            assert_eq!(*cents, want, "{e} from {start}");
        }
        // a fixed length is the same as `totals`
        assert_eq!(run.totals_in(&Period::parse("1d").expect("1d")), days);
    }
}
