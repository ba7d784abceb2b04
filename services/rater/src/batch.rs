//! Batch re-rating: the streaming rater's windows and rules applied to recorded usage
//! (Parquet, e.g. from `meterflow usage export`), for `meterflow rerate` and
//! `meterflow rules diff`.
//!
//! The same pieces, windows, duplicate rule and evaluation as the stream: usage is split
//! into the rule's panes pro rata (`split_usage`), a pane piece counts once in each window
//! it lies in (key: usage id, and pane when hopping), windows are per usage partition, and
//! each window is evaluated once with every piece it got. The revenue events are therefore
//! the stream's, id for id, for a run without late usage (tested end to end).
//!
//! Memory stays bounded by closing windows as the input moves on: per partition, a window
//! closes once usage ending `max_disorder` past its end has been read. Usage for a window
//! that already closed is an error that says so (the input is more out of order than
//! `max_disorder`), never a silently different result.

use crate::rules::{usage_schema, Engine};
use crate::{id_key, split_usage};
use anyhow::{bail, Context, Result};
use datafusion::arrow::array::{
    Array, ArrayRef, BooleanArray, Decimal128Array, Decimal128Builder, Int32Array, Int32Builder,
    Int64Array, MapArray, MapBuilder, RecordBatch, StringArray, StringBuilder,
    TimestampMillisecondArray, TimestampMillisecondBuilder,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use datafusion::parquet::arrow::{ArrowWriter, ProjectionMask};
use datafusion::parquet::file::properties::WriterProperties;
use meterflow_types::watermark::SourceTimes;
use meterflow_types::window::Tumbling;
use meterflow_types::{Dec, Labels, Millis, RatedEvent, Usage, Watermark};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::todate::QUANTITIES;

/// Recorded usage as Parquet: the usage partition it was on, then the `Usage` fields.
pub fn usage_file_schema() -> SchemaRef {
    let dec = || DataType::Decimal128(38, 9);
    let ts = || DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()));
    let labels = usage_schema()
        .field_with_name("labels")
        .map(|f| f.data_type().clone())
        .unwrap_or(DataType::Null);
    let mut fields = vec![
        Field::new("partition", DataType::Int32, false),
        Field::new("id", DataType::Utf8, false),
        Field::new("sample_id", DataType::Utf8, false),
        Field::new("instance_id", DataType::Utf8, false),
        Field::new("entity_id", DataType::Utf8, false),
        Field::new("user_id", DataType::Utf8, false),
        Field::new("project", DataType::Utf8, true),
        Field::new("node_id", DataType::Utf8, false),
        Field::new("site", DataType::Utf8, false),
        Field::new("kind", DataType::Utf8, false),
        Field::new("flavor", DataType::Utf8, true),
        Field::new("interval_start", ts(), false),
        Field::new("interval_end", ts(), false),
    ];
    for q in QUANTITIES {
        fields.push(Field::new(q, dec(), q == "memory_used_byte_seconds"));
    }
    fields.push(Field::new("labels", labels, false));
    // a watermark marker row (the enricher's progress, in its place in the partition):
    // these set, the usage columns empty
    fields.push(Field::new("marker_source_partition", DataType::Int32, true));
    fields.push(Field::new(
        "marker_source_partitions",
        DataType::Int32,
        true,
    ));
    fields.push(Field::new("marker_time", ts(), true));
    Arc::new(Schema::new(fields))
}

/// One row of a usage file: a usage record or a watermark marker, with its partition.
/// (Usage rows vastly outnumber markers and are consumed at once.)
#[derive(Clone, Debug, PartialEq)]
#[allow(clippy::large_enum_variant)]
pub enum Row {
    Usage(i32, Usage),
    Marker(i32, Watermark),
}

/// A usage record with every field empty (marker rows, tests).
pub(crate) fn empty_usage() -> Usage {
    Usage {
        id: String::new(),
        sample_id: String::new(),
        instance_id: String::new(),
        entity_id: String::new(),
        user_id: String::new(),
        project: None,
        node_id: String::new(),
        site: String::new(),
        kind: String::new(),
        flavor: None,
        interval_start: 0,
        interval_end: 0,
        vcpu_seconds: Dec::ZERO,
        cpu_seconds: Dec::ZERO,
        memory_byte_seconds: Dec::ZERO,
        memory_used_byte_seconds: None,
        net_rx_bytes: Dec::ZERO,
        net_tx_bytes: Dec::ZERO,
        disk_read_bytes: Dec::ZERO,
        disk_write_bytes: Dec::ZERO,
        labels: Labels::new(),
    }
}

/// Rows of recorded usage as one batch of `usage_file_schema()`.
pub fn usage_file_batch(rows: &[Row]) -> Result<RecordBatch> {
    let n = rows.len();
    let blank = empty_usage();
    let mut m_src = Int32Builder::with_capacity(n);
    let mut m_srcs = Int32Builder::with_capacity(n);
    let mut m_time = TimestampMillisecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut part = Int32Builder::with_capacity(n);
    let mut strings: Vec<StringBuilder> = (0..10).map(|_| StringBuilder::new()).collect();
    let mut ts: Vec<TimestampMillisecondBuilder> = (0..2)
        .map(|_| TimestampMillisecondBuilder::with_capacity(n).with_timezone("UTC"))
        .collect();
    let mut decs = (0..8)
        .map(|_| Decimal128Builder::with_capacity(n).with_precision_and_scale(38, 9))
        .collect::<Result<Vec<_>, _>>()?;
    let mut labels = MapBuilder::new(None, StringBuilder::new(), StringBuilder::new());
    for row in rows {
        let (p, u) = match row {
            Row::Usage(p, u) => {
                m_src.append_null();
                m_srcs.append_null();
                m_time.append_null();
                (p, u)
            }
            Row::Marker(p, w) => {
                m_src.append_value(w.source_partition);
                m_srcs.append_value(w.source_partitions);
                m_time.append_value(w.time);
                (p, &blank)
            }
        };
        part.append_value(*p);
        let texts: [Option<&str>; 10] = [
            Some(&u.id),
            Some(&u.sample_id),
            Some(&u.instance_id),
            Some(&u.entity_id),
            Some(&u.user_id),
            u.project.as_deref(),
            Some(&u.node_id),
            Some(&u.site),
            Some(&u.kind),
            u.flavor.as_deref(),
        ];
        for (b, v) in strings.iter_mut().zip(texts) {
            b.append_option(v);
        }
        ts[0].append_value(u.interval_start);
        ts[1].append_value(u.interval_end);
        let qs = [
            Some(u.vcpu_seconds),
            Some(u.cpu_seconds),
            Some(u.memory_byte_seconds),
            u.memory_used_byte_seconds,
            Some(u.net_rx_bytes),
            Some(u.net_tx_bytes),
            Some(u.disk_read_bytes),
            Some(u.disk_write_bytes),
        ];
        for (b, q) in decs.iter_mut().zip(qs) {
            b.append_option(q.map(Dec::raw));
        }
        for (k, v) in &u.labels {
            labels.keys().append_value(k);
            labels.values().append_value(v);
        }
        labels.append(true)?;
    }
    let mut cols: Vec<ArrayRef> = vec![Arc::new(part.finish())];
    cols.extend(strings.iter_mut().map(|b| Arc::new(b.finish()) as ArrayRef));
    cols.extend(ts.iter_mut().map(|b| Arc::new(b.finish()) as ArrayRef));
    cols.extend(decs.iter_mut().map(|b| Arc::new(b.finish()) as ArrayRef));
    cols.push(Arc::new(labels.finish()));
    cols.push(Arc::new(m_src.finish()));
    cols.push(Arc::new(m_srcs.finish()));
    cols.push(Arc::new(m_time.finish()));
    Ok(RecordBatch::try_new(usage_file_schema(), cols)?)
}

/// Writes recorded usage to a Parquet file, a row group every 128k rows.
pub struct UsageWriter {
    w: ArrowWriter<std::fs::File>,
    pending: Vec<Row>,
    pub rows: u64,
}

impl UsageWriter {
    pub fn create(path: &Path) -> Result<UsageWriter> {
        let f = std::fs::File::create(path).with_context(|| format!("{}", path.display()))?;
        let props = WriterProperties::builder()
            .set_created_by("meterflow".into())
            .build();
        Ok(UsageWriter {
            w: ArrowWriter::try_new(f, usage_file_schema(), Some(props))?,
            pending: Vec::new(),
            rows: 0,
        })
    }
    pub fn push(&mut self, row: Row) -> Result<()> {
        if matches!(row, Row::Usage(..)) {
            self.rows += 1;
        }
        self.pending.push(row);
        if self.pending.len() >= 128 * 1024 {
            self.flush()?;
        }
        Ok(())
    }
    fn flush(&mut self) -> Result<()> {
        if !self.pending.is_empty() {
            let b = usage_file_batch(&self.pending)?;
            self.w.write(&b)?;
            self.pending.clear();
        }
        Ok(())
    }
    pub fn finish(mut self) -> Result<u64> {
        self.flush()?;
        self.w.close()?;
        Ok(self.rows)
    }
}

/// The Parquet files named: files as they are, directories for their `*.parquet`.
pub fn usage_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("{}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.extension().is_some_and(|x| x == "parquet"))
                .collect();
            v.sort();
            out.extend(v);
        } else {
            out.push(p.clone());
        }
    }
    if out.is_empty() {
        bail!("no usage files in {paths:?}");
    }
    Ok(out)
}

/// Rows in a set of usage files (from their footers).
pub fn count_rows(files: &[PathBuf]) -> Result<u64> {
    let mut n = 0;
    for f in files {
        let b = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(f)?)?;
        n += b.metadata().file_metadata().num_rows() as u64;
    }
    Ok(n)
}

fn col<'a, T: 'static>(b: &'a RecordBatch, name: &str) -> Option<&'a T> {
    b.column_by_name(name)?.as_any().downcast_ref::<T>()
}

/// Decode one batch of a usage file into records; only the columns present are filled
/// (a reader projects the columns its rules read), the rest stay empty.
pub fn usage_rows(b: &RecordBatch, file: &Path) -> Result<Vec<Row>> {
    let bad = |what: &str| anyhow::anyhow!("{}: column {what} missing or mistyped", file.display());
    let part = col::<Int32Array>(b, "partition");
    let text = |name: &str| col::<StringArray>(b, name);
    let id = text("id").ok_or_else(|| bad("id"))?;
    let entity = text("entity_id").ok_or_else(|| bad("entity_id"))?;
    let start = col::<TimestampMillisecondArray>(b, "interval_start")
        .ok_or_else(|| bad("interval_start"))?;
    let end =
        col::<TimestampMillisecondArray>(b, "interval_end").ok_or_else(|| bad("interval_end"))?;
    let others: Vec<Option<&StringArray>> = [
        "sample_id",
        "instance_id",
        "user_id",
        "project",
        "node_id",
        "site",
        "kind",
        "flavor",
    ]
    .iter()
    .map(|n| text(n))
    .collect();
    let qs: Vec<Option<&Decimal128Array>> = QUANTITIES
        .iter()
        .map(|n| col::<Decimal128Array>(b, n))
        .collect();
    for (q, a) in QUANTITIES.iter().zip(&qs) {
        if let Some(a) = a {
            if a.scale() != 9 {
                bail!(
                    "{}: column {q} has scale {}, not 9",
                    file.display(),
                    a.scale()
                );
            }
        }
    }
    let labels = col::<MapArray>(b, "labels");
    let m_src = col::<Int32Array>(b, "marker_source_partition");
    let m_srcs = col::<Int32Array>(b, "marker_source_partitions");
    let m_time = col::<TimestampMillisecondArray>(b, "marker_time");
    let get = |a: Option<&StringArray>, i: usize| -> Option<String> {
        a.filter(|a| !a.is_null(i)).map(|a| a.value(i).to_string())
    };
    let dec = |k: usize, i: usize| -> Option<Dec> {
        qs[k]
            .filter(|a| !a.is_null(i))
            .map(|a| Dec::from_raw(a.value(i)))
    };
    let mut out = Vec::with_capacity(b.num_rows());
    for i in 0..b.num_rows() {
        let p = part.map_or(0, |p| p.value(i));
        if let (Some(s), Some(n), Some(t)) = (m_src, m_srcs, m_time) {
            if !t.is_null(i) {
                out.push(Row::Marker(
                    p,
                    Watermark {
                        stage: "enricher".into(),
                        source_partition: s.value(i),
                        source_partitions: n.value(i),
                        time: t.value(i),
                    },
                ));
                continue;
            }
        }
        let mut l = Labels::new();
        if let Some(m) = labels {
            let e = m.value(i);
            if let (Some(k), Some(v)) = (
                e.column(0).as_any().downcast_ref::<StringArray>(),
                e.column(1).as_any().downcast_ref::<StringArray>(),
            ) {
                for j in 0..k.len() {
                    l.insert(k.value(j).to_string(), v.value(j).to_string());
                }
            }
        }
        out.push(Row::Usage(
            p,
            Usage {
                id: id.value(i).to_string(),
                sample_id: get(others[0], i).unwrap_or_default(),
                instance_id: get(others[1], i).unwrap_or_default(),
                entity_id: entity.value(i).to_string(),
                user_id: get(others[2], i).unwrap_or_default(),
                project: get(others[3], i),
                node_id: get(others[4], i).unwrap_or_default(),
                site: get(others[5], i).unwrap_or_default(),
                kind: get(others[6], i).unwrap_or_default(),
                flavor: get(others[7], i),
                interval_start: start.value(i),
                interval_end: end.value(i),
                vcpu_seconds: dec(0, i).unwrap_or(Dec::ZERO),
                cpu_seconds: dec(1, i).unwrap_or(Dec::ZERO),
                memory_byte_seconds: dec(2, i).unwrap_or(Dec::ZERO),
                memory_used_byte_seconds: dec(3, i),
                net_rx_bytes: dec(4, i).unwrap_or(Dec::ZERO),
                net_tx_bytes: dec(5, i).unwrap_or(Dec::ZERO),
                disk_read_bytes: dec(6, i).unwrap_or(Dec::ZERO),
                disk_write_bytes: dec(7, i).unwrap_or(Dec::ZERO),
                labels: l,
            },
        ));
    }
    Ok(out)
}

/// The usage-file columns the engine's rules read, plus those every window needs.
pub fn needed_columns(engine: &Engine) -> Vec<String> {
    let schema = usage_schema();
    let mut v: Vec<String> = [
        "partition",
        "id",
        "entity_id",
        "interval_start",
        "interval_end",
        "marker_source_partition",
        "marker_source_partitions",
        "marker_time",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for r in &engine.rules {
        for &c in r.columns() {
            let name = schema.field(c).name();
            if name != "window_start" && name != "window_end" && !v.contains(name) {
                v.push(name.clone());
            }
        }
    }
    v
}

/// Whether any of the files holds watermark markers (a recorded usage topic).
pub fn has_markers(files: &[PathBuf]) -> Result<bool> {
    for f in files {
        for b in read_usage_file(f, &["marker_time".to_string()])? {
            let b = b?;
            if let Some(t) = b.column_by_name("marker_time") {
                if t.null_count() < t.len() {
                    return Ok(true);
                }
            }
        }
    }
    Ok(false)
}

/// Read a usage file batch by batch, only `columns` (all if empty).
pub fn read_usage_file(
    path: &Path,
    columns: &[String],
) -> Result<impl Iterator<Item = Result<RecordBatch>>> {
    let f = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
    let b = ParquetRecordBatchReaderBuilder::try_new(f)?;
    let b = if columns.is_empty() {
        b
    } else {
        let schema = b.schema().clone();
        let idx: Vec<usize> = columns
            .iter()
            .filter_map(|c| schema.index_of(c).ok())
            .collect();
        let mask = ProjectionMask::roots(b.parquet_schema(), idx);
        b.with_projection(mask)
    };
    let r = b.with_batch_size(64 * 1024).build()?;
    Ok(r.map(|b| b.map_err(anyhow::Error::from)))
}

/// Hashes (usage id key, pane) pairs: the ids are already uniformly spread (derived
/// hashes), so folding them is enough and much cheaper than SipHash on 43M rows.
#[derive(Default)]
struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ *b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    fn write_u128(&mut self, v: u128) {
        self.0 ^= (v as u64) ^ ((v >> 64) as u64);
        self.0 = self.0.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    fn write_i64(&mut self, v: i64) {
        self.0 ^= v as u64;
        self.0 = self.0.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type Keys = HashSet<(u128, Millis), std::hash::BuildHasherDefault<KeyHasher>>;

#[derive(Default)]
struct Win {
    rows: Vec<Arc<Usage>>,
    keys: Keys,
}

#[derive(Default)]
struct Part {
    /// Open windows per rule.
    windows: Vec<BTreeMap<Millis, Win>>,
    /// Keys of recently closed windows per rule, as the stream keeps them.
    closed_keys: Vec<BTreeMap<Millis, Keys>>,
    /// Latest marker per source partition (a recorded topic).
    sources: SourceTimes,
    /// Without markers: every window ending at or before this has been priced.
    closed_through: Millis,
    /// Latest interval end read.
    max_end: Millis,
    /// The earliest end of an open window (no window can close before it).
    next_due: Millis,
    /// Period-to-date usage per rule (rules reading `usage_to_date`).
    to_date: Vec<crate::todate::ToDate>,
}

/// Batch re-rating state: feed rows with `push`, then `finish`.
///
/// With watermark markers in the input (a recorded usage topic), windows close exactly as
/// the stream closes them — when the minimum over source partitions passes end +
/// lateness — and later usage becomes adjustments, as in the stream. Without markers a
/// window closes once the input is `max_disorder` past its end, and usage for a window
/// already priced is an error.
pub struct Rerate<'a> {
    engine: &'a Engine,
    /// The billing period `usage_to_date` counts within.
    period: meterflow_types::window::Period,
    /// The input carries watermark markers (a recorded topic): windows close as in the
    /// stream, never before a marker says so.
    marked: bool,
    max_disorder: Millis,
    dedup_horizon: Millis,
    parts: HashMap<i32, Part>,
    panes: Vec<Tumbling>,
    /// Scratch: one record's pieces per distinct pane size.
    split: Vec<(Tumbling, crate::Pieces)>,
    keep_labels: bool,
    /// Revenue events of windows closed so far (taken with `take_events`).
    events: Vec<RatedEvent>,
    /// Usage records read and duplicates dropped.
    pub usage: u64,
    pub duplicates: u64,
}

impl<'a> Rerate<'a> {
    pub fn new(
        engine: &'a Engine,
        period: meterflow_types::window::Period,
        marked: bool,
        max_disorder: Millis,
        dedup_horizon: Millis,
    ) -> Rerate<'a> {
        Rerate {
            engine,
            period,
            marked,
            max_disorder,
            dedup_horizon,
            parts: HashMap::new(),
            panes: engine
                .rules
                .iter()
                .map(|r| Tumbling::new(r.source.header.slide))
                .collect(),
            split: Vec::new(),
            keep_labels: engine.rules.iter().any(|r| r.reads_labels()),
            events: Vec::new(),
            usage: 0,
            duplicates: 0,
        }
    }

    pub async fn push(&mut self, row: Row) -> Result<()> {
        match row {
            Row::Usage(p, u) => self.push_usage(p, u).await,
            Row::Marker(p, w) => {
                let part = self.part(p);
                part.sources.observe(
                    w.source_partition as usize,
                    w.source_partitions as usize,
                    w.time,
                );
                match part.sources.min() {
                    Some(wm) => self.close(p, Close::Watermark(wm)).await,
                    None => Ok(()),
                }
            }
        }
    }

    fn part(&mut self, partition: i32) -> &mut Part {
        new_part(&mut self.parts, self.engine.rules.len(), partition)
    }

    async fn push_usage(&mut self, partition: i32, mut u: Usage) -> Result<()> {
        self.usage += 1;
        if !self.keep_labels {
            u.labels.clear();
        }
        let Rerate {
            engine,
            marked,
            max_disorder,
            parts,
            panes,
            split,
            ..
        } = self;
        let engine: &Engine = engine;
        let nrules = engine.rules.len();
        let part = new_part(parts, nrules, partition);
        let wm = if *marked { part.sources.min() } else { None };
        let key = id_key(&u.id);
        let (start, end) = (u.interval_start, u.interval_end);
        let whole = Arc::new(u);
        let mut late: Vec<(usize, Millis, Arc<Usage>, String)> = Vec::new();
        let mut duplicates = 0;
        split.clear();
        for (r, &pane) in panes.iter().enumerate().take(nrules) {
            if !split.iter().any(|(w, _)| *w == pane) {
                // a record inside one pane is shared as it is; others are split pro rata
                let one = end <= start || pane.start_of(start) == pane.start_of(end - 1);
                let pieces = if one {
                    vec![(pane.start_of(start), whole.clone())]
                } else {
                    split_usage(&whole, pane)
                        .into_iter()
                        .map(|(ws, p)| (ws, Arc::new(p)))
                        .collect()
                };
                split.push((pane, pieces));
            }
            let Some((_, pieces)) = split.iter().find(|(w, _)| *w == pane) else {
                continue;
            };
            let header = &engine.rules[r].source.header;
            let hops = header.hops();
            for (ps, piece) in pieces {
                let k = (key, if hops == 1 { 0 } else { *ps });
                for j in 0..hops {
                    let ws = ps - j * pane.size;
                    if !header.applies(ws) {
                        continue;
                    }
                    let w_end = ws.saturating_add(header.window);
                    if *marked {
                        if wm.is_some_and(|wm| w_end.saturating_add(header.lateness) <= wm) {
                            // the stream had closed this window: a duplicate, or an adjustment
                            if !part.closed_keys[r].entry(ws).or_default().insert(k) {
                                duplicates += 1;
                                continue;
                            }
                            let of = if hops == 1 {
                                whole.id.clone()
                            } else {
                                format!("{}@{ps}", whole.id)
                            };
                            late.push((r, ws, piece.clone(), of));
                            continue;
                        }
                    } else if w_end <= part.closed_through {
                        bail!(
                            "usage {} (partition {partition}, {start}..{end}) belongs to a window of rule {} that was already priced: the input is more out of order than --max-disorder ({max_disorder} ms)",
                            whole.id,
                            header.name,
                        );
                    }
                    let win = part.windows[r].entry(ws).or_insert_with(|| {
                        part.next_due = part.next_due.min(w_end);
                        Win::default()
                    });
                    if win.keys.insert(k) {
                        win.rows.push(piece.clone());
                    } else {
                        duplicates += 1;
                    }
                }
            }
        }
        part.max_end = part.max_end.max(end);
        let through = part.max_end.saturating_sub(*max_disorder);
        let due = !*marked && through >= part.next_due;
        self.duplicates += duplicates;
        for (r, ws, piece, of) in late {
            let to_date = if engine.rules[r].reads_to_date {
                let ps = self.period.bounds(ws).0;
                let t = &self.parts[&partition].to_date[r];
                vec![(piece.entity_id.clone(), t.current(ps, &piece.entity_id))]
            } else {
                Vec::new()
            };
            let ev = engine
                .evaluate_with(r, ws, &[piece.as_ref()], partition, Some(&of), &to_date)
                .await
                .with_context(|| format!("adjustment for window {ws} of partition {partition}"))?;
            self.events.extend(ev);
        }
        if due {
            self.close(partition, Close::Through(through)).await?;
        }
        Ok(())
    }

    /// Evaluate and drop the windows of `partition` that are due.
    async fn close(&mut self, partition: i32, how: Close) -> Result<()> {
        let engine = self.engine;
        let horizon = self.dedup_horizon;
        let marked = self.marked;
        let Some(part) = self.parts.get_mut(&partition) else {
            return Ok(());
        };
        for r in 0..engine.rules.len() {
            let h = &engine.rules[r].source.header;
            let due: Vec<Millis> = part.windows[r]
                .keys()
                .copied()
                .filter(|ws| {
                    let end = ws.saturating_add(h.window);
                    match how {
                        Close::Watermark(wm) => end.saturating_add(h.lateness) <= wm,
                        Close::Through(t) => end <= t,
                    }
                })
                .collect();
            for ws in due {
                let Some(win) = part.windows[r].remove(&ws) else {
                    continue;
                };
                let rows: Vec<&Usage> = win.rows.iter().map(|u| u.as_ref()).collect();
                let to_date = if engine.rules[r].reads_to_date {
                    let ps = self.period.bounds(ws).0;
                    part.to_date[r].prune(self.period.bounds(ps - 1).0);
                    part.to_date[r].close_window(ps, ws, &rows)?
                } else {
                    Vec::new()
                };
                let ev = engine
                    .evaluate_with(r, ws, &rows, partition, None, &to_date)
                    .await
                    .with_context(|| format!("window {ws} of partition {partition}"))?;
                self.events.extend(ev);
                if marked {
                    part.closed_keys[r].insert(ws, win.keys);
                    let newest = part.closed_keys[r]
                        .keys()
                        .next_back()
                        .copied()
                        .unwrap_or(ws);
                    part.closed_keys[r].retain(|k, _| *k >= newest - horizon);
                }
            }
        }
        if let Close::Through(t) = how {
            part.closed_through = part.closed_through.max(t);
        }
        part.next_due = (0..engine.rules.len())
            .filter_map(|r| {
                let size = engine.rules[r].source.header.window;
                part.windows[r]
                    .keys()
                    .next()
                    .map(|ws| ws.saturating_add(size))
            })
            .min()
            .unwrap_or(Millis::MAX);
        Ok(())
    }

    /// Events of the windows closed so far.
    pub fn take_events(&mut self) -> Vec<RatedEvent> {
        std::mem::take(&mut self.events)
    }

    /// Close every remaining window (all input is read) and return the last events, the
    /// usage records read and the duplicates dropped.
    pub async fn finish(mut self) -> Result<(Vec<RatedEvent>, u64, u64)> {
        let parts: Vec<i32> = self.parts.keys().copied().collect();
        for p in parts {
            self.close(p, Close::Through(Millis::MAX)).await?;
        }
        Ok((self.events, self.usage, self.duplicates))
    }
}

fn new_part(parts: &mut HashMap<i32, Part>, nrules: usize, partition: i32) -> &mut Part {
    parts.entry(partition).or_insert_with(|| Part {
        windows: (0..nrules).map(|_| BTreeMap::new()).collect(),
        closed_keys: (0..nrules).map(|_| BTreeMap::new()).collect(),
        closed_through: Millis::MIN,
        max_end: Millis::MIN,
        next_due: Millis::MAX,
        to_date: (0..nrules).map(|_| Default::default()).collect(),
        ..Default::default()
    })
}

#[derive(Clone, Copy)]
enum Close {
    /// Windows whose end + lateness the watermark has passed.
    Watermark(Millis),
    /// Windows ending at or before this.
    Through(Millis),
}

/// Re-rate usage files: every row through `Rerate`, events handed to `on_events` as
/// windows close, `on_rows` told how many rows were read. With several engines (one per
/// core), usage partitions are spread over worker threads — partitions are independent
/// in the stream too — while this thread decodes the files. Returns (usage records read,
/// duplicates dropped).
pub fn rerate_files(
    engines: &[Engine],
    period: meterflow_types::window::Period,
    files: &[PathBuf],
    max_disorder: Millis,
    dedup_horizon: Millis,
    mut on_rows: impl FnMut(u64),
    mut on_events: impl FnMut(&[RatedEvent]) -> Result<()>,
) -> Result<(u64, u64)> {
    let first = engines.first().context("no engine")?;
    let marked = has_markers(files)?;
    let cols = needed_columns(first);
    let n = engines.len();
    std::thread::scope(|sc| -> Result<(u64, u64)> {
        let (ev_tx, ev_rx) = std::sync::mpsc::channel::<Vec<RatedEvent>>();
        let mut row_txs = Vec::with_capacity(n);
        let mut workers = Vec::with_capacity(n);
        for engine in engines {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Row>>(4);
            row_txs.push(tx);
            let ev_tx = ev_tx.clone();
            workers.push(sc.spawn(move || -> Result<(u64, u64)> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(async {
                    let mut r = Rerate::new(engine, period, marked, max_disorder, dedup_horizon);
                    for rows in rx {
                        for row in rows {
                            r.push(row).await?;
                        }
                        let _ = ev_tx.send(r.take_events());
                    }
                    let (ev, usage, dups) = r.finish().await?;
                    let _ = ev_tx.send(ev);
                    Ok((usage, dups))
                })
            }));
        }
        drop(ev_tx);
        let mut fed: Result<()> = Ok(());
        'files: for f in files {
            let batches = match read_usage_file(f, &cols) {
                Ok(b) => b,
                Err(e) => {
                    fed = Err(e);
                    break;
                }
            };
            for b in batches {
                let rows = match b.and_then(|b| usage_rows(&b, f)) {
                    Ok(r) => r,
                    Err(e) => {
                        fed = Err(e);
                        break 'files;
                    }
                };
                let count = rows.len() as u64;
                let mut per: Vec<Vec<Row>> = (0..n).map(|_| Vec::new()).collect();
                for row in rows {
                    let p = match &row {
                        Row::Usage(p, _) | Row::Marker(p, _) => *p,
                    };
                    per[p.rem_euclid(n as i32) as usize].push(row);
                }
                for (tx, rows) in row_txs.iter().zip(per) {
                    if !rows.is_empty() && tx.send(rows).is_err() {
                        break 'files; // a worker failed: its error is reported below
                    }
                }
                while let Ok(ev) = ev_rx.try_recv() {
                    if let Err(e) = on_events(&ev) {
                        fed = Err(e);
                        break 'files;
                    }
                }
                on_rows(count);
            }
        }
        drop(row_txs);
        let mut totals = (0, 0);
        let mut failed = None;
        for w in workers {
            match w.join() {
                Ok(Ok((u, d))) => {
                    totals.0 += u;
                    totals.1 += d;
                }
                Ok(Err(e)) => failed = Some(e),
                Err(_) => failed = Some(anyhow::anyhow!("a re-rating worker panicked")),
            }
        }
        for ev in ev_rx.try_iter() {
            if fed.is_ok() {
                fed = on_events(&ev);
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
        fed?;
        Ok(totals)
    })
}

/// The revenue-event contract as Parquet columns (one per `RatedEvent` field).
pub fn rated_schema() -> SchemaRef {
    let dec = || DataType::Decimal128(38, 9);
    let ts = || DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()));
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("rule_id", DataType::Utf8, false),
        Field::new("rule_version", DataType::Int32, false),
        Field::new("entity_id", DataType::Utf8, false),
        Field::new("resource_id", DataType::Utf8, false),
        Field::new("window_start", ts(), false),
        Field::new("window_end", ts(), false),
        Field::new("unit", DataType::Utf8, false),
        Field::new("quantity", dec(), false),
        Field::new("unit_price", dec(), false),
        Field::new("amount", dec(), false),
        Field::new("currency", DataType::Utf8, false),
        Field::new("adjustment", DataType::Boolean, false),
        Field::new("usage_records", DataType::Int64, false),
        Field::new("source_partition", DataType::Int32, false),
    ]))
}

/// Revenue events as one batch of `rated_schema()`.
pub fn rated_batch(ev: &[RatedEvent]) -> Result<RecordBatch> {
    let s = |f: &dyn Fn(&RatedEvent) -> &str| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(ev.iter().map(f)))
    };
    let t = |f: &dyn Fn(&RatedEvent) -> Millis| -> ArrayRef {
        Arc::new(TimestampMillisecondArray::from_iter_values(ev.iter().map(f)).with_timezone("UTC"))
    };
    let d = |f: &dyn Fn(&RatedEvent) -> Dec| -> Result<ArrayRef> {
        Ok(Arc::new(
            Decimal128Array::from_iter_values(ev.iter().map(|e| f(e).raw()))
                .with_precision_and_scale(38, 9)?,
        ))
    };
    let cols: Vec<ArrayRef> = vec![
        s(&|e| &e.id),
        s(&|e| &e.rule_id),
        Arc::new(Int32Array::from_iter_values(
            ev.iter().map(|e| e.rule_version),
        )),
        s(&|e| &e.entity_id),
        s(&|e| &e.resource_id),
        t(&|e| e.window_start),
        t(&|e| e.window_end),
        s(&|e| &e.unit),
        d(&|e| e.quantity)?,
        d(&|e| e.unit_price)?,
        d(&|e| e.amount)?,
        s(&|e| &e.currency),
        Arc::new(BooleanArray::from(
            ev.iter().map(|e| e.adjustment).collect::<Vec<_>>(),
        )),
        Arc::new(Int64Array::from_iter_values(
            ev.iter().map(|e| e.usage_records),
        )),
        Arc::new(Int32Array::from_iter_values(
            ev.iter().map(|e| e.source_partition),
        )),
    ];
    Ok(RecordBatch::try_new(rated_schema(), cols)?)
}

/// Read revenue events back from a file written with `rated_batch`.
pub fn read_rated(path: &Path) -> Result<Vec<RatedEvent>> {
    let mut out = Vec::new();
    for b in read_usage_file(path, &[])? {
        let b = b?;
        let bad = |n: &str| anyhow::anyhow!("{}: column {n}", path.display());
        let s = |n: &str| col::<StringArray>(&b, n).ok_or_else(|| bad(n));
        let t = |n: &str| col::<TimestampMillisecondArray>(&b, n).ok_or_else(|| bad(n));
        let d = |n: &str| col::<Decimal128Array>(&b, n).ok_or_else(|| bad(n));
        let i32s = |n: &str| col::<Int32Array>(&b, n).ok_or_else(|| bad(n));
        let (id, rule, ent, res, unit, cur) = (
            s("id")?,
            s("rule_id")?,
            s("entity_id")?,
            s("resource_id")?,
            s("unit")?,
            s("currency")?,
        );
        let (ver, part) = (i32s("rule_version")?, i32s("source_partition")?);
        let (ws, we) = (t("window_start")?, t("window_end")?);
        let (q, p, a) = (d("quantity")?, d("unit_price")?, d("amount")?);
        let adj = col::<BooleanArray>(&b, "adjustment").ok_or_else(|| bad("adjustment"))?;
        let n = col::<Int64Array>(&b, "usage_records").ok_or_else(|| bad("usage_records"))?;
        for i in 0..b.num_rows() {
            out.push(RatedEvent {
                id: id.value(i).into(),
                rule_id: rule.value(i).into(),
                rule_version: ver.value(i),
                entity_id: ent.value(i).into(),
                resource_id: res.value(i).into(),
                window_start: ws.value(i),
                window_end: we.value(i),
                unit: unit.value(i).into(),
                quantity: Dec::from_raw(q.value(i)),
                unit_price: Dec::from_raw(p.value(i)),
                amount: Dec::from_raw(a.value(i)),
                currency: cur.value(i).into(),
                adjustment: adj.value(i),
                usage_records: n.value(i),
                source_partition: part.value(i),
            });
        }
    }
    Ok(out)
}

/// Writes revenue events to a Parquet file as they come.
pub struct RatedWriter {
    w: ArrowWriter<std::fs::File>,
    pub events: u64,
}

impl RatedWriter {
    pub fn create(path: &Path) -> Result<RatedWriter> {
        let f = std::fs::File::create(path).with_context(|| format!("{}", path.display()))?;
        let props = WriterProperties::builder()
            .set_created_by("meterflow".into())
            .build();
        Ok(RatedWriter {
            w: ArrowWriter::try_new(f, rated_schema(), Some(props))?,
            events: 0,
        })
    }
    pub fn write(&mut self, ev: &[RatedEvent]) -> Result<()> {
        if !ev.is_empty() {
            self.w.write(&rated_batch(ev)?)?;
            self.events += ev.len() as u64;
        }
        Ok(())
    }
    pub fn finish(self) -> Result<u64> {
        self.w.close()?;
        Ok(self.events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(id: &str, start: Millis) -> Usage {
        Usage {
            id: id.into(),
            entity_id: "acme".into(),
            interval_start: start,
            interval_end: start + 60_000,
            vcpu_seconds: Dec::from_int(120),
            ..empty_usage()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn usage_files_keep_usage_and_markers_in_order() {
        let dir = tempfile::tempdir().expect("tmp");
        let f = dir.path().join("u.parquet");
        let mut w = UsageWriter::create(&f).expect("create");
        let marker = Watermark {
            stage: "enricher".into(),
            source_partition: 1,
            source_partitions: 4,
            time: 600_000,
        };
        let rows = vec![
            Row::Usage(3, usage("00000000000000000000000000000001", 0)),
            Row::Marker(3, marker.clone()),
            Row::Usage(2, usage("00000000000000000000000000000002", 60_000)),
        ];
        for r in rows.clone() {
            w.push(r).expect("push");
        }
        assert_eq!(w.finish().expect("finish"), 2);
        let engine = Engine::load(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("../../rules"),
            64 << 20,
            std::time::Duration::from_secs(5),
        )
        .await
        .expect("rules");
        let cols = needed_columns(&engine);
        let mut back = Vec::new();
        for b in read_usage_file(&f, &cols).expect("read") {
            back.extend(usage_rows(&b.expect("batch"), &f).expect("rows"));
        }
        assert_eq!(back.len(), 3);
        assert_eq!(back[1], Row::Marker(3, marker));
        assert!(matches!(&back[0], Row::Usage(3, u) if u.vcpu_seconds == Dec::from_int(120)));
        assert!(has_markers(&[f]).expect("markers"));
    }
}
