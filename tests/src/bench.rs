//! The pipeline benchmarks behind `bench-pipeline` (see BENCHMARKS.md): each stage alone
//! against a bare relay of its own input through the same broker, end-to-end latency of
//! a paced fleet against the moment its windows could close, and the rater's memory at
//! one and ten times the events in the same open windows. Every baseline is measured in
//! the same run, and every run checks its bill to the cent, or its figure is void.

use crate::expect::{FleetRun, DAY};
use crate::pipeline::{block_on, Pipeline};
use crate::Proc;
use meterflow_kafka::{read_table, KafkaConfig, StageIo};
use meterflow_types::window::Period;
use meterflow_types::{Millis, NodeHeartbeat, RatedEvent};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const LIMIT: Duration = Duration::from_secs(1800);

/// A simulated fleet of `instances` (20 entities at most) polled every `poll_ms`.
pub fn fleet(instances: u32, polls: i64, poll_ms: Millis) -> anyhow::Result<FleetRun> {
    Ok(FleetRun {
        fleet: meterflow_collector::fleet::FleetConfig {
            instances,
            entities: 20.min(instances),
            seed: 7,
            ..Default::default()
        },
        start: meterflow_types::time::parse_rfc3339("2026-01-05T00:00:00Z")
            .map_err(anyhow::Error::msg)?,
        poll_ms,
        polls,
        reassign: Vec::new(),
    })
}

/// A broker with the fleet's samples all on the topic (the collector ran unpaced to its
/// end and retired), and no stage running.
pub fn prefilled(run: FleetRun) -> anyhow::Result<Pipeline> {
    let mut p = Pipeline::start_stages(run, 1_000_000_000, "day", &[]);
    p.start_collector();
    let st = p
        .collector
        .as_mut()
        .and_then(|c| c.wait(LIMIT))
        .ok_or_else(|| anyhow::anyhow!("collector did not finish"))?;
    anyhow::ensure!(st.success(), "collector failed");
    Ok(p)
}

/// Wait until every running stage has its partitions (Tansu can take 20 s to assign a
/// new group at start-up: time no stage should be charged with).
pub fn joined(p: &mut Pipeline) -> anyhow::Result<()> {
    p.wait_groups_settled(Duration::from_secs(120))
        .map_err(|waiting| anyhow::anyhow!("no assignment for {waiting:?}"))
}

fn stage_proc<'a>(p: &'a mut Pipeline, stage: &str) -> &'a mut Proc {
    match stage {
        "enricher" => &mut p.enricher,
        "rater" => &mut p.rater,
        "settler" => &mut p.settler,
        other => panic!("no stage {other}"),
    }
}

/// One stage alone on input that is all on its topic: launched, the clock runs from its
/// partition assignment until the commit that reaches the end of its input (and until
/// `done` holds, if that is later). Returns its seconds, the CPU seconds its process and
/// the broker used meanwhile, and its peak RSS.
///
/// The stop is the `at_ms` the stage itself logs once the broker has taken that commit
/// (target `meterflow::commit`, enabled for the stage under test only): the relay stops its
/// clock after the same `StageIo::commit`. Asking the broker for the group's committed
/// offsets every few milliseconds instead cost the broker ~0.05 CPU s per second of the
/// stage's clock, a load the relay never carried. The broker's committed offsets are read
/// once, after the clock: if they do not reach the end, the figure is void.
pub fn stage_alone(
    p: &mut Pipeline,
    stage: &str,
    input: &str,
    done: impl Fn(&Pipeline) -> bool,
) -> anyhow::Result<StageRun> {
    stage_alone_in(p, stage, &format!("meterflow-{stage}"), input, done)
}

/// As `stage_alone`, for a stage configured with consumer group `group`.
pub fn stage_alone_in(
    p: &mut Pipeline,
    stage: &str,
    group: &str,
    input: &str,
    done: impl Fn(&Pipeline) -> bool,
) -> anyhow::Result<StageRun> {
    // the input is all on its topic: its end is read once, before the clock
    let ends: HashMap<i32, i64> = meterflow_kafka::high_watermarks(&p.kafka, input)?
        .into_iter()
        .collect();
    let filter = format!("{},meterflow::commit=debug", crate::pipeline::log_filter());
    let proc = stage_proc(p, stage);
    proc.set_env("METERFLOW_LOG", &filter);
    let mut tail = LogTail::from_end(proc.log_path());
    proc.launch();
    let joined = Instant::now();
    while !stage_proc(p, stage).settled_in_group() {
        anyhow::ensure!(
            joined.elapsed() < Duration::from_secs(120),
            "{stage}: no assignment; its log ends:\n{}",
            stage_proc(p, stage).tail(30)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let t0_ms = now_ms();
    let t0 = Instant::now();
    let startup_secs = joined.elapsed().as_secs_f64();
    let cpu0 = stage_proc(p, stage).cpu_secs().unwrap_or(0.0);
    let broker0 = p.broker.proc.cpu_secs().unwrap_or(0.0);
    let mut reached: HashMap<i32, i64> = HashMap::new();
    let mut committed_at: Option<i64> = None;
    let mut looked_after_commit = false;
    let stop_ms = loop {
        if committed_at.is_none() {
            for line in tail.new_lines() {
                let Some((at, offsets)) = meterflow_kafka::parse_commit_log(&line) else {
                    continue;
                };
                for (topic, part, next) in offsets {
                    if topic == input {
                        let r = reached.entry(part).or_insert(next);
                        *r = (*r).max(next);
                    }
                }
                let all = ends
                    .iter()
                    .all(|(part, end)| *end == 0 || reached.get(part).is_some_and(|r| r >= end));
                if all {
                    committed_at = Some(at);
                    break;
                }
            }
        }
        if let Some(at) = committed_at {
            if done(p) {
                // `done` held at the first look after the commit: the commit was the
                // stop; otherwise it came later, when it was seen
                break if looked_after_commit { now_ms() } else { at };
            }
            looked_after_commit = true;
        }
        p.assert_services_alive();
        anyhow::ensure!(t0.elapsed() < LIMIT, "{stage} did not drain");
        std::thread::sleep(Duration::from_millis(5));
    };
    let cpu = stage_proc(p, stage).cpu_secs().unwrap_or(0.0) - cpu0;
    let broker_cpu = p.broker.proc.cpu_secs().unwrap_or(0.0) - broker0;
    let secs = (stop_ms - t0_ms) as f64 / 1000.0;
    // the stage's word checked against the broker's, outside the clock
    let committed: BaseConsumer = meterflow_kafka::client_config(&p.kafka, "bench-committed")
        .set("group.id", group)
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for part in ends.keys() {
        tpl.add_partition(input, *part);
    }
    let got = committed.committed_offsets(tpl, Duration::from_secs(10))?;
    for (part, end) in &ends {
        let at = got
            .find_partition(input, *part)
            .and_then(|e| match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            });
        anyhow::ensure!(
            *end == 0 || at.is_some_and(|o| o >= *end),
            "{stage}: logged a commit to the end of {input}/{part} ({end}) but the broker has {at:?}: figure void"
        );
    }
    Ok(StageRun {
        secs,
        cpu,
        broker_cpu,
        // VmHWM: the process's peak over its whole life
        rss_kib: stage_proc(p, stage).peak_rss_kib().unwrap_or(0),
        startup_secs,
        startup_cpu: cpu0,
    })
}

/// The lines appended to a log file since it was opened at its end.
struct LogTail {
    path: std::path::PathBuf,
    at: u64,
    partial: String,
}

impl LogTail {
    fn from_end(path: &std::path::Path) -> LogTail {
        let at = std::fs::metadata(path).map_or(0, |m| m.len());
        LogTail {
            path: path.to_path_buf(),
            at,
            partial: String::new(),
        }
    }

    /// Whole lines written since the last call.
    fn new_lines(&mut self) -> Vec<String> {
        use std::io::{Read, Seek, SeekFrom};
        let Ok(mut f) = std::fs::File::open(&self.path) else {
            return Vec::new();
        };
        let mut buf = Vec::new();
        if f.seek(SeekFrom::Start(self.at)).is_err() || f.read_to_end(&mut buf).is_err() {
            return Vec::new();
        }
        self.at += buf.len() as u64;
        self.partial.push_str(&String::from_utf8_lossy(&buf));
        let Some(end) = self.partial.rfind('\n') else {
            return Vec::new();
        };
        let rest = self.partial.split_off(end + 1);
        let whole = std::mem::replace(&mut self.partial, rest);
        whole.lines().map(str::to_string).collect()
    }
}

/// A stage measured alone: wall seconds, CPU seconds of its process and of the broker
/// meanwhile, and the stage's peak RSS.
#[derive(Clone, Copy, Debug)]
pub struct StageRun {
    pub secs: f64,
    pub cpu: f64,
    pub broker_cpu: f64,
    pub rss_kib: u64,
    /// From its launch to its assignment (reading its tables and state, joining its
    /// group): outside the clock, what a restart costs before work resumes.
    pub startup_secs: f64,
    pub startup_cpu: f64,
}

/// A relay measured: wall seconds, CPU seconds of the relay (this process) and of the
/// broker meanwhile.
pub type RelayRun = (f64, f64, f64);

/// Every stage has committed everything it was given and every expected file set exists.
pub fn drained(p: &Pipeline, expected_sets: usize) -> bool {
    meterflow_settler::files::all_manifests(&p.out).is_ok_and(|m| m.len() >= expected_sets)
        && p.stages_caught_up()
}

/// The stages' peak RSS (VmHWM, read while they run), as "name MiB, …".
pub fn stage_peaks(p: &Pipeline) -> String {
    [
        ("enricher", &p.enricher),
        ("rater", &p.rater),
        ("settler", &p.settler),
    ]
    .iter()
    .map(|(name, proc)| {
        format!(
            "{name} {:.0}",
            proc.peak_rss_kib().unwrap_or(0) as f64 / 1024.0
        )
    })
    .collect::<Vec<_>>()
    .join(", ")
}

/// Each stage alone against a bare relay of its own input, all in one run: the samples
/// (collector output) through the enricher, the usage it wrote through the rater, the
/// revenue events the rater wrote through the settler. Each relay copies the same
/// messages (keys, payloads, markers) with the stages' own Kafka I/O, its input also on
/// the topic before its clock starts.
pub fn stages(run: FleetRun) -> anyhow::Result<()> {
    let expected_sets = run.totals(DAY).len();
    let mut p = prefilled(run)?;
    let t = p.kafka.topics.clone();
    println!("| stage | messages in | stage s | stage msg/s | relay s | relay msg/s | vs relay | stage CPU s | relay CPU s | broker CPU s (stage / relay) | peak RSS MiB | start-up s (CPU s) | relay of a copy s (broker CPU s), stage vs it |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let row = |stage: &str,
               what: String,
               n: usize,
               st: StageRun,
               (relay, relay_cpu, relay_broker): RelayRun,
               (copy, _, copy_broker): RelayRun| {
        let StageRun {
            secs,
            cpu,
            broker_cpu,
            rss_kib,
            startup_secs,
            startup_cpu,
        } = st;
        let (s, r) = (n as f64 / secs, n as f64 / relay);
        println!(
            "| {stage} ({what}) | {n} | {secs:.2} | {s:.0} | {relay:.2} | {r:.0} | {:.2} | {cpu:.2} | {relay_cpu:.2} | {broker_cpu:.2} / {relay_broker:.2} | {:.0} | {startup_secs:.2} ({startup_cpu:.2}) | {copy:.2} ({copy_broker:.2}), {:.2} |",
            s / r,
            rss_kib as f64 / 1024.0,
            copy / secs
        );
    };
    // each stage against a relay of its input as it lies on the topic (`relay_here`),
    // and, for comparison with earlier sessions, of a copy of it written in large batches
    let (_, copy) = relay_topic(&p, &t.samples, "samples")?;
    let (n, relay) = relay_here(&p, &t.samples, "samples-here")?;
    let stage = stage_alone(&mut p, "enricher", &t.samples, |_| true)?;
    let usage = p.messages(&t.usage);
    row(
        "enricher",
        format!("samples + poll markers → {usage} usage + markers"),
        n,
        stage,
        relay,
        copy,
    );
    let (_, copy) = relay_topic(&p, &t.usage, "usage")?;
    let (n, relay) = relay_here(&p, &t.usage, "usage-here")?;
    let stage = stage_alone(&mut p, "rater", &t.usage, |_| true)?;
    let rated = p.messages(&t.rated);
    row(
        "rater",
        format!("usage + markers → windows, 3 rules, {rated} revenue events + markers"),
        n,
        stage,
        relay,
        copy,
    );
    let (_, copy) = relay_topic(&p, &t.rated, "rated")?;
    let (n, relay) = relay_here(&p, &t.rated, "rated-here")?;
    let out = p.out.clone();
    let stage = stage_alone(&mut p, "settler", &t.rated, move |_| {
        meterflow_settler::files::all_manifests(&out).is_ok_and(|m| m.len() >= expected_sets)
    })?;
    row(
        "settler",
        format!("revenue events + markers → {expected_sets} daily file sets"),
        n,
        stage,
        relay,
        copy,
    );
    // the bill must be exact, or the figures mean nothing
    crate::settled::Settled::read(&p.out).assert_matches(&p.run, DAY);
    // The same revenue events settled by calendar month, the settler's default period
    // (a file set holds an entity's month, not its day): a settler of its own group,
    // directory and state topics, against a relay of the same input measured again.
    anyhow::ensure!(
        p.settler.terminate(Duration::from_secs(60)).is_some(),
        "the daily settler did not stop"
    );
    let ((n, relay, copy), stage, month_sets) = settler_in(&mut p, "month", "month", |p| {
        let (_, copy) = relay_topic(p, &t.rated, "rated-month")?;
        let (n, relay) = relay_here(p, &t.rated, "rated-month-here")?;
        Ok((n, relay, copy))
    })?;
    row(
        "settler",
        format!("revenue events + markers → {month_sets} monthly file sets"),
        n,
        stage,
        relay,
        copy,
    );
    p.stop();
    Ok(())
}

/// The settler by `period` (`month`, its default, or `day`, ...) on the rated topic, as a
/// group of its own (`meterflow-settler-{name}`, directory `settlements-{name}`, its own
/// settlements and state topics), after `before` (its baselines) has run: what `before`
/// returned, the stage's run, and its number of file sets, the bill checked to the cent.
fn settler_in<R>(
    p: &mut Pipeline,
    name: &str,
    period: &str,
    before: impl FnOnce(&Pipeline) -> anyhow::Result<R>,
) -> anyhow::Result<(R, StageRun, usize)> {
    let by = Period::parse(period).map_err(anyhow::Error::msg)?;
    let sets = p.run.totals_in(&by).len();
    let group = format!("meterflow-settler-{name}");
    let out = p.path().join(format!("settlements-{name}"));
    p.configure(
        "settler",
        &format!(
            "group = \"{group}\"\nout_dir = \"{}\"\nperiod = \"{period}\"\n\
             [kafka.topics]\nsettlements = \"bench.settlements-{name}\"\n\
             settler_state = \"bench.settler-state-{name}\"\n",
            out.display()
        ),
    );
    let baseline = before(p)?;
    let rated = p.kafka.topics.rated.clone();
    let files = out.clone();
    let stage = stage_alone_in(p, "settler", &group, &rated, move |_| {
        meterflow_settler::files::all_manifests(&files).is_ok_and(|m| m.len() >= sets)
    })?;
    crate::settled::Settled::read(&out).assert_matches_in(&p.run, &by);
    Ok((baseline, stage, sets))
}

/// Two (or more) builds of the enricher alternated on the same samples: the collector
/// runs once, then each round runs every build in turn, each as its own group with its
/// own usage, parked and state topics (a run must not find the last run's
/// duplicate-detection checkpoints), against a relay of the samples measured just before
/// it. The rater and settler do not run; each run's usage count is printed beside it.
pub fn enricher_ab(
    run: FleetRun,
    builds: &[std::path::PathBuf],
    rounds: usize,
) -> anyhow::Result<()> {
    check_ab(builds, rounds)?;
    let mut p = prefilled(run)?;
    let t = p.kafka.topics.clone();
    let runs = AbStage {
        stage: "enricher",
        input: t.samples.clone(),
        output: t.usage.clone(),
        config: |name: &str| {
            format!(
                "[kafka.topics]\nusage = \"{}-{name}\"\nparked = \"{}-{name}\"\n\
                 enricher_state = \"{}-{name}\"\n",
                t.usage, t.parked, t.enricher_state
            )
        },
    };
    runs.alternate(&mut p, builds, rounds, ("samples", "usage"))
}

/// Two (or more) builds of the rater alternated on the same usage: the collector and the
/// enricher run once, then each round runs every build in turn, each as its own group
/// with its own rated and state topics (a run must not find the last run's closed
/// windows), against a relay of the usage measured just before it. The settler does not
/// run; each run's rated-topic count is printed beside it.
pub fn rater_ab(run: FleetRun, builds: &[std::path::PathBuf], rounds: usize) -> anyhow::Result<()> {
    check_ab(builds, rounds)?;
    let mut p = prefilled(run)?;
    let t = p.kafka.topics.clone();
    stage_alone(&mut p, "enricher", &t.samples, |_| true)?;
    p.enricher.terminate(Duration::from_secs(30));
    // what the pipeline configured the rater with (its rules, its period: the top-level
    // settings but its member name), kept for every run
    let base: String = std::fs::read_to_string(p.path().join("rater.toml"))?
        .lines()
        .take_while(|l| !l.trim_start().starts_with('['))
        .filter(|l| !l.trim().is_empty() && !l.starts_with("member"))
        .map(|l| format!("{l}\n"))
        .collect();
    let runs = AbStage {
        stage: "rater",
        input: t.usage.clone(),
        output: t.rated.clone(),
        config: |name: &str| {
            format!(
                "{base}[kafka.topics]\nrated = \"{}-{name}\"\nrater_state = \"{}-{name}\"\n",
                t.rated, t.rater_state
            )
        },
    };
    runs.alternate(&mut p, builds, rounds, ("usage", "rated"))
}

/// One run of an alternation for the enricher or the rater: `stage` as group
/// `meterflow-{stage}-ab{i}` reading `input`, configured by `config(name)` (its own
/// output and state topics, `{topic}-{name}`), against a relay of `input` just before.
struct AbStage<C> {
    stage: &'static str,
    input: String,
    output: String,
    config: C,
}

impl<C: Fn(&str) -> String> AbStage<C> {
    /// The table's header (`topics`: how the input and output topics are named in it),
    /// then every run (`alternated`).
    fn alternate(
        &self,
        p: &mut Pipeline,
        builds: &[std::path::PathBuf],
        rounds: usize,
        topics: (&str, &str),
    ) -> anyhow::Result<()> {
        let (s, (input, output)) = (self.stage, topics);
        println!("| run | build | {input}-topic messages | {output}-topic messages | {s} s | relay s | vs relay | {s} CPU s | relay CPU s | broker CPU s ({s} / relay) |");
        println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        alternated(p, builds, rounds, |p, i, build| self.run(p, i, build))
    }

    fn run(
        &self,
        p: &mut Pipeline,
        i: usize,
        build: &std::path::Path,
    ) -> anyhow::Result<(f64, String)> {
        let stage = self.stage;
        let name = format!("ab{i}");
        let group = format!("meterflow-{stage}-{name}");
        p.configure(
            stage,
            &format!("group = \"{group}\"\n{}", (self.config)(&name)),
        );
        stage_proc(p, stage).set_program(build);
        let (n, (relay, relay_cpu, relay_broker)) =
            relay_here(p, &self.input, &format!("{stage}-{name}"))?;
        let st = stage_alone_in(p, stage, &group, &self.input, |_| true)?;
        anyhow::ensure!(
            stage_proc(p, stage)
                .terminate(Duration::from_secs(30))
                .is_some(),
            "{stage} run {i} did not stop"
        );
        let ratio = relay / st.secs;
        let row = format!(
            "{n} | {} | {:.3} | {relay:.3} | {ratio:.2} | {:.3} | {relay_cpu:.3} | {:.3} / {relay_broker:.3}",
            p.messages(&format!("{}-{name}", self.output)),
            st.secs,
            st.cpu,
            st.broker_cpu
        );
        Ok((ratio, row))
    }
}

/// Two (or more) builds of the settler alternated on the same revenue events, by `period`
/// (`month`, its default, or `day`, ...): the enricher and rater run once, then each
/// round runs every build in turn, each as its own group with its own directory and
/// state topics, against a relay of its input measured just before it. Each bill is
/// checked. On a machine whose speed drifts within the hour, alternation in one run is
/// how two builds compare.
pub fn settler_ab(
    run: FleetRun,
    builds: &[std::path::PathBuf],
    rounds: usize,
    period: &str,
) -> anyhow::Result<()> {
    check_ab(builds, rounds)?;
    let mut p = prefilled(run)?;
    let t = p.kafka.topics.clone();
    stage_alone(&mut p, "enricher", &t.samples, |_| true)?;
    p.enricher.terminate(Duration::from_secs(30));
    stage_alone(&mut p, "rater", &t.usage, |_| true)?;
    p.rater.terminate(Duration::from_secs(30));
    println!("| run | build | revenue events | settler s | relay s | vs relay | settler CPU s | broker CPU s (settler / relay) |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    alternated(&mut p, builds, rounds, |p, i, build| {
        let name = format!("ab{i}");
        p.settler.set_program(build);
        let ((n, (relay, _, relay_broker)), st, _) = settler_in(p, &name, period, |p| {
            relay_here(p, &t.rated, &format!("rated-{name}"))
        })?;
        anyhow::ensure!(
            p.settler.terminate(Duration::from_secs(60)).is_some(),
            "settler run {i} did not stop"
        );
        let ratio = relay / st.secs;
        let row = format!(
            "{n} | {:.3} | {relay:.3} | {ratio:.2} | {:.3} | {:.3} / {relay_broker:.3}",
            st.secs, st.cpu, st.broker_cpu
        );
        Ok((ratio, row))
    })
}

/// Before the expensive part: something to alternate.
fn check_ab(builds: &[std::path::PathBuf], rounds: usize) -> anyhow::Result<()> {
    anyhow::ensure!(
        !builds.is_empty() && rounds > 0,
        "no builds or rounds to compare"
    );
    Ok(())
}

/// `rounds` rounds of every build in turn: `one(p, i, build)` runs run `i` and returns
/// its ratio against its relay and the rest of its table row. Prints each row, then each
/// build's median ratio, and stops the pipeline. Its callers `check_ab` first, before
/// the pipeline's expensive set-up.
fn alternated(
    p: &mut Pipeline,
    builds: &[std::path::PathBuf],
    rounds: usize,
    mut one: impl FnMut(&mut Pipeline, usize, &std::path::Path) -> anyhow::Result<(f64, String)>,
) -> anyhow::Result<()> {
    let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); builds.len()];
    for i in 0..rounds * builds.len() {
        let b = i % builds.len();
        let (ratio, row) = one(p, i, &builds[b])?;
        ratios[b].push(ratio);
        println!("| {} | {} | {row} |", i + 1, builds[b].display());
    }
    p.stop();
    for (b, mut r) in builds.iter().zip(ratios) {
        r.sort_by(f64::total_cmp);
        println!("\nmedian vs relay, {}: {:.2}", b.display(), r[r.len() / 2]);
    }
    Ok(())
}

/// The three stages together on samples that are all on the topic (the collector ran
/// first): the clock runs from when every stage has its partitions until every stage
/// has committed everything and every file set exists. Baseline: the relay of the same
/// samples topic, as it lies there.
pub fn chain(run: FleetRun) -> anyhow::Result<()> {
    let expected_sets = run.totals(DAY).len();
    let mut p = prefilled(run)?;
    let t = p.kafka.topics.clone();
    let (n, (relay, _, _)) = relay_here(&p, &t.samples, "samples-here")?;
    p.enricher.launch();
    p.rater.launch();
    p.settler.launch();
    joined(&mut p)?;
    let t0 = Instant::now();
    while !drained(&p, expected_sets) {
        p.assert_services_alive();
        anyhow::ensure!(t0.elapsed() < LIMIT, "the stages did not drain");
        std::thread::sleep(Duration::from_millis(50));
    }
    let secs = t0.elapsed().as_secs_f64();
    crate::settled::Settled::read(&p.out).assert_matches(&p.run, DAY);
    let (usage, rated) = (p.messages(&t.usage), p.messages(&t.rated));
    let peaks = stage_peaks(&p);
    p.stop();
    let (s, r) = (n as f64 / secs, n as f64 / relay);
    println!("| run | messages in | seconds | messages/s | vs relay |");
    println!("|---|---:|---:|---:|---:|");
    println!(
        "| bare relay of the samples topic as it lies there | {n} | {relay:.2} | {r:.0} | 1.00 |"
    );
    println!(
        "| enricher + rater + settler together (→ {usage} usage, {rated} rated msgs, {expected_sets} file sets) | {n} | {secs:.2} | {s:.0} | {:.2} |",
        s / r
    );
    println!("\npeak RSS (MiB): {peaks}");
    Ok(())
}

/// The messages of `topic` relayed through the same broker by the stages' own Kafka I/O,
/// with all of them on the relay's input topic before its clock starts: (count,
/// (seconds, CPU seconds of this process meanwhile — the relay, and the harness's idle
/// threads — and of the broker)).
pub fn relay_topic(p: &Pipeline, topic: &str, name: &str) -> anyhow::Result<(usize, RelayRun)> {
    let msgs = topic_messages(&p.kafka, topic)?;
    let n = msgs.len();
    let run = block_on(relay(&p.kafka, msgs, true, name, p.broker.proc.pid()))?;
    relayed_all(p, name, n)?;
    Ok((n, run))
}

/// The messages of `topic` relayed as they lie there — the same record batches the stage
/// reads — through the same broker by the stages' own Kafka I/O: (count, run). The
/// baseline of every stage figure. Relaying a copy (`relay_topic`) is faster: the copy is
/// written in large batches, where the collector's samples and each stage's output lie
/// in the batches their producers sent, and the broker spends 2.4–4× the CPU serving
/// the small ones (BENCHMARKS.md, session 34).
pub fn relay_here(p: &Pipeline, topic: &str, name: &str) -> anyhow::Result<(usize, RelayRun)> {
    let n = usize::try_from(p.messages(topic))?;
    let run = block_on(relay_in_place(
        &p.kafka,
        topic,
        n,
        name,
        p.broker.proc.pid(),
    ))?;
    relayed_all(p, name, n)?;
    Ok((n, run))
}

/// The relay's output topic holds every message it was given, or its figure is void.
pub fn relayed_all(p: &Pipeline, name: &str, n: usize) -> anyhow::Result<()> {
    let out = p.messages(&format!("bench.relay-{name}-out"));
    anyhow::ensure!(out == n as i64, "relay {name}: {out} of {n} messages out");
    Ok(())
}

/// A message as (key, payload).
pub type KeyPayload = (Option<Vec<u8>>, Vec<u8>);

/// Every message of `topic` as (key, payload).
pub fn topic_messages(kafka: &KafkaConfig, topic: &str) -> anyhow::Result<Vec<KeyPayload>> {
    Ok(
        read_table(kafka, &[topic], &HashMap::new(), Duration::from_secs(120))?
            .into_iter()
            .map(|r| (r.key, r.payload.unwrap_or_default()))
            .collect(),
    )
}

/// `prefill`: the input is all on the topic before the clock starts (as for a stage
/// measured alone); otherwise it is produced while the relay runs (as in the pipeline).
/// `name` keeps each relay's topics and group its own.
pub async fn relay(
    kafka: &KafkaConfig,
    msgs: Vec<KeyPayload>,
    prefill: bool,
    name: &str,
    broker_pid: Option<u32>,
) -> anyhow::Result<RelayRun> {
    let src = format!("bench.relay-{name}-in");
    create_topics(kafka, &[&src, &format!("bench.relay-{name}-out")]).await?;
    let n = msgs.len();
    // the stages' outbox, which waits out a full producer queue (millions of records);
    // every message here has a key (every meterflow producer sets one)
    let mut out = meterflow_kafka::Outbox::connect(kafka, "bench-feed")?;
    let feed_topic = src.clone();
    let feed = async move {
        for (k, v) in &msgs {
            out.send(&feed_topic, k.as_deref().unwrap_or_default(), v, None)
                .await?;
        }
        out.flush().await
    };
    // prefilled: the input is on the topic before the relay subscribes, as it was for the
    // stage; otherwise it is produced from when the relay has joined
    if prefill {
        feed.await?;
        relay_loop(kafka, &src, n, name, broker_pid, None).await
    } else {
        relay_loop(kafka, &src, n, name, broker_pid, Some(Box::pin(feed))).await
    }
}

/// The `n` messages of `src`, a topic already written, relayed as they lie there (the
/// same record batches the stage reads) to `bench.relay-{name}-out`.
pub async fn relay_in_place(
    kafka: &KafkaConfig,
    src: &str,
    n: usize,
    name: &str,
    broker_pid: Option<u32>,
) -> anyhow::Result<RelayRun> {
    create_topics(kafka, &[&format!("bench.relay-{name}-out")]).await?;
    relay_loop(kafka, src, n, name, broker_pid, None).await
}

async fn create_topics(kafka: &KafkaConfig, names: &[&str]) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> =
        meterflow_kafka::client_config(kafka, "bench-admin").create()?;
    let topics: Vec<NewTopic<'_>> = names
        .iter()
        .map(|t| NewTopic::new(t, kafka.partitions, TopicReplication::Fixed(1)))
        .collect();
    admin.create_topics(&topics, &AdminOptions::new()).await?;
    Ok(())
}

type Feed = std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<()>> + Send>>;

/// The relay itself: `n` messages of `src` to `bench.relay-{name}-out` by `StageIo`
/// (batch, produce, commit after ack), its clock from its partition assignment; `feed`,
/// if any, writes `src` meanwhile.
async fn relay_loop(
    kafka: &KafkaConfig,
    src: &str,
    n: usize,
    name: &str,
    broker_pid: Option<u32>,
    feed: Option<Feed>,
) -> anyhow::Result<RelayRun> {
    let broker_cpu = || {
        broker_pid
            .and_then(|pid| crate::cpu_secs_of(&format!("/proc/{pid}/stat")))
            .unwrap_or(0.0)
    };
    let dst = format!("bench.relay-{name}-out");
    let group = format!("bench-relay-{name}");
    let mut io = StageIo::new(kafka, "relay", &group, &[src], "relay-1")?;
    let stop = CancellationToken::new();
    // the clock starts when every partition is assigned, as it did for the stage
    let join = Instant::now();
    let mut assigned = 0;
    let mut first = Vec::new();
    while assigned < kafka.partitions {
        anyhow::ensure!(
            join.elapsed() < Duration::from_secs(120),
            "relay: no assignment"
        );
        let b = io.next_batch(1, Duration::from_millis(20), &stop).await?;
        first.extend(b.messages);
        for a in b.rebalances {
            match a {
                meterflow_kafka::Assignment::Assigned(v) => assigned += v.len() as i32,
                meterflow_kafka::Assignment::Revoked(v) => assigned -= v.len() as i32,
            }
        }
    }
    let t0 = Instant::now();
    let cpu0 = crate::cpu_secs_of("/proc/self/stat").unwrap_or(0.0);
    let broker0 = broker_cpu();
    let feed = feed.map(tokio::spawn);
    let mut done = 0usize;
    while done < n {
        let mut b = io
            .next_batch(5000, Duration::from_millis(50), &stop)
            .await?;
        b.messages.splice(0..0, std::mem::take(&mut first));
        let mut offsets: HashMap<i32, i64> = HashMap::new();
        for m in &b.messages {
            io.send(
                &dst,
                m.key().unwrap_or_default(),
                m.payload().unwrap_or_default(),
                None,
            )
            .await?;
            offsets.insert(m.partition(), m.offset() + 1);
        }
        done += b.messages.len();
        let o: Vec<(String, i32, i64)> = offsets
            .into_iter()
            .map(|(p, o)| (src.to_string(), p, o))
            .collect();
        io.commit(&o).await?;
        anyhow::ensure!(t0.elapsed() < LIMIT, "relay stalled at {done}/{n}");
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = crate::cpu_secs_of("/proc/self/stat").unwrap_or(0.0) - cpu0;
    let broker = broker_cpu() - broker0;
    if let Some(f) = feed {
        f.await??;
    }
    Ok((secs, cpu, broker))
}

fn now_ms() -> i64 {
    meterflow_kafka::now_ms()
}

/// A consumer of every partition of `topic` from the beginning, fetching eagerly.
fn eager_consumer(kafka: &KafkaConfig, topic: &str) -> anyhow::Result<BaseConsumer> {
    let c: BaseConsumer = meterflow_kafka::client_config(kafka, "bench-watch")
        .set("group.id", "bench-watch")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "5")
        .set("enable.partition.eof", "false")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for part in 0..kafka.partitions {
        tpl.add_partition_offset(topic, part, Offset::Beginning)?;
    }
    c.assign(&tpl)?;
    Ok(c)
}

/// The lateness of the shipped rules (`-- lateness:` in their headers), which must agree.
fn shipped_lateness() -> anyhow::Result<Millis> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../rules");
    let mut seen = Vec::new();
    for e in std::fs::read_dir(&dir)? {
        let path = e?.path();
        if path.extension().is_some_and(|x| x == "sql") {
            let text = std::fs::read_to_string(&path)?;
            let line = text
                .lines()
                .find_map(|l| l.strip_prefix("-- lateness:"))
                .ok_or_else(|| anyhow::anyhow!("{} has no lateness", path.display()))?;
            seen.push(
                meterflow_types::window::humantime_ms(line.trim()).map_err(anyhow::Error::msg)?,
            );
        }
    }
    seen.dedup();
    anyhow::ensure!(
        seen.len() == 1,
        "shipped rules differ in lateness: {seen:?}"
    );
    Ok(seen[0])
}

fn percentile(sorted: &[i64], q: f64) -> i64 {
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// End-to-end latency of a paced fleet: for every revenue event, the moment a consumer
/// of the rated topic received it, minus the moment its window could first have closed:
/// when the collector produced the poll (samples, then its poll marker) that took the
/// stream past the window's end plus the rule's lateness. Both on this machine's clock.
pub fn latency(run: FleetRun, speed: u32) -> anyhow::Result<()> {
    let lateness = shipped_lateness()?;
    let mut p = Pipeline::start(run, speed, "day");
    joined(&mut p)?; // the clock starts with every stage in its group
    let t = p.kafka.topics.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let watch = {
        let (kafka, stop) = (p.kafka.clone(), stop.clone());
        std::thread::spawn(move || -> anyhow::Result<Vec<(RatedEvent, i64, i64)>> {
            let c = eager_consumer(&kafka, &kafka.topics.rated)?;
            let mut got = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match c.poll(Duration::from_millis(20)) {
                    Some(Ok(m)) => {
                        let seen = now_ms();
                        let created = m.timestamp().to_millis().unwrap_or(0);
                        if let Ok(ev) =
                            meterflow_avro::decode::<RatedEvent>(m.payload().unwrap_or_default())
                        {
                            got.push((ev, created, seen));
                        }
                    }
                    Some(Err(e)) => eprintln!("watch: {e}"),
                    None => {}
                }
            }
            Ok(got)
        })
    };
    let t0 = Instant::now();
    p.start_collector();
    settle(&mut p);
    let wall = t0.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let got = watch
        .join()
        .map_err(|_| anyhow::anyhow!("watch thread panicked"))??;
    crate::settled::Settled::read(&p.out).assert_matches(&p.run, DAY);
    // when each poll marker was produced (the first time the node reached each time)
    let c = eager_consumer(&p.kafka, &t.samples)?;
    let total = p.messages(&t.samples);
    let mut read = 0;
    let mut polls: BTreeMap<Millis, (i64, bool)> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while read < total {
        anyhow::ensure!(
            Instant::now() < deadline,
            "samples topic not read to its end"
        );
        if let Some(m) = c.poll(Duration::from_millis(100)) {
            let m = m?;
            read += 1;
            if let Ok(hb) = meterflow_avro::decode::<NodeHeartbeat>(m.payload().unwrap_or_default())
            {
                let ts = m.timestamp().to_millis().unwrap_or(0);
                let e = polls.entry(hb.time).or_insert((ts, hb.retired));
                e.0 = e.0.max(ts);
            }
        }
    }
    p.stop();
    let (mut seen, mut created) = (Vec::new(), Vec::new());
    let mut by_retirement = 0;
    for (ev, c_ms, s_ms) in &got {
        let due = ev.window_end + lateness;
        // the poll that took the stream past `due`; windows closed only because the
        // node retired at the end of the run are left out
        match polls.range(due..).next() {
            Some((_, (ts, false))) => {
                seen.push(s_ms - ts);
                created.push(c_ms - ts);
            }
            _ => by_retirement += 1,
        }
    }
    anyhow::ensure!(!seen.is_empty(), "no revenue event to measure");
    seen.sort_unstable();
    created.sort_unstable();
    let poll_wall = p.run.poll_ms as f64 / f64::from(speed);
    println!(
        "paced fleet: {} instances, a poll every {} s of event time, clock speed {speed}× \
         (one poll every {poll_wall:.0} ms of wall time), {} polls, {wall:.0} s; lateness {} s",
        p.run.fleet.instances,
        p.run.poll_ms / 1000,
        p.run.polls,
        lateness / 1000
    );
    println!("| revenue event | events | p50 ms | p99 ms | max ms |");
    println!("|---|---:|---:|---:|---:|");
    println!(
        "| received by a consumer of the rated topic | {} | {} | {} | {} |",
        seen.len(),
        percentile(&seen, 0.5),
        percentile(&seen, 0.99),
        seen[seen.len() - 1]
    );
    println!(
        "| produced by the rater (record timestamp) | {} | {} | {} | {} |",
        created.len(),
        percentile(&created, 0.5),
        percentile(&created, 0.99),
        created[created.len() - 1]
    );
    println!("({by_retirement} events of windows closed by the node's retirement left out)");
    Ok(())
}

/// The rater's memory with the same open windows and ten times the events in them: the
/// same fleet over the same hours, paced, polled every 300 s and then every 30 s. Beside
/// the peak RSS (the target's figure), what it is made of: the largest anonymous
/// resident memory seen (heap, stacks: what the rater allocated), sampled every 50 ms,
/// and the file-backed pages (the binary's code) at the end.
pub fn rater_memory(instances: u32, hours: i64, speed: u32) -> anyhow::Result<()> {
    let (m1, u1, r1) = rater_peak(instances, hours, 300_000, speed)?;
    let (m10, u10, r10) = rater_peak(instances, hours, 30_000, speed)?;
    println!(
        "paced fleet: {instances} instances over {hours} h of event time at clock speed {speed}×; 1-hour windows"
    );
    println!(
        "| run | usage records | rated-topic messages | rater peak RSS MiB | vs 1× | of it: peak anonymous MiB (vs 1×) | file-backed at the end MiB |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let mib = |k: u64| k as f64 / 1024.0;
    println!(
        "| 1× (a poll every 300 s) | {u1} | {r1} | {:.1} | 1.00 | {:.1} (1.00) | {:.1} |",
        mib(m1.hwm),
        mib(m1.anon),
        mib(m1.file)
    );
    println!(
        "| 10× (a poll every 30 s) | {u10} | {r10} | {:.1} | {:.2} | {:.1} ({:.2}) | {:.1} |",
        mib(m10.hwm),
        m10.hwm as f64 / m1.hwm as f64,
        mib(m10.anon),
        m10.anon as f64 / m1.anon as f64,
        mib(m10.file)
    );
    Ok(())
}

/// `Pipeline::drain` (collector finished, every stage caught up, every expected file
/// set written).
fn settle(p: &mut Pipeline) {
    let expected_sets = p.run.totals(DAY).len();
    p.drain(LIMIT, |out| {
        meterflow_settler::files::all_manifests(out).is_ok_and(|m| m.len() >= expected_sets)
    });
}

/// A process's memory over a run, KiB: peak RSS (`VmHWM`), the largest anonymous
/// resident memory sampled (`RssAnon`), file-backed resident pages at the end (`RssFile`).
struct Memory {
    hwm: u64,
    anon: u64,
    file: u64,
}

/// Samples `pid`'s `RssAnon` every 50 ms on a thread of its own until `stop` is set;
/// the thread returns the largest value seen.
fn sample_anon(pid: u32, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut most = 0;
        while !stop.load(Ordering::Relaxed) {
            most = most.max(crate::status_kib(pid, "RssAnon").unwrap_or(0));
            std::thread::sleep(Duration::from_millis(50));
        }
        most
    })
}

/// The rater's memory over a paced run of `hours` of the fleet polled every `poll_ms`,
/// and how many usage records it rated.
fn rater_peak(
    instances: u32,
    hours: i64,
    poll_ms: Millis,
    speed: u32,
) -> anyhow::Result<(Memory, i64, i64)> {
    let polls = hours * 3_600_000 / poll_ms + 1;
    let run = fleet(instances, polls, poll_ms)?;
    let mut p = Pipeline::start(run, speed, "day");
    let pid = p
        .rater
        .pid()
        .ok_or_else(|| anyhow::anyhow!("the rater is not running"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample_anon(pid, stop.clone());
    joined(&mut p)?;
    p.start_collector();
    let t = p.kafka.topics.clone();
    settle(&mut p);
    let file = crate::status_kib(pid, "RssFile").unwrap_or(0);
    let hwm = p.rater.peak_rss_kib().unwrap_or(0);
    stop.store(true, Ordering::Relaxed);
    let anon = sampler.join().unwrap_or(0);
    crate::settled::Settled::read(&p.out).assert_matches(&p.run, DAY);
    let usage = p.messages(&t.usage);
    let rated = p.messages(&t.rated);
    p.stop();
    Ok((Memory { hwm, anon, file }, usage, rated))
}
