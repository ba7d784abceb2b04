//! Reference tables rules can join: every `<name>.csv` and `<name>.parquet` next to the
//! rules is the table `<name>` (rate cards, tiers, SKU maps). Money is never a float:
//! a CSV column whose values are all integers is BIGINT, one whose values are all plain
//! decimals is DECIMAL(38, 9), anything else is text, and an empty cell is NULL; a
//! Parquet float column is refused. Tables are re-read when their file changes; a window
//! is priced with the contents current when it closes.

use crate::rules::RuleError;
use async_trait::async_trait;
use datafusion::arrow::array::{
    ArrayRef, Decimal128Builder, Int64Builder, RecordBatch, RecordBatchReader, StringBuilder,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::catalog::Session;
use datafusion::datasource::{TableProvider, TableType};
use datafusion::logical_expr::Expr;
use datafusion::physical_plan::ExecutionPlan;
use meterflow_types::Dec;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// A reference table file found next to the rules.
#[derive(Clone, Debug)]
pub struct TableSource {
    pub name: String,
    pub path: PathBuf,
}

/// Names rules cannot use for a reference table.
const RESERVED: [&str; 2] = ["usage", "usage_to_date"];

/// Every `*.csv` and `*.parquet` in `dir`, sorted by name.
pub fn find_tables(dir: &Path) -> Result<Vec<TableSource>, RuleError> {
    let mut out: Vec<TableSource> = Vec::new();
    let entries = std::fs::read_dir(dir)
        .map_err(|e| RuleError::Io(format!("reading rules dir {}: {e}", dir.display())))?;
    for e in entries.flatten() {
        let path = e.path();
        let ext = path
            .extension()
            .and_then(|x| x.to_str())
            .unwrap_or_default();
        if ext != "csv" && ext != "parquet" {
            continue;
        }
        let file = path.display().to_string();
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_string();
        let valid = name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !valid || RESERVED.contains(&name.as_str()) {
            return Err(RuleError::Table {
                file,
                msg: format!(
                    "{name:?} cannot name a table: lower-case letters, digits and _, not {RESERVED:?}"
                ),
            });
        }
        if let Some(other) = out.iter().find(|t| t.name == name) {
            return Err(RuleError::Table {
                file,
                msg: format!("table {name:?} is also {}", other.path.display()),
            });
        }
        out.push(TableSource { name, path });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Read a table file into one batch.
pub fn read_table_file(path: &Path) -> Result<RecordBatch, RuleError> {
    let file = path.display().to_string();
    let err = |msg: String| RuleError::Table {
        file: file.clone(),
        msg,
    };
    if path.extension().is_some_and(|x| x == "parquet") {
        use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
        let f = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
        let reader = ParquetRecordBatchReaderBuilder::try_new(f)
            .map_err(|e| err(e.to_string()))?
            .build()
            .map_err(|e| err(e.to_string()))?;
        let schema = reader.schema();
        for f in schema.fields() {
            if matches!(
                f.data_type(),
                DataType::Float16 | DataType::Float32 | DataType::Float64
            ) {
                return Err(err(format!(
                    "column {} is {}: amounts and prices must be exact — store it as DECIMAL",
                    f.name(),
                    f.data_type()
                )));
            }
        }
        let batches = reader
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| err(e.to_string()))?;
        return datafusion::arrow::compute::concat_batches(&schema, &batches)
            .map_err(|e| err(e.to_string()));
    }
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(true)
        .trim(csv::Trim::All)
        .from_path(path)
        .map_err(|e| err(e.to_string()))?;
    let headers: Vec<String> = rdr
        .headers()
        .map_err(|e| err(e.to_string()))?
        .iter()
        .map(str::to_string)
        .collect();
    if headers.is_empty() || headers.iter().any(String::is_empty) {
        return Err(err("the first line must name every column".into()));
    }
    let mut rows: Vec<Vec<String>> = Vec::new();
    for (i, r) in rdr.records().enumerate() {
        let r = r.map_err(|e| err(format!("line {}: {e}", i + 2)))?;
        if r.len() != headers.len() {
            return Err(err(format!(
                "line {}: {} fields, the header has {}",
                i + 2,
                r.len(),
                headers.len()
            )));
        }
        rows.push(r.iter().map(str::to_string).collect());
    }
    let mut fields = Vec::new();
    let mut cols: Vec<ArrayRef> = Vec::new();
    for (c, name) in headers.iter().enumerate() {
        let values: Vec<Option<&str>> = rows
            .iter()
            .map(|r| Some(r[c].as_str()).filter(|v| !v.is_empty()))
            .collect();
        let present = || values.iter().flatten();
        let all_int = present().all(|v| v.parse::<i64>().is_ok());
        let all_dec = present().all(|v| is_plain_decimal(v));
        let any = present().next().is_some();
        if any && all_int {
            let mut b = Int64Builder::with_capacity(values.len());
            for v in &values {
                b.append_option(v.and_then(|v| v.parse().ok()));
            }
            fields.push(Field::new(name, DataType::Int64, true));
            cols.push(Arc::new(b.finish()));
        } else if any && all_dec {
            let mut b = Decimal128Builder::with_capacity(values.len())
                .with_precision_and_scale(38, 9)
                .map_err(|e| err(e.to_string()))?;
            for (i, v) in values.iter().enumerate() {
                match v {
                    None => b.append_null(),
                    Some(v) => b.append_value(
                        v.parse::<Dec>()
                            .map_err(|e| err(format!("line {}, column {name}: {e}", i + 2)))?
                            .raw(),
                    ),
                }
            }
            fields.push(Field::new(name, DataType::Decimal128(38, 9), true));
            cols.push(Arc::new(b.finish()));
        } else {
            let mut b = StringBuilder::new();
            for v in &values {
                b.append_option(*v);
            }
            fields.push(Field::new(name, DataType::Utf8, true));
            cols.push(Arc::new(b.finish()));
        }
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).map_err(|e| err(e.to_string()))
}

/// `-12.5`, `0.036`, `7`: digits with at most one point, optionally signed.
fn is_plain_decimal(v: &str) -> bool {
    let d = v.strip_prefix('-').unwrap_or(v);
    let mut parts = d.splitn(2, '.');
    let int = parts.next().unwrap_or_default();
    let frac = parts.next().unwrap_or("0");
    !(int.is_empty() && frac.is_empty())
        && int.bytes().all(|b| b.is_ascii_digit())
        && frac.bytes().all(|b| b.is_ascii_digit())
        && !frac.is_empty()
}

/// A reference table whose contents can be replaced (same schema) while plans that
/// read it stay valid.
#[derive(Debug)]
pub struct RefTable {
    schema: SchemaRef,
    batch: Arc<Mutex<RecordBatch>>,
}

impl RefTable {
    /// The table's columns.
    pub fn columns(&self) -> SchemaRef {
        self.schema.clone()
    }
    /// New contents with the same columns.
    pub fn replace(&self, batch: RecordBatch) {
        if let Ok(mut b) = self.batch.lock() {
            *b = batch;
        }
    }
    pub fn new(batch: RecordBatch) -> RefTable {
        RefTable {
            schema: batch.schema(),
            batch: Arc::new(Mutex::new(batch)),
        }
    }
}

#[async_trait]
impl TableProvider for RefTable {
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
        let schema = match projection {
            Some(p) => Arc::new(self.schema.project(p)?),
            None => self.schema.clone(),
        };
        let (batch, projection) = (self.batch.clone(), projection.cloned());
        // read when the plan runs: the contents current when the window closes
        let read: crate::live::Read = Arc::new(move || {
            let b = batch
                .lock()
                .map(|b| b.clone())
                .map_err(|_| datafusion::error::DataFusionError::Internal("table lock".into()))?;
            Ok(vec![match &projection {
                Some(p) => b.project(p)?,
                None => b,
            }])
        });
        Ok(Arc::new(crate::live::LiveScan::new(
            "reference table",
            schema,
            read,
        )))
    }
}

/// A loaded reference table and the file state it was loaded from.
pub struct Loaded {
    pub source: TableSource,
    pub table: Arc<RefTable>,
    modified: Option<SystemTime>,
}

fn modified(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

impl Loaded {
    pub fn load(source: TableSource) -> Result<Loaded, RuleError> {
        let modified = modified(&source.path);
        let batch = read_table_file(&source.path)?;
        Ok(Loaded {
            table: Arc::new(RefTable::new(batch)),
            source,
            modified,
        })
    }

    /// Re-read the file if it changed. `Ok(true)`: new contents in place. A file whose
    /// schema changed is refused (the loaded contents stay): rules were planned against
    /// the old columns — ship a new rule set instead.
    pub fn reload(&mut self) -> Result<bool, RuleError> {
        let now = modified(&self.source.path);
        if now == self.modified {
            return Ok(false);
        }
        self.modified = now;
        let batch = read_table_file(&self.source.path)?;
        if batch.schema() != self.table.schema {
            return Err(RuleError::Table {
                file: self.source.path.display().to_string(),
                msg: format!(
                    "columns changed ({} → {}); the old contents stay until the rules are reloaded",
                    self.table.schema,
                    batch.schema()
                ),
            });
        }
        if let Ok(mut b) = self.table.batch.lock() {
            *b = batch;
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Array, Decimal128Array, Int64Array, StringArray};

    #[test]
    fn csv_columns_are_integers_decimals_or_text_never_floats() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("cards.csv");
        std::fs::write(
            &p,
            "sku, price ,units,note\nvm.small,0.036,10,\nvm.large,1.5,,\"big, fast\"\n",
        )
        .expect("write");
        let b = read_table_file(&p).expect("reads");
        let s = b.schema();
        let types: Vec<_> = s
            .fields()
            .iter()
            .map(|f| (f.name().as_str(), f.data_type().clone()))
            .collect();
        assert_eq!(
            types,
            vec![
                ("sku", DataType::Utf8),
                ("price", DataType::Decimal128(38, 9)),
                ("units", DataType::Int64),
                ("note", DataType::Utf8),
            ]
        );
        let price = b
            .column(1)
            .as_any()
            .downcast_ref::<Decimal128Array>()
            .expect("dec");
        assert_eq!(price.value(0), 36_000_000);
        let units = b
            .column(2)
            .as_any()
            .downcast_ref::<Int64Array>()
            .expect("int");
        assert!(units.is_null(1));
        let note = b
            .column(3)
            .as_any()
            .downcast_ref::<StringArray>()
            .expect("text");
        assert_eq!(note.value(1), "big, fast");
        std::fs::write(&p, "a,b\n1\n").expect("write");
        let e = read_table_file(&p).expect_err("short line").to_string();
        assert!(e.contains("cards.csv") && e.contains("line 2"), "{e}");
    }

    #[test]
    fn table_names_must_be_plain_and_not_shadow_usage() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::write(dir.path().join("usage.csv"), "a\n1\n").expect("write");
        let e = find_tables(dir.path()).expect_err("reserved").to_string();
        assert!(e.contains("usage.csv"), "{e}");
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::write(dir.path().join("Rate-Card.csv"), "a\n1\n").expect("write");
        assert!(find_tables(dir.path()).is_err());
    }

    #[test]
    fn a_changed_file_is_reloaded_unless_its_columns_changed() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("cards.csv");
        std::fs::write(&p, "sku,price\na,1.5\n").expect("write");
        let mut t = Loaded::load(TableSource {
            name: "cards".into(),
            path: p.clone(),
        })
        .expect("loads");
        assert!(!t.reload().expect("unchanged"));
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&p, "sku,price\na,1.5\nb,2.25\n").expect("write");
        let later = SystemTime::now() + std::time::Duration::from_secs(1);
        let f = std::fs::File::options().write(true).open(&p).expect("open");
        f.set_modified(later).expect("mtime");
        assert!(t.reload().expect("reloaded"));
        assert_eq!(t.table.batch.lock().expect("lock").num_rows(), 2);
        std::fs::write(&p, "sku,price,extra\na,1.5,x\n").expect("write");
        let f = std::fs::File::options().write(true).open(&p).expect("open");
        f.set_modified(later + std::time::Duration::from_secs(1))
            .expect("mtime");
        let e = t.reload().expect_err("columns changed").to_string();
        assert!(e.contains("columns changed"), "{e}");
        assert_eq!(
            t.table.batch.lock().expect("lock").num_rows(),
            2,
            "old contents stay"
        );
    }
}
