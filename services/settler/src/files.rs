//! Settlement files for one entity and billing period: `lines.csv`, `lines.parquet`
//! and `manifest.json`, each written whole through the settlement store (see `store`),
//! the manifest last, and byte-identical
//! when regenerated from the same events. Rounding happens here, once per line, to the
//! currency's minor unit (half to even); totals are sums of rounded lines.

use crate::store::Store;
use anyhow::{Context, Result};
use datafusion::arrow::array::{
    ArrayRef, BooleanArray, Decimal128Array, Int32Array, Int64Array, RecordBatch, StringArray,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::file::properties::WriterProperties;
use meterflow_types::decimal::minor_units;
use meterflow_types::time::fmt_rfc3339;
use meterflow_types::{Dec, Millis, RatedEvent};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;

pub const SCHEMA_VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub schema_version: u32,
    /// When the version was written (wall clock; a rebuild keeps the original's).
    #[serde(default)]
    pub generated_at: String,
    /// `complete`: the completeness watermark passed the period's end plus the grace.
    /// `incomplete`: written because the deadline passed first; `reason` says how far
    /// the data was complete. A later version completes it.
    #[serde(default = "complete")]
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub entity_id: String,
    pub period: String,
    pub period_start: String,
    pub period_end: String,
    /// 1 for the first settlement; corrections after close are later versions holding the delta.
    pub version: u32,
    pub previous: Option<String>,
    pub line_count: usize,
    /// Per currency, the sum of the rounded lines.
    pub totals: BTreeMap<String, String>,
    /// File name → SHA-256.
    pub files: BTreeMap<String, String>,
    pub rule_versions: Vec<String>,
    /// Rated-topic offsets the lines came from: partition → [first, last].
    pub input_offsets: BTreeMap<i32, [i64; 2]>,
    pub ids: Vec<String>,
}

fn complete() -> String {
    "complete".into()
}

/// How a version is written, beyond its events.
#[derive(Clone, Debug, Default)]
pub struct VersionOpts {
    /// Also write `focus.csv`.
    pub focus: bool,
    /// The manifest's `generated_at`.
    pub generated_at: Millis,
    /// `Some(reason)`: the version is written before the period is complete.
    pub incomplete: Option<String>,
}

impl VersionOpts {
    /// The options a manifest was written with (to rebuild it).
    pub fn of(m: &Manifest) -> Result<VersionOpts> {
        Ok(VersionOpts {
            focus: m.files.contains_key(&version_name(m.version, "focus.csv")),
            generated_at: meterflow_types::time::parse_rfc3339(&m.generated_at)
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("generated_at of {} v{}", m.entity_id, m.version))?,
            incomplete: (m.status == "incomplete").then(|| m.reason.clone().unwrap_or_default()),
        })
    }
}

/// The directory of one entity's files for one period, relative to the settlement root.
pub fn entity_dir(period_label: &str, entity: &str) -> String {
    let safe: String = entity
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.@".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("period={period_label}/entity={safe}")
}

/// Versions already written for an entity and period (1, 2, ...), with their manifests.
pub async fn existing(store: &Store, dir: &str) -> Result<Vec<Manifest>> {
    read_versions(store, dir, "manifest.json").await
}

/// The JSON documents `base`, `v2.base`, ... in `dir`, up to the first missing version.
///
/// The last of them unreadable is taken as not written: a crash (a power loss) after a
/// local file was renamed into place but before it was synced can leave it empty or cut
/// short, and nothing that follows a version's sync — its announcement, its offsets'
/// commit, a later version — had happened, so the version is written again when its
/// input is read again. Unreadable with a later version after it, it was synced before
/// that one was written: damage no crash explains, and an error.
pub async fn read_versions<T: serde::de::DeserializeOwned>(
    store: &Store,
    dir: &str,
    base: &str,
) -> Result<Vec<T>> {
    let mut out = Vec::new();
    for v in 1.. {
        let f = format!("{dir}/{}", version_name(v, base));
        let Some(bytes) = store.get(&f).await? else {
            break;
        };
        match serde_json::from_slice(&bytes) {
            Ok(doc) => out.push(doc),
            Err(e) => {
                let next = format!("{dir}/{}", version_name(v + 1, base));
                if store.exists(&next).await? {
                    return Err(e).with_context(|| {
                        format!(
                            "reading {} (damaged: a later version, {}, was written after it)",
                            store.describe(&f),
                            store.describe(&next)
                        )
                    });
                }
                tracing::warn!(
                    file = %store.describe(&f),
                    bytes = bytes.len(),
                    error = %e,
                    "latest version unreadable: taken as a write cut short by a crash before \
                     its sync, not written (it is written again from its input)"
                );
                break;
            }
        }
    }
    Ok(out)
}

/// Whether the document at `rel` is missing or unreadable JSON (what `read_versions`
/// takes as not written).
pub async fn unreadable(store: &Store, rel: &str) -> Result<bool> {
    Ok(match store.get(rel).await? {
        None => true,
        Some(b) => serde_json::from_slice::<serde::de::IgnoredAny>(&b).is_err(),
    })
}

/// A version's file name: `base` for version 1, then prefixed with the version.
pub fn version_name(v: u32, base: &str) -> String {
    if v == 1 {
        base.to_string()
    } else {
        format!("v{v}.{base}")
    }
}

fn sha(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// A line's rounded amount.
pub fn rounded(e: &RatedEvent) -> Dec {
    e.amount.round_half_even(minor_units(&e.currency))
}

/// The lines as FOCUS 1.x (FinOps Open Cost and Usage Specification) rows: costs are the
/// rounded line amounts in the billing currency (no discounts: billed = effective = list
/// = contracted), the charge period is the rating window, the SKU is the rule and its
/// price the rule version; late usage and correction versions are `ChargeClass`
/// `Correction`.
pub fn focus_csv(
    events: &[(i32, i64, RatedEvent)],
    period: (Millis, Millis),
    correction_version: bool,
) -> String {
    let mut s = String::from(
        "BilledCost,EffectiveCost,ListCost,ContractedCost,BillingCurrency,BillingPeriodStart,BillingPeriodEnd,\
         ChargePeriodStart,ChargePeriodEnd,ChargeCategory,ChargeClass,ChargeFrequency,ChargeDescription,\
         ConsumedQuantity,ConsumedUnit,PricingQuantity,PricingUnit,ListUnitPrice,ContractedUnitPrice,\
         ResourceId,SkuId,SkuPriceId,SubAccountId,ProviderName,PublisherName,InvoiceIssuerName,ServiceCategory\n",
    );
    let mut times = Times::default();
    let (period_start, period_end) = (fmt_rfc3339(period.0), fmt_rfc3339(period.1));
    for (_, _, e) in events {
        let cost = rounded(e).fixed(minor_units(&e.currency));
        let class = if e.adjustment || correction_version {
            "Correction"
        } else {
            ""
        };
        let (start, end) = times.window(e);
        let _ = write!(
            s,
            "{cost},{cost},{cost},{cost},{},{period_start},{period_end},{start},{end},Usage,{class},Usage-Based,",
            e.currency
        );
        field(
            &mut s,
            format_args!("{}@{} {}", e.rule_id, e.rule_version, e.unit),
        );
        let _ = write!(s, ",{},", e.quantity);
        text(&mut s, &e.unit);
        let _ = write!(s, ",{},", e.quantity);
        text(&mut s, &e.unit);
        let _ = write!(s, ",{},{},", e.unit_price, e.unit_price);
        text(&mut s, &e.resource_id);
        s.push(',');
        text(&mut s, &e.rule_id);
        s.push(',');
        field(&mut s, format_args!("{}@{}", e.rule_id, e.rule_version));
        s.push(',');
        text(&mut s, &e.entity_id);
        s.push_str(",meterflow,meterflow,meterflow,Compute\n");
    }
    s
}

pub fn csv(events: &[(i32, i64, RatedEvent)]) -> String {
    let mut s = String::from("id,entity_id,rule_id,rule_version,resource_id,window_start,window_end,unit,quantity,unit_price,amount,currency,amount_unrounded,adjustment\n");
    let mut times = Times::default();
    for (_, _, e) in events {
        s.push_str(&e.id);
        s.push(',');
        text(&mut s, &e.entity_id);
        s.push(',');
        text(&mut s, &e.rule_id);
        let _ = write!(s, ",{},", e.rule_version);
        text(&mut s, &e.resource_id);
        let (start, end) = times.window(e);
        for t in [",", start, ",", end, ","] {
            s.push_str(t);
        }
        text(&mut s, &e.unit);
        let _ = writeln!(
            s,
            ",{},{},{},{},{},{}",
            e.quantity,
            e.unit_price,
            rounded(e).fixed(minor_units(&e.currency)),
            e.currency,
            e.amount,
            e.adjustment
        );
    }
    s
}

/// `field` for a string: appended as it is when it needs no quotes (most do not), with
/// no formatting on the way.
fn text(s: &mut String, v: &str) {
    if v.contains([',', '"', '\n']) {
        field(s, v);
    } else {
        s.push_str(v);
    }
}

/// Append a CSV field: as it is, or quoted (quotes doubled) if it holds a comma, a
/// quote or a newline. Written in place: most fields need no quoting, and the lines
/// are the bulk of a settlement's encoding.
fn field(s: &mut String, v: impl std::fmt::Display) {
    let from = s.len();
    let _ = write!(s, "{v}");
    if s[from..].contains([',', '"', '\n']) {
        let quoted = format!("\"{}\"", s[from..].replace('"', "\"\""));
        s.truncate(from);
        s.push_str(&quoted);
    }
}

/// The RFC 3339 times of the lines' windows, each formatted once for a run of lines
/// with the same window (lines are sorted by window start).
#[derive(Default)]
struct Times {
    /// The last window and its start and end, formatted.
    last: Option<((Millis, Millis), String, String)>,
}

impl Times {
    fn window(&mut self, e: &RatedEvent) -> (&str, &str) {
        let window = (e.window_start, e.window_end);
        if self.last.as_ref().is_some_and(|last| last.0 != window) {
            self.last = None;
        }
        let (_, start, end) = self
            .last
            .get_or_insert_with(|| (window, fmt_rfc3339(window.0), fmt_rfc3339(window.1)));
        (start, end)
    }
}

fn parquet(events: &[(i32, i64, RatedEvent)]) -> Result<Vec<u8>> {
    let dec = || DataType::Decimal128(38, 9);
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("entity_id", DataType::Utf8, false),
        Field::new("rule_id", DataType::Utf8, false),
        Field::new("rule_version", DataType::Int32, false),
        Field::new("resource_id", DataType::Utf8, false),
        Field::new("window_start_ms", DataType::Int64, false),
        Field::new("window_end_ms", DataType::Int64, false),
        Field::new("unit", DataType::Utf8, false),
        Field::new("quantity", dec(), false),
        Field::new("unit_price", dec(), false),
        Field::new("amount", dec(), false),
        Field::new("currency", DataType::Utf8, false),
        Field::new("amount_unrounded", dec(), false),
        Field::new("adjustment", DataType::Boolean, false),
    ]));
    let ev: Vec<&RatedEvent> = events.iter().map(|(_, _, e)| e).collect();
    let s = |f: &dyn Fn(&RatedEvent) -> &str| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(ev.iter().map(|e| f(e))))
    };
    let d = |f: &dyn Fn(&RatedEvent) -> Dec| -> Result<ArrayRef> {
        Ok(Arc::new(
            Decimal128Array::from_iter_values(ev.iter().map(|e| f(e).raw()))
                .with_precision_and_scale(38, 9)?,
        ))
    };
    let cols: Vec<ArrayRef> = vec![
        s(&|e| &e.id),
        s(&|e| &e.entity_id),
        s(&|e| &e.rule_id),
        Arc::new(Int32Array::from_iter_values(
            ev.iter().map(|e| e.rule_version),
        )),
        s(&|e| &e.resource_id),
        Arc::new(Int64Array::from_iter_values(
            ev.iter().map(|e| e.window_start),
        )),
        Arc::new(Int64Array::from_iter_values(
            ev.iter().map(|e| e.window_end),
        )),
        s(&|e| &e.unit),
        d(&|e| e.quantity)?,
        d(&|e| e.unit_price)?,
        d(&|e| rounded(e))?,
        s(&|e| &e.currency),
        d(&|e| e.amount)?,
        Arc::new(BooleanArray::from(
            ev.iter().map(|e| e.adjustment).collect::<Vec<_>>(),
        )),
    ];
    let batch = RecordBatch::try_new(schema.clone(), cols)?;
    let mut buf = Vec::new();
    let props = WriterProperties::builder()
        .set_created_by("meterflow".into())
        .build();
    let mut w = ArrowWriter::try_new(&mut buf, schema, Some(props))?;
    w.write(&batch)?;
    w.close()?;
    Ok(buf)
}

/// A version ready to write: its data files (path, bytes), its manifest and the
/// manifest's path and bytes.
pub struct Version {
    pub manifest: Manifest,
    files: Vec<(String, Vec<u8>)>,
    manifest_file: (String, Vec<u8>),
}

/// Write a new version of an entity's settlement for a period. Events are sorted into
/// a canonical order first, so the same events always give the same bytes.
pub async fn write_version(
    store: &Store,
    period_label: &str,
    bounds: (Millis, Millis),
    entity: &str,
    events: Vec<(i32, i64, RatedEvent)>,
    opts: &VersionOpts,
) -> Result<Manifest> {
    let v = prepare_version(store, None, period_label, bounds, entity, events, opts).await?;
    let mut written = write_versions(store, vec![v]).await?;
    Ok(written.remove(0))
}

/// Write versions of different (period, entity) pairs together, side by side, each its
/// data files and then its manifest (`Store::put_sets`): a manifest exists only once the
/// files it lists are durable.
pub async fn write_versions(store: &Store, versions: Vec<Version>) -> Result<Vec<Manifest>> {
    let mut sets = Vec::with_capacity(versions.len());
    let mut out = Vec::with_capacity(versions.len());
    for v in versions {
        sets.push((v.files, v.manifest_file));
        out.push(v.manifest);
    }
    store.put_sets(sets).await?;
    Ok(out)
}

/// Encode a new version of an entity's settlement for a period, on a blocking thread:
/// the CSV and Parquet encoders of several versions run side by side. `version` is its
/// number when the caller knows how many versions the store holds (the settler read them
/// when the (period, entity) first came up); `None` reads the store for the next one.
pub async fn prepare_version(
    store: &Store,
    version: Option<u32>,
    period_label: &str,
    bounds: (Millis, Millis),
    entity: &str,
    events: Vec<(i32, i64, RatedEvent)>,
    opts: &VersionOpts,
) -> Result<Version> {
    let dir = entity_dir(period_label, entity);
    let version = match version {
        Some(v) => v,
        None => existing(store, &dir).await?.len() as u32 + 1,
    };
    let (label, entity, opts) = (period_label.to_string(), entity.to_string(), opts.clone());
    tokio::task::spawn_blocking(move || {
        encode_version(&dir, &label, bounds, &entity, version, events, &opts)
    })
    .await?
}

fn encode_version(
    dir: &str,
    period_label: &str,
    bounds: (Millis, Millis),
    entity: &str,
    version: u32,
    mut events: Vec<(i32, i64, RatedEvent)>,
    opts: &VersionOpts,
) -> Result<Version> {
    let focus = opts.focus;
    events.sort_by(|a, b| {
        (a.2.window_start, &a.2.rule_id, &a.2.resource_id, &a.2.id).cmp(&(
            b.2.window_start,
            &b.2.rule_id,
            &b.2.resource_id,
            &b.2.id,
        ))
    });
    let csv_bytes = csv(&events).into_bytes();
    let pq = parquet(&events)?;
    let focus_file = focus.then(|| {
        (
            version_name(version, "focus.csv"),
            focus_csv(&events, bounds, version > 1).into_bytes(),
        )
    });
    let csv_name = version_name(version, "lines.csv");
    let pq_name = version_name(version, "lines.parquet");
    let mut totals: BTreeMap<String, Dec> = BTreeMap::new();
    for (_, _, e) in &events {
        *totals.entry(e.currency.clone()).or_default() += rounded(e);
    }
    let mut offsets: BTreeMap<i32, [i64; 2]> = BTreeMap::new();
    for (p, o, _) in &events {
        let e = offsets.entry(*p).or_insert([*o, *o]);
        e[0] = e[0].min(*o);
        e[1] = e[1].max(*o);
    }
    let mut rules: Vec<String> = events
        .iter()
        .map(|(_, _, e)| format!("{}@{}", e.rule_id, e.rule_version))
        .collect();
    rules.sort();
    rules.dedup();
    let line_count = events.len();
    let manifest = Manifest {
        schema_version: SCHEMA_VERSION,
        generated_at: fmt_rfc3339(opts.generated_at),
        status: if opts.incomplete.is_some() {
            "incomplete".into()
        } else {
            complete()
        },
        reason: opts.incomplete.clone(),
        entity_id: entity.to_string(),
        period: period_label.to_string(),
        period_start: fmt_rfc3339(bounds.0),
        period_end: fmt_rfc3339(bounds.1),
        version,
        previous: (version > 1).then(|| version_name(version - 1, "manifest.json")),
        line_count,
        totals: totals
            .iter()
            .map(|(c, d)| (c.clone(), d.to_fixed(minor_units(c))))
            .collect(),
        files: [
            (csv_name.clone(), sha(&csv_bytes)),
            (pq_name.clone(), sha(&pq)),
        ]
        .into_iter()
        .chain(focus_file.iter().map(|(n, b)| (n.clone(), sha(b))))
        .collect(),
        rule_versions: rules,
        input_offsets: offsets,
        // the events are encoded: their ids move into the manifest
        ids: events.into_iter().map(|(_, _, e)| e.id).collect(),
    };
    let mut files = vec![
        (format!("{dir}/{csv_name}"), csv_bytes),
        (format!("{dir}/{pq_name}"), pq),
    ];
    files.extend(focus_file.map(|(name, bytes)| (format!("{dir}/{name}"), bytes)));
    let manifest_file = (
        format!("{dir}/{}", version_name(version, "manifest.json")),
        serde_json::to_vec_pretty(&manifest)?,
    );
    Ok(Version {
        manifest,
        files,
        manifest_file,
    })
}

/// Every manifest under a settlement root (all periods, entities, versions).
pub async fn manifests(store: &Store) -> Result<Vec<Manifest>> {
    let mut out = Vec::new();
    for p in store.dirs("").await? {
        if !p.starts_with("period=") {
            continue;
        }
        for e in store.dirs(&p).await? {
            out.extend(existing(store, &format!("{p}/{e}")).await?);
        }
    }
    Ok(out)
}

/// Every manifest under a local settlement directory, from synchronous code.
pub fn all_manifests(root: &Path) -> Result<Vec<Manifest>> {
    if !root.exists() {
        return Ok(Vec::new());
    }
    crate::store::blocking(manifests(&Store::local(root)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(id: &str, ws: Millis, amount: &str, adjustment: bool) -> (i32, i64, RatedEvent) {
        (
            0,
            ws,
            RatedEvent {
                id: id.into(),
                rule_id: "vcpu_hours".into(),
                rule_version: 2,
                entity_id: "acme, inc".into(),
                resource_id: String::new(),
                window_start: ws,
                window_end: ws + 3_600_000,
                unit: "vcpu_hour".into(),
                quantity: "2".parse().expect("dec"),
                unit_price: "0.036".parse().expect("dec"),
                amount: amount.parse().expect("dec"),
                currency: "USD".into(),
                adjustment,
                usage_records: 1,
                source_partition: 0,
            },
        )
    }

    /// The lines files of earlier builds, field by field through `format!` (a version
    /// regenerated by this build must have the same bytes and checksums).
    fn csv_as_before(events: &[(i32, i64, RatedEvent)]) -> String {
        let esc = |v: &str| {
            if v.contains([',', '"', '\n']) {
                format!("\"{}\"", v.replace('"', "\"\""))
            } else {
                v.to_string()
            }
        };
        let mut s = String::from("id,entity_id,rule_id,rule_version,resource_id,window_start,window_end,unit,quantity,unit_price,amount,currency,amount_unrounded,adjustment\n");
        for (_, _, e) in events {
            s.push_str(&format!(
                "{},{},{},{},{},{},{},{},{},{},{},{},{},{}\n",
                e.id,
                esc(&e.entity_id),
                esc(&e.rule_id),
                e.rule_version,
                esc(&e.resource_id),
                fmt_rfc3339(e.window_start),
                fmt_rfc3339(e.window_end),
                esc(&e.unit),
                e.quantity,
                e.unit_price,
                rounded(e).to_fixed(minor_units(&e.currency)),
                e.currency,
                e.amount,
                e.adjustment
            ));
        }
        s
    }

    fn focus_as_before(
        events: &[(i32, i64, RatedEvent)],
        period: (Millis, Millis),
        corr: bool,
    ) -> String {
        let esc = |v: &str| {
            if v.contains([',', '"', '\n']) {
                format!("\"{}\"", v.replace('"', "\"\""))
            } else {
                v.to_string()
            }
        };
        let mut s = focus_csv(&[], period, corr);
        for (_, _, e) in events {
            let cost = rounded(e).to_fixed(minor_units(&e.currency));
            let class = if e.adjustment || corr {
                "Correction"
            } else {
                ""
            };
            s.push_str(&format!(
                "{cost},{cost},{cost},{cost},{},{},{},{},{},Usage,{class},Usage-Based,{},{},{},{},{},{},{},{},{},{},{},meterflow,meterflow,meterflow,Compute\n",
                e.currency,
                fmt_rfc3339(period.0),
                fmt_rfc3339(period.1),
                fmt_rfc3339(e.window_start),
                fmt_rfc3339(e.window_end),
                esc(&format!("{}@{} {}", e.rule_id, e.rule_version, e.unit)),
                e.quantity,
                esc(&e.unit),
                e.quantity,
                esc(&e.unit),
                e.unit_price,
                e.unit_price,
                esc(&e.resource_id),
                esc(&e.rule_id),
                esc(&format!("{}@{}", e.rule_id, e.rule_version)),
                esc(&e.entity_id),
            ));
        }
        s
    }

    #[test]
    fn lines_files_have_the_bytes_of_earlier_builds() {
        let mut events = Vec::new();
        let names = [
            "plain",
            "a, comma",
            "a \"quote\"",
            "new\nline",
            "",
            "ünï,\"\n",
        ];
        for (i, name) in names.iter().enumerate() {
            for (j, amount) in ["0.072", "-0.0725", "1234567.125", "0", "-0.004"]
                .iter()
                .enumerate()
            {
                let (p, o, mut e) = ev(
                    &format!("id-{i}-{j}"),
                    (i as i64 % 3) * 3_600_000,
                    amount,
                    j % 2 == 1,
                );
                e.entity_id = (*name).into();
                e.rule_id = names[(i + 1) % names.len()].into();
                e.resource_id = names[(i + j) % names.len()].into();
                e.unit = names[(i + 2 * j) % names.len()].into();
                e.currency = ["USD", "JPY", "KWD"][j % 3].into();
                e.quantity = format!("{j}.5").parse().expect("dec");
                // a window of its own for some lines, shared by runs of others
                e.window_end = e.window_start + if j == 4 { 60_000 } else { 3_600_000 };
                events.push((p, o, e));
            }
        }
        events.sort_by(|a, b| (a.2.window_start, &a.2.id).cmp(&(b.2.window_start, &b.2.id)));
        assert_eq!(csv(&events), csv_as_before(&events));
        for corr in [false, true] {
            let period = (0, 86_400_000);
            assert_eq!(
                focus_csv(&events, period, corr),
                focus_as_before(&events, period, corr)
            );
        }
        // and the quoting itself, spelled out
        let at = events
            .iter()
            .position(|(_, _, e)| e.entity_id == "a, comma")
            .expect("a line of it");
        let line = csv(&events[at..=at]);
        let id = &events[at].2.id;
        assert!(
            line.lines()
                .nth(1)
                .expect("a line")
                .starts_with(&format!("{id},\"a, comma\",")),
            "{line}"
        );
    }

    #[tokio::test]
    async fn focus_export_is_listed_checksummed_and_sums_to_the_manifest() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = Store::local(dir.path()).expect("store");
        let events = vec![
            ev("a", 0, "0.072", false),
            ev("b", 3_600_000, "0.0725", false),
            ev("c", 0, "0.036", true),
        ];
        let opts = VersionOpts {
            focus: true,
            generated_at: 1_774_000_000_000,
            incomplete: Some("deadline passed".into()),
        };
        let m = write_version(
            &store,
            "p",
            (0, 86_400_000),
            "acme, inc",
            events.clone(),
            &opts,
        )
        .await
        .expect("written");
        assert_eq!(
            (m.status.as_str(), m.reason.as_deref()),
            ("incomplete", Some("deadline passed"))
        );
        let back = VersionOpts::of(&m).expect("opts");
        assert_eq!(
            (back.focus, back.generated_at, back.incomplete),
            (true, opts.generated_at, opts.incomplete.clone())
        );
        let d = dir.path().join(entity_dir("p", "acme, inc"));
        let focus = std::fs::read(d.join("focus.csv")).expect("focus.csv");
        assert_eq!(m.files.get("focus.csv"), Some(&sha(&focus)));
        let text = String::from_utf8(focus).expect("utf8");
        let mut lines = text.lines();
        let header: Vec<&str> = lines.next().expect("header").split(',').collect();
        assert_eq!(header.len(), 27);
        assert!(header.contains(&"BilledCost") && header.contains(&"SubAccountId"));
        let rows: Vec<&str> = lines.collect();
        assert_eq!(rows.len(), 3);
        // Σ BilledCost (first column) equals the manifest total, to the cent
        let billed = rows
            .iter()
            .map(|r| {
                r.split(',')
                    .next()
                    .expect("cost")
                    .parse::<Dec>()
                    .expect("dec")
            })
            .fold(Dec::ZERO, |a, b| a.checked_add(b).expect("sum"));
        assert_eq!(billed.to_fixed(2), m.totals["USD"]);
        assert_eq!(
            rows.iter().filter(|r| r.contains(",Correction,")).count(),
            1
        );
        assert!(rows[0].contains("\"acme, inc\""), "{}", rows[0]);
        // the same events give the same bytes
        let again = Store::open("memory://", &BTreeMap::new()).expect("memory");
        write_version(&again, "p", (0, 86_400_000), "acme, inc", events, &opts)
            .await
            .expect("again");
        assert_eq!(
            again
                .get(&format!("{}/focus.csv", entity_dir("p", "acme, inc")))
                .await
                .expect("get"),
            Some(text.into_bytes())
        );
    }

    #[tokio::test]
    async fn a_latest_version_cut_short_by_a_crash_is_written_again_and_an_earlier_one_is_an_error()
    {
        let dir = tempfile::tempdir().expect("tmp");
        let store = Store::local(dir.path()).expect("store");
        let opts = VersionOpts::default();
        let bounds = (0, 86_400_000);
        let v1 = write_version(
            &store,
            "d",
            bounds,
            "a",
            vec![ev("1", 0, "1", false)],
            &opts,
        )
        .await
        .expect("v1");
        let v2 = write_version(&store, "d", bounds, "a", vec![ev("2", 0, "2", true)], &opts)
            .await
            .expect("v2");
        assert_eq!((v1.version, v2.version), (1, 2));
        let ent = dir.path().join("period=d/entity=a");
        // a power loss after the rename, before the sync: empty, or cut mid-document
        for cut in [0, 40] {
            let f = ent.join("v2.manifest.json");
            let whole = std::fs::read(&f).expect("read");
            std::fs::write(&f, &whole[..cut]).expect("cut");
            let read = existing(&store, "period=d/entity=a").await.expect("read");
            assert_eq!(read, vec![v1.clone()], "cut at {cut}");
            // its input read again: the same version number, written over it
            let again = write_version(&store, "d", bounds, "a", vec![ev("2", 0, "2", true)], &opts)
                .await
                .expect("again");
            assert_eq!(again.version, 2);
            assert_eq!(
                existing(&store, "period=d/entity=a").await.expect("read"),
                vec![v1.clone(), again]
            );
        }
        // an earlier version unreadable is not a crash's doing: an error naming it
        let f = ent.join("manifest.json");
        let whole = std::fs::read(&f).expect("read");
        std::fs::write(&f, &whole[..whole.len() / 2]).expect("cut");
        let err = existing(&store, "period=d/entity=a")
            .await
            .expect_err("damaged");
        let msg = format!("{err:#}");
        assert!(
            msg.contains("manifest.json") && msg.contains("damaged"),
            "{msg}"
        );
    }
}
