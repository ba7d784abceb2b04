//! The whole pipeline as separate processes on a Tansu broker: the four service binaries,
//! configured through TOML files the way an operator would, fed by a bounded simulated
//! fleet whose bill is known in closed form (see `expect`).

use crate::expect::FleetRun;
use crate::{bin, Proc, Tansu};
use meterflow_kafka::KafkaConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub struct Pipeline {
    /// Kept (and printed) when a test fails, for the logs and files; kept always under
    /// `METERFLOW_BENCH_DIR` (see [`run_dir`]).
    pub dir: Option<tempfile::TempDir>,
    pub broker: Tansu,
    pub kafka: KafkaConfig,
    pub out: PathBuf,
    pub run: FleetRun,
    /// Event-time ms per wall ms of the collector's clock.
    pub speed: u32,
    pub period: String,
    pub enricher: Proc,
    pub rater: Proc,
    pub settler: Proc,
    pub collector: Option<Proc>,
    /// Collectors of further nodes (`start_collector_on`).
    pub more_collectors: Vec<Proc>,
    /// More replicas started during the run (`start_replica`).
    pub replicas: Vec<Proc>,
}

/// `METERFLOW_TEST_LOG` overrides the services' log filter (e.g. to debug librdkafka).
pub(crate) fn log_filter() -> String {
    std::env::var("METERFLOW_TEST_LOG").unwrap_or_else(|_| "info,rdkafka=warn".into())
}

/// A run's directory (broker data, configuration, logs, settlement files): a new
/// temporary directory, or — with `METERFLOW_BENCH_DIR` set, as `scripts/proof.sh` does
/// for the benchmarks — a new directory inside that one, left in place when the run ends
/// (the caller removes the whole directory once every benchmark has run). Why: on ext4
/// without a journal, creating a file checks every inode freed in its block group in the
/// last one to six minutes and passes over them, one by one; a benchmark that deleted the
/// previous run's thousands of settlement files beside the next run's would charge that
/// scan to the settler (BENCHMARKS.md, "Creating files where files were just deleted").
fn run_dir() -> tempfile::TempDir {
    match std::env::var_os("METERFLOW_BENCH_DIR") {
        Some(root) => {
            std::fs::create_dir_all(&root).expect("creating METERFLOW_BENCH_DIR");
            let mut dir = tempfile::Builder::new()
                .prefix("run-")
                .tempdir_in(&root)
                .expect("a run directory in METERFLOW_BENCH_DIR");
            dir.disable_cleanup(true);
            dir
        }
        None => tempfile::tempdir().expect("tmp"),
    }
}

fn rules_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../rules")
}

fn kafka_toml(brokers: &str) -> String {
    let extra = std::env::var("METERFLOW_TEST_KAFKA_CLIENT").unwrap_or_default();
    format!("[kafka]\nbrokers = \"{brokers}\"\npartitions = 4\n[kafka.client]\n{extra}\n")
}

impl Pipeline {
    /// Broker, topics, and the three downstream services (the collector starts with
    /// `start_collector`, so a test can act before any usage flows).
    pub fn start(run: FleetRun, speed: u32, period: &str) -> Pipeline {
        Pipeline::start_stages(run, speed, period, &["settler", "rater", "enricher"])
    }

    /// Like `start`, launching only the named stages; the others are prepared and can be
    /// started later with `launch` on their `Proc`.
    pub fn start_stages(run: FleetRun, speed: u32, period: &str, stages: &[&str]) -> Pipeline {
        Pipeline::start_with_rules(run, speed, period, stages, &rules_dir())
    }

    /// Like `start`, on a broker with the given Tansu storage engine (`sqlite://…` is
    /// persistent across a broker restart).
    pub fn start_on(storage: &str, run: FleetRun, speed: u32, period: &str) -> Pipeline {
        let stages = ["settler", "rater", "enricher"];
        Pipeline::start_stages_on(storage, run, speed, period, &stages)
    }

    /// Like `start_on`, launching only the named stages (as `start_stages`).
    pub fn start_stages_on(
        storage: &str,
        run: FleetRun,
        speed: u32,
        period: &str,
        stages: &[&str],
    ) -> Pipeline {
        Pipeline::launch_all(storage, run, speed, period, stages, &rules_dir(), false)
    }

    /// Like `start`, with the stages started before their broker, as when a deployment
    /// starts everything at once: the broker starts once every stage has logged that it
    /// is not reachable yet (and the harness creates no topics: the stages do).
    pub fn start_before_broker(run: FleetRun, speed: u32, period: &str) -> Pipeline {
        let stages = ["settler", "rater", "enricher"];
        Pipeline::launch_all(
            "memory://tansu/",
            run,
            speed,
            period,
            &stages,
            &rules_dir(),
            true,
        )
    }

    /// Like `start_stages`, with the rater reading the rules in `rules`.
    pub fn start_with_rules(
        run: FleetRun,
        speed: u32,
        period: &str,
        stages: &[&str],
        rules: &Path,
    ) -> Pipeline {
        Pipeline::launch_all("memory://tansu/", run, speed, period, stages, rules, false)
    }

    fn launch_all(
        storage: &str,
        run: FleetRun,
        speed: u32,
        period: &str,
        stages: &[&str],
        rules: &Path,
        broker_late: bool,
    ) -> Pipeline {
        let dir = run_dir();
        let port = crate::free_port();
        let kafka = KafkaConfig {
            brokers: format!("127.0.0.1:{port}"),
            partitions: 4,
            ..KafkaConfig::default()
        };
        let broker = (!broker_late).then(|| {
            let b = Tansu::start_on(dir.path(), storage, port);
            block_on(meterflow_kafka::ensure_topics(&kafka)).expect("creating topics on Tansu");
            b
        });
        let out = dir.path().join("settlements");
        let k = kafka_toml(&kafka.brokers);
        let svc = |name: &str, extra: String| {
            let cfg = dir.path().join(format!("{name}.toml"));
            // replicas on one host need distinct members (static group membership)
            std::fs::write(&cfg, format!("member = \"{name}-1\"\n{extra}\n{k}")).expect("config");
            let mut p = Proc::prepare(
                name,
                &bin(&format!("meterflow-{name}")),
                &["--config", cfg.to_str().expect("utf8 path")],
                &[("METERFLOW_LOG", &log_filter())],
                dir.path(),
            );
            if stages.contains(&name) {
                p.launch();
            }
            p
        };
        let settler = svc(
            "settler",
            format!("out_dir = \"{}\"\nperiod = \"{period}\"\n", out.display()),
        );
        let rater = svc(
            "rater",
            format!(
                "rules_dir = \"{}\"\nbilling_period = \"{period}\"\n",
                rules.display()
            ),
        );
        let enricher = svc("enricher", String::new());
        let broker = match broker {
            Some(b) => b,
            None => {
                for p in [&settler, &rater, &enricher] {
                    if stages.contains(&p.name.as_str()) {
                        crate::wait_until(
                            Duration::from_secs(60),
                            || p.log().contains("Kafka not reachable yet"),
                            || format!("{} waiting for its broker: {}", p.name, p.tail(20)),
                        );
                    }
                }
                Tansu::start_on(dir.path(), storage, port)
            }
        };
        Pipeline {
            dir: Some(dir),
            broker,
            kafka,
            out,
            run,
            speed,
            period: period.to_string(),
            enricher,
            rater,
            settler,
            collector: None,
            more_collectors: Vec::new(),
            replicas: Vec::new(),
        }
    }

    /// Start another replica of a stage (`enricher`, `rater`, `settler`) in the same group,
    /// with the same configuration and its own member name.
    pub fn start_replica(&mut self, stage: &str) {
        self.start_replica_with(stage, str::to_string);
    }

    /// `start_replica` with its configuration passed through `edit` first.
    pub fn start_replica_with(&mut self, stage: &str, edit: impl FnOnce(&str) -> String) {
        let n = 2 + self
            .replicas
            .iter()
            .filter(|p| p.name.starts_with(stage))
            .count();
        let dir = self.path();
        let base = std::fs::read_to_string(dir.join(format!("{stage}.toml"))).expect("config");
        let body: String = base
            .lines()
            .filter(|l| !l.starts_with("member ="))
            .map(|l| format!("{l}\n"))
            .collect();
        let name = format!("{stage}-{n}");
        let cfg = dir.join(format!("{name}.toml"));
        std::fs::write(&cfg, edit(&format!("member = \"{name}\"\n{body}"))).expect("config");
        self.replicas.push(Proc::start(
            &name,
            &bin(&format!("meterflow-{stage}")),
            &["--config", cfg.to_str().expect("utf8 path")],
            &[("METERFLOW_LOG", &log_filter())],
            &dir,
        ));
    }

    pub fn start_collector(&mut self) {
        self.start_collector_on("node-a", "");
    }

    /// A collector for node `node` running the fleet, with `fleet_extra` appended to its
    /// `[fleet]` table (e.g. `present_until_ms = …` for a migration).
    pub fn start_collector_on(&mut self, node: &str, fleet_extra: &str) {
        let r = &self.run;
        let name = if self.collector.is_none() {
            "collector".to_string()
        } else {
            format!("collector-{node}")
        };
        let cfg = self.path().join(format!("{name}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "node_id = \"{node}\"\nsite = \"test\"\npoll_interval = \"{}ms\"\npolls = {}\n\
                 retire_on_exit = true\nstate_file = \"{name}.state\"\n\
                 [clock]\nspeed = {}\nstart = \"{}\"\n\
                 [fleet]\ninstances = {}\nentities = {}\nseed = {}\n{fleet_extra}\n{}",
                r.poll_ms,
                r.polls,
                self.speed,
                meterflow_types::time::fmt_rfc3339(r.start),
                r.fleet.instances,
                r.fleet.entities,
                r.fleet.seed,
                kafka_toml(&self.kafka.brokers)
            ),
        )
        .expect("config");
        let p = Proc::start(
            &name,
            &bin("meterflow-collector"),
            &["--config", cfg.to_str().expect("utf8 path")],
            &[("METERFLOW_LOG", &log_filter())],
            &self.path(),
        );
        if self.collector.is_none() {
            self.collector = Some(p);
        } else {
            self.more_collectors.push(p);
        }
    }

    /// Launch a stage that was not started with the others (`enricher`, `rater`,
    /// `settler`) with `extra` as its configuration besides its member and Kafka
    /// settings: top-level keys first, then tables.
    pub fn launch_with(&mut self, stage: &str, extra: &str) {
        self.configure(stage, extra);
        match stage {
            "enricher" => self.enricher.launch(),
            "rater" => self.rater.launch(),
            "settler" => self.settler.launch(),
            other => panic!("no stage {other}"),
        }
    }

    /// Replace a stage's configuration (as `launch_with`, without launching it): its next
    /// launch reads it.
    pub fn configure(&mut self, stage: &str, extra: &str) {
        let cfg = self.path().join(format!("{stage}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "member = \"{stage}-1\"\n{extra}\n{}",
                kafka_toml(&self.kafka.brokers)
            ),
        )
        .expect("stage config");
    }

    pub fn path(&self) -> PathBuf {
        self.dir
            .as_ref()
            .map(|d| d.path().to_path_buf())
            .unwrap_or_default()
    }

    pub fn procs(&mut self) -> Vec<&mut Proc> {
        let mut v = vec![&mut self.enricher, &mut self.rater, &mut self.settler];
        if let Some(c) = self.collector.as_mut() {
            v.push(c);
        }
        v.extend(self.more_collectors.iter_mut());
        v.extend(self.replicas.iter_mut());
        v
    }

    /// Logs of every process, for a failure message.
    pub fn logs(&mut self) -> String {
        let mut s = String::new();
        for p in self.procs() {
            s.push_str(&format!(
                "\n===== {} (started {}×) =====\n{}",
                p.name,
                p.starts,
                p.tail(40)
            ));
        }
        s.push_str(&format!(
            "\n===== tansu =====\n{}",
            self.broker.proc.tail(20)
        ));
        s
    }

    /// Every record of `topic` from the beginning (to its end now).
    pub fn read(&self, topic: &str) -> Vec<meterflow_kafka::TableRecord> {
        meterflow_kafka::read_table(
            &self.kafka,
            &[topic],
            &std::collections::HashMap::new(),
            Duration::from_secs(30),
        )
        .unwrap_or_else(|e| panic!("reading {topic}: {e}"))
    }

    /// The records of type `R` on `topic`, in read order (others, such as markers, skipped).
    pub fn records<R: meterflow_avro::Record>(&self, topic: &str) -> Vec<R> {
        self.read(topic)
            .into_iter()
            .filter_map(|r| meterflow_avro::decode::<R>(&r.payload?).ok())
            .collect()
    }

    /// Produce `(key, payload, partition)` records to `topic` and wait for each to be
    /// acknowledged.
    pub fn produce(&self, topic: &str, records: &[(Vec<u8>, Vec<u8>, Option<i32>)]) {
        // The stages' outbox: every record queued, then all acknowledged at once (awaiting
        // each in turn waited out `linger.ms` per record — seconds for a few thousand, and
        // a test meaning to land records mid-run landed them after the run).
        let mut out =
            meterflow_kafka::Outbox::connect(&self.kafka, "test-producer").expect("producer");
        block_on(async {
            for (k, v, part) in records {
                out.send(topic, k, v, *part).await?;
            }
            out.flush().await
        })
        .unwrap_or_else(|e| panic!("producing to {topic}: {e}"));
    }

    /// Panics with the logs if a downstream service has exited.
    pub fn assert_services_alive(&mut self) {
        let mut dead = Vec::new();
        let mut running: Vec<&mut Proc> =
            vec![&mut self.enricher, &mut self.rater, &mut self.settler];
        running.extend(self.replicas.iter_mut());
        for p in running {
            if p.stopped {
                continue;
            }
            if let Some(st) = p.exited() {
                dead.push(format!("{} exited: {st}", p.name));
            }
        }
        if !dead.is_empty() {
            panic!("{dead:?}{}", self.logs());
        }
    }

    /// Messages on `topic` so far (sum of high watermarks).
    pub fn messages(&self, topic: &str) -> i64 {
        meterflow_kafka::high_watermarks(&self.kafka, topic)
            .map(|v| v.iter().map(|(_, h)| *h).sum())
            .unwrap_or(0)
    }

    /// Per partition of `topic`: (end offset, offset `group` committed).
    pub fn lag(&self, group: &str, topic: &str) -> anyhow::Result<Vec<(i32, i64, Option<i64>)>> {
        let hw = meterflow_kafka::high_watermarks(&self.kafka, topic)?;
        let mut c = meterflow_kafka::client_config(&self.kafka, "meterflow-test-lag");
        c.set("group.id", group);
        let consumer: BaseConsumer = c.create()?;
        let mut tpl = TopicPartitionList::new();
        for (p, _) in &hw {
            tpl.add_partition(topic, *p);
        }
        let got = consumer
            .committed_offsets(tpl, Duration::from_secs(10))
            .ok();
        Ok(hw
            .iter()
            .map(|(p, h)| {
                let c = got
                    .as_ref()
                    .and_then(|g| g.find_partition(topic, *p))
                    .and_then(|e| match e.offset() {
                        Offset::Offset(o) => Some(o),
                        _ => None,
                    });
                (*p, *h, c)
            })
            .collect())
    }

    /// Whether `group` has committed everything on `topic`.
    pub fn caught_up(&self, group: &str, topic: &str) -> bool {
        let Ok(l) = self.lag(group, topic) else {
            return false;
        };
        !l.is_empty()
            && l.iter()
                .all(|(_, h, c)| *h == 0 || c.is_some_and(|c| c >= *h))
    }

    /// Every stage has committed everything on its input topic.
    pub fn stages_caught_up(&self) -> bool {
        let t = &self.kafka.topics;
        self.caught_up("meterflow-enricher", &t.samples)
            && self.caught_up("meterflow-rater", &t.usage)
            && self.caught_up("meterflow-settler", &t.rated)
    }

    fn lags(&self) -> String {
        let t = &self.kafka.topics;
        [
            ("meterflow-enricher", &t.samples),
            ("meterflow-rater", &t.usage),
            ("meterflow-settler", &t.rated),
        ]
        .iter()
        .map(|(g, topic)| {
            format!(
                "\n{g} on {topic} (partition, end, committed): {:?}",
                self.lag(g, topic)
            )
        })
        .collect()
    }

    /// Wait until the collector has finished, every stage has committed everything it
    /// was given (twice in a row, a second apart), and `done()` holds; fail with the logs
    /// if a service dies or `within` passes.
    pub fn drain(&mut self, within: Duration, mut done: impl FnMut(&Path) -> bool) {
        let end = std::time::Instant::now() + within;
        let mut calm = 0;
        loop {
            self.assert_services_alive();
            let mut collector_done = self.collector.is_some();
            let mut failed = None;
            for c in self
                .collector
                .iter_mut()
                .chain(self.more_collectors.iter_mut())
            {
                match c.exited() {
                    Some(st) if !st.success() => failed = Some(format!("{} failed: {st}", c.name)),
                    Some(_) => {}
                    None => collector_done = false,
                }
            }
            if let Some(f) = failed {
                panic!("{f}{}", self.logs());
            }
            let ok = collector_done && self.stages_caught_up() && done(&self.out);
            calm = if ok { calm + 1 } else { 0 };
            if calm >= 2 {
                return;
            }
            if std::time::Instant::now() > end {
                panic!(
                    "the pipeline did not drain within {within:?}{}{}",
                    self.lags(),
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(1000));
        }
    }

    /// Wait (bounded) until every running stage member has been assigned its partitions
    /// since its latest start and not revoked after; the names of those that have not.
    pub fn wait_groups_settled(&mut self, within: Duration) -> Result<(), Vec<String>> {
        let end = std::time::Instant::now() + within;
        loop {
            let mut members = vec![&self.enricher, &self.rater, &self.settler];
            members.extend(self.replicas.iter().filter(|r| !r.stopped));
            let unsettled: Vec<String> = members
                .into_iter()
                .filter(|p| !p.settled_in_group())
                .map(|p| p.name.clone())
                .collect();
            if unsettled.is_empty() {
                return Ok(());
            }
            if std::time::Instant::now() > end {
                return Err(unsettled);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Stop the services with SIGTERM; each must exit cleanly.
    pub fn stop(&mut self) {
        let mut running: Vec<&mut Proc> =
            vec![&mut self.settler, &mut self.rater, &mut self.enricher];
        running.extend(self.replicas.iter_mut());
        for p in running.into_iter().filter(|p| !p.stopped) {
            let st = p.terminate(Duration::from_secs(20));
            assert!(
                st.is_some_and(|s| s.success()),
                "{} did not shut down cleanly on SIGTERM: {st:?}\n{}",
                p.name,
                p.tail(30)
            );
        }
    }

    /// Wait (bounded) until `f` holds, failing with the pipeline's logs.
    pub fn wait_for(&mut self, within: Duration, what: &str, mut f: impl FnMut(&Pipeline) -> bool) {
        let end = std::time::Instant::now() + within;
        while !f(self) {
            self.assert_services_alive();
            if std::time::Instant::now() > end {
                panic!("gave up waiting for {what}{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(d) = self.dir.take() {
                eprintln!("test files kept in {}", d.keep().display());
            }
        }
    }
}

/// Run a future to completion on a small runtime of its own.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}
