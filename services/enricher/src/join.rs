//! The pure part of the enricher: who owned an instance when, and a sample's usage
//! integrated over its interval and split between owners at ownership changes.

use meterflow_types::{
    Dec, FastMap, InstanceState, Millis, Ownership, SampleView, SeenSample, Usage, UsageView,
    NO_LABELS,
};

/// A sample's owner segments: `(segment_start, segment_end, owner)`. Nearly every sample
/// has one owner for its whole interval: that one is kept inline, not allocated.
pub type Segments<'a> = smallvec::SmallVec<[(Millis, Millis, &'a Ownership); 1]>;

/// Ownership history per instance, ordered by `valid_from`.
///
/// Precedence: explicit assignments (`meterflow ownership set|import`, sources `cli` and
/// `import`) win over owners discovered on the node (`metadata`, `fleet`): a discovered
/// record is ignored once an explicit record is valid at or before its `valid_from`.
/// Within a class, the latest `valid_from` at a point in time wins.
#[derive(Default, Debug)]
pub struct Owners {
    by_instance: FastMap<String, Vec<Ownership>>,
}

/// Whether an ownership record was set explicitly (rather than discovered).
pub fn is_explicit(o: &Ownership) -> bool {
    matches!(o.source.as_str(), "cli" | "import")
}

impl Owners {
    pub fn insert(&mut self, o: Ownership) {
        let v = self.by_instance.entry(o.instance_id.clone()).or_default();
        let k = |x: &Ownership| (x.valid_from, x.source.clone());
        match v.binary_search_by_key(&k(&o), k) {
            Ok(i) => v[i] = o,
            Err(i) => v.insert(i, o),
        }
    }

    /// How many instances have an owner history.
    pub fn len(&self) -> usize {
        self.by_instance.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_instance.is_empty()
    }

    /// Owner segments covering `[start, end)`: `(segment_start, segment_end, owner)`.
    /// `None` if the instance had no owner at `start` (the sample must be parked).
    pub fn segments(&self, instance: &str, start: Millis, end: Millis) -> Option<Segments<'_>> {
        let all = self.by_instance.get(instance)?;
        if let [only] = all.as_slice() {
            // one owner ever (nearly always): no classes to weigh
            return (only.valid_from <= start).then(|| smallvec::smallvec![(start, end, only)]);
        }
        let first_explicit = all
            .iter()
            .filter(|o| is_explicit(o))
            .map(|o| o.valid_from)
            .min();
        let v: Vec<&Ownership> = all
            .iter()
            .filter(|o| is_explicit(o) || first_explicit.is_none_or(|t| o.valid_from < t))
            .collect();
        let first = v.iter().rposition(|o| o.valid_from <= start)?;
        let mut out = Segments::new();
        let mut i = first;
        let mut s = start;
        loop {
            let next = v.get(i + 1).map(|o| o.valid_from).filter(|t| *t < end);
            let e = next.unwrap_or(end);
            out.push((s, e, v[i]));
            match next {
                Some(t) => {
                    s = t;
                    i += 1;
                }
                None => break,
            }
        }
        Some(out)
    }
}

/// The last billed sample per instance incarnation of one samples partition: a sample
/// whose seq is not above it is a duplicate (a collector resending, a broker redelivering)
/// and is dropped, however old. Samples of one instance arrive in seq order per
/// incarnation (same key, same partition); a new incarnation starts its own count.
/// Checkpointed with the offsets, so it survives restarts and rebalances.
#[derive(Default, Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    by_instance: FastMap<String, Vec<SeenSample>>,
}

/// Incarnations remembered per instance (a migration has two in flight at most).
const INCARNATIONS_KEPT: usize = 4;

impl Seen {
    pub fn from_checkpoint(seen: Vec<SeenSample>) -> Seen {
        let mut out = Seen::default();
        for e in seen {
            out.by_instance
                .entry(e.instance_id.clone())
                .or_default()
                .push(e);
        }
        out
    }

    pub fn to_checkpoint(&self) -> Vec<SeenSample> {
        let mut v: Vec<SeenSample> = self.by_instance.values().flatten().cloned().collect();
        v.sort_by(|a, b| (&a.instance_id, &a.incarnation).cmp(&(&b.instance_id, &b.incarnation)));
        v
    }

    pub fn is_duplicate(&self, s: &SampleView<'_>) -> bool {
        self.by_instance.get(s.instance_id).is_some_and(|v| {
            v.iter()
                .any(|e| e.incarnation == s.incarnation && e.seq >= s.seq)
        })
    }

    /// Record a billed sample.
    pub fn record(&mut self, s: &SampleView<'_>) {
        if !self.by_instance.contains_key(s.instance_id) {
            self.by_instance
                .insert(s.instance_id.to_string(), Vec::new());
        }
        let Some(v) = self.by_instance.get_mut(s.instance_id) else {
            return;
        };
        match v.iter_mut().find(|e| e.incarnation == s.incarnation) {
            Some(e) => {
                e.seq = e.seq.max(s.seq);
                e.interval_end = e.interval_end.max(s.interval_end);
            }
            None => {
                v.push(SeenSample {
                    instance_id: s.instance_id.to_string(),
                    incarnation: s.incarnation.to_string(),
                    seq: s.seq,
                    interval_end: s.interval_end,
                });
                if v.len() > INCARNATIONS_KEPT {
                    v.sort_by_key(|e| std::cmp::Reverse(e.interval_end));
                    v.truncate(INCARNATIONS_KEPT);
                }
            }
        }
    }

    /// Forget instances with nothing billed after `before` (event time).
    pub fn prune(&mut self, before: Millis) {
        self.by_instance
            .retain(|_, v| v.iter().any(|e| e.interval_end >= before));
    }

    pub fn len(&self) -> usize {
        self.by_instance.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_instance.is_empty()
    }
}

/// Quantities of one sample integrated over its interval (decimal, scale 9).
/// Gauges (vCPUs, memory) are the values observed at the interval's end, held over it.
pub fn quantities(s: &SampleView<'_>) -> [Option<Dec>; 8] {
    let ms = (s.interval_end - s.interval_start) as i128;
    let q = |v: i128, places: u32| Dec::from_scaled(v, places).ok();
    [
        q(s.vcpu_millis as i128 * ms, 6),
        q(s.deltas.cpu_time_ns as i128, 9),
        q(s.memory_alloc_bytes as i128 * ms, 3),
        s.memory_used_bytes.and_then(|m| q(m as i128 * ms, 3)),
        Some(Dec::from_int(s.deltas.net_rx_bytes)),
        Some(Dec::from_int(s.deltas.net_tx_bytes)),
        Some(Dec::from_int(s.deltas.disk_read_bytes)),
        Some(Dec::from_int(s.deltas.disk_write_bytes)),
    ]
}

/// A sample that carries no usage: a baseline (empty interval) or a final sample with
/// nothing measured. It is consumed without output.
pub fn carries_nothing(s: &SampleView<'_>) -> bool {
    s.interval_end == s.interval_start
        || (s.ended
            && s.deltas == meterflow_types::Counters::default()
            && s.vcpu_millis == 0
            && s.memory_alloc_bytes == 0
            && s.memory_used_bytes.is_none_or(|m| m == 0))
}

/// Why a sample cannot be billed at all (dead-letter reason code, detail).
/// No host has more CPUs than this: CPU time beyond it in an interval is a corrupt or
/// overflowed counter, not usage.
const MAX_CPUS: i64 = 1024;
/// Bytes (network, disk, memory) beyond this in one sample are corrupt (1 PiB).
const MAX_BYTES: i64 = 1 << 50;

/// Reasons a sample cannot be billed, as dead-letter codes: `bad_interval`,
/// `future_timestamp`, `ancient_timestamp`, `negative_counter`, `negative_gauge`,
/// `implausible_counter`, `unknown_instance`.
pub fn validate(
    s: &SampleView<'_>,
    now: Millis,
    max_future: Millis,
    max_age: Millis,
) -> Result<(), (&'static str, String)> {
    if s.interval_end < s.interval_start {
        return Err((
            "bad_interval",
            format!(
                "interval ends {} before it starts {}",
                s.interval_end, s.interval_start
            ),
        ));
    }
    if s.interval_end > now + max_future {
        return Err((
            "future_timestamp",
            format!(
                "interval_end {} is more than {max_future} ms ahead of now",
                s.interval_end
            ),
        ));
    }
    if s.interval_start < now.saturating_sub(max_age) {
        return Err((
            "ancient_timestamp",
            format!(
                "interval_start {} is more than {max_age} ms behind now",
                s.interval_start
            ),
        ));
    }
    for (name, v) in s.deltas.fields().iter().chain(s.counters.fields().iter()) {
        if *v < 0 {
            return Err(("negative_counter", format!("{name} = {v}")));
        }
    }
    let span_ns = (s.interval_end - s.interval_start).saturating_mul(1_000_000);
    if s.deltas.cpu_time_ns
        > span_ns
            .saturating_mul(MAX_CPUS)
            .saturating_add(1_000_000_000)
    {
        return Err((
            "implausible_counter",
            format!(
                "cpu_time_ns delta {} over {} ms is more than {MAX_CPUS} CPUs could use",
                s.deltas.cpu_time_ns,
                s.interval_end - s.interval_start
            ),
        ));
    }
    for (name, v) in s.deltas.fields().iter().skip(1) {
        if *v > MAX_BYTES {
            return Err((
                "implausible_counter",
                format!("{name} delta {v} exceeds 1 PiB"),
            ));
        }
    }
    if s.memory_alloc_bytes > MAX_BYTES || s.memory_used_bytes.is_some_and(|m| m > MAX_BYTES) {
        return Err(("implausible_counter", "memory gauge exceeds 1 PiB".into()));
    }
    if s.vcpu_millis < 0 || s.memory_alloc_bytes < 0 || s.memory_used_bytes.is_some_and(|m| m < 0) {
        return Err(("negative_gauge", "a gauge is negative".into()));
    }
    if s.instance_id.is_empty() {
        return Err(("unknown_instance", "empty instance id".into()));
    }
    Ok(())
}

/// Usage records for one sample, one per owner segment, quantities split pro rata by
/// time so the parts add up to the sample exactly: as views borrowing from the sample,
/// its owners and its instance state (what the enricher encodes, with no `Usage` in
/// between).
pub fn usage_views<'a>(
    s: &SampleView<'a>,
    segments: &[(Millis, Millis, &'a Ownership)],
    state: Option<&'a InstanceState>,
) -> smallvec::SmallVec<[UsageView<'a>; 1]> {
    let q = quantities(s);
    if let [(a, b, o)] = segments {
        // one owner for the whole interval (nearly always): nothing to split
        return smallvec::smallvec![usage_part(s, (*a, *b, o), state, |k| q[k])];
    }
    let weights: Vec<i64> = segments.iter().map(|(a, b, _)| b - a).collect();
    let split: Vec<Option<Vec<Dec>>> = q
        .iter()
        .map(|v| v.map(|d| d.split_pro_rata(&weights)))
        .collect();
    segments
        .iter()
        .enumerate()
        .map(|(i, seg)| usage_part(s, *seg, state, |k| split[k].as_ref().map(|v| v[i])))
        .collect()
}

/// The usage of segment `[a, b)` of `s`, owned by `o`; `part(k)` is its share of the
/// sample's `k`th quantity (see `quantities`).
fn usage_part<'a>(
    s: &SampleView<'a>,
    (a, b, o): (Millis, Millis, &'a Ownership),
    state: Option<&'a InstanceState>,
    part: impl Fn(usize) -> Option<Dec>,
) -> UsageView<'a> {
    let or_zero = |k: usize| part(k).unwrap_or(Dec::ZERO);
    UsageView {
        id: Usage::make_id(s.id, &o.entity_id, a).into(),
        sample_id: s.id,
        instance_id: s.instance_id,
        entity_id: &o.entity_id,
        user_id: &o.user_id,
        project: o.project.as_deref(),
        node_id: s.node_id,
        site: s.site,
        kind: s.kind,
        flavor: state.and_then(|st| st.flavor.as_deref()),
        interval_start: a,
        interval_end: b,
        vcpu_seconds: or_zero(0),
        cpu_seconds: or_zero(1),
        memory_byte_seconds: or_zero(2),
        memory_used_byte_seconds: part(3),
        net_rx_bytes: or_zero(4),
        net_tx_bytes: or_zero(5),
        disk_read_bytes: or_zero(6),
        disk_write_bytes: or_zero(7),
        labels: std::borrow::Cow::Borrowed(state.map_or(&NO_LABELS, |st| &st.labels)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meterflow_types::{Counters, Sample};

    fn own(entity: &str, from: Millis) -> Ownership {
        Ownership {
            instance_id: "i".into(),
            user_id: "u".into(),
            entity_id: entity.into(),
            project: None,
            valid_from: from,
            source: "cli".into(),
        }
    }
    /// The usage records of a sample as the rater reads them: each view encoded as the
    /// enricher sends it, then decoded.
    fn usage_for(
        s: &Sample,
        segments: &[(Millis, Millis, &Ownership)],
        state: Option<&InstanceState>,
    ) -> Vec<Usage> {
        usage_views(&s.view(), segments, state)
            .iter()
            .map(|v| {
                let mut bytes = Vec::new();
                meterflow_avro::encode_usage_into(v, &mut bytes);
                meterflow_avro::decode::<Usage>(&bytes).expect("usage decodes")
            })
            .collect()
    }
    fn sample(start: Millis, end: Millis) -> Sample {
        Sample {
            id: "s".into(),
            instance_id: "i".into(),
            node_id: "n".into(),
            site: "x".into(),
            kind: "vm".into(),
            incarnation: "1".into(),
            seq: 1,
            interval_start: start,
            interval_end: end,
            counters: Counters::default(),
            deltas: Counters {
                cpu_time_ns: 3_000_000_001,
                net_tx_bytes: 10,
                ..Default::default()
            },
            vcpu_millis: 2000,
            memory_alloc_bytes: 1 << 30,
            memory_used_bytes: None,
            owner_hint: None,
            ended: false,
        }
    }

    #[test]
    fn usage_integrates_gauges_over_the_interval() {
        let mut o = Owners::default();
        o.insert(own("acme", 0));
        let s = sample(10_000, 20_000);
        let segs = o.segments("i", 10_000, 20_000).expect("owned");
        let u = usage_for(&s, &segs, None);
        assert_eq!(u.len(), 1);
        assert_eq!(u[0].vcpu_seconds.to_string(), "20");
        assert_eq!(u[0].cpu_seconds.to_string(), "3.000000001");
        assert_eq!(u[0].memory_byte_seconds, Dec::from_int(10 * (1 << 30)));
        assert_eq!(u[0].memory_used_byte_seconds, None);
    }

    #[test]
    fn owner_change_mid_interval_splits_usage_exactly() {
        let mut o = Owners::default();
        o.insert(own("acme", 0));
        o.insert(own("globex", 17_500));
        let s = sample(10_000, 20_000);
        let segs = o.segments("i", 10_000, 20_000).expect("owned");
        let u = usage_for(&s, &segs, None);
        assert_eq!(
            u.iter().map(|u| u.entity_id.as_str()).collect::<Vec<_>>(),
            vec!["acme", "globex"]
        );
        assert_eq!(u[0].vcpu_seconds.to_string(), "15");
        assert_eq!(u[1].vcpu_seconds.to_string(), "5");
        assert_eq!(u[0].net_tx_bytes + u[1].net_tx_bytes, Dec::from_int(10));
        assert_eq!(
            u[0].cpu_seconds + u[1].cpu_seconds,
            "3.000000001".parse().expect("dec")
        );
        assert_ne!(u[0].id, u[1].id);
    }

    #[test]
    fn usage_carries_the_sample_owner_and_registration_and_encodes_as_its_record() {
        let mut o = own("acme", 0);
        o.project = Some("web".into());
        let s = sample(10_000, 20_000);
        let state = InstanceState {
            instance_id: "i".into(),
            node_id: "n".into(),
            site: "x".into(),
            kind: "vm".into(),
            name: "i".into(),
            state: "running".into(),
            hypervisor: "kvm".into(),
            flavor: Some("m1.large".into()),
            vcpu_millis: 2000,
            memory_alloc_bytes: 1 << 30,
            first_seen: 0,
            last_seen: 0,
            labels: [("team".to_string(), "blue".to_string())].into(),
        };
        let segs = [(10_000, 20_000, &o)];
        let views = usage_views(&s.view(), &segs, Some(&state));
        let u = usage_for(&s, &segs, Some(&state));
        assert_eq!(u.len(), 1);
        let u = &u[0];
        assert_eq!(u.id, Usage::make_id(&s.id, "acme", 10_000));
        assert_eq!(
            (
                u.sample_id.as_str(),
                u.instance_id.as_str(),
                u.entity_id.as_str()
            ),
            ("s", "i", "acme")
        );
        assert_eq!(
            (u.user_id.as_str(), u.project.as_deref()),
            ("u", Some("web"))
        );
        assert_eq!(
            (u.node_id.as_str(), u.site.as_str(), u.kind.as_str()),
            ("n", "x", "vm")
        );
        assert_eq!(u.flavor.as_deref(), Some("m1.large"));
        assert_eq!(u.labels, state.labels);
        assert_eq!((u.interval_start, u.interval_end), (10_000, 20_000));
        // the bytes the enricher sends (from the view) are the record's own encoding
        // (`u` was read back from them)
        let mut from_view = Vec::new();
        meterflow_avro::encode_usage_into(&views[0], &mut from_view);
        assert_eq!(from_view, meterflow_avro::encode(u));
        // without the registration: no flavor, no labels
        let bare = usage_for(&s, &segs, None);
        assert_eq!((bare[0].flavor.as_deref(), bare[0].labels.len()), (None, 0));
    }

    #[test]
    fn usage_before_the_first_owner_is_parked() {
        let mut o = Owners::default();
        assert!(o.segments("i", 0, 10).is_none());
        o.insert(own("acme", 5));
        assert!(o.segments("i", 0, 10).is_none());
        assert_eq!(o.segments("i", 5, 10).expect("owned").len(), 1);
    }

    #[test]
    fn bad_samples_get_reason_codes() {
        let age = 1_000_000;
        let mut s = sample(10, 5);
        assert_eq!(
            validate(&s.view(), 0, 1000, age).map_err(|e| e.0),
            Err("bad_interval")
        );
        s = sample(0, 10_000);
        assert_eq!(
            validate(&s.view(), 0, 1000, age).map_err(|e| e.0),
            Err("future_timestamp")
        );
        assert_eq!(validate(&s.view(), 10_000, 1000, age), Ok(()));
        assert_eq!(
            validate(&s.view(), 10_000 + age + 1, 1000, age).map_err(|e| e.0),
            Err("ancient_timestamp")
        );
        s.deltas.net_rx_bytes = -1;
        assert_eq!(
            validate(&s.view(), 100_000, 1000, age).map_err(|e| e.0),
            Err("negative_counter")
        );
        s.deltas.net_rx_bytes = 1 << 51;
        assert_eq!(
            validate(&s.view(), 100_000, 1000, age).map_err(|e| e.0),
            Err("implausible_counter")
        );
        s.deltas.net_rx_bytes = 0;
        // 10 s of 1024 CPUs (plus a second of slack) is the most a sample can carry
        s.deltas.cpu_time_ns = 10_000 * 1_000_000 * 1024 + 1_000_000_000;
        assert_eq!(validate(&s.view(), 100_000, 1000, age), Ok(()));
        s.deltas.cpu_time_ns = i64::MAX;
        assert_eq!(
            validate(&s.view(), 100_000, 1000, age).map_err(|e| e.0),
            Err("implausible_counter")
        );
    }

    #[test]
    fn explicit_owners_win_over_discovered_ones() {
        let mut o = Owners::default();
        let mut meta = own("from-metadata", 0);
        meta.source = "metadata".into();
        o.insert(meta.clone());
        let mut later_meta = own("later-metadata", 500);
        later_meta.source = "metadata".into();
        o.insert(later_meta);
        let mut cli = own("from-cli", 300);
        cli.source = "cli".into();
        o.insert(cli);
        let who: Vec<(Millis, Millis, String)> = o
            .segments("i", 0, 1000)
            .expect("owned")
            .iter()
            .map(|(a, b, w)| (*a, *b, w.entity_id.clone()))
            .collect();
        // metadata until the explicit assignment; later metadata does not override it
        assert_eq!(
            who,
            [
                (0, 300, "from-metadata".to_string()),
                (300, 1000, "from-cli".to_string())
            ]
        );
        // the same valid_from from both classes: both kept, the explicit one wins
        let mut same = meta;
        same.valid_from = 300;
        o.insert(same);
        let seg = o.segments("i", 300, 400).expect("owned");
        assert_eq!(seg[0].2.entity_id, "from-cli");
    }

    #[test]
    fn duplicates_are_recognised_per_incarnation_and_survive_a_checkpoint() {
        let at = |inc: &str, seq: i64| Sample {
            incarnation: inc.into(),
            seq,
            ..sample(seq * 10, seq * 10 + 10)
        };
        let mut seen = Seen::default();
        assert!(!seen.is_duplicate(&at("a", 1).view()));
        seen.record(&at("a", 1).view());
        seen.record(&at("a", 2).view());
        assert!(seen.is_duplicate(&at("a", 1).view()) && seen.is_duplicate(&at("a", 2).view()));
        assert!(!seen.is_duplicate(&at("a", 3).view()));
        // a migration: the new incarnation counts from 1, the old one's final sample
        // may still arrive after it
        assert!(!seen.is_duplicate(&at("b", 1).view()));
        seen.record(&at("b", 1).view());
        assert!(!seen.is_duplicate(&at("a", 3).view()));
        seen.record(&at("a", 3).view());
        assert!(seen.is_duplicate(&at("b", 1).view()) && seen.is_duplicate(&at("a", 3).view()));
        let back = Seen::from_checkpoint(seen.to_checkpoint());
        assert_eq!(back, seen);
        // forgetting instances idle since before a time
        let mut pruned = back.clone();
        pruned.prune(1000);
        assert!(pruned.is_empty());
        let mut kept = back;
        kept.prune(40);
        assert_eq!(kept.len(), 1);
    }
}
