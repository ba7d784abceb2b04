//! Chaos: the real service binaries on Tansu, a simulated fleet of known usage, SIGKILLs
//! of random stages at random moments, and extra enricher and rater members added and
//! removed mid-run. Pass = the settlement files equal the bill computed independently
//! from the fleet and the rules, to the cent, with no revenue event settled twice and
//! nothing dead-lettered or left parked.
//!
//! `target/release/chaos [samples] [kills] [seed]` runs it at scale (RELIABILITY.md); the
//! test suite runs a short version.

use crate::expect::{FleetRun, DAY};
use crate::pipeline::Pipeline;
use crate::settled::Settled;
use crate::Rng;
use meterflow_collector::fleet::FleetConfig;
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct Chaos {
    pub instances: u32,
    pub polls: i64,
    /// SIGKILLs, each followed by a restart of the same member.
    pub kills: usize,
    /// Simulated milliseconds per wall millisecond of the collector's clock.
    pub speed: u32,
    pub seed: u64,
    /// Add a second enricher and rater after a third of the kills, remove them (SIGTERM)
    /// after two thirds.
    pub extra_members: bool,
    /// How long the pipeline may take to settle everything after the last fault.
    pub drain_secs: u64,
    /// Tansu's storage engine: `memory://tansu/`, or `sqlite://broker.db` (persistent,
    /// much slower) for a run that restarts the broker.
    pub storage: String,
    /// SIGKILLs of the broker itself, each followed by a restart on the same storage,
    /// spread among the stage kills.
    pub broker_restarts: usize,
    /// More of the settler's configuration (TOML appended to its `out_dir` and `period`),
    /// e.g. a `[storage_options]` table; empty for the defaults.
    pub settler_extra: String,
}

#[derive(Debug)]
pub struct Report {
    pub samples: i64,
    /// Each fault, with its wall time since the start.
    pub faults: Vec<String>,
    pub expected_cents: i128,
    pub settled_cents: i128,
    /// (period start, entity) totals that differ, as text.
    pub differences: Vec<String>,
    pub settled_twice: usize,
    pub dead_lettered: usize,
    pub parked: usize,
    /// Members whose group had not settled when the next fault was due (the run stops).
    pub unsettled: Vec<String>,
    pub seconds: f64,
    /// The raters' batches that billed late usage as adjustments, and that dropped copies
    /// of counted usage behind the watermark closing their window (from their logs).
    pub late_batches: usize,
    pub copies_behind_close: usize,
    /// The raters' batches that dropped copies of usage in closed windows at all.
    pub copies_after_close: usize,
    /// Batches of any stage that dropped records the Kafka client delivered again.
    pub redelivered: usize,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.differences.is_empty()
            && self.expected_cents == self.settled_cents
            && self.settled_twice == 0
            && self.dead_lettered == 0
            && self.parked == 0
            && self.unsettled.is_empty()
    }

    pub fn print(&self) {
        println!("chaos run: {} samples, {:.1} s", self.samples, self.seconds);
        for f in &self.faults {
            println!("  {f}");
        }
        let usd = |c: i128| format!("{}.{:02}", c / 100, c % 100);
        println!(
            "expected {} USD, settled {} USD; {} (period, entity) totals differ; {} revenue events settled twice; {} dead-lettered; {} parked",
            usd(self.expected_cents),
            usd(self.settled_cents),
            self.differences.len(),
            self.settled_twice,
            self.dead_lettered,
            self.parked
        );
        println!(
            "raters: {} batches billed late usage as adjustments; {} dropped copies of usage in closed windows, {} of them behind the watermark closing the window in the same batch",
            self.late_batches, self.copies_after_close, self.copies_behind_close
        );
        println!(
            "stages: {} batches dropped records their Kafka client delivered again",
            self.redelivered
        );
        for d in self.differences.iter().take(20) {
            println!("  {d}");
        }
        println!("{}", if self.passed() { "PASS" } else { "FAIL" });
    }
}

pub fn run(c: &Chaos) -> Report {
    let fleet = FleetRun {
        fleet: FleetConfig {
            instances: c.instances,
            entities: 20.min(c.instances),
            seed: c.seed,
            ..Default::default()
        },
        start: meterflow_types::time::parse_rfc3339("2026-02-02T00:00:00Z").expect("time"),
        poll_ms: 300_000,
        polls: c.polls,
        reassign: Vec::new(),
    };
    let mut rng = Rng(c.seed);
    let t0 = Instant::now();
    let mut p = Pipeline::start_stages_on(
        &c.storage,
        fleet.clone(),
        c.speed,
        "day",
        &["rater", "enricher"],
    );
    let mut faults = Vec::new();
    let out = p.out.display().to_string();
    p.launch_with(
        "settler",
        &format!("out_dir = \"{out}\"\nperiod = \"day\"\n{}", c.settler_extra),
    );
    if !c.settler_extra.is_empty() {
        faults.push(format!(
            "settler configured with: {}",
            c.settler_extra.trim().replace('\n', "; ")
        ));
    }
    p.start_collector();
    // the collector's run takes about this long; faults are spread over it
    let span_ms = (c.polls * fleet.poll_ms / i64::from(c.speed.max(1))).max(1000) as u64;
    let total = c.kills + c.broker_restarts;
    let gap = span_ms / (total as u64 + 1);
    // the broker restarts fall at evenly spaced faults
    let broker_at: Vec<usize> = (1..=c.broker_restarts)
        .map(|j| j * total / (c.broker_restarts + 1))
        .collect();
    let log = |faults: &mut Vec<String>, what: String| {
        let line = format!("t={:>7.1}s {what}", t0.elapsed().as_secs_f64());
        eprintln!("{line}");
        faults.push(line);
    };
    let mut extras = false;
    let mut unsettled = Vec::new();
    // Each fault waits until every consumer group has settled from the one before:
    // Tansu 0.6 never expires a member, so a member killed while its group rebalances is
    // waited for forever (Kafka would drop it after session.timeout.ms). A fault that
    // lands while data flows, not a fault the broker cannot recover from, is the test.
    let mut settle = |p: &mut Pipeline, faults: &mut Vec<String>, changed: bool| -> bool {
        if changed {
            // members learn of a rebalance at their next heartbeat (3 s)
            std::thread::sleep(Duration::from_secs(4));
        }
        match p.wait_groups_settled(Duration::from_secs(120)) {
            Ok(()) => true,
            Err(names) => {
                log(
                    faults,
                    format!("groups did not settle within 120 s: {}", names.join(", ")),
                );
                unsettled = names;
                false
            }
        }
    };
    let mut broker_restarted = false;
    for k in 0..total {
        if !settle(&mut p, &mut faults, std::mem::take(&mut broker_restarted)) {
            break;
        }
        std::thread::sleep(Duration::from_millis(rng.below(gap as usize) as u64));
        if c.extra_members && k == total / 3 {
            for stage in ["enricher", "rater"] {
                // dynamic members: they can leave again (Tansu never expires a static
                // member that is gone)
                p.start_replica_with(stage, |cfg| {
                    cfg.replace("[kafka]\n", "[kafka]\nstatic_membership = false\n")
                });
                log(&mut faults, format!("extra {stage} member added"));
            }
            extras = true;
            if !settle(&mut p, &mut faults, true) {
                break;
            }
        }
        if extras && k == 2 * total / 3 {
            remove_extras(&mut p, &mut faults, &log);
            extras = false;
            if !settle(&mut p, &mut faults, true) {
                break;
            }
        }
        if broker_at.contains(&k) {
            // Tansu keeps group state in its storage: a broker killed within moments of a
            // rebalance came back with a group that never completed (seen: the rater
            // never assigned again; Kafka would expire the stale generation). The broker
            // fault lands on groups that have been stable for a while.
            std::thread::sleep(Duration::from_secs(10));
            p.broker.restart();
            log(
                &mut faults,
                format!("SIGKILL broker ({}), restarted", p.broker.storage()),
            );
            broker_restarted = true;
            continue;
        }
        let collecting = p.collector.as_mut().is_some_and(|c| c.exited().is_none());
        let victim = match rng.below(if collecting { 4 } else { 3 }) {
            0 => &mut p.enricher,
            1 => &mut p.rater,
            2 => &mut p.settler,
            _ => p.collector.as_mut().expect("collector"),
        };
        victim.kill9();
        victim.restart();
        let name = victim.name.clone();
        log(&mut faults, format!("SIGKILL {name}, restarted"));
    }
    if extras && unsettled.is_empty() {
        remove_extras(&mut p, &mut faults, &log);
    }
    if !unsettled.is_empty() {
        let seconds = t0.elapsed().as_secs_f64();
        eprintln!("{}", p.logs());
        keep(&mut p);
        p.stop();
        return Report {
            samples: i64::from(c.instances) * c.polls,
            faults,
            expected_cents: fleet.totals(DAY).values().sum(),
            settled_cents: 0,
            differences: Vec::new(),
            settled_twice: 0,
            dead_lettered: 0,
            parked: 0,
            unsettled,
            seconds,
            late_batches: 0,
            copies_behind_close: 0,
            copies_after_close: 0,
            redelivered: 0,
        };
    }
    let want = fleet.totals(DAY).len();
    p.drain(Duration::from_secs(c.drain_secs), |out| {
        meterflow_settler::files::all_manifests(out).is_ok_and(|m| m.len() >= want)
    });
    let seconds = t0.elapsed().as_secs_f64();
    let s = Settled::read(&p.out);
    let got = s.totals_cents("USD");
    let expected = fleet.totals(DAY);
    let mut differences = Vec::new();
    for k in expected.keys().chain(got.keys()) {
        let (e, g) = (expected.get(k), got.get(k));
        if e != g
            && !differences
                .iter()
                .any(|d: &String| d.starts_with(&format!("{k:?}")))
        {
            differences.push(format!("{k:?}: expected {e:?} cents, settled {g:?}"));
        }
    }
    let mut ids = std::collections::HashSet::new();
    let settled_twice = s.lines.iter().filter(|l| !ids.insert(&l.id)).count();
    let dead_lettered = p.read(&p.kafka.topics.dlq).len();
    let mut live = std::collections::HashMap::new();
    for r in p.read(&p.kafka.topics.parked) {
        live.insert(r.key.clone(), r.payload.is_some());
    }
    let parked = live.values().filter(|l| **l).count();
    // every stage's whole log, replicas too
    let logs: String = p.procs().iter().map(|x| x.log()).collect();
    let report = Report {
        samples: i64::from(c.instances) * c.polls,
        faults,
        expected_cents: expected.values().sum(),
        settled_cents: got.values().sum(),
        differences,
        settled_twice,
        dead_lettered,
        parked,
        unsettled,
        seconds,
        late_batches: logs.matches("late usage billed as adjustments").count(),
        copies_behind_close: logs
            .lines()
            .filter(|l| l.contains("copies of usage counted in closed windows dropped"))
            .filter(|l| !l.contains("in_this_batch=0"))
            .count(),
        copies_after_close: logs
            .matches("copies of usage counted in closed windows dropped")
            .count(),
        redelivered: logs
            .matches("records delivered again by the client dropped")
            .count(),
    };
    // METERFLOW_CHAOS_DUMP keeps a passing run's files too
    if !report.passed() || std::env::var_os("METERFLOW_CHAOS_DUMP").is_some() {
        dump(&p);
        keep(&mut p);
    }
    p.stop();
    report
}

/// A kept run's usage, revenue events and rater state, record by record (the broker's
/// storage may be in memory): `usage.csv`, `rated.csv`, `rater_state.csv` in the kept
/// directory.
fn dump(p: &Pipeline) {
    use meterflow_types::{RatedEvent, Usage, Watermark};
    use std::fmt::Write as _;
    let Some(dir) = p.dir.as_ref().map(|d| d.path().to_path_buf()) else {
        return;
    };
    let t = &p.kafka.topics;
    let key = |r: &meterflow_kafka::TableRecord| {
        String::from_utf8_lossy(r.key.as_deref().unwrap_or_default()).into_owned()
    };
    let mut usage = String::from(
        "partition,offset,kind,id,sample_id,entity_id,instance_id,interval_start,interval_end,source,time\n",
    );
    for r in p.read(&t.usage) {
        let b = r.payload.as_deref().unwrap_or_default();
        let _ = if let Ok(u) = meterflow_avro::decode::<Usage>(b) {
            writeln!(
                usage,
                "{},{},usage,{},{},{},{},{},{},,",
                r.partition,
                r.offset,
                u.id,
                u.sample_id,
                u.entity_id,
                u.instance_id,
                u.interval_start,
                u.interval_end
            )
        } else if let Ok(w) = meterflow_avro::decode::<Watermark>(b) {
            writeln!(
                usage,
                "{},{},watermark,,,,,,,{},{}",
                r.partition, r.offset, w.source_partition, w.time
            )
        } else {
            writeln!(usage, "{},{},other,,,,,,,,", r.partition, r.offset)
        };
    }
    let mut rated = String::from(
        "partition,offset,id,entity_id,rule,window_start,adjustment,usage_records,source_partition,quantity,amount\n",
    );
    for r in p.read(&t.rated) {
        let b = r.payload.as_deref().unwrap_or_default();
        let _ = match meterflow_avro::decode::<RatedEvent>(b) {
            Ok(e) => writeln!(
                rated,
                "{},{},{},{},{}@{},{},{},{},{},{},{}",
                r.partition,
                r.offset,
                e.id,
                e.entity_id,
                e.rule_id,
                e.rule_version,
                e.window_start,
                e.adjustment,
                e.usage_records,
                e.source_partition,
                e.quantity,
                e.amount
            ),
            Err(_) => writeln!(rated, "{},{},marker,,,,,,,,", r.partition, r.offset),
        };
    }
    let mut state = String::from("offset,key,bytes\n");
    for r in p.read(&t.rater_state) {
        let _ = writeln!(
            state,
            "{},{},{}",
            r.offset,
            key(&r),
            r.payload.as_ref().map_or(-1, |b| b.len() as i64)
        );
    }
    for (name, text) in [
        ("usage.csv", usage),
        ("rated.csv", rated),
        ("rater_state.csv", state),
    ] {
        if let Err(e) = std::fs::write(dir.join(name), text) {
            eprintln!("could not write {name}: {e}");
        }
    }
}

/// Keep the run's directory (logs, configs, broker storage) for a failed run.
fn keep(p: &mut Pipeline) {
    if let Some(d) = p.dir.take() {
        eprintln!("chaos files kept in {}", d.keep().display());
    }
}

fn remove_extras(
    p: &mut Pipeline,
    faults: &mut Vec<String>,
    log: &impl Fn(&mut Vec<String>, String),
) {
    for r in p.replicas.iter_mut().filter(|r| !r.stopped) {
        r.terminate(Duration::from_secs(30));
        log(faults, format!("extra member {} removed (SIGTERM)", r.name));
    }
}
