//! Settlement files read back and checked against themselves: every file listed in a
//! manifest exists with its SHA-256, the CSV and the Parquet file hold the same lines,
//! line counts match, and each manifest total is the sum of its rounded lines.

use datafusion::arrow::array::{Array, Decimal128Array, StringArray};
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use meterflow_settler::files::{entity_dir, manifests, Manifest};
use meterflow_settler::store::{blocking, Store};
use meterflow_types::{Dec, Millis};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashSet};
use std::path::Path;

#[derive(Clone, Debug)]
pub struct Line {
    pub id: String,
    pub entity: String,
    pub rule: String,
    pub window_start: Millis,
    pub quantity: Dec,
    /// Rounded to the currency's minor unit.
    pub amount: Dec,
    pub unrounded: Dec,
    pub currency: String,
    pub adjustment: bool,
    pub period: String,
    pub period_start: Millis,
    pub version: u32,
}

pub struct Settled {
    pub manifests: Vec<Manifest>,
    pub lines: Vec<Line>,
}

impl Settled {
    /// Reads every manifest under `out` and checks the files against it; panics on any
    /// disagreement.
    pub fn read(out: &Path) -> Settled {
        Settled::read_store(&Store::local(out).expect("settlement directory"))
    }

    /// The same, from any settlement store (a directory or an object store).
    pub fn read_store(out: &Store) -> Settled {
        let manifests = blocking(manifests(out)).expect("reading manifests");
        let get = |dir: &str, name: &str| -> Vec<u8> {
            blocking(out.get(&format!("{dir}/{name}")))
                .unwrap_or_else(|e| panic!("{name}: {e:#}"))
                .unwrap_or_else(|| panic!("{dir}/{name} listed in the manifest is missing"))
        };
        let mut lines = Vec::new();
        for m in &manifests {
            let dir = entity_dir(&m.period, &m.entity_id);
            for (name, sha) in &m.files {
                let bytes = get(&dir, name);
                assert_eq!(
                    &hex::encode(Sha256::digest(&bytes)),
                    sha,
                    "SHA-256 of {name}"
                );
            }
            let csv = m
                .files
                .keys()
                .find(|k| k.ends_with(".csv"))
                .expect("a CSV file");
            let pq = m
                .files
                .keys()
                .find(|k| k.ends_with(".parquet"))
                .expect("a Parquet file");
            let text = String::from_utf8(get(&dir, csv)).expect("csv");
            let mut total: BTreeMap<String, Dec> = BTreeMap::new();
            let mut mine = Vec::new();
            for l in text.lines().skip(1) {
                let f: Vec<&str> = l.split(',').collect();
                assert_eq!(f.len(), 14, "CSV line {l}");
                let dec = |s: &str| s.parse::<Dec>().unwrap_or_else(|e| panic!("{s}: {e}"));
                let line = Line {
                    id: f[0].to_string(),
                    entity: f[1].to_string(),
                    rule: f[2].to_string(),
                    window_start: meterflow_types::time::parse_rfc3339(f[5]).expect("time"),
                    quantity: dec(f[8]),
                    amount: dec(f[10]),
                    currency: f[11].to_string(),
                    unrounded: dec(f[12]),
                    adjustment: f[13] == "true",
                    period: m.period.clone(),
                    period_start: meterflow_types::time::parse_rfc3339(&m.period_start)
                        .expect("period start"),
                    version: m.version,
                };
                assert_eq!(line.entity, m.entity_id);
                *total.entry(line.currency.clone()).or_default() += line.amount;
                mine.push(line);
            }
            assert_eq!(mine.len(), m.line_count, "line count of {csv}");
            let want: BTreeMap<String, String> = total
                .iter()
                .map(|(c, t)| {
                    (
                        c.clone(),
                        t.to_fixed(meterflow_types::decimal::minor_units(c)),
                    )
                })
                .collect();
            assert_eq!(
                m.totals, want,
                "manifest totals = sums of rounded lines ({csv})"
            );
            check_parquet(get(&dir, pq), &mine);
            lines.extend(mine);
        }
        Settled { manifests, lines }
    }

    /// Every revenue event id appears once across all files and versions.
    pub fn assert_no_id_twice(&self) {
        let mut seen = HashSet::new();
        for l in &self.lines {
            assert!(seen.insert(&l.id), "revenue event {} settled twice", l.id);
        }
    }

    /// Each (period, entity) has its first version only: nothing was settled again as a
    /// correction.
    pub fn assert_each_settled_once(&self) {
        assert!(
            self.manifests.iter().all(|m| m.version == 1),
            "each period settled once, no correction versions: {:?}",
            self.manifests
                .iter()
                .map(|m| (&m.period, &m.entity_id, m.version))
                .collect::<Vec<_>>()
        );
    }

    /// (period start, entity) → total in cents of one currency, over all versions.
    pub fn totals_cents(&self, currency: &str) -> BTreeMap<(Millis, String), i128> {
        let mut t = BTreeMap::new();
        for l in self.lines.iter().filter(|l| l.currency == currency) {
            *t.entry((l.period_start, l.entity.clone())).or_default() +=
                l.amount.raw() / 10_000_000;
        }
        t
    }

    /// Checks every line against the expectation: each (entity, rule, window) billed
    /// once, unrounded amount to 10⁻⁹ and rounded amount to the cent; no adjustments;
    /// and the per-period totals.
    pub fn assert_matches(&self, run: &crate::expect::FleetRun, period_ms: Millis) {
        self.assert_matches_totals(run, run.totals(period_ms));
    }

    /// As `assert_matches`, for any billing period (calendar months, for instance).
    pub fn assert_matches_in(
        &self,
        run: &crate::expect::FleetRun,
        period: &meterflow_types::window::Period,
    ) {
        self.assert_matches_totals(run, run.totals_in(period));
    }

    /// Every line against the expectation, and the per-period totals against `totals`.
    fn assert_matches_totals(
        &self,
        run: &crate::expect::FleetRun,
        totals: BTreeMap<(Millis, String), i128>,
    ) {
        self.assert_no_id_twice();
        let want = run.lines();
        let mut got = BTreeMap::new();
        for l in &self.lines {
            assert!(!l.adjustment, "a healthy run has no adjustments: {l:?}");
            assert_eq!(l.currency, "USD");
            let k = (l.entity.clone(), l.rule.clone(), l.window_start);
            assert!(got.insert(k.clone(), l).is_none(), "{k:?} billed twice");
        }
        let missing: Vec<_> = want.keys().filter(|k| !got.contains_key(*k)).collect();
        let extra: Vec<_> = got.keys().filter(|k| !want.contains_key(*k)).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{} lines missing (first {:?}), {} unexpected (first {:?})",
            missing.len(),
            missing.first(),
            extra.len(),
            extra.first()
        );
        for (k, x) in &want {
            let l = got[k];
            assert_eq!(l.unrounded.raw(), x.nano, "{k:?}: amount before rounding");
            assert_eq!(
                l.amount.raw(),
                x.cents * 10_000_000,
                "{k:?}: amount in cents"
            );
        }
        assert_eq!(
            self.totals_cents("USD"),
            totals,
            "totals per period and entity"
        );
    }
}

fn check_parquet(bytes: Vec<u8>, csv: &[Line]) {
    let reader = ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(bytes))
        .expect("a Parquet file")
        .build()
        .expect("reader");
    let mut rows = Vec::new();
    for b in reader {
        let b = b.expect("batch");
        let col = |n: &str| {
            b.column_by_name(n)
                .unwrap_or_else(|| panic!("column {n}"))
                .clone()
        };
        let ids = col("id");
        let ids = ids.as_any().downcast_ref::<StringArray>().expect("utf8 id");
        let amt = col("amount");
        let amt = amt
            .as_any()
            .downcast_ref::<Decimal128Array>()
            .expect("decimal amount");
        assert_eq!(amt.scale(), 9);
        for i in 0..b.num_rows() {
            rows.push((ids.value(i).to_string(), amt.value(i)));
        }
    }
    let want: Vec<(String, i128)> = csv.iter().map(|l| (l.id.clone(), l.amount.raw())).collect();
    assert_eq!(rows, want, "the Parquet file holds the CSV's lines");
}
