//! Helpers for the end-to-end tests: the service binaries built in the same profile as
//! the tests (`cargo build --workspace --bins` runs first in scripts/test.sh), a Tansu
//! broker as a separate process, service processes with their logs, and the settlement
//! files read back.

pub mod bench;
pub mod chaos;
pub mod expect;
pub mod pipeline;
pub mod settled;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A path as a command-line argument.
pub fn utf8(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Run the `meterflow` command line (warnings only in its log) and return its output.
pub fn meterflow<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> std::process::Output {
    meterflow_env(args, &[])
}

/// `meterflow` with extra environment variables.
pub fn meterflow_env<S: AsRef<std::ffi::OsStr>>(
    args: &[S],
    envs: &[(String, String)],
) -> std::process::Output {
    Command::new(bin("meterflow"))
        .args(args)
        .env("METERFLOW_LOG", "warn")
        .envs(envs.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("runs meterflow")
}

/// `meterflow` that must succeed; its standard output.
pub fn meterflow_ok<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> String {
    let out = meterflow(args);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "meterflow {:?} failed:\n{stdout}{}",
        args.iter()
            .map(|a| a.as_ref().to_owned())
            .collect::<Vec<_>>(),
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// A field of `/proc/<pid>/status` given in kB (`VmHWM`, `RssAnon`, `RssFile`, ...), in
/// KiB; `None` once the process is gone.
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Path of a workspace binary next to the test executable's profile directory.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/e2e-xxxx (a test) or target/<profile>/bench-… (a binary)
    let mut dir = exe.parent().expect("profile dir").to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (scripts/test.sh does)",
        p.display()
    );
    p
}

/// The Tansu binary: `$METERFLOW_TANSU`, else `~/.cache/meterflow/tansu/bin/tansu`, else
/// `tansu` on PATH. Panics (never skips) with the command that installs it.
pub fn tansu_bin() -> PathBuf {
    let candidates = [
        std::env::var_os("METERFLOW_TANSU").map(PathBuf::from),
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/meterflow/tansu/bin/tansu")),
    ];
    for p in candidates.into_iter().flatten() {
        if p.is_file() {
            return p;
        }
    }
    if let Ok(out) = Command::new("sh").args(["-c", "command -v tansu"]).output() {
        let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() && !s.is_empty() {
            return PathBuf::from(s);
        }
    }
    panic!(
        "the Tansu broker is not installed; these end-to-end tests need it. Install it with\n  \
         bash scripts/setup.sh --tests\n(or: cargo install tansu --version 0.6.0 --locked --features dynostore,libsql \
         --root ~/.cache/meterflow/tansu), or point METERFLOW_TANSU at the binary"
    );
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn wait_for_port(port: u16, within: Duration) -> bool {
    let end = Instant::now() + within;
    while Instant::now() < end {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// splitmix64: a small, seeded, reproducible generator (the same seed gives the same
/// corpus, the same faults at the same moments).
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform-ish in 0..n (0 when n is 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

/// A process with its output in a log file; SIGKILLed when dropped.
pub struct Proc {
    pub name: String,
    program: PathBuf,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    pub starts: u32,
    /// Stopped on purpose (not a failure if it is gone).
    pub stopped: bool,
}

impl Proc {
    pub fn start(
        name: &str,
        program: &Path,
        args: &[&str],
        envs: &[(&str, &str)],
        dir: &Path,
    ) -> Proc {
        let mut p = Proc::prepare(name, program, args, envs, dir);
        p.spawn();
        p
    }

    /// A process ready to `launch`, not running yet.
    pub fn prepare(
        name: &str,
        program: &Path,
        args: &[&str],
        envs: &[(&str, &str)],
        dir: &Path,
    ) -> Proc {
        Proc {
            name: name.to_string(),
            program: program.to_path_buf(),
            args: args.iter().map(|s| s.to_string()).collect(),
            envs: envs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            dir: dir.to_path_buf(),
            log: dir.join(format!("{name}.log")),
            child: None,
            starts: 0,
            stopped: true,
        }
    }

    /// Run `program` from the next start on (a benchmark comparing two builds).
    pub fn set_program(&mut self, program: &Path) {
        self.program = program.to_path_buf();
    }

    /// Set (or replace) an environment variable for the next start.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.envs.retain(|(k, _)| k != key);
        self.envs.push((key.to_string(), value.to_string()));
    }

    /// The file its output goes to (appended to across restarts).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Start a prepared process, or one that has exited (stopped or crashed) again; a
    /// running one is left alone.
    pub fn launch(&mut self) {
        if self.child.is_none() || self.exited().is_some() {
            self.spawn();
        }
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let err = log.try_clone().expect("log file");
        let child = Command::new(&self.program)
            .args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.program.display()));
        self.child = Some(child);
        self.starts += 1;
        self.stopped = false;
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a graceful exit.
    pub fn terminate(&mut self, within: Duration) -> Option<ExitStatus> {
        self.stopped = true;
        let c = self.child.as_mut()?;
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let st = self.wait(within);
        if st.is_none() {
            self.kill9();
        }
        st
    }

    pub fn restart(&mut self) {
        self.kill9();
        self.stopped = false;
        self.spawn();
    }

    /// The exit status if the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    pub fn wait(&mut self, within: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + within;
        loop {
            if let Some(s) = self.exited() {
                return Some(s);
            }
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// CPU time (user + system, all threads) the process has used so far, in seconds.
    pub fn cpu_secs(&self) -> Option<f64> {
        cpu_secs_of(&format!("/proc/{}/stat", self.pid()?))
    }

    /// Peak resident memory (VmHWM) in KiB, while the process runs.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        status_kib(self.pid()?, "VmHWM")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A consumer-group member whose log says that, since its latest start, it was
    /// assigned partitions and not revoked after: its group has settled around it.
    pub fn settled_in_group(&self) -> bool {
        self.latest_says("partitions assigned", "partitions revoked")
    }

    /// Whether, since the latest start, the log said `yes` and not `no` after it.
    fn latest_says(&self, yes: &str, no: &str) -> bool {
        let log = self.log();
        // the latest incarnation has not logged its start yet: what the log shows is the
        // previous one's (a fault right after a restart once landed mid-join that way)
        if log.matches(" starting").count() < self.starts as usize {
            return false;
        }
        let since = log.rfind(" starting").map_or(&log[..], |i| &log[i..]);
        match (since.rfind(yes), since.rfind(no)) {
            (Some(a), Some(r)) => a > r,
            (Some(_), None) => true,
            _ => false,
        }
    }

    /// A settler whose log says that, since its latest start, it became the master (the
    /// member holding rated partition 0) and has not handed that on since. Mastership
    /// moves with the partition: a member alone in the group is master until another
    /// joins and takes partition 0, so "ever said master" names two members at times.
    pub fn settler_master_now(&self) -> bool {
        self.latest_says("master: this member", "no longer master")
    }

    /// The last `n` lines of the log, for failure messages.
    pub fn tail(&self, n: usize) -> String {
        let l = self.log();
        let lines: Vec<&str> = l.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A Tansu broker in its own process, on a port of its own.
pub struct Tansu {
    pub proc: Proc,
    pub port: u16,
    storage: String,
}

impl Tansu {
    /// In-memory storage: fast, gone when the process ends.
    pub fn start(dir: &Path) -> Tansu {
        Tansu::start_with(dir, "memory://tansu/")
    }

    /// `storage` is a Tansu storage URL, e.g. `sqlite://broker.db` (relative to `dir`).
    pub fn start_with(dir: &Path, storage: &str) -> Tansu {
        Tansu::start_on(dir, storage, free_port())
    }

    /// On a given port (e.g. one the services were told of before the broker started).
    pub fn start_on(dir: &Path, storage: &str, port: u16) -> Tansu {
        let url = format!("tcp://127.0.0.1:{port}");
        let bin = tansu_bin();
        let proc = Proc::start(
            "tansu",
            &bin,
            &[
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
                "--storage-engine",
                storage,
            ],
            // `METERFLOW_TANSU_LOG` (a RUST_LOG filter) to see the broker's group
            // coordinator at work, e.g. `warn,tansu_broker::coordinator=info`
            &[(
                "RUST_LOG",
                &std::env::var("METERFLOW_TANSU_LOG").unwrap_or_else(|_| "warn".into()),
            )],
            dir,
        );
        let t = Tansu {
            proc,
            port,
            storage: storage.to_string(),
        };
        t.await_listening();
        t
    }

    fn await_listening(&self) {
        assert!(
            wait_for_port(self.port, Duration::from_secs(30)),
            "Tansu did not listen on {}: {}",
            self.port,
            self.proc.tail(20)
        );
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The Kafka settings of a test on this broker (4 partitions a topic), every
    /// meterflow topic created.
    pub fn with_topics(&self) -> meterflow_kafka::KafkaConfig {
        let cfg = meterflow_kafka::KafkaConfig {
            brokers: self.brokers(),
            partitions: 4,
            ..meterflow_kafka::KafkaConfig::default()
        };
        crate::pipeline::block_on(meterflow_kafka::ensure_topics(&cfg)).expect("topics");
        cfg
    }

    pub fn storage(&self) -> &str {
        &self.storage
    }

    /// Kill the broker and start it again on the same port and storage.
    pub fn restart(&mut self) {
        self.proc.restart();
        self.await_listening();
    }
}

/// An S3-compatible object store (moto's server, installed by `scripts/setup.sh --tests`
/// into `~/.cache/meterflow/moto`, or `$METERFLOW_MOTO`) on a port of its own, with one
/// bucket. Panics (never skips) when it is missing.
pub struct S3 {
    pub proc: Proc,
    pub port: u16,
    pub bucket: String,
}

impl S3 {
    pub fn start(dir: &Path, bucket: &str) -> S3 {
        let bin = [
            std::env::var_os("METERFLOW_MOTO").map(PathBuf::from),
            std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".cache/meterflow/moto/bin/moto_server")),
        ]
        .into_iter()
        .flatten()
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("moto's S3 server is not installed: run `bash scripts/setup.sh --tests`")
        });
        let port = free_port();
        let proc = Proc::start(
            "moto",
            &bin,
            &["-H", "127.0.0.1", "-p", &port.to_string()],
            &[],
            dir,
        );
        assert!(
            wait_for_port(port, Duration::from_secs(30)),
            "moto did not listen on {port}: {}",
            proc.tail(20)
        );
        // CreateBucket: the server takes an unsigned request
        let mut c = TcpStream::connect(("127.0.0.1", port)).expect("connect to moto");
        write!(
            c,
            "PUT /{bucket} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .expect("create bucket");
        let mut reply = String::new();
        c.read_to_string(&mut reply).expect("reply");
        assert!(reply.starts_with("HTTP/1.1 200"), "CreateBucket: {reply}");
        S3 {
            proc,
            port,
            bucket: bucket.to_string(),
        }
    }

    /// `s3://<bucket>/<prefix>`.
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{}/{prefix}", self.bucket)
    }

    /// The object-store options that reach this server.
    pub fn options(&self) -> Vec<(String, String)> {
        [
            ("aws_endpoint", format!("http://127.0.0.1:{}", self.port)),
            ("aws_allow_http", "true".into()),
            ("aws_region", "us-east-1".into()),
            ("aws_access_key_id", "meterflow".into()),
            ("aws_secret_access_key", "meterflow".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// The same as a `[storage_options]` table for a settler's configuration.
    pub fn toml(&self) -> String {
        let mut t = String::from("[storage_options]\n");
        for (k, v) in self.options() {
            t.push_str(&format!("{k} = \"{v}\"\n"));
        }
        t
    }

    /// The same as environment variables (`AWS_ENDPOINT`, ...) for `meterflow` commands.
    pub fn env(&self) -> Vec<(String, String)> {
        self.options()
            .into_iter()
            .map(|(k, v)| (k.to_ascii_uppercase(), v))
            .collect()
    }
}

/// Wait until `f` holds, checking every 200 ms; panic with `what()` after `within`.
/// A guard against hangs, not a performance threshold.
pub fn wait_until(within: Duration, mut f: impl FnMut() -> bool, what: impl Fn() -> String) {
    let end = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < end, "gave up waiting: {}", what());
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// User + system CPU seconds of a process from its `/proc/<pid>/stat` (or
/// `/proc/self/stat`): fields 14 and 15, in clock ticks (100 per second on Linux).
pub fn cpu_secs_of(stat_path: &str) -> Option<f64> {
    let s = std::fs::read_to_string(stat_path).ok()?;
    // the command name (field 2) may hold spaces: count from the closing parenthesis
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let (utime, stime): (u64, u64) = (f.get(11)?.parse().ok()?, f.get(12)?.parse().ok()?);
    Some((utime + stime) as f64 / 100.0)
}
