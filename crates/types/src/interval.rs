//! From two observations of an instance to one exact interval sample.
//!
//! Rules (also in ARCHITECTURE.md):
//! 1. The first observation of an incarnation is a baseline: `seq = 0`, an empty interval,
//!    zero deltas. Usage before it is not visible to this collector and not invented.
//! 2. Same incarnation, every counter ≥ before: delta = current − previous.
//! 3. A new incarnation, or any counter below its previous value, is a reset: the counters
//!    restarted from zero inside the interval, so delta = current value (nothing negative,
//!    nothing lost). Gauges are integrated over the whole interval.
//! 4. Negative counters are bad input and never produce a sample.

use crate::{Counters, Millis};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observation {
    pub incarnation: String,
    pub time: Millis,
    pub counters: Counters,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interval {
    pub seq: i64,
    pub start: Millis,
    pub end: Millis,
    pub deltas: Counters,
    pub reset: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IntervalError {
    #[error("counter {0} is negative ({1})")]
    NegativeCounter(&'static str, i64),
    #[error("time went backwards: {prev} then {cur}")]
    TimeWentBack { prev: Millis, cur: Millis },
}

/// `prev` is the last observation that was emitted (with its seq); returns the interval
/// for `cur`.
pub fn next_interval(
    prev: Option<(&Observation, i64)>,
    cur: &Observation,
) -> Result<Interval, IntervalError> {
    for (name, v) in cur.counters.fields() {
        if v < 0 {
            return Err(IntervalError::NegativeCounter(name, v));
        }
    }
    let Some((p, pseq)) = prev else {
        return Ok(Interval {
            seq: 0,
            start: cur.time,
            end: cur.time,
            deltas: Counters::default(),
            reset: false,
        });
    };
    if cur.time < p.time {
        return Err(IntervalError::TimeWentBack {
            prev: p.time,
            cur: cur.time,
        });
    }
    let went_down = p
        .counters
        .fields()
        .iter()
        .zip(cur.counters.fields())
        .any(|((_, a), (_, b))| b < *a);
    let reset = p.incarnation != cur.incarnation || went_down;
    let deltas = if reset {
        cur.counters
    } else {
        let c = &cur.counters;
        let q = &p.counters;
        Counters {
            cpu_time_ns: c.cpu_time_ns - q.cpu_time_ns,
            net_rx_bytes: c.net_rx_bytes - q.net_rx_bytes,
            net_tx_bytes: c.net_tx_bytes - q.net_tx_bytes,
            disk_read_bytes: c.disk_read_bytes - q.disk_read_bytes,
            disk_write_bytes: c.disk_write_bytes - q.disk_write_bytes,
        }
    };
    Ok(Interval {
        seq: pseq + 1,
        start: p.time,
        end: cur.time,
        deltas,
        reset,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(inc: &str, t: Millis, cpu: i64, tx: i64) -> Observation {
        Observation {
            incarnation: inc.into(),
            time: t,
            counters: Counters {
                cpu_time_ns: cpu,
                net_tx_bytes: tx,
                ..Default::default()
            },
        }
    }

    #[test]
    fn first_observation_is_a_baseline_without_usage() {
        let i = next_interval(None, &obs("a", 1000, 5_000, 7)).expect("ok");
        assert_eq!((i.seq, i.start, i.end), (0, 1000, 1000));
        assert_eq!(i.deltas, Counters::default());
    }

    #[test]
    fn steady_counters_give_differences() {
        let p = obs("a", 1000, 5_000, 7);
        let i = next_interval(Some((&p, 3)), &obs("a", 11_000, 9_000, 10)).expect("ok");
        assert_eq!((i.seq, i.start, i.end, i.reset), (4, 1000, 11_000, false));
        assert_eq!((i.deltas.cpu_time_ns, i.deltas.net_tx_bytes), (4_000, 3));
    }

    #[test]
    fn counter_reset_never_goes_negative_or_loses_usage() {
        let p = obs("a", 1000, 5_000, 7);
        // a counter went down within the same incarnation: restarted from zero
        let i = next_interval(Some((&p, 0)), &obs("a", 2000, 300, 9)).expect("ok");
        assert!(i.reset);
        assert_eq!((i.deltas.cpu_time_ns, i.deltas.net_tx_bytes), (300, 9));
        // new incarnation (reboot or migration) even though counters look higher
        let i = next_interval(Some((&p, 0)), &obs("b", 2000, 6_000, 8)).expect("ok");
        assert!(i.reset);
        assert_eq!(i.deltas.cpu_time_ns, 6_000);
    }

    #[test]
    fn negative_counters_and_backwards_time_are_rejected() {
        assert_eq!(
            next_interval(None, &obs("a", 1, -1, 0)),
            Err(IntervalError::NegativeCounter("cpu_time_ns", -1))
        );
        let p = obs("a", 1000, 1, 1);
        assert!(matches!(
            next_interval(Some((&p, 0)), &obs("a", 999, 2, 2)),
            Err(IntervalError::TimeWentBack { .. })
        ));
    }
}
