//! Batch re-rating of a month of usage at one-minute resolution: `instances` × `minutes`
//! rows (1,000 × 43,200 = 43.2M by default) from Parquet through the shipped rules, the
//! way `meterflow rerate` does it. Baseline in the same run: reading the same columns of
//! the same files (the decode no batch tool can avoid). The generated files are kept in
//! `dir` (default `~/.cache/meterflow/bench-rerate`) and reused; generating them is not
//! timed. The run checks Σ vCPU-hours against the generator's closed form, or the
//! figure is void.
//!
//! `cargo run --release -p meterflow-rater --bin bench-rerate -- [instances] [minutes] [dir]`

/// The allocator of `meterflow rerate` (the `meterflow` binary), which this measures.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::{ensure, Result};
use datafusion::arrow::array::{
    ArrayRef, Decimal128Array, Int32Array, MapBuilder, RecordBatch, StringArray, StringBuilder,
    TimestampMillisecondArray,
};
use datafusion::parquet::arrow::ArrowWriter;
use meterflow_rater::batch::{
    needed_columns, read_usage_file, rerate_files, usage_file_schema, usage_rows,
};
use meterflow_rater::rules::Engine;
use meterflow_types::Dec;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MINUTE: i64 = 60_000;
/// 2026-01-01T00:00:00Z
const START: i64 = 1_767_225_600_000;

use meterflow_runtime::peak_rss_mib;

fn vcpus(i: usize) -> i128 {
    1 + (i % 8) as i128
}

/// One batch: every instance for minutes `m0..m1`, minute by minute.
fn batch(instances: usize, m0: i64, m1: i64) -> Result<RecordBatch> {
    let n = instances * (m1 - m0) as usize;
    let mut part = Vec::with_capacity(n);
    let mut ids = Vec::with_capacity(n);
    let mut inst = Vec::with_capacity(n);
    let mut ent = Vec::with_capacity(n);
    let mut start = Vec::with_capacity(n);
    let mut end = Vec::with_capacity(n);
    let (mut vcpu, mut cpu, mut mem, mut tx) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for m in m0..m1 {
        for i in 0..instances {
            let e = i % 100;
            part.push((e % 4) as i32);
            let h = (i as u128) << 64 | m as u128;
            ids.push(format!(
                "{:032x}",
                h.wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835)
            ));
            inst.push(format!("i-{i:05}"));
            ent.push(format!("entity-{e:03}"));
            start.push(START + m * MINUTE);
            end.push(START + (m + 1) * MINUTE);
            let nano = 1_000_000_000i128;
            vcpu.push(vcpus(i) * 60 * nano);
            cpu.push(vcpus(i) * 30 * nano);
            mem.push((1 + (i % 16) as i128) * (1 << 30) * 60 * nano);
            tx.push((1000 + i as i128) * 60 * nano);
        }
    }
    let dec = |v: Vec<i128>| -> Result<ArrayRef> {
        Ok(Arc::new(
            Decimal128Array::from(v).with_precision_and_scale(38, 9)?,
        ))
    };
    let zeros = || dec(vec![0; n]);
    let text = |v: &[String]| -> ArrayRef { Arc::new(StringArray::from_iter_values(v.iter())) };
    let same = |s: &str| -> ArrayRef { Arc::new(StringArray::from_iter_values((0..n).map(|_| s))) };
    let ts = |v: Vec<i64>| -> ArrayRef {
        Arc::new(TimestampMillisecondArray::from(v).with_timezone("UTC"))
    };
    let mut labels = MapBuilder::new(None, StringBuilder::new(), StringBuilder::new());
    for _ in 0..n {
        labels.append(true)?;
    }
    let none_i32 = || -> ArrayRef { Arc::new(Int32Array::from(vec![None; n])) };
    let cols: Vec<ArrayRef> = vec![
        Arc::new(Int32Array::from(part)),
        text(&ids),
        text(&ids),
        text(&inst),
        text(&ent),
        same("user"),
        Arc::new(StringArray::from(vec![None::<&str>; n])),
        same("node-1"),
        same("bench"),
        same("vm"),
        Arc::new(StringArray::from(vec![None::<&str>; n])),
        ts(start),
        ts(end),
        dec(vcpu)?,
        dec(cpu)?,
        dec(mem)?,
        Arc::new(Decimal128Array::from(vec![None; n]).with_precision_and_scale(38, 9)?),
        zeros()?,
        dec(tx)?,
        zeros()?,
        zeros()?,
        Arc::new(labels.finish()),
        none_i32(),
        none_i32(),
        Arc::new(TimestampMillisecondArray::from(vec![None; n]).with_timezone("UTC")),
    ];
    Ok(RecordBatch::try_new(usage_file_schema(), cols)?)
}

/// One file per day, 60 minutes a batch.
fn generate(dir: &Path, instances: usize, minutes: i64) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut files = Vec::new();
    let mut day = 0;
    while day * 1440 < minutes {
        let f = dir.join(format!("day-{day:03}.parquet"));
        if !f.exists() {
            let tmp = f.with_extension("tmp");
            let mut w =
                ArrowWriter::try_new(std::fs::File::create(&tmp)?, usage_file_schema(), None)?;
            let last = ((day + 1) * 1440).min(minutes);
            let mut m = day * 1440;
            while m < last {
                let m1 = (m + 60).min(last);
                w.write(&batch(instances, m, m1)?)?;
                m = m1;
            }
            w.close()?;
            std::fs::rename(&tmp, &f)?;
        }
        files.push(f);
        day += 1;
    }
    Ok(files)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let instances: usize = args.first().map(|s| s.parse()).transpose()?.unwrap_or(1000);
    let minutes: i64 = args
        .get(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(43_200);
    let dir = args.get(2).map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| ".".into()))
            .join(".cache/meterflow/bench-rerate")
            .join(format!("{instances}x{minutes}"))
    });
    let rows = instances as u64 * minutes as u64;
    let t = Instant::now();
    let files = generate(&dir, instances, minutes)?;
    eprintln!(
        "{} files of usage in {} (ready in {:.1} s)",
        files.len(),
        dir.display(),
        t.elapsed().as_secs_f64()
    );
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../rules");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let engines = (0..threads)
        .map(|_| rt.block_on(Engine::load(&rules, 1 << 30, Duration::from_secs(600))))
        .collect::<Result<Vec<_>, _>>()?;
    let cols = needed_columns(&engines[0]);

    // baseline: the same columns of the same files, decoded
    let t = Instant::now();
    let mut read = 0u64;
    for f in &files {
        for b in read_usage_file(f, &cols)? {
            read += b?.num_rows() as u64;
        }
    }
    let bare = t.elapsed().as_secs_f64();
    ensure!(read == rows, "{read} rows read, {rows} expected");

    // the same, decoded into usage records
    let t = Instant::now();
    let mut decoded = 0u64;
    for f in &files {
        for b in read_usage_file(f, &cols)? {
            decoded += usage_rows(&b?, f)?.len() as u64;
        }
    }
    let decode = t.elapsed().as_secs_f64();
    ensure!(decoded == rows);

    // re-rating
    let t = Instant::now();
    let mut events = 0u64;
    let mut vcpu_hours = Dec::ZERO;
    let (usage, dups) = rerate_files(
        &engines,
        meterflow_types::window::Period::MONTH,
        &files,
        5 * MINUTE,
        2 * 3600 * 1000,
        |_| {},
        |ev| {
            events += ev.len() as u64;
            for e in ev.iter().filter(|e| e.rule_id == "vcpu_hours") {
                vcpu_hours = vcpu_hours.checked_add(e.quantity)?;
            }
            Ok(())
        },
    )?;
    let secs = t.elapsed().as_secs_f64();
    ensure!(
        usage == rows && dups == 0,
        "{usage} usage, {dups} duplicates"
    );
    let want: i128 = (0..instances).map(vcpus).sum::<i128>() * minutes as i128 / 60;
    ensure!(
        vcpu_hours == Dec::from_scaled(want * 1_000_000_000, 9)?,
        "Σ vCPU-hours {vcpu_hours}, closed form {want}"
    );
    println!(
        "| batch re-rating, {instances} instances × {minutes} minutes ({} rows), 3 shipped rules | seconds | rows/s | vs bare read |",
        rows
    );
    println!("|---|---:|---:|---:|");
    println!(
        "| bare read of the rules' columns (baseline) | {bare:.2} | {:.0} | 1.00 |",
        rows as f64 / bare
    );
    println!(
        "| read + decode into usage records | {decode:.2} | {:.0} | {:.2} |",
        rows as f64 / decode,
        bare / decode
    );
    println!(
        "| re-rating ({threads} workers + the reader): windows + rules + {events} revenue events | {secs:.2} | {:.0} | {:.2} |",
        rows as f64 / secs,
        bare / secs
    );
    println!();
    println!(
        "Σ vCPU-hours {vcpu_hours} = closed form; peak RSS {:.0} MiB",
        peak_rss_mib()
    );
    Ok(())
}
