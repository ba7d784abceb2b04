//! Rating rules: one SELECT per `.sql` file with a header, compiled once per rule
//! version into a DataFusion logical plan over a `usage` table whose rows are swapped
//! per evaluation. Rules are untrusted SQL: DDL, DML and statements are refused, URL
//! tables and recursive CTEs are off, memory is bounded and every evaluation has a
//! time limit.

use async_trait::async_trait;
use datafusion::arrow::array::{
    Array, ArrayRef, Decimal128Array, Decimal128Builder, Int64Array, MapBuilder, RecordBatch,
    StringArray, StringBuilder, TimestampMillisecondBuilder,
};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::catalog::Session;
use datafusion::datasource::{TableProvider, TableType};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::logical_expr::{Expr, LogicalPlan};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::{SQLOptions, SessionConfig, SessionContext};
use meterflow_types::window::humantime_ms;
use meterflow_types::{id, Dec, Millis, RatedEvent, Usage, UsageView};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    #[error("{file}:{line}: {msg}")]
    Header {
        file: String,
        line: usize,
        msg: String,
    },
    #[error("{file}: {msg}")]
    Sql { file: String, msg: String },
    #[error("{file}: {msg}")]
    Table { file: String, msg: String },
    #[error("{file}: output column {column}: {msg}")]
    Contract {
        file: String,
        column: String,
        msg: String,
    },
    #[error("rule {rule}: evaluation failed: {msg}")]
    Eval { rule: String, msg: String },
    #[error("{0}")]
    Io(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleHeader {
    pub name: String,
    pub version: i32,
    /// Window size.
    pub window: Millis,
    /// Hopping windows: a window starts every `slide` (a divisor of `window`); equal to
    /// `window` for tumbling windows.
    pub slide: Millis,
    pub lateness: Millis,
    pub currency: String,
    pub description: String,
    /// The rule prices windows starting at or after this time (inclusive)…
    pub valid_from: Option<Millis>,
    /// …and before this one (exclusive).
    pub valid_to: Option<Millis>,
}

impl RuleHeader {
    /// Whether this rule version prices the window starting at `ws`.
    pub fn applies(&self, ws: Millis) -> bool {
        self.valid_from.is_none_or(|f| ws >= f) && self.valid_to.is_none_or(|t| ws < t)
    }
    /// Windows per pane: how many windows each `slide`-long pane belongs to.
    pub fn hops(&self) -> i64 {
        self.window / self.slide
    }
}

#[derive(Clone, Debug)]
pub struct RuleSource {
    pub path: PathBuf,
    pub header: RuleHeader,
    pub sql: String,
}

/// Parse the `-- key: value` header at the top of a rule file.
pub fn parse_rule(path: &Path, text: &str) -> Result<RuleSource, RuleError> {
    let file = path.display().to_string();
    let err = |line: usize, msg: String| RuleError::Header {
        file: file.clone(),
        line,
        msg,
    };
    let (mut name, mut version, mut window, mut lateness, mut currency, mut description) =
        (None, None, None, Some(0), None, String::new());
    let (mut slide, mut valid_from, mut valid_to) = (None, None, None);
    let mut lines = (1, 1, 1); // where slide, valid_from and valid_to were given
    let time = |i: usize, v: &str| {
        meterflow_types::time::parse_rfc3339(v)
            .map_err(|e| err(i + 1, format!("{v:?} is not an RFC 3339 time: {e}")))
    };
    let mut body_start = text.len();
    let mut offset = 0;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if let Some(c) = t.strip_prefix("--") {
            if let Some((k, v)) = c.split_once(':') {
                let v = v.trim();
                match k.trim() {
                    "name" => name = Some(v.to_string()),
                    "version" => version = Some(v.parse::<i32>().map_err(|_| err(i + 1, format!("version {v:?} is not an integer")))?),
                    "window" => window = Some(humantime_ms(v).map_err(|e| err(i + 1, e))?),
                    "slide" => {
                        slide = Some(humantime_ms(v).map_err(|e| err(i + 1, e))?);
                        lines.0 = i + 1;
                    }
                    "valid_from" => {
                        valid_from = Some(time(i, v)?);
                        lines.1 = i + 1;
                    }
                    "valid_to" => {
                        valid_to = Some(time(i, v)?);
                        lines.2 = i + 1;
                    }
                    "lateness" => lateness = Some(if v == "0" || v == "0s" { 0 } else { humantime_ms(v).map_err(|e| err(i + 1, e))? }),
                    "currency" => {
                        if v.len() != 3 || !v.bytes().all(|b| b.is_ascii_uppercase()) {
                            return Err(err(i + 1, format!("currency {v:?} is not an ISO 4217 code")));
                        }
                        currency = Some(v.to_string())
                    }
                    "description" => {
                        // a long description may continue over several header lines
                        if !description.is_empty() {
                            description.push(' ');
                        }
                        description.push_str(v)
                    }
                    other => return Err(err(i + 1, format!("unknown header key {other:?} (name, version, window, slide, lateness, currency, description, valid_from, valid_to)"))),
                }
            }
        } else if !t.is_empty() {
            body_start = offset;
            break;
        }
        offset += line.len() + 1;
    }
    let window = window.ok_or_else(|| err(1, "missing `-- window:`".into()))?;
    let slide = slide.unwrap_or(window);
    if slide > window || window % slide != 0 {
        return Err(err(
            lines.0,
            format!("slide {slide} ms must divide the window ({window} ms)"),
        ));
    }
    if let (Some(f), Some(t)) = (valid_from, valid_to) {
        if f >= t {
            return Err(err(lines.2, "valid_to must be after valid_from".into()));
        }
    }
    if let Some(f) = valid_from {
        if f.rem_euclid(slide) != 0 {
            return Err(err(
                lines.1,
                "valid_from must fall on a window start (a multiple of the slide)".into(),
            ));
        }
    }
    if let Some(t) = valid_to {
        if t.rem_euclid(slide) != 0 {
            return Err(err(
                lines.2,
                "valid_to must fall on a window start (a multiple of the slide)".into(),
            ));
        }
    }
    let header = RuleHeader {
        name: name.ok_or_else(|| err(1, "missing `-- name:`".into()))?,
        version: version.ok_or_else(|| err(1, "missing `-- version:`".into()))?,
        window,
        slide,
        lateness: lateness.unwrap_or(0),
        currency: currency.ok_or_else(|| err(1, "missing `-- currency:`".into()))?,
        description,
        valid_from,
        valid_to,
    };
    let sql = text[body_start.min(text.len())..]
        .trim()
        .trim_end_matches(';')
        .to_string();
    if sql.is_empty() {
        return Err(err(1, "no SELECT after the header".into()));
    }
    Ok(RuleSource {
        path: path.to_path_buf(),
        header,
        sql,
    })
}

/// Every `*.sql` file in `dir`, sorted by name.
pub fn load_dir(dir: &Path) -> Result<Vec<RuleSource>, RuleError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| RuleError::Io(format!("reading rules dir {}: {e}", dir.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "sql"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(RuleError::Io(format!(
            "no *.sql rules in {}",
            dir.display()
        )));
    }
    files
        .iter()
        .map(|f| {
            let text = std::fs::read_to_string(f)
                .map_err(|e| RuleError::Io(format!("{}: {e}", f.display())))?;
            parse_rule(f, &text)
        })
        .collect()
}

/// The `usage` table a rule reads: one row per usage record and window piece.
pub fn usage_schema() -> SchemaRef {
    let dec = || DataType::Decimal128(38, 9);
    let ts = || DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()));
    Arc::new(Schema::new(vec![
        Field::new("window_start", ts(), false),
        Field::new("window_end", ts(), false),
        Field::new("entity_id", DataType::Utf8, false),
        Field::new("user_id", DataType::Utf8, false),
        Field::new("project", DataType::Utf8, true),
        Field::new("instance_id", DataType::Utf8, false),
        Field::new("node_id", DataType::Utf8, false),
        Field::new("site", DataType::Utf8, false),
        Field::new("kind", DataType::Utf8, false),
        Field::new("flavor", DataType::Utf8, true),
        Field::new("interval_start", ts(), false),
        Field::new("interval_end", ts(), false),
        Field::new("vcpu_seconds", dec(), false),
        Field::new("cpu_seconds", dec(), false),
        Field::new("memory_byte_seconds", dec(), false),
        Field::new("memory_used_byte_seconds", dec(), true),
        Field::new("net_rx_bytes", dec(), false),
        Field::new("net_tx_bytes", dec(), false),
        Field::new("disk_read_bytes", dec(), false),
        Field::new("disk_write_bytes", dec(), false),
        Field::new("labels", labels_type(), false),
    ]))
}

/// The `usage_to_date` table: per entity of the window, its usage in the billing period
/// before the window (the rule's earlier windows), one column per usage quantity.
pub fn to_date_schema() -> SchemaRef {
    let dec = || DataType::Decimal128(38, 9);
    let mut fields = vec![Field::new("entity_id", DataType::Utf8, false)];
    for q in crate::todate::QUANTITIES {
        fields.push(Field::new(q, dec(), false));
    }
    Arc::new(Schema::new(fields))
}

fn to_date_batch(rows: &[(String, crate::todate::Sums)]) -> Result<RecordBatch, RuleError> {
    let io = |e: datafusion::arrow::error::ArrowError| RuleError::Io(e.to_string());
    let mut cols: Vec<ArrayRef> = vec![Arc::new(StringArray::from_iter_values(
        rows.iter().map(|(e, _)| e.as_str()),
    ))];
    for i in 0..8 {
        cols.push(Arc::new(
            Decimal128Array::from_iter_values(rows.iter().map(|(_, s)| s[i].raw()))
                .with_precision_and_scale(38, 9)
                .map_err(io)?,
        ));
    }
    RecordBatch::try_new(to_date_schema(), cols).map_err(io)
}

/// `labels`: Map<Utf8, Utf8>, keys sorted; in SQL `labels['team']` (NULL when absent).
fn labels_type() -> DataType {
    MapBuilder::new(None, StringBuilder::new(), StringBuilder::new())
        .finish()
        .data_type()
        .clone()
}

/// Build the `usage` batch for rows of one window: every column.
pub fn usage_batch(
    window_start: Millis,
    window_end: Millis,
    rows: &[&Usage],
) -> Result<RecordBatch, RuleError> {
    let all: Vec<usize> = (0..usage_schema().fields().len()).collect();
    usage_columns(window_start, window_end, rows, &all)
}

/// Build only the columns `needed` (indices into `usage_schema()`), in that order, as a
/// batch of the projected schema: a rule that reads three columns costs three.
pub fn usage_columns(
    window_start: Millis,
    window_end: Millis,
    rows: &[&Usage],
    needed: &[usize],
) -> Result<RecordBatch, RuleError> {
    let n = rows.len();
    let ts = |f: &dyn Fn(&Usage) -> Millis| -> ArrayRef {
        let mut b = TimestampMillisecondBuilder::with_capacity(n).with_timezone("UTC");
        for r in rows {
            b.append_value(f(r));
        }
        Arc::new(b.finish())
    };
    let st = |f: &dyn Fn(&Usage) -> Option<&str>| -> ArrayRef {
        let mut b = StringBuilder::with_capacity(n, n * 16);
        for r in rows {
            b.append_option(f(r));
        }
        Arc::new(b.finish())
    };
    let de = |f: &dyn Fn(&Usage) -> Option<Dec>| -> Result<ArrayRef, RuleError> {
        let mut b = Decimal128Builder::with_capacity(n)
            .with_precision_and_scale(38, 9)
            .map_err(|e| RuleError::Io(e.to_string()))?;
        for r in rows {
            b.append_option(f(r).map(Dec::raw));
        }
        Ok(Arc::new(b.finish()))
    };
    let build = |i: usize| -> Result<ArrayRef, RuleError> {
        Ok(match i {
            0 => ts(&|_| window_start),
            1 => ts(&|_| window_end),
            2 => st(&|r| Some(&r.entity_id)),
            3 => st(&|r| Some(&r.user_id)),
            4 => st(&|r| r.project.as_deref()),
            5 => st(&|r| Some(&r.instance_id)),
            6 => st(&|r| Some(&r.node_id)),
            7 => st(&|r| Some(&r.site)),
            8 => st(&|r| Some(&r.kind)),
            9 => st(&|r| r.flavor.as_deref()),
            10 => ts(&|r| r.interval_start),
            11 => ts(&|r| r.interval_end),
            12 => de(&|r| Some(r.vcpu_seconds))?,
            13 => de(&|r| Some(r.cpu_seconds))?,
            14 => de(&|r| Some(r.memory_byte_seconds))?,
            15 => de(&|r| r.memory_used_byte_seconds)?,
            16 => de(&|r| Some(r.net_rx_bytes))?,
            17 => de(&|r| Some(r.net_tx_bytes))?,
            18 => de(&|r| Some(r.disk_read_bytes))?,
            19 => de(&|r| Some(r.disk_write_bytes))?,
            20 => {
                let mut b = MapBuilder::new(None, StringBuilder::new(), StringBuilder::new());
                for r in rows {
                    for (k, v) in &r.labels {
                        b.keys().append_value(k);
                        b.values().append_value(v);
                    }
                    b.append(true).map_err(|e| RuleError::Io(e.to_string()))?;
                }
                Arc::new(b.finish())
            }
            _ => return Err(RuleError::Io(format!("no usage column {i}"))),
        })
    };
    let cols = needed
        .iter()
        .map(|i| build(*i))
        .collect::<Result<Vec<_>, _>>()?;
    let schema = usage_schema()
        .project(needed)
        .map_err(|e| RuleError::Io(e.to_string()))?;
    // a rule may read no usage column at all (COUNT(*)): the batch still has its rows
    let opts = datafusion::arrow::array::RecordBatchOptions::new().with_row_count(Some(n));
    RecordBatch::try_new_with_options(Arc::new(schema), cols, &opts)
        .map_err(|e| RuleError::Io(e.to_string()))
}

/// A table whose batches are swapped before each evaluation, so a plan built once per
/// rule version reads the current window.
#[derive(Debug)]
struct SwapTable {
    schema: SchemaRef,
    /// The current window's batch and the `usage_schema()` indices of its columns.
    batches: Arc<Mutex<Current>>,
}

#[derive(Debug, Default)]
struct Current {
    batches: Vec<RecordBatch>,
    columns: Vec<usize>,
}

#[async_trait]
impl TableProvider for SwapTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }
    fn table_type(&self) -> TableType {
        TableType::Base
    }
    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        let all: Vec<usize> = (0..self.schema.fields().len()).collect();
        let want = projection.cloned().unwrap_or(all);
        let schema = Arc::new(self.schema.project(&want)?);
        let current = self.batches.clone();
        // read when the plan runs: the window being evaluated, not the one planned with
        let read: crate::live::Read = Arc::new(move || {
            let (batches, columns) = current
                .lock()
                .map(|c| (c.batches.clone(), c.columns.clone()))
                .unwrap_or_default();
            // the plan reads only columns that were built for it (its projection, found
            // at load)
            let pos = want
                .iter()
                .map(|i| columns.iter().position(|c| c == i))
                .collect::<Option<Vec<usize>>>()
                .ok_or_else(|| {
                    datafusion::error::DataFusionError::Internal(format!(
                        "usage columns {want:?} requested, {columns:?} built"
                    ))
                })?;
            Ok(batches
                .iter()
                .map(|b| b.project(&pos))
                .collect::<Result<Vec<_>, _>>()?)
        });
        Ok(Arc::new(crate::live::LiveScan::new("usage", schema, read)))
    }
}

/// A compiled rule: its header and its logical plan.
pub struct Rule {
    pub source: RuleSource,
    plan: LogicalPlan,
    /// The plan optimized once at load, when that is the same at every evaluation
    /// (`only_immutable`): each window then skips the logical optimizer, which was most
    /// of the cost of evaluating a small window.
    optimized: Option<LogicalPlan>,
    has_resource: bool,
    /// The `usage` columns the optimized plan reads (indices into `usage_schema()`).
    columns: Vec<usize>,
    /// The rule reads `usage_to_date` (period-to-date usage per entity).
    pub reads_to_date: bool,
    /// How its window's rows may be merged as they arrive (`None`: kept one by one).
    pub merge: Option<Merge>,
    /// The physical plan of `optimized`, made at its first window and run (reset) for
    /// every later one: its scans read the window when they run (`live`).
    physical: std::sync::OnceLock<Arc<dyn ExecutionPlan>>,
}

impl Rule {
    /// The `usage` columns the rule reads (indices into `usage_schema()`).
    pub fn columns(&self) -> &[usize] {
        &self.columns
    }
    /// Whether the rule reads the `labels` column.
    pub fn reads_labels(&self) -> bool {
        let labels = usage_schema().fields().len() - 1;
        self.columns.contains(&labels)
    }
}

/// Every operator's output stream takes part in tokio's cooperative scheduling, so an
/// evaluation yields regularly and its time limit can stop it: an operator that makes
/// rows from memory (a cross join of the window with itself, a generated series) never
/// waits on its input, and would otherwise run to completion whatever the limit.
fn cooperative_everywhere(
    plan: Arc<dyn ExecutionPlan>,
) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
    use datafusion::physical_plan::coop::CooperativeExec;
    let children = plan
        .children()
        .into_iter()
        .map(|c| {
            cooperative_everywhere(c.clone())
                .map(|c| Arc::new(CooperativeExec::new(c)) as Arc<dyn ExecutionPlan>)
        })
        .collect::<datafusion::error::Result<Vec<_>>>()?;
    if children.is_empty() {
        return Ok(plan);
    }
    datafusion::physical_plan::replace_children_if_necessary(plan, children)
}

/// Whether every function a plan calls is immutable (no `now()`, no `random()`): then its
/// optimized form can be kept and planned again for each window (the optimizer folds a
/// stable function such as `now()` to the moment it runs, so a plan calling one is
/// optimized again at every evaluation, as before).
fn only_immutable(plan: &LogicalPlan) -> bool {
    use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
    use datafusion::logical_expr::Volatility;
    let mut ok = true;
    let _ = plan.apply_with_subqueries(|node| {
        node.apply_expressions(|e| {
            e.apply(|e| {
                if let Expr::ScalarFunction(f) = e {
                    if f.func.signature().volatility != Volatility::Immutable {
                        ok = false;
                        return Ok(TreeNodeRecursion::Stop);
                    }
                }
                Ok(TreeNodeRecursion::Continue)
            })
        })
    });
    ok
}

/// The tables an optimized plan scans.
fn scanned_tables(plan: &LogicalPlan) -> Vec<String> {
    use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
    let mut out = Vec::new();
    let _ = plan.apply(|node| {
        if let LogicalPlan::TableScan(t) = node {
            out.push(t.table_name.table().to_string());
        }
        Ok(TreeNodeRecursion::Continue)
    });
    out
}

/// The `usage` columns an optimized plan scans (reference tables' scans are not `usage`).
fn scanned_columns(plan: &LogicalPlan) -> Vec<usize> {
    use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
    let n = usage_schema().fields().len();
    let mut cols = std::collections::BTreeSet::new();
    let _ = plan.apply(|node| {
        if let LogicalPlan::TableScan(t) = node {
            if t.table_name.table() != "usage" {
                return Ok(TreeNodeRecursion::Continue);
            }
            match &t.projection {
                Some(p) => cols.extend(p.iter().copied()),
                None => cols.extend(0..n),
            }
        }
        Ok(TreeNodeRecursion::Continue)
    });
    cols.into_iter().collect()
}

/// How a rule's window may hold fewer rows than it was given: rows that agree on every
/// `key` column, and on the sign of every `sign` column, can be merged as they arrive by
/// adding their quantities, and the rule's result is the same (`merge_spec`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Merge {
    /// Non-quantity `usage` columns the rule reads (indices into `usage_schema()`),
    /// without `window_start`/`window_end` (the same for the whole window).
    pub key: Vec<usize>,
    /// Quantity columns the rule compares with zero.
    pub sign: Vec<usize>,
}

impl Merge {
    /// The bytes that rows to be merged share: their key columns, and the sign of each
    /// sign column.
    pub fn key(&self, u: &UsageView<'_>) -> Vec<u8> {
        let mut k = Vec::with_capacity(64);
        self.key_into(u, &mut k);
        k
    }

    /// `key`, written into `k` (cleared first): a buffer reused across rows allocates
    /// nothing for the rows that merge into an existing one.
    pub fn key_into(&self, u: &UsageView<'_>, k: &mut Vec<u8>) {
        k.clear();
        let mut s = |v: Option<&[u8]>| match v {
            None => k.push(0),
            Some(v) => {
                k.push(1);
                k.extend_from_slice(&(v.len() as u32).to_le_bytes());
                k.extend_from_slice(v);
            }
        };
        for c in &self.key {
            match c {
                2 => s(Some(u.entity_id.as_bytes())),
                3 => s(Some(u.user_id.as_bytes())),
                4 => s(u.project.map(str::as_bytes)),
                5 => s(Some(u.instance_id.as_bytes())),
                6 => s(Some(u.node_id.as_bytes())),
                7 => s(Some(u.site.as_bytes())),
                8 => s(Some(u.kind.as_bytes())),
                9 => s(u.flavor.map(str::as_bytes)),
                10 => s(Some(&u.interval_start.to_le_bytes())),
                11 => s(Some(&u.interval_end.to_le_bytes())),
                // not a key column (`merge_spec` never makes one)
                _ => s(None),
            }
        }
        for c in &self.sign {
            let q = quantity(u, *c);
            k.push(match q {
                None => 0,
                Some(d) if d.is_negative() => 1,
                Some(d) if d == Dec::ZERO => 2,
                Some(_) => 3,
            });
        }
    }
}

/// Quantity column `c` of a usage row.
fn quantity(u: &UsageView<'_>, c: usize) -> Option<Dec> {
    match c {
        12 => Some(u.vcpu_seconds),
        13 => Some(u.cpu_seconds),
        14 => Some(u.memory_byte_seconds),
        15 => u.memory_used_byte_seconds,
        16 => Some(u.net_rx_bytes),
        17 => Some(u.net_tx_bytes),
        18 => Some(u.disk_read_bytes),
        19 => Some(u.disk_write_bytes),
        _ => None,
    }
}

/// Add `from`'s quantities to `into` (a merged row). `false`, and `into` unchanged, on
/// overflow: then the rows stay apart (and the rule's SUM reports the overflow as it
/// would have).
pub fn add_quantities(into: &mut Usage, from: &UsageView<'_>) -> bool {
    let add = |a: Dec, b: Dec| a.checked_add(b).ok();
    let sums = (|| {
        let used = match (into.memory_used_byte_seconds, from.memory_used_byte_seconds) {
            (Some(a), Some(b)) => Some(add(a, b)?),
            (a, b) => a.or(b),
        };
        Some([
            add(into.vcpu_seconds, from.vcpu_seconds)?,
            add(into.cpu_seconds, from.cpu_seconds)?,
            add(into.memory_byte_seconds, from.memory_byte_seconds)?,
            add(into.net_rx_bytes, from.net_rx_bytes)?,
            add(into.net_tx_bytes, from.net_tx_bytes)?,
            add(into.disk_read_bytes, from.disk_read_bytes)?,
            add(into.disk_write_bytes, from.disk_write_bytes)?,
        ])
        .map(|q| (q, used))
    })();
    let Some(([vc, cs, mb, nr, nt, dr, dw], used)) = sums else {
        return false;
    };
    into.vcpu_seconds = vc;
    into.cpu_seconds = cs;
    into.memory_byte_seconds = mb;
    into.memory_used_byte_seconds = used;
    into.net_rx_bytes = nr;
    into.net_tx_bytes = nt;
    into.disk_read_bytes = dr;
    into.disk_write_bytes = dw;
    true
}

/// The `usage` columns that are quantities: additive, summed when rows merge.
const QUANTITY_COLUMNS: std::ops::Range<usize> = 12..20;
const LABELS_COLUMN: usize = 20;

/// Whether rows of the window can be merged without changing the rule's result, and by
/// which columns. Yes when every use of `usage` is an aggregation over a chain of
/// filters and projections of its rows in which: quantities are only summed (`SUM`,
/// neither DISTINCT nor FILTER), the other aggregates are `MIN`/`MAX`/`COUNT(DISTINCT)`
/// of non-quantities, nothing groups by a quantity, filters compare quantities only with
/// zero, and projections pass quantities through unchanged (aliased or cast). Then a sum
/// over merged rows equals the sum over their parts — decimals add exactly — and every
/// other value a rule can see is the same in each row of a merged group. `COUNT(*)`,
/// `AVG`, row-level rules, joins or windows below the aggregation, labels: no.
pub fn merge_spec(plan: &LogicalPlan, columns: &[usize]) -> Option<Merge> {
    use datafusion::common::tree_node::TreeNodeRecursion;
    if columns.contains(&LABELS_COLUMN) {
        return None;
    }
    let mut usage_scans = 0;
    let _ = plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(t) = node {
            if t.table_name.table() == "usage" {
                usage_scans += 1;
            }
        }
        Ok(TreeNodeRecursion::Continue)
    });
    let mut m = MergeCheck {
        scans: 0,
        sign: std::collections::BTreeSet::new(),
    };
    m.walk(plan)?;
    if m.scans != usage_scans {
        return None; // a use of `usage` the walk did not see (a subquery expression)
    }
    let schema = usage_schema();
    let index = |name: &str| schema.index_of(name).ok();
    Some(Merge {
        key: columns
            .iter()
            .copied()
            .filter(|c| *c > 1 && !QUANTITY_COLUMNS.contains(c))
            .collect(),
        sign: m.sign.iter().filter_map(|n| index(n)).collect(),
    })
}

struct MergeCheck {
    /// `usage` scans reached through an aggregation.
    scans: usize,
    /// Quantities compared with zero (by their `usage` name).
    sign: std::collections::BTreeSet<String>,
}

type Quantities = std::collections::HashMap<String, String>;

impl MergeCheck {
    /// Above the aggregations: anything; every `usage` scan must lie under one.
    fn walk(&mut self, plan: &LogicalPlan) -> Option<()> {
        match plan {
            LogicalPlan::Aggregate(a) => {
                let q = self.rows(&a.input)?;
                if a.group_expr.iter().any(|e| refers(e, &q)) {
                    return None;
                }
                for e in &a.aggr_expr {
                    agg_ok(e, &q)?;
                }
                Some(())
            }
            LogicalPlan::TableScan(t) if t.table_name.table() == "usage" => None,
            other => {
                for i in other.inputs() {
                    self.walk(i)?;
                }
                Some(())
            }
        }
    }

    /// Below an aggregation: the columns of this node's output that carry a quantity
    /// (output name → `usage` quantity), if rows merge through it.
    fn rows(&mut self, plan: &LogicalPlan) -> Option<Quantities> {
        match plan {
            LogicalPlan::TableScan(t) => {
                let q: Quantities = if t.table_name.table() == "usage" {
                    self.scans += 1;
                    let schema = usage_schema();
                    QUANTITY_COLUMNS
                        .map(|i| {
                            let n = schema.field(i).name().clone();
                            (n.clone(), n)
                        })
                        .collect()
                } else {
                    Quantities::new()
                };
                for f in &t.filters {
                    self.filter_ok(f, &q)?;
                }
                Some(q)
            }
            LogicalPlan::Filter(f) => {
                let q = self.rows(&f.input)?;
                self.filter_ok(&f.predicate, &q)?;
                Some(q)
            }
            LogicalPlan::SubqueryAlias(a) => self.rows(&a.input),
            LogicalPlan::Projection(p) => {
                let q = self.rows(&p.input)?;
                let mut out = Quantities::new();
                for (i, e) in p.expr.iter().enumerate() {
                    if !refers(e, &q) {
                        continue;
                    }
                    let origin = passed_through(e, &q)?;
                    out.insert(p.schema.field(i).name().clone(), origin);
                }
                Some(out)
            }
            _ => None,
        }
    }

    /// A conjunction whose terms either leave quantities alone or compare one with zero.
    fn filter_ok(&mut self, e: &Expr, q: &Quantities) -> Option<()> {
        use datafusion::logical_expr::{BinaryExpr, Operator};
        if !refers(e, q) {
            return Some(());
        }
        let Expr::BinaryExpr(BinaryExpr { left, op, right }) = e else {
            return None;
        };
        if *op == Operator::And {
            self.filter_ok(left, q)?;
            return self.filter_ok(right, q);
        }
        if !matches!(
            op,
            Operator::Gt
                | Operator::GtEq
                | Operator::Lt
                | Operator::LtEq
                | Operator::Eq
                | Operator::NotEq
        ) {
            return None;
        }
        let (col, other) = if refers(left, q) {
            (left, right)
        } else {
            (right, left)
        };
        let origin = passed_through(col, q)?;
        match strip_casts(other) {
            Expr::Literal(v, _) if is_zero(v) => {
                self.sign.insert(origin);
                Some(())
            }
            _ => None,
        }
    }
}

fn strip_casts(e: &Expr) -> &Expr {
    match e {
        Expr::Cast(c) => strip_casts(&c.expr),
        Expr::TryCast(c) => strip_casts(&c.expr),
        Expr::Alias(a) => strip_casts(&a.expr),
        other => other,
    }
}

/// The quantity a column reference (aliased or cast) carries.
fn passed_through(e: &Expr, q: &Quantities) -> Option<String> {
    match strip_casts(e) {
        Expr::Column(c) => q.get(&c.name).cloned(),
        _ => None,
    }
}

fn refers(e: &Expr, q: &Quantities) -> bool {
    e.column_refs().iter().any(|c| q.contains_key(&c.name))
}

fn is_zero(v: &datafusion::scalar::ScalarValue) -> bool {
    use datafusion::scalar::ScalarValue as S;
    matches!(
        v,
        S::Decimal128(Some(0), _, _)
            | S::Int8(Some(0))
            | S::Int16(Some(0))
            | S::Int32(Some(0))
            | S::Int64(Some(0))
            | S::UInt8(Some(0))
            | S::UInt16(Some(0))
            | S::UInt32(Some(0))
            | S::UInt64(Some(0))
    )
}

/// An aggregate that gives the same over merged rows as over their parts.
fn agg_ok(e: &Expr, q: &Quantities) -> Option<()> {
    let Expr::AggregateFunction(f) = strip_casts(e) else {
        return None;
    };
    let p = &f.params;
    if p.filter.is_some() || !p.order_by.is_empty() || p.args.len() != 1 {
        return None;
    }
    let arg = &p.args[0];
    match (f.func.name(), refers(arg, q)) {
        ("sum", true) if !p.distinct => passed_through(arg, q).map(|_| ()),
        ("min" | "max", false) => Some(()),
        ("count", false) if p.distinct => Some(()),
        _ => None,
    }
}

/// One DataFusion session per rater worker, with the rules compiled against it.
pub struct Engine {
    ctx: SessionContext,
    /// What every run of a plan executes with (the session's configuration, functions
    /// and memory pool), made once rather than from a copy of the session per window.
    task: Arc<datafusion::execution::TaskContext>,
    table: Arc<Mutex<Current>>,
    /// `usage_to_date` of the evaluation in progress.
    to_date: Arc<crate::tables::RefTable>,
    pub rules: Vec<Rule>,
    pub eval_timeout: Duration,
    /// Reference tables the rules may join.
    pub tables: Vec<crate::tables::Loaded>,
}

const REQUIRED: [(&str, bool); 5] = [
    ("entity_id", false),
    ("unit", false),
    ("quantity", true),
    ("unit_price", true),
    ("amount", true),
];

/// `labels['team']`: key access on the labels map (DataFusion's `get_field`, without
/// pulling in the whole nested-functions crate). Only named keys are planned here.
#[derive(Debug)]
struct LabelAccess;

impl datafusion::logical_expr::planner::ExprPlanner for LabelAccess {
    fn plan_field_access(
        &self,
        expr: datafusion::logical_expr::planner::RawFieldAccessExpr,
        _schema: &datafusion::common::DFSchema,
    ) -> datafusion::error::Result<
        datafusion::logical_expr::planner::PlannerResult<
            datafusion::logical_expr::planner::RawFieldAccessExpr,
        >,
    > {
        use datafusion::logical_expr::planner::PlannerResult;
        use datafusion::logical_expr::GetFieldAccess;
        match expr.field_access {
            GetFieldAccess::NamedStructField { name } => Ok(PlannerResult::Planned(
                datafusion::functions::core::expr_fn::get_field(expr.expr, name),
            )),
            _ => Ok(PlannerResult::Original(expr)),
        }
    }
}

impl Engine {
    pub async fn new(
        sources: Vec<RuleSource>,
        memory_limit: usize,
        eval_timeout: Duration,
    ) -> Result<Engine, RuleError> {
        Engine::with_tables(sources, Vec::new(), memory_limit, eval_timeout).await
    }

    /// The rules and every reference table in `dir`.
    pub async fn load(
        dir: &Path,
        memory_limit: usize,
        eval_timeout: Duration,
    ) -> Result<Engine, RuleError> {
        let sources = load_dir(dir)?;
        let tables = crate::tables::find_tables(dir)?;
        Engine::with_tables(sources, tables, memory_limit, eval_timeout).await
    }

    /// Re-read reference tables whose files changed; returns what was reloaded and what
    /// was refused (the refused keep their old contents).
    pub fn reload_tables(&mut self) -> (Vec<String>, Vec<RuleError>) {
        let mut done = Vec::new();
        let mut errors = Vec::new();
        for t in &mut self.tables {
            match t.reload() {
                Ok(true) => done.push(t.source.name.clone()),
                Ok(false) => {}
                Err(e) => errors.push(e),
            }
        }
        (done, errors)
    }

    pub async fn with_tables(
        sources: Vec<RuleSource>,
        tables: Vec<crate::tables::TableSource>,
        memory_limit: usize,
        eval_timeout: Duration,
    ) -> Result<Engine, RuleError> {
        let mut config = SessionConfig::new()
            .with_target_partitions(1)
            .with_information_schema(false);
        config.options_mut().sql_parser.parse_float_as_decimal = true;
        config.options_mut().execution.enable_recursive_ctes = false;
        // a rule's physical plan is run again for every window, and a dynamic filter
        // pushed into its scan would carry one run's bounds into the next
        // (`reset_plan_states` does not support them); windows are small enough
        let o = &mut config.options_mut().optimizer;
        o.enable_dynamic_filter_pushdown = false;
        o.enable_topk_dynamic_filter_pushdown = false;
        o.enable_join_dynamic_filter_pushdown = false;
        o.enable_aggregate_dynamic_filter_pushdown = false;
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_limit(memory_limit, 1.0)
            .build_arc()
            .map_err(|e| RuleError::Io(e.to_string()))?;
        let mut ctx = SessionContext::new_with_config_rt(config, runtime);
        {
            use datafusion::execution::FunctionRegistry;
            ctx.register_expr_planner(Arc::new(LabelAccess))
                .map_err(|e| RuleError::Io(e.to_string()))?;
        }
        let table = Arc::new(Mutex::new(Current::default()));
        ctx.register_table(
            "usage",
            Arc::new(SwapTable {
                schema: usage_schema(),
                batches: table.clone(),
            }),
        )
        .map_err(|e| RuleError::Io(e.to_string()))?;
        let to_date = Arc::new(crate::tables::RefTable::new(RecordBatch::new_empty(
            to_date_schema(),
        )));
        ctx.register_table("usage_to_date", to_date.clone())
            .map_err(|e| RuleError::Io(e.to_string()))?;
        let mut loaded = Vec::new();
        for t in tables {
            let l = crate::tables::Loaded::load(t)?;
            ctx.register_table(l.source.name.as_str(), l.table.clone())
                .map_err(|e| RuleError::Io(e.to_string()))?;
            loaded.push(l);
        }
        let mut rules = Vec::new();
        for s in sources {
            let file = s.path.display().to_string();
            // versions of one rule may coexist when their validity does not overlap
            if let Some(other) = rules.iter().find(|r: &&Rule| {
                let (a, b) = (&r.source.header, &s.header);
                a.name == b.name
                    && (a.version == b.version
                        || (a.valid_from.unwrap_or(Millis::MIN)
                            < b.valid_to.unwrap_or(Millis::MAX)
                            && b.valid_from.unwrap_or(Millis::MIN)
                                < a.valid_to.unwrap_or(Millis::MAX)))
            }) {
                return Err(RuleError::Sql {
                    file,
                    msg: format!(
                        "rule {:?} version {} overlaps {} (version {}): versions of a rule need the same name, distinct versions and valid_from/valid_to ranges that do not overlap",
                        s.header.name,
                        s.header.version,
                        other.source.path.display(),
                        other.source.header.version
                    ),
                });
            }
            let opts = SQLOptions::new()
                .with_allow_ddl(false)
                .with_allow_dml(false)
                .with_allow_statements(false);
            let df = ctx
                .sql_with_options(&s.sql, opts)
                .await
                .map_err(|e| RuleError::Sql {
                    file: file.clone(),
                    msg: e.to_string(),
                })?;
            let plan = df.logical_plan().clone();
            let schema = plan.schema();
            for (col, numeric) in REQUIRED {
                let f =
                    schema
                        .field_with_unqualified_name(col)
                        .map_err(|_| RuleError::Contract {
                            file: file.clone(),
                            column: col.into(),
                            msg:
                                "missing (required: entity_id, unit, quantity, unit_price, amount)"
                                    .into(),
                        })?;
                check_type(f.data_type(), numeric).map_err(|msg| RuleError::Contract {
                    file: file.clone(),
                    column: col.into(),
                    msg,
                })?;
            }
            let has_resource = match schema.field_with_unqualified_name("resource_id") {
                Ok(f) => {
                    check_type(f.data_type(), false).map_err(|msg| RuleError::Contract {
                        file: file.clone(),
                        column: "resource_id".into(),
                        msg,
                    })?;
                    true
                }
                Err(_) => false,
            };
            let optimized = ctx.state().optimize(&plan).map_err(|e| RuleError::Sql {
                file: file.clone(),
                msg: e.to_string(),
            })?;
            let reads_to_date = scanned_tables(&optimized)
                .iter()
                .any(|t| t == "usage_to_date");
            if reads_to_date && s.header.hops() > 1 {
                return Err(RuleError::Sql {
                    file,
                    msg: "usage_to_date needs tumbling windows (no slide)".into(),
                });
            }
            let columns = scanned_columns(&optimized);
            rules.push(Rule {
                source: s,
                merge: merge_spec(&optimized, &columns),
                columns,
                optimized: only_immutable(&plan).then_some(optimized),
                physical: std::sync::OnceLock::new(),
                plan,
                has_resource,
                reads_to_date,
            });
        }
        let task = Arc::new(datafusion::execution::TaskContext::from(&ctx.state()));
        Ok(Engine {
            ctx,
            task,
            table,
            to_date,
            tables: loaded,
            rules,
            eval_timeout,
        })
    }

    /// A stable name for the rule set (names, versions and validity), used to key
    /// checkpoints.
    pub fn ruleset_id(&self) -> String {
        let mut parts: Vec<String> = self
            .rules
            .iter()
            .map(|r| {
                let h = &r.source.header;
                format!(
                    "{}@{}[{},{})",
                    h.name,
                    h.version,
                    h.valid_from.map(|t| t.to_string()).unwrap_or_default(),
                    h.valid_to.map(|t| t.to_string()).unwrap_or_default()
                )
            })
            .collect();
        parts.sort();
        id::derive(
            "ruleset",
            &parts.iter().map(String::as_str).collect::<Vec<_>>(),
        )[..12]
            .to_string()
    }

    /// Evaluate rule `idx` over the rows of one window. `adjustment_of` marks the output
    /// as a correction computed from that late usage record.
    pub async fn evaluate(
        &self,
        idx: usize,
        window_start: Millis,
        rows: &[&Usage],
        partition: i32,
        adjustment_of: Option<&str>,
    ) -> Result<Vec<RatedEvent>, RuleError> {
        self.evaluate_with(idx, window_start, rows, partition, adjustment_of, &[])
            .await
    }

    /// `evaluate`, with the `usage_to_date` rows of the window's entities.
    pub async fn evaluate_with(
        &self,
        idx: usize,
        window_start: Millis,
        rows: &[&Usage],
        partition: i32,
        adjustment_of: Option<&str>,
        to_date: &[(String, crate::todate::Sums)],
    ) -> Result<Vec<RatedEvent>, RuleError> {
        let n = rows.len() as i64;
        self.evaluate_merged(
            idx,
            window_start,
            rows,
            n,
            partition,
            adjustment_of,
            to_date,
        )
        .await
    }

    /// `evaluate_with` on rows that were merged as they arrived (`Rule::merge`): `records`
    /// is how many usage pieces they hold (each event's `usage_records`).
    #[allow(clippy::too_many_arguments)]
    pub async fn evaluate_merged(
        &self,
        idx: usize,
        window_start: Millis,
        rows: &[&Usage],
        records: i64,
        partition: i32,
        adjustment_of: Option<&str>,
        to_date: &[(String, crate::todate::Sums)],
    ) -> Result<Vec<RatedEvent>, RuleError> {
        let rule = &self.rules[idx];
        if rule.reads_to_date {
            self.to_date.replace(to_date_batch(to_date)?);
        }
        let h = &rule.source.header;
        let window_end = window_start + h.window;
        let batch = usage_columns(window_start, window_end, rows, &rule.columns)?;
        if let Ok(mut t) = self.table.lock() {
            *t = Current {
                batches: vec![batch],
                columns: rule.columns.clone(),
            };
        }
        let fail = |msg: String| RuleError::Eval {
            rule: h.name.clone(),
            msg,
        };
        let run = async {
            let planned = match &rule.optimized {
                Some(optimized) => {
                    let made = match rule.physical.get() {
                        Some(p) => p.clone(),
                        None => {
                            let state = self.ctx.state();
                            let p = state
                                .query_planner()
                                .create_physical_plan(optimized, &state)
                                .await?;
                            let p = cooperative_everywhere(p)?;
                            rule.physical.get_or_init(|| p).clone()
                        }
                    };
                    // fresh state for this run (a join's built side, a sort's filter)
                    datafusion::physical_plan::execution_plan::reset_plan_states(made)?
                }
                None => cooperative_everywhere(
                    self.ctx.state().create_physical_plan(&rule.plan).await?,
                )?,
            };
            datafusion::physical_plan::collect(planned, self.task.clone()).await
        };
        let out = tokio::time::timeout(self.eval_timeout, run)
            .await
            .map_err(|_| fail(format!("exceeded the {:?} time limit", self.eval_timeout)))?
            .map_err(|e| fail(e.to_string()))?;
        let mut events = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for b in &out {
            let strings = |name: &str| -> Result<StringArray, RuleError> {
                let c = b
                    .column_by_name(name)
                    .ok_or_else(|| fail(format!("no column {name}")))?;
                let c = cast(c, &DataType::Utf8).map_err(|e| fail(e.to_string()))?;
                c.as_any()
                    .downcast_ref::<StringArray>()
                    .cloned()
                    .ok_or_else(|| fail(format!("{name} is not text")))
            };
            let entity = strings("entity_id")?;
            let unit = strings("unit")?;
            let resource = if rule.has_resource {
                Some(strings("resource_id")?)
            } else {
                None
            };
            let q = decimals(b, "quantity").map_err(fail)?;
            let p = decimals(b, "unit_price").map_err(fail)?;
            let a = decimals(b, "amount").map_err(fail)?;
            for i in 0..b.num_rows() {
                if entity.is_null(i) || unit.is_null(i) {
                    return Err(fail(format!(
                        "row {i}: entity_id and unit must not be null"
                    )));
                }
                let (Some(qv), Some(pv), Some(av)) = (q[i], p[i], a[i]) else {
                    return Err(fail(format!(
                        "row {i}: quantity, unit_price and amount must not be null"
                    )));
                };
                let res = resource
                    .as_ref()
                    .map(|r| {
                        if r.is_null(i) {
                            String::new()
                        } else {
                            r.value(i).to_string()
                        }
                    })
                    .unwrap_or_default();
                let key = (
                    entity.value(i).to_string(),
                    unit.value(i).to_string(),
                    res.clone(),
                );
                if !seen.insert(key.clone()) {
                    return Err(fail(format!(
                        "two rows for entity {:?} unit {:?} resource {:?} in one window",
                        key.0, key.1, key.2
                    )));
                }
                let ws = window_start.to_string();
                let ver = h.version.to_string();
                let mut parts = vec![
                    h.name.as_str(),
                    ver.as_str(),
                    ws.as_str(),
                    key.0.as_str(),
                    key.1.as_str(),
                    key.2.as_str(),
                ];
                if let Some(u) = adjustment_of {
                    parts.push(u);
                }
                events.push(RatedEvent {
                    id: id::derive("rated", &parts),
                    rule_id: h.name.clone(),
                    rule_version: h.version,
                    entity_id: key.0,
                    resource_id: key.2,
                    window_start,
                    window_end,
                    unit: key.1,
                    quantity: qv,
                    unit_price: pv,
                    amount: av,
                    currency: h.currency.clone(),
                    adjustment: adjustment_of.is_some(),
                    usage_records: records,
                    source_partition: partition,
                });
            }
        }
        Ok(events)
    }
}

fn check_type(t: &DataType, numeric: bool) -> Result<(), String> {
    match (numeric, t) {
        (false, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View) => Ok(()),
        (false, other) => Err(format!("must be text, is {other}")),
        (
            true,
            DataType::Decimal128(_, _)
            | DataType::Int8
            | DataType::Int16
            | DataType::Int32
            | DataType::Int64,
        ) => Ok(()),
        (true, DataType::Float16 | DataType::Float32 | DataType::Float64) => Err(
            "is a float; money and quantities must be DECIMAL (write CAST(x AS DECIMAL(38,9)))"
                .into(),
        ),
        (true, other) => Err(format!("must be DECIMAL or integer, is {other}")),
    }
}

/// A decimal or integer column as `Dec` (scale 9). Values with more than 9 decimals
/// are rounded half-to-even to 9, the contract's resolution.
fn decimals(b: &RecordBatch, name: &str) -> Result<Vec<Option<Dec>>, String> {
    let c = b
        .column_by_name(name)
        .ok_or_else(|| format!("no column {name}"))?;
    match c.data_type() {
        DataType::Decimal128(_, s) => {
            let s = *s as i32;
            let a = c
                .as_any()
                .downcast_ref::<Decimal128Array>()
                .ok_or("decimal column")?;
            (0..a.len())
                .map(|i| {
                    if a.is_null(i) {
                        return Ok(None);
                    }
                    let v = a.value(i);
                    let raw = if s <= 9 {
                        v.checked_mul(10i128.pow((9 - s) as u32))
                            .ok_or_else(|| format!("{name} overflows"))?
                    } else {
                        round_half_even_div(v, 10i128.pow((s - 9) as u32))
                    };
                    Ok(Some(Dec::from_raw(raw)))
                })
                .collect()
        }
        _ => {
            let c = cast(c, &DataType::Int64).map_err(|e| e.to_string())?;
            let a = c
                .as_any()
                .downcast_ref::<Int64Array>()
                .ok_or("integer column")?;
            Ok((0..a.len())
                .map(|i| {
                    if a.is_null(i) {
                        None
                    } else {
                        Some(Dec::from_int(a.value(i)))
                    }
                })
                .collect())
        }
    }
}

fn round_half_even_div(v: i128, d: i128) -> i128 {
    let q = v.div_euclid(d);
    let r = v.rem_euclid(d);
    if r * 2 > d || (r * 2 == d && q % 2 != 0) {
        q + 1
    } else {
        q
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(entity: &str, vcpu: &str, mem: i64, tx: i64) -> Usage {
        Usage {
            id: format!("u-{entity}-{vcpu}"),
            sample_id: "s".into(),
            instance_id: "i".into(),
            entity_id: entity.into(),
            user_id: "u".into(),
            project: None,
            node_id: "n".into(),
            site: "x".into(),
            kind: "vm".into(),
            flavor: None,
            interval_start: 0,
            interval_end: 60_000,
            vcpu_seconds: vcpu.parse().expect("dec"),
            cpu_seconds: Dec::ZERO,
            memory_byte_seconds: Dec::from_int(mem),
            memory_used_byte_seconds: None,
            net_rx_bytes: Dec::ZERO,
            net_tx_bytes: Dec::from_int(tx),
            disk_read_bytes: Dec::ZERO,
            disk_write_bytes: Dec::ZERO,
            labels: Default::default(),
        }
    }

    async fn engine() -> Engine {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../rules");
        Engine::new(
            load_dir(&dir).expect("rules load"),
            64 << 20,
            Duration::from_secs(10),
        )
        .await
        .expect("rules compile")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn shipped_rules_price_exactly_in_decimal() {
        let e = engine().await;
        let rows = [
            usage("acme", "3600", 3_600_000_000_000, 2_000_000_000),
            usage("acme", "0.5", 0, 0),
            usage("globex", "7200", 0, 1),
        ];
        let refs: Vec<&Usage> = rows.iter().collect();
        let idx = |n: &str| {
            e.rules
                .iter()
                .position(|r| r.source.header.name == n)
                .expect("rule")
        };
        let mut v = e
            .evaluate(idx("vcpu_hours"), 0, &refs, 0, None)
            .await
            .expect("eval");
        v.sort_by(|a, b| a.entity_id.cmp(&b.entity_id));
        assert_eq!(v.len(), 2);
        assert_eq!(
            (
                v[0].entity_id.as_str(),
                v[0].amount.to_string(),
                v[0].unit.as_str()
            ),
            ("acme", "0.036005".to_string(), "vcpu_hour")
        );
        assert_eq!(v[0].quantity.to_string(), "1.000138889");
        assert_eq!(v[0].unit_price.to_string(), "0.036");
        assert_eq!(v[1].amount.to_string(), "0.072");
        assert_eq!(v[0].window_end, 3_600_000);
        let m = e
            .evaluate(idx("memory_gb_hours"), 0, &refs, 0, None)
            .await
            .expect("eval");
        let acme = m.iter().find(|r| r.entity_id == "acme").expect("acme");
        assert_eq!(
            (acme.quantity.to_string(), acme.amount.to_string()),
            ("1".to_string(), "0.0045".to_string())
        );
        let n = e
            .evaluate(idx("network_egress_gb"), 0, &refs, 0, None)
            .await
            .expect("eval");
        let g = n.iter().find(|r| r.entity_id == "globex").expect("globex");
        assert_eq!(
            g.amount.to_string(),
            "0",
            "9e-11 rounds half-even to 0 at 9 places"
        );
        assert_eq!(
            n.iter()
                .find(|r| r.entity_id == "acme")
                .expect("acme")
                .amount
                .to_string(),
            "0.18"
        );
        // ids are deterministic; an adjustment gets its own id
        let again = e
            .evaluate(idx("vcpu_hours"), 0, &refs, 0, None)
            .await
            .expect("eval");
        assert!(again.iter().any(|r| r.id == v[0].id));
        let adj = e
            .evaluate(idx("vcpu_hours"), 0, &refs[..1], 0, Some("late-1"))
            .await
            .expect("eval");
        assert!(adj[0].adjustment && adj[0].id != v[0].id);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn hopping_windows_and_validity_are_checked_where_they_are_written() {
        let parse = |h: &str| {
            parse_rule(
                Path::new("rules/r.sql"),
                &format!("-- name: r\n-- version: 1\n-- currency: USD\n{h}SELECT 1"),
            )
        };
        let ok = parse("-- window: 1h\n-- slide: 15m\n-- valid_from: 2026-04-01T00:00:00Z\n")
            .expect("hopping rule");
        assert_eq!((ok.header.slide, ok.header.hops()), (900_000, 4));
        let from = meterflow_types::time::parse_rfc3339("2026-04-01T00:00:00Z").expect("t");
        assert!(!ok.header.applies(from - 900_000) && ok.header.applies(from));
        let e = parse("-- window: 1h\n-- slide: 25m\n").expect_err("25m does not divide 1h");
        assert!(e.to_string().contains("rules/r.sql:5"), "{e}");
        let e = parse("-- window: 1h\n-- valid_from: 2026-04-02T00:00:00Z\n-- valid_to: 2026-04-01T00:00:00Z\n")
            .expect_err("empty validity");
        assert!(e.to_string().contains("valid_to"), "{e}");
        let e = parse("-- window: 1h\n-- valid_from: 2026-04-01T00:30:00Z\n")
            .expect_err("not on a window start");
        assert!(e.to_string().contains("window start"), "{e}");
        // two versions of a rule: fine when their validity does not overlap
        let v = |n: i32, h: &str| {
            parse_rule(
                Path::new(&format!("rules/v{n}.sql")),
                &format!("-- name: p\n-- version: {n}\n-- window: 1h\n-- currency: USD\n{h}SELECT entity_id, 'u' AS unit, 1 AS quantity, 1 AS unit_price, 1 AS amount FROM usage"),
            )
            .expect("parses")
        };
        let split = "2026-04-01T00:00:00Z";
        Engine::new(
            vec![
                v(1, &format!("-- valid_to: {split}\n")),
                v(2, &format!("-- valid_from: {split}\n")),
            ],
            64 << 20,
            Duration::from_secs(5),
        )
        .await
        .expect("disjoint versions load");
        let err = Engine::new(
            vec![v(1, ""), v(2, &format!("-- valid_from: {split}\n"))],
            64 << 20,
            Duration::from_secs(5),
        )
        .await
        .err()
        .expect("overlapping versions refused");
        assert!(err.to_string().contains("rules/v1.sql"), "{err}");
    }

    /// One entity's (quantity, amount) from rule 0 over `rows`.
    async fn count_and_amount(e: &Engine, rows: Vec<Usage>) -> (String, String) {
        let refs: Vec<&Usage> = rows.iter().collect();
        let v = e.evaluate(0, 0, &refs, 0, None).await.expect("eval");
        assert_eq!(v.len(), 1);
        (v[0].quantity.to_string(), v[0].amount.to_string())
    }

    /// A rule's physical plan is made once and run for every window: each run reads its
    /// own window and the reference table's current contents (no count or maximum of an
    /// earlier window folded into the plan, no join side kept from an earlier run).
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_plan_made_once_reads_each_window_and_the_current_table() {
        let dir = tempfile::tempdir().expect("dir");
        let prices = dir.path().join("prices.csv");
        std::fs::write(&prices, "kind,price\nvm,0.5\n").expect("write");
        let rule = parse_rule(
            Path::new("rules/c.sql"),
            "-- name: c\n-- version: 1\n-- window: 1h\n-- currency: USD\n\
             SELECT u.entity_id, 'row' AS unit, COUNT(*) AS quantity, MAX(p.price) AS unit_price, \
             MAX(u.vcpu_seconds) * MAX(p.price) AS amount \
             FROM usage u JOIN prices p ON p.kind = u.kind GROUP BY u.entity_id",
        )
        .expect("parses");
        let tables = vec![crate::tables::TableSource {
            name: "prices".into(),
            path: prices.clone(),
        }];
        let mut e = Engine::with_tables(vec![rule], tables, 64 << 20, Duration::from_secs(10))
            .await
            .expect("loads");
        let three = vec![
            usage("acme", "4", 0, 0),
            usage("acme", "8", 0, 0),
            usage("acme", "2", 0, 0),
        ];
        assert_eq!(
            count_and_amount(&e, three).await,
            ("3".to_string(), "4".to_string())
        );
        assert!(e.rules[0].physical.get().is_some(), "the plan is kept");
        assert_eq!(
            count_and_amount(&e, vec![usage("acme", "6", 0, 0)]).await,
            ("1".to_string(), "3".to_string())
        );
        std::fs::write(&prices, "kind,price\nvm,2.0\n").expect("write");
        let (reloaded, refused) = e.reload_tables();
        assert!(refused.is_empty() && reloaded == ["prices"], "{reloaded:?}");
        assert_eq!(
            count_and_amount(&e, vec![usage("acme", "6", 0, 0), usage("acme", "1", 0, 0)]).await,
            ("2".to_string(), "12".to_string())
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn expensive_rules_are_bounded_by_the_memory_pool_and_the_time_limit() {
        let cases = [
            // a cross-join bomb: 2,000³ rows
            "SELECT a.entity_id, 'x' AS unit, COUNT(*) AS quantity, 1 AS unit_price, COUNT(*) AS amount \
             FROM usage a, usage b, usage c GROUP BY a.entity_id",
            // a huge generated series
            "SELECT 'e' AS entity_id, 'x' AS unit, SUM(value) AS quantity, 1 AS unit_price, SUM(value) AS amount \
             FROM generate_series(1, 1000000000000)",
            // a sort that must hold a cross join in memory (8·10⁹ rows)
            "SELECT a.entity_id, 'x' AS unit, 1 AS quantity, 1 AS unit_price, 1 AS amount \
             FROM usage a, usage b, usage c ORDER BY a.id_text, b.id_text, c.id_text",
        ];
        let rows: Vec<Usage> = (0..2000)
            .map(|i| usage(&format!("e{}", i % 10), "1", i, 0))
            .collect();
        let refs: Vec<&Usage> = rows.iter().collect();
        for sql in cases {
            let sql = sql.replace("id_text", "instance_id");
            let text =
                format!("-- name: heavy\n-- version: 1\n-- window: 1h\n-- currency: USD\n{sql}\n");
            let src = parse_rule(Path::new("rules/heavy.sql"), &text).expect("header parses");
            let e = match Engine::new(vec![src], 16 << 20, Duration::from_secs(2)).await {
                Err(e) => {
                    // refused at load is as good, if it says where
                    assert!(e.to_string().contains("rules/heavy.sql"), "{e}");
                    continue;
                }
                Ok(e) => e,
            };
            let err = e
                .evaluate(0, 0, &refs, 0, None)
                .await
                .err()
                .unwrap_or_else(|| panic!("ran to completion: {sql}"));
            let msg = err.to_string();
            assert!(
                msg.contains("time limit") || msg.to_lowercase().contains("resources exhausted"),
                "{sql}: {msg}"
            );
        }
    }

    async fn one_rule(select: &str) -> Engine {
        let text =
            format!("-- name: r\n-- version: 1\n-- window: 1h\n-- currency: USD\n{select}\n");
        let src = parse_rule(Path::new("rules/r.sql"), &text).expect("parses");
        Engine::new(vec![src], 64 << 20, Duration::from_secs(5))
            .await
            .expect("compiles")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn rows_merge_only_for_rules_that_just_sum_quantities() {
        let e = engine().await;
        let spec = |name: &str| {
            e.rules
                .iter()
                .find(|r| r.source.header.name == name)
                .and_then(|r| r.merge.clone())
        };
        // the shipped rules: by entity; egress also by whether anything was sent
        let entity = Merge {
            key: vec![2],
            sign: vec![],
        };
        assert_eq!(spec("vcpu_hours"), Some(entity.clone()));
        assert_eq!(spec("memory_gb_hours"), Some(entity));
        assert_eq!(
            spec("network_egress_gb"),
            Some(Merge {
                key: vec![2],
                sign: vec![17]
            })
        );
        let head = "SELECT entity_id, 'x' AS unit";
        let tail = "0.1 AS unit_price, 0.1 AS amount FROM usage";
        for (sql, merges) in [
            (format!("{head}, SUM(vcpu_seconds) AS quantity, {tail} GROUP BY entity_id"), true),
            (format!("{head}, SUM(vcpu_seconds) AS quantity, {tail} WHERE kind = 'vm' GROUP BY entity_id"), true),
            (format!("{head}, MAX(node_id) AS resource_id, SUM(vcpu_seconds) AS quantity, {tail} GROUP BY entity_id"), true),
            // the optimizer turns this into two aggregations, which the check does not follow
            (format!("{head}, CAST(COUNT(DISTINCT instance_id) AS DECIMAL(38, 9)) AS quantity, {tail} GROUP BY entity_id"), false),
            (format!("{head}, CAST(COUNT(*) AS DECIMAL(38, 9)) AS quantity, {tail} GROUP BY entity_id"), false),
            (format!("{head}, AVG(vcpu_seconds) AS quantity, {tail} GROUP BY entity_id"), false),
            (format!("{head}, MAX(vcpu_seconds) AS quantity, {tail} GROUP BY entity_id"), false),
            (format!("{head}, SUM(vcpu_seconds) AS quantity, {tail} WHERE net_tx_bytes > 5 GROUP BY entity_id"), false),
            (format!("{head}, SUM(vcpu_seconds * vcpu_seconds) AS quantity, {tail} GROUP BY entity_id"), false),
            (format!("{head}, SUM(vcpu_seconds) AS quantity, {tail} GROUP BY entity_id, cpu_seconds"), false),
            (format!("{head}, vcpu_seconds AS quantity, {tail}"), false),
        ] {
            let e = one_rule(&sql).await;
            assert_eq!(e.rules[0].merge.is_some(), merges, "{sql}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn merged_rows_give_the_events_of_the_rows_one_by_one() {
        let e = engine().await;
        let mut rows = Vec::new();
        for (i, (entity, tx)) in [
            ("acme", 0),
            ("acme", 5_000_000_000),
            ("acme", 0),
            ("globex", 7),
            ("globex", 0),
        ]
        .iter()
        .enumerate()
        {
            let mut u = usage(entity, &format!("{}.123456789", 100 + i), 1 << 30, *tx);
            u.memory_used_byte_seconds = (i % 2 == 0).then(|| Dec::from_int(i as i64));
            rows.push(u);
        }
        for (idx, rule) in e.rules.iter().enumerate() {
            let m = rule.merge.clone().expect("shipped rules merge");
            let mut merged: Vec<Usage> = Vec::new();
            let mut slots: std::collections::HashMap<Vec<u8>, usize> = Default::default();
            for u in &rows {
                match slots.get(&m.key(&u.view())) {
                    Some(&i) => assert!(add_quantities(&mut merged[i], &u.view())),
                    None => {
                        slots.insert(m.key(&u.view()), merged.len());
                        merged.push(u.clone());
                    }
                }
            }
            assert!(
                merged.len() < rows.len(),
                "{}: nothing merged",
                rule.source.header.name
            );
            let one: Vec<&Usage> = rows.iter().collect();
            let many: Vec<&Usage> = merged.iter().collect();
            let want = e.evaluate(idx, 0, &one, 0, None).await.expect("eval");
            let got = e
                .evaluate_merged(idx, 0, &many, rows.len() as i64, 0, None, &[])
                .await
                .expect("eval");
            assert_eq!(got, want, "{}", rule.source.header.name);
            assert!(!want.is_empty());
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn the_readme_example_rule_loads() {
        let readme =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md"))
                .expect("README");
        let start = readme.find("```sql\n").expect("an sql block") + 7;
        let len = readme[start..].find("```").expect("closed");
        let src = parse_rule(Path::new("README.md"), &readme[start..start + len]).expect("parses");
        assert_eq!(src.header.name, "vcpu_hours");
        Engine::new(vec![src], 64 << 20, Duration::from_secs(5))
            .await
            .expect("compiles");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn rules_read_instance_labels() {
        let text = "-- name: gold\n-- version: 1\n-- window: 1h\n-- currency: USD\n\
            SELECT entity_id, labels['tier'] AS resource_id, 'vcpu_hour' AS unit, \
            SUM(vcpu_seconds) / 3600 AS quantity, 0.05 AS unit_price, \
            SUM(vcpu_seconds) / 3600 * 0.05 AS amount \
            FROM usage WHERE labels['tier'] = 'gold' GROUP BY entity_id, labels['tier']\n";
        let src = parse_rule(Path::new("rules/gold.sql"), text).expect("parses");
        let e = Engine::new(vec![src], 64 << 20, Duration::from_secs(5))
            .await
            .expect("compiles");
        assert!(e.rules[0].reads_labels());
        assert!(engine().await.rules.iter().all(|r| !r.reads_labels()));
        let mut gold = usage("acme", "7200", 0, 0);
        gold.labels.insert("tier".into(), "gold".into());
        let mut silver = usage("acme", "3600", 0, 0);
        silver.labels.insert("tier".into(), "silver".into());
        let plain = usage("globex", "3600", 0, 0);
        let rows = [gold, silver, plain];
        let refs: Vec<&Usage> = rows.iter().collect();
        let v = e.evaluate(0, 0, &refs, 0, None).await.expect("eval");
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!(
            (
                v[0].entity_id.as_str(),
                v[0].resource_id.as_str(),
                v[0].amount.to_string()
            ),
            ("acme", "gold", "0.1".to_string())
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn hostile_and_broken_rules_are_refused_with_the_file_named() {
        let cases = [
            ("CREATE TABLE x AS SELECT 1", "DDL"),
            ("COPY (SELECT 1) TO '/tmp/x.csv'", ""),
            ("SELECT * FROM '/etc/passwd'", ""),
            ("INSERT INTO usage SELECT * FROM usage", ""),
            ("SET datafusion.execution.batch_size = 1", ""),
            ("SELECT entity_id, 'x' AS unit, 1.5::double AS quantity, 1 AS unit_price, 1 AS amount FROM usage", "float"),
            ("SELECT entity_id, 'x' AS unit, 1 AS quantity, 1 AS unit_price FROM usage", "amount"),
            ("WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT 'e' AS entity_id, 'x' AS unit, n AS quantity, 1 AS unit_price, 1 AS amount FROM r", ""),
        ];
        for (sql, hint) in cases {
            let text =
                format!("-- name: bad\n-- version: 1\n-- window: 1h\n-- currency: USD\n{sql}\n");
            let src = parse_rule(Path::new("rules/bad.sql"), &text).expect("header parses");
            let err = Engine::new(vec![src], 64 << 20, Duration::from_secs(5))
                .await
                .err()
                .unwrap_or_else(|| panic!("accepted: {sql}"));
            let msg = err.to_string();
            assert!(msg.contains("rules/bad.sql"), "{msg}");
            assert!(
                msg.to_lowercase().contains(&hint.to_lowercase()),
                "{sql}: {msg}"
            );
        }
        let e = parse_rule(Path::new("r.sql"), "-- name: x\n-- version: one\nSELECT 1")
            .expect_err("bad version");
        assert_eq!(e.to_string(), "r.sql:2: version \"one\" is not an integer");
    }
}
