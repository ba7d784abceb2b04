//! From two observations of an instance to one exact interval sample.
//!
//! Rules (also in ARCHITECTURE.md, "Intervals"):
//! 1. An instance this collector has never polled, at its first poll ever, is a
//!    baseline: `seq = 0`, an empty interval, zero deltas. Usage before it is not visible
//!    to this collector and not invented.
//! 2. Same incarnation, every counter ≥ before: delta = current − previous, over
//!    `[previous, now]`, however long the gap: the incarnation did not change, so the
//!    instance lived through it and its counters measured all of it.
//! 3. A new incarnation, or any counter below its previous value, is a reset: the counters
//!    restarted from zero inside the interval, so delta = current value (nothing negative,
//!    nothing lost). Gauges are integrated over the whole interval.
//! 4. An instance that appears between two polls of a running collector (created, or
//!    migrated in) started inside `(previous poll, now]`: everything its counters hold is
//!    its usage here, so delta = current value over `[previous poll, now]`.
//! 5. In 3 and 4, if the interval is longer than `max_gap`, the instance started at an
//!    unknown moment of a long gap: its counters are kept (measured, never lost) but the
//!    interval is clipped to the last poll interval, so gauges (allocation) are not
//!    billed over a span nobody observed.
//! 6. Negative counters are bad input and never produce a sample.

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

/// What the collector knows besides the instance's own last observation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cadence {
    /// The collector's previous complete poll (None: this is its first poll ever).
    pub previous_poll: Option<Millis>,
    pub poll_ms: i64,
    pub max_gap_ms: i64,
}

impl Cadence {
    /// Start of a reset or new-instance interval that would begin at `from`: clipped to
    /// the last poll interval when it is longer than `max_gap` (rule 5).
    fn start_of_unknown(&self, from: Millis, now: Millis) -> Millis {
        if now - from > self.max_gap_ms {
            from.max(now - self.poll_ms)
        } else {
            from
        }
    }
}

/// `prev` is the last observation that was emitted (with its seq); returns the interval
/// for `cur`.
pub fn next_interval(
    prev: Option<(&Observation, i64)>,
    cur: &Observation,
    cadence: &Cadence,
) -> Result<Interval, IntervalError> {
    for (name, v) in cur.counters.fields() {
        if v < 0 {
            return Err(IntervalError::NegativeCounter(name, v));
        }
    }
    let Some((p, pseq)) = prev else {
        return Ok(match cadence.previous_poll.filter(|t| *t < cur.time) {
            // rule 1: baseline
            None => Interval {
                seq: 0,
                start: cur.time,
                end: cur.time,
                deltas: Counters::default(),
                reset: false,
            },
            // rule 4: appeared since the previous poll
            Some(tp) => Interval {
                seq: 1,
                start: cadence.start_of_unknown(tp, cur.time),
                end: cur.time,
                deltas: cur.counters,
                reset: true,
            },
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
        start: if reset {
            cadence.start_of_unknown(p.time, cur.time)
        } else {
            p.time
        },
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

    const C: Cadence = Cadence {
        previous_poll: None,
        poll_ms: 1000,
        max_gap_ms: 5000,
    };

    #[test]
    fn first_observation_is_a_baseline_without_usage() {
        let i = next_interval(None, &obs("a", 1000, 5_000, 7), &C).expect("ok");
        assert_eq!((i.seq, i.start, i.end), (0, 1000, 1000));
        assert_eq!(i.deltas, Counters::default());
    }

    #[test]
    fn steady_counters_give_differences() {
        let p = obs("a", 1000, 5_000, 7);
        let i = next_interval(Some((&p, 3)), &obs("a", 11_000, 9_000, 10), &C).expect("ok");
        assert_eq!((i.seq, i.start, i.end, i.reset), (4, 1000, 11_000, false));
        assert_eq!((i.deltas.cpu_time_ns, i.deltas.net_tx_bytes), (4_000, 3));
    }

    #[test]
    fn counter_reset_never_goes_negative_or_loses_usage() {
        let p = obs("a", 1000, 5_000, 7);
        // a counter went down within the same incarnation: restarted from zero
        let i = next_interval(Some((&p, 0)), &obs("a", 2000, 300, 9), &C).expect("ok");
        assert!(i.reset);
        assert_eq!((i.deltas.cpu_time_ns, i.deltas.net_tx_bytes), (300, 9));
        // new incarnation (reboot or migration) even though counters look higher
        let i = next_interval(Some((&p, 0)), &obs("b", 2000, 6_000, 8), &C).expect("ok");
        assert!(i.reset);
        assert_eq!(i.deltas.cpu_time_ns, 6_000);
    }

    #[test]
    fn negative_counters_and_backwards_time_are_rejected() {
        assert_eq!(
            next_interval(None, &obs("a", 1, -1, 0), &C),
            Err(IntervalError::NegativeCounter("cpu_time_ns", -1))
        );
        let p = obs("a", 1000, 1, 1);
        assert!(matches!(
            next_interval(Some((&p, 0)), &obs("a", 999, 2, 2), &C),
            Err(IntervalError::TimeWentBack { .. })
        ));
    }

    #[test]
    fn an_instance_appearing_between_polls_keeps_what_its_counters_measured() {
        let c = Cadence {
            previous_poll: Some(10_000),
            ..C
        };
        let i = next_interval(None, &obs("a", 11_000, 700, 3), &c).expect("ok");
        assert_eq!((i.seq, i.start, i.end, i.reset), (1, 10_000, 11_000, true));
        assert_eq!((i.deltas.cpu_time_ns, i.deltas.net_tx_bytes), (700, 3));
    }

    #[test]
    fn long_gaps_bill_counters_but_never_allocation_nobody_observed() {
        let p = obs("a", 1000, 5_000, 7);
        // same incarnation over a long gap: it lived through it, the whole gap counts
        let i = next_interval(Some((&p, 4)), &obs("a", 61_000, 9_000, 7), &C).expect("ok");
        assert_eq!(
            (i.start, i.end, i.deltas.cpu_time_ns),
            (1000, 61_000, 4_000)
        );
        // restarted somewhere in a long gap: counters kept, interval clipped to one poll
        let i = next_interval(Some((&p, 4)), &obs("b", 61_000, 300, 1), &C).expect("ok");
        assert_eq!(
            (i.start, i.end, i.deltas.cpu_time_ns),
            (60_000, 61_000, 300)
        );
        // appeared during a long collector outage: the same
        let c = Cadence {
            previous_poll: Some(1000),
            ..C
        };
        let i = next_interval(None, &obs("a", 61_000, 300, 1), &c).expect("ok");
        assert_eq!(
            (i.start, i.end, i.deltas.cpu_time_ns),
            (60_000, 61_000, 300)
        );
        // within max_gap a reset covers the whole interval
        let i = next_interval(Some((&p, 4)), &obs("b", 4000, 300, 1), &C).expect("ok");
        assert_eq!((i.start, i.end), (1000, 4000));
    }
}
