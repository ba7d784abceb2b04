//! Loss and duplication audit: every stage counts what it reads from and sends to each
//! topic per event-time bucket (count and a quantity sum), and sends the counts since
//! its last record to `meterflow.audit` with each commit (in the same transaction where
//! the broker has them). `meterflow audit --from --to` sums them and compares the two
//! sides of every topic: what its producers sent with what its consumers read.
//!
//! Counts are of records as they travel, duplicates included: a stage that replays input
//! after a crash reads (and may send) records again, and the audit reports that as
//! duplication at the stage that replayed (downstream deduplication by id keeps the
//! bills exact); a record lost between two stages shows as a loss in its bucket.

use meterflow_types::{AuditCount, Dec, FastMap, Millis, RatedEvent, SampleView, Usage, UsageView};

/// Event-time bucket width.
pub const BUCKET_MS: i64 = 3_600_000;

/// The counts of one stage member since its last record.
#[derive(Debug, Default)]
pub struct Ledger {
    stage: String,
    member: String,
    /// The topics counted so far (a stage counts two or three): `counts` refers to them
    /// by index, so counting a record allocates nothing.
    topics: Vec<String>,
    /// Hashed, not ordered (a record counts twice a message in the enricher: an ordered
    /// map's string comparisons were a twentieth of its main loop); sorted at `drain`.
    counts: FastMap<(usize, &'static str, Millis), (i64, Dec)>,
}

impl Ledger {
    pub fn new(stage: &str, member: &str) -> Ledger {
        Ledger {
            stage: stage.to_string(),
            member: member.to_string(),
            topics: Vec::new(),
            counts: FastMap::default(),
        }
    }

    /// One record read (`in`), sent (`out`) or dropped as a duplicate (`dup`).
    pub fn count(&mut self, topic: &str, direction: &'static str, (t, qty): (Millis, Dec)) {
        let bucket = t - t.rem_euclid(BUCKET_MS);
        let topic = match self.topics.iter().position(|x| x == topic) {
            Some(i) => i,
            None => {
                self.topics.push(topic.to_string());
                self.topics.len() - 1
            }
        };
        let e = self
            .counts
            .entry((topic, direction, bucket))
            .or_insert((0, Dec::ZERO));
        e.0 += 1;
        e.1 = e.1.checked_add(qty).unwrap_or(e.1);
    }

    /// The records to send (key, record), and the counts start again.
    pub fn drain(&mut self) -> Vec<(String, AuditCount)> {
        let now = crate::now_ms();
        let mut counts: Vec<_> = std::mem::take(&mut self.counts).into_iter().collect();
        counts.sort_unstable_by_key(|(k, _)| *k);
        counts
            .into_iter()
            .map(|((topic, direction, bucket), (count, qty))| {
                let topic = self.topics[topic].clone();
                (
                    format!(
                        "{}|{}|{topic}|{direction}|{bucket}",
                        self.stage, self.member
                    ),
                    AuditCount {
                        stage: self.stage.clone(),
                        member: self.member.clone(),
                        topic,
                        direction: direction.to_string(),
                        bucket_start: bucket,
                        bucket_ms: BUCKET_MS,
                        count,
                        quantity: qty.to_string(),
                        sent_at: now,
                    },
                )
            })
            .collect()
    }
}

/// A sample's bucket time (its end) and quantity (allocated vCPU-seconds).
pub fn of_sample(s: &SampleView<'_>) -> (Millis, Dec) {
    (
        s.interval_end,
        Dec::from_raw(s.vcpu_millis as i128 * s.interval_ms() as i128 * 1_000),
    )
}

/// A usage record's bucket time (its start) and quantity (vCPU-seconds).
pub fn of_usage(u: &Usage) -> (Millis, Dec) {
    of_usage_view(&u.view())
}

/// `of_usage` of a usage record not yet built (the enricher encodes views).
pub fn of_usage_view(u: &UsageView<'_>) -> (Millis, Dec) {
    (u.interval_start, u.vcpu_seconds)
}

/// A revenue event's bucket time (its window start) and quantity (its amount).
pub fn of_rated(e: &RatedEvent) -> (Millis, Dec) {
    (e.window_start, e.amount)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_go_to_their_bucket_and_start_again_after_a_drain() {
        let mut l = Ledger::new("enricher", "m");
        let one: Dec = "1.5".parse().expect("dec");
        l.count("u", "out", (10, one));
        l.count("u", "out", (BUCKET_MS - 1, one));
        l.count("u", "out", (BUCKET_MS, one));
        l.count("u", "in", (10, one));
        let d = l.drain();
        assert_eq!(d.len(), 3);
        let first = &d[1].1;
        assert_eq!((first.direction.as_str(), first.bucket_start), ("out", 0));
        assert_eq!((first.count, first.quantity.as_str()), (2, "3"));
        assert_eq!(d[1].0, "enricher|m|u|out|0");
        assert!(l.drain().is_empty());
    }
}
