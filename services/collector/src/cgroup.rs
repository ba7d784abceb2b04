//! Containers through cgroup v2: walk a cgroup root, recognise container cgroups of
//! Docker, containerd (CRI) and CRI-O — standalone or under Kubernetes, with the systemd
//! or the cgroupfs driver, in every QoS class — and read their files.
//!
//! Per container: `cpu.stat` usage_usec (CPU time), `memory.current` and `memory.stat`
//! (working set = current − inactive_file), `io.stat` (bytes read and written, all
//! devices), `cpu.max` and `memory.max` (the allocation; `max` = no limit = no
//! allocation), and network bytes from `/proc/<pid>/net/dev` of a process in the
//! container.
//!
//! Network counters belong to a network namespace, not a container: the containers of a
//! pod share one. Each namespace is counted once, for one container — the pod's sandbox
//! (its process is `pause`) if there is one, else the lowest container id — and the host
//! namespace (`--network host`) is never counted. Loopback is excluded.
//!
//! Incarnation: the cgroup directory's inode. A restarted container gets a new cgroup,
//! hence a new inode, and its counters restart from zero as a new incarnation.

use crate::source::OwnerMeta;
use crate::source::{Reading, SourceError};
use meterflow_types::{Counters, Labels};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What a container cgroup's path says about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerRef {
    pub container_id: String,
    /// `docker`, `containerd` or `crio`.
    pub runtime: &'static str,
    pub pod_uid: Option<String>,
    /// `guaranteed`, `burstable` or `besteffort` under Kubernetes.
    pub qos: Option<&'static str>,
    pub path: PathBuf,
}

fn is_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The container id in one path component, with its runtime.
fn container_in(name: &str) -> Option<(String, &'static str)> {
    // systemd driver: <prefix>-<id>.scope
    if let Some(stem) = name.strip_suffix(".scope") {
        for (prefix, rt) in [
            ("docker-", "docker"),
            ("cri-containerd-", "containerd"),
            ("crio-", "crio"),
        ] {
            if let Some(id) = stem.strip_prefix(prefix) {
                if is_id(id) {
                    return Some((id.to_string(), rt));
                }
            }
        }
        return None;
    }
    // cgroupfs driver: the bare id (runtime from the parent, see `classify`)
    if is_id(name) {
        return Some((name.to_string(), ""));
    }
    None
}

/// A pod uid in one path component: `pod<uid>` (cgroupfs) or
/// `kubepods[-<qos>]-pod<uid_with_underscores>.slice` (systemd).
fn pod_in(name: &str) -> Option<String> {
    let s = name.strip_suffix(".slice").unwrap_or(name);
    let i = s.rfind("pod")?;
    let uid = &s[i + 3..];
    let ok = uid.len() >= 32
        && uid
            .bytes()
            .all(|b| b.is_ascii_hexdigit() || b == b'-' || b == b'_');
    ok.then(|| uid.replace('_', "-"))
}

/// Recognise a container cgroup from its path below the root.
pub fn classify(root: &Path, path: &Path) -> Option<ContainerRef> {
    let rel = path.strip_prefix(root).ok()?;
    let parts: Vec<&str> = rel.iter().filter_map(|c| c.to_str()).collect();
    let last = *parts.last()?;
    let (id, mut runtime) = container_in(last)?;
    let kube = parts.iter().any(|p| p.starts_with("kubepods"));
    let pod_uid = if kube {
        parts.iter().rev().skip(1).find_map(|p| pod_in(p))
    } else {
        None
    };
    if runtime.is_empty() {
        // cgroupfs: /docker/<id>, /kubepods/.../<id> (runtime not in the path)
        runtime = match parts.first() {
            Some(&"docker") => "docker",
            _ if kube => "containerd",
            _ => return None,
        };
    }
    if kube && pod_uid.is_none() {
        return None;
    }
    let qos = kube.then(|| {
        if parts.iter().any(|p| p.contains("burstable")) {
            "burstable"
        } else if parts.iter().any(|p| p.contains("besteffort")) {
            "besteffort"
        } else {
            "guaranteed"
        }
    });
    Some(ContainerRef {
        container_id: id,
        runtime,
        pod_uid,
        qos,
        path: path.to_path_buf(),
    })
}

/// Every container cgroup below `root` (depth-limited, links not followed).
pub fn discover(root: &Path) -> std::io::Result<Vec<ContainerRef>> {
    let mut out = Vec::new();
    let mut stack = vec![(root.to_path_buf(), 0usize)];
    while let Some((dir, depth)) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if dir == root => return Err(e),
            Err(_) => continue, // vanished or unreadable: not a container we can read
        };
        for e in entries.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            if !ft.is_dir() {
                continue;
            }
            let p = e.path();
            if let Some(c) = classify(root, &p) {
                out.push(c);
            } else if depth < 8 {
                stack.push((p, depth + 1));
            }
        }
    }
    out.sort_by(|a, b| a.container_id.cmp(&b.container_id));
    Ok(out)
}

/// A cgroup's directory, opened once per poll (`O_PATH`): its files are opened relative
/// to it, one path component each, instead of walking the cgroup's whole path (eight or
/// more components under `kubepods.slice`) again for every file — the walk was most of
/// a file's cost in a poll of 1,000 containers (`strace -c`, BENCHMARKS.md).
struct CgroupDir {
    fd: rustix::fd::OwnedFd,
    /// The directory's inode: the cgroup's incarnation (a container recreated under the
    /// same path gets a new one).
    ino: u64,
}

impl CgroupDir {
    fn open(dir: &Path) -> std::io::Result<CgroupDir> {
        use rustix::fs::{Mode, OFlags};
        let fd = rustix::fs::open(
            dir,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let ino = rustix::fs::fstat(&fd)?.st_ino;
        Ok(CgroupDir { fd, ino })
    }

    fn read(&self, file: &str) -> Result<String, String> {
        use rustix::fs::{Mode, OFlags};
        rustix::fs::openat(
            &self.fd,
            file,
            OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(std::io::Error::from)
        .and_then(|fd| read_whole(std::fs::File::from(fd)))
        .map_err(|e| format!("{file}: {e}"))
    }
}

/// A small kernel-generated file (cgroup, proc) read whole; see `read_whole`.
fn read_virtual(path: &Path) -> std::io::Result<String> {
    read_whole(std::fs::File::open(path)?)
}

/// An open file read whole, in one `read` when it fits the first 8 KiB, as systemd reads
/// kernel-generated files: open, read, close. Such a file is generated anew for each
/// `read` call, so one call is also one consistent snapshot, and a short read is its end.
/// `std::fs::read_to_string` adds a `statx` (for a size these files do not report) and a
/// second `read` to see the end — five system calls per file where three do. A file that
/// fills the buffer is read on until `read` returns 0, so a regular file of any size
/// reads whole too.
fn read_whole(mut f: std::fs::File) -> std::io::Result<String> {
    use std::io::Read;
    let mut first = [0u8; 8192];
    let n = loop {
        match f.read(&mut first) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            r => break r?,
        }
    };
    let mut bytes = first[..n].to_vec();
    if n == first.len() {
        f.read_to_end(&mut bytes)?;
    }
    String::from_utf8(bytes).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// `key value` lines (cpu.stat, memory.stat).
pub fn flat_keyed(text: &str, file: &str) -> Result<BTreeMap<String, i64>, String> {
    let mut m = BTreeMap::new();
    for (n, l) in text.lines().enumerate() {
        if l.trim().is_empty() {
            continue;
        }
        let mut it = l.split_whitespace();
        let (Some(k), Some(v), None) = (it.next(), it.next(), it.next()) else {
            return Err(format!(
                "{file} line {}: expected `key value`: {l:?}",
                n + 1
            ));
        };
        let v: i64 = v
            .parse()
            .map_err(|_| format!("{file} line {}: {v:?} is not a number", n + 1))?;
        m.insert(k.to_string(), v);
    }
    Ok(m)
}

fn single(text: &str, file: &str) -> Result<i64, String> {
    text.trim()
        .parse()
        .map_err(|_| format!("{file}: {:?} is not a number", text.trim()))
}

/// `cpu.max`: `max <period>` (no limit → None) or `<quota> <period>` → milli-vCPUs
/// (quota × 1000 / period, exact for Kubernetes limits, rounded down otherwise).
pub fn cpu_max_millis(text: &str) -> Result<Option<i64>, String> {
    let mut it = text.split_whitespace();
    let (Some(q), Some(p), None) = (it.next(), it.next(), it.next()) else {
        return Err(format!("cpu.max: expected `<quota> <period>`: {text:?}"));
    };
    let period: i64 = p
        .parse()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("cpu.max: bad period {p:?}"))?;
    if q == "max" {
        return Ok(None);
    }
    let quota: i64 = q
        .parse()
        .ok()
        .filter(|q| *q >= 0)
        .ok_or_else(|| format!("cpu.max: bad quota {q:?}"))?;
    Ok(Some(quota * 1000 / period))
}

/// `memory.max`: `max` (no limit → None) or bytes.
pub fn memory_max(text: &str) -> Result<Option<i64>, String> {
    match text.trim() {
        "max" => Ok(None),
        t => single(t, "memory.max").map(Some),
    }
}

/// `io.stat`: Σ rbytes and Σ wbytes over devices.
pub fn io_bytes(text: &str) -> Result<(i64, i64), String> {
    let (mut r, mut w) = (0i64, 0i64);
    for (n, l) in text.lines().enumerate() {
        let mut it = l.split_whitespace();
        let Some(dev) = it.next() else { continue };
        if !dev.contains(':') {
            return Err(format!("io.stat line {}: no device: {l:?}", n + 1));
        }
        for kv in it {
            let Some((k, v)) = kv.split_once('=') else {
                return Err(format!("io.stat line {}: {kv:?} is not key=value", n + 1));
            };
            let v: i64 = v
                .parse()
                .map_err(|_| format!("io.stat line {}: {kv:?}", n + 1))?;
            match k {
                "rbytes" => r += v,
                "wbytes" => w += v,
                _ => {}
            }
        }
    }
    Ok((r, w))
}

/// `/proc/<pid>/net/dev`: Σ received and transmitted bytes over interfaces but `lo`.
pub fn net_dev(text: &str) -> Result<(i64, i64), String> {
    let (mut rx, mut tx) = (0i64, 0i64);
    for (n, l) in text.lines().enumerate().skip(2) {
        let Some((iface, rest)) = l.split_once(':') else {
            return Err(format!("net/dev line {}: {l:?}", n + 1));
        };
        if iface.trim() == "lo" {
            continue;
        }
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.len() < 16 {
            return Err(format!(
                "net/dev line {}: {} fields, expected 16",
                n + 1,
                f.len()
            ));
        }
        let num = |s: &str| {
            s.parse::<i64>()
                .map_err(|_| format!("net/dev line {}: {s:?}", n + 1))
        };
        rx += num(f[0])?;
        tx += num(f[8])?;
    }
    Ok((rx, tx))
}

/// A container's cgroup files, read once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupStats {
    pub cpu_usage_usec: i64,
    pub memory_current: i64,
    pub working_set: i64,
    pub io_read: i64,
    pub io_write: i64,
    pub cpu_limit_millis: Option<i64>,
    pub memory_limit: Option<i64>,
    pub populated: bool,
    pub incarnation: u64,
    pub first_pid: Option<u32>,
}

pub fn read_stats(dir: &Path) -> Result<CgroupStats, String> {
    let d = CgroupDir::open(dir).map_err(|e| format!("cgroup: {e}"))?;
    let cpu = flat_keyed(&d.read("cpu.stat")?, "cpu.stat")?;
    let usage = *cpu.get("usage_usec").ok_or("cpu.stat: no usage_usec")?;
    let current = single(&d.read("memory.current")?, "memory.current")?;
    let mstat = flat_keyed(&d.read("memory.stat")?, "memory.stat")?;
    let inactive = mstat.get("inactive_file").copied().unwrap_or(0);
    let (io_read, io_write) = match d.read("io.stat") {
        Ok(t) => io_bytes(&t)?,
        Err(_) => (0, 0), // io controller not enabled for this cgroup
    };
    let populated = d
        .read("cgroup.events")
        .ok()
        .and_then(|t| flat_keyed(&t, "cgroup.events").ok())
        .and_then(|m| m.get("populated").copied())
        .map(|v| v == 1)
        .unwrap_or(true);
    let first_pid = d
        .read("cgroup.procs")
        .ok()
        .and_then(|t| t.lines().next().and_then(|l| l.trim().parse().ok()));
    Ok(CgroupStats {
        cpu_usage_usec: usage,
        memory_current: current,
        working_set: (current - inactive).max(0),
        io_read,
        io_write,
        cpu_limit_millis: cpu_max_millis(&d.read("cpu.max")?)?,
        memory_limit: memory_max(&d.read("memory.max")?)?,
        populated,
        incarnation: d.ino,
        first_pid,
    })
}

/// One poll of every container below `root`, network read through `proc_root`.
/// Container labels from the runtimes' records under a root (`/` on a node), cached per
/// container: a container's labels and annotations are fixed when it is created, so each
/// record is parsed once, not every poll. A missing record is looked up again next poll.
pub struct RuntimeMeta {
    root: PathBuf,
    cache: std::sync::Mutex<std::collections::HashMap<String, Labels>>,
}

impl RuntimeMeta {
    pub fn new(root: &Path) -> RuntimeMeta {
        RuntimeMeta {
            root: root.to_path_buf(),
            cache: Default::default(),
        }
    }

    fn labels(&self, c: &ContainerRef) -> Labels {
        if let Some(l) = self
            .cache
            .lock()
            .ok()
            .and_then(|m| m.get(&c.container_id).cloned())
        {
            return l;
        }
        let l = container_labels(&self.root, c);
        if !l.is_empty() {
            if let Ok(mut m) = self.cache.lock() {
                m.insert(c.container_id.clone(), l.clone());
            }
        }
        l
    }

    /// Forget containers that are gone.
    fn retain(&self, live: &std::collections::HashSet<&str>) {
        if let Ok(mut m) = self.cache.lock() {
            m.retain(|id, _| live.contains(id.as_str()));
        }
    }
}

pub fn poll(root: &Path, proc_root: &Path, meta: &RuntimeMeta) -> (Vec<Reading>, Vec<SourceError>) {
    let mut errors = Vec::new();
    let refs = match discover(root) {
        Ok(r) => r,
        Err(e) => {
            errors.push(SourceError {
                instance: "*".into(),
                reason: format!("cgroup root {}: {e}", root.display()),
            });
            return (Vec::new(), errors);
        }
    };
    let host_ns = netns(proc_root, 1);
    let mut read_ok = Vec::new();
    for c in refs {
        match read_stats(&c.path) {
            Ok(s) => read_ok.push((c, s)),
            Err(reason) => errors.push(SourceError {
                instance: c.container_id.clone(),
                reason,
            }),
        }
    }
    // each container's network namespace, looked up once per poll
    let ns_of: Vec<Option<String>> = read_ok
        .iter()
        .map(|(_, s)| s.first_pid.and_then(|pid| netns(proc_root, pid)))
        .collect();
    // one owner per network namespace: the sandbox (pause) first, then the lowest id
    let mut ns_owner: BTreeMap<String, (bool, String)> = BTreeMap::new();
    for ((c, s), ns) in read_ok.iter().zip(&ns_of) {
        let (Some(pid), Some(ns)) = (s.first_pid, ns.as_ref()) else {
            continue;
        };
        if Some(ns) == host_ns.as_ref() {
            continue;
        }
        let is_pause = read_virtual(&proc_root.join(pid.to_string()).join("comm"))
            .map(|s| s.trim() == "pause")
            .unwrap_or(false);
        let better = match ns_owner.get(ns) {
            None => true,
            Some((p, id)) => (is_pause && !p) || (is_pause == *p && c.container_id < *id),
        };
        if better {
            ns_owner.insert(ns.clone(), (is_pause, c.container_id.clone()));
        }
    }
    // labels from the runtimes' own records; pod-level ones (owner, namespace, pod name,
    // usually set on the sandbox) shared by every container of the pod
    let own: Vec<Labels> = read_ok.iter().map(|(c, _)| meta.labels(c)).collect();
    meta.retain(
        &read_ok
            .iter()
            .map(|(c, _)| c.container_id.as_str())
            .collect(),
    );
    let mut pod_level: BTreeMap<String, Labels> = BTreeMap::new();
    for ((c, _), l) in read_ok.iter().zip(&own) {
        if let Some(pod) = &c.pod_uid {
            let shared = pod_level.entry(pod.clone()).or_default();
            for (k, v) in l.iter().filter(|(k, _)| is_pod_level(k)) {
                shared.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
    }
    let mut readings = Vec::new();
    for (((c, s), own), ns) in read_ok.into_iter().zip(own).zip(ns_of) {
        let mut labels = c
            .pod_uid
            .as_ref()
            .and_then(|p| pod_level.get(p))
            .cloned()
            .unwrap_or_default();
        labels.extend(own);
        let owner = owner_from_labels(&labels);
        let mut net = (0, 0);
        if let Some(pid) = s.first_pid {
            let owns = ns
                .and_then(|ns| ns_owner.get(&ns))
                .is_some_and(|(_, id)| *id == c.container_id);
            if owns {
                match read_virtual(&proc_root.join(pid.to_string()).join("net/dev"))
                    .map_err(|e| format!("net/dev of pid {pid}: {e}"))
                    .and_then(|t| net_dev(&t))
                {
                    Ok(v) => net = v,
                    Err(reason) => {
                        errors.push(SourceError {
                            instance: c.container_id.clone(),
                            reason,
                        });
                        continue;
                    }
                }
            }
        }
        readings.push(Reading {
            instance_id: c.container_id.clone(),
            name: match &c.pod_uid {
                Some(p) => format!("pod-{p}/{}", &c.container_id[..12]),
                None => c.container_id[..12].to_string(),
            },
            kind: "container",
            hypervisor: format!("cgroup/{}", c.runtime),
            incarnation: format!("cg{}", s.incarnation),
            state: if s.populated { "running" } else { "exited" }.into(),
            counters: Counters {
                cpu_time_ns: s.cpu_usage_usec.saturating_mul(1000),
                net_rx_bytes: net.0,
                net_tx_bytes: net.1,
                disk_read_bytes: s.io_read,
                disk_write_bytes: s.io_write,
            },
            vcpu_millis: s.cpu_limit_millis.unwrap_or(0),
            memory_alloc_bytes: s.memory_limit.unwrap_or(0),
            memory_used_bytes: Some(s.working_set),
            flavor: c.qos.map(str::to_string),
            site: None,
            owner,
            labels,
        });
    }
    (readings, errors)
}

/// Label keys that carry ownership (any runtime; for Kubernetes, pod annotations the
/// runtime passes through, e.g. containerd `pod_annotations`, CRI-O `allowed_annotations`).
pub const ENTITY_LABEL: &str = "meterflow.dev/entity";
pub const USER_LABEL: &str = "meterflow.dev/user";
pub const PROJECT_LABEL: &str = "meterflow.dev/project";

fn is_pod_level(k: &str) -> bool {
    k.starts_with("meterflow.dev/") || k == "k8s.namespace" || k == "k8s.pod"
}

/// Owner from `meterflow.dev/entity` and `meterflow.dev/user` (and `/project`).
pub fn owner_from_labels(l: &Labels) -> Option<OwnerMeta> {
    Some(OwnerMeta {
        entity_id: l.get(ENTITY_LABEL).filter(|v| !v.is_empty())?.clone(),
        user_id: l
            .get(USER_LABEL)
            .filter(|v| !v.is_empty())
            .cloned()
            .unwrap_or_else(|| "unknown".into()),
        project: l.get(PROJECT_LABEL).cloned(),
    })
}

/// A container's labels from its runtime's record under `runtime_root` (`/` on a node):
/// Docker's `var/lib/docker/containers/<id>/config.v2.json` (`Config.Labels`), or the
/// OCI bundle's `config.json` annotations of containerd
/// (`run/containerd/io.containerd.runtime.v2.task/<namespace>/<id>/`) and CRI-O
/// (`var/lib/containers/storage/overlay-containers/<id>/userdata/`). Kubernetes
/// annotations become `k8s.namespace`, `k8s.pod`, `k8s.container`; other runtime-internal
/// keys (`io.kubernetes.*`, `io.containerd.*`, `org.opencontainers.*`) are dropped.
/// Missing or unreadable records give no labels (labels are optional; usage is not).
pub fn container_labels(runtime_root: &Path, c: &ContainerRef) -> Labels {
    let id = &c.container_id;
    let json = |p: PathBuf| -> Option<serde_json::Value> {
        serde_json::from_slice(&std::fs::read(p).ok()?).ok()
    };
    let raw: Option<serde_json::Value> = match c.runtime {
        "docker" => {
            json(runtime_root.join(format!("var/lib/docker/containers/{id}/config.v2.json")))
                .and_then(|v| v.get("Config")?.get("Labels").cloned())
        }
        "crio" => json(runtime_root.join(format!(
            "var/lib/containers/storage/overlay-containers/{id}/userdata/config.json"
        )))
        .and_then(|v| v.get("annotations").cloned()),
        _ => {
            let task = runtime_root.join("run/containerd/io.containerd.runtime.v2.task");
            std::fs::read_dir(task)
                .ok()
                .into_iter()
                .flatten()
                .flatten()
                .find_map(|ns| json(ns.path().join(id).join("config.json")))
                .and_then(|v| v.get("annotations").cloned())
        }
    };
    let mut out = Labels::new();
    let Some(serde_json::Value::Object(map)) = raw else {
        return out;
    };
    for (k, v) in map {
        let serde_json::Value::String(v) = v else {
            continue;
        };
        let key = match k.as_str() {
            "io.kubernetes.cri.sandbox-namespace" | "io.kubernetes.pod.namespace" => {
                "k8s.namespace"
            }
            "io.kubernetes.cri.sandbox-name" | "io.kubernetes.pod.name" => "k8s.pod",
            "io.kubernetes.cri.container-name" | "io.kubernetes.container.name" => "k8s.container",
            k if k.starts_with("io.kubernetes.")
                || k.starts_with("io.containerd.")
                || k.starts_with("org.opencontainers.") =>
            {
                continue
            }
            k => k,
        };
        out.insert(key.to_string(), v);
    }
    out
}

/// The network namespace of a process (`net:[4026531840]`), if readable.
fn netns(proc_root: &Path, pid: u32) -> Option<String> {
    std::fs::read_link(proc_root.join(pid.to_string()).join("ns/net"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const B: &str = "1111111111111111111111111111111111111111111111111111111111111111";
    const C: &str = "2222222222222222222222222222222222222222222222222222222222222222";
    const D: &str = "3333333333333333333333333333333333333333333333333333333333333333";
    const E: &str = "4444444444444444444444444444444444444444444444444444444444444444";
    const POD: &str = "6f2c8f0e-57a2-4c1e-9d3b-2a8e4f1b7c9d";

    fn under(p: &str) -> Option<(String, &'static str, Option<String>, Option<&'static str>)> {
        let root = Path::new("/sys/fs/cgroup");
        classify(root, &root.join(p)).map(|c| (c.container_id, c.runtime, c.pod_uid, c.qos))
    }

    #[test]
    fn a_file_is_read_whole_at_any_size_and_bad_text_or_no_file_is_an_error() {
        let dir = tempfile::tempdir().expect("tmp");
        // around the one-read buffer: empty, small, exactly full, past it, far past it
        for len in [0usize, 17, 8191, 8192, 8193, 100_000] {
            let text: String = (0..len).map(|i| (b'a' + (i % 26) as u8) as char).collect();
            let p = dir.path().join(format!("f{len}"));
            std::fs::write(&p, &text).expect("write");
            assert_eq!(read_virtual(&p).expect("read"), text, "{len} bytes");
        }
        // a kernel-generated file, where the system has one
        if let Ok(want) = std::fs::read_to_string("/proc/self/cgroup") {
            assert_eq!(
                read_virtual(Path::new("/proc/self/cgroup")).expect("proc"),
                want
            );
        }
        let bad = dir.path().join("bad");
        std::fs::write(&bad, [0x66, 0xff, 0x66]).expect("write");
        assert_eq!(
            read_virtual(&bad).map_err(|e| e.kind()),
            Err(std::io::ErrorKind::InvalidData)
        );
        assert_eq!(
            read_virtual(&dir.path().join("missing")).map_err(|e| e.kind()),
            Err(std::io::ErrorKind::NotFound)
        );
    }

    #[test]
    fn container_cgroups_of_every_runtime_driver_and_qos_class_are_recognised() {
        let pod_ = POD.replace('-', "_");
        let pod = Some(POD.to_string());
        let cases = [
            // systemd driver
            (format!("system.slice/docker-{A}.scope"), (A, "docker", None, None)),
            (
                format!("kubepods.slice/kubepods-pod{pod_}.slice/cri-containerd-{A}.scope"),
                (A, "containerd", pod.clone(), Some("guaranteed")),
            ),
            (
                format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{pod_}.slice/crio-{A}.scope"),
                (A, "crio", pod.clone(), Some("burstable")),
            ),
            (
                format!("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{pod_}.slice/docker-{A}.scope"),
                (A, "docker", pod.clone(), Some("besteffort")),
            ),
            // cgroupfs driver
            (format!("docker/{A}"), (A, "docker", None, None)),
            (format!("kubepods/pod{POD}/{A}"), (A, "containerd", pod.clone(), Some("guaranteed"))),
            (
                format!("kubepods/burstable/pod{POD}/{A}"),
                (A, "containerd", pod.clone(), Some("burstable")),
            ),
            (
                format!("kubepods/besteffort/pod{POD}/{A}"),
                (A, "containerd", pod.clone(), Some("besteffort")),
            ),
        ];
        for (path, (id, rt, pod, qos)) in cases {
            assert_eq!(under(&path), Some((id.to_string(), rt, pod, qos)), "{path}");
        }
        for not in [
            "system.slice/sshd.service".to_string(),
            "init.scope".into(),
            "user.slice/user-1000.slice/session-2.scope".into(),
            "kubepods.slice/kubepods-burstable.slice".into(),
            format!("kubepods.slice/kubepods-pod{pod_}.slice"),
            format!("system.slice/crio-conmon-{A}.scope"),
            format!("system.slice/docker-{}.scope", &A[..12]),
            format!("machine.slice/{A}"),
        ] {
            assert_eq!(under(&not), None, "{not}");
        }
    }

    fn write(dir: &Path, files: &[(&str, &str)]) {
        std::fs::create_dir_all(dir).expect("dir");
        for (f, t) in files {
            std::fs::write(dir.join(f), t).expect("file");
        }
    }

    /// A container cgroup with the files a cgroup v2 kernel shows.
    fn container(
        dir: &Path,
        usage_usec: i64,
        cur: i64,
        inactive: i64,
        max: &str,
        cpu: &str,
        pid: u32,
    ) {
        write(
            dir,
            &[
                (
                    "cpu.stat",
                    &format!("usage_usec {usage_usec}\nuser_usec {}\nsystem_usec {}\nnr_periods 0\nnr_throttled 0\nthrottled_usec 0\n", usage_usec / 2, usage_usec / 2),
                ),
                ("memory.current", &format!("{cur}\n")),
                (
                    "memory.stat",
                    &format!("anon 1000\nfile 5000\nkernel 0\nactive_file 100\ninactive_file {inactive}\nactive_anon 10\ninactive_anon 0\n"),
                ),
                ("memory.max", &format!("{max}\n")),
                ("cpu.max", &format!("{cpu}\n")),
                (
                    "io.stat",
                    "8:0 rbytes=1000 wbytes=2000 rios=3 wios=4 dbytes=0 dios=0\n259:0 rbytes=10 wbytes=20 rios=1 wios=1 dbytes=0 dios=0\n",
                ),
                ("cgroup.events", "populated 1\nfrozen 0\n"),
                ("cgroup.procs", &format!("{pid}\n")),
            ],
        );
    }

    fn process(proc_root: &Path, pid: u32, comm: &str, netns: &str, rx: i64, tx: i64) {
        let d = proc_root.join(pid.to_string());
        std::fs::create_dir_all(d.join("ns")).expect("dir");
        std::fs::create_dir_all(d.join("net")).expect("dir");
        std::fs::write(d.join("comm"), format!("{comm}\n")).expect("comm");
        std::os::unix::fs::symlink(format!("net:[{netns}]"), d.join("ns/net")).expect("link");
        std::fs::write(
            d.join("net/dev"),
            format!(
                "Inter-|   Receive                                                |  Transmit\n \
                 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    \
                 lo: 999999 10 0 0 0 0 0 0 999999 10 0 0 0 0 0 0\n  \
                 eth0: {rx} 100 0 0 0 0 0 0 {tx} 90 0 0 0 0 0 0\n"
            ),
        )
        .expect("net/dev");
    }

    #[test]
    fn a_poll_reads_every_container_and_counts_each_network_namespace_once() {
        let tmp = tempfile::tempdir().expect("tmp");
        let root = tmp.path().join("cgroup");
        let proc_root = tmp.path().join("proc");
        let pod_ = POD.replace('-', "_");
        let podd = root.join(format!(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{pod_}.slice"
        ));
        // a pod: sandbox (pause) + app share one network namespace
        container(
            &podd.join(format!("cri-containerd-{A}.scope")),
            5_000,
            1 << 20,
            0,
            "max",
            "max 100000",
            101,
        );
        container(
            &podd.join(format!("cri-containerd-{B}.scope")),
            2_000_000,
            300 << 20,
            100 << 20,
            "536870912",
            "50000 100000",
            102,
        );
        process(&proc_root, 101, "pause", "4026532001", 7_000, 3_000);
        process(&proc_root, 102, "app", "4026532001", 7_000, 3_000);
        // a standalone container with its own namespace, one on the host network
        container(
            &root.join(format!("system.slice/docker-{C}.scope")),
            10,
            4096,
            0,
            "max",
            "200000 100000",
            201,
        );
        process(&proc_root, 201, "nginx", "4026532100", 50, 60);
        container(
            &root.join(format!("system.slice/docker-{D}.scope")),
            10,
            4096,
            0,
            "max",
            "max 100000",
            301,
        );
        process(&proc_root, 301, "agent", "4026531840", 1, 1);
        process(&proc_root, 1, "systemd", "4026531840", 1, 1);
        // a container whose cpu.stat is garbage: skipped this poll, the others go on
        container(
            &root.join(format!("system.slice/docker-{E}.scope")),
            10,
            4096,
            0,
            "max",
            "max 100000",
            401,
        );
        std::fs::write(
            root.join(format!("system.slice/docker-{E}.scope/cpu.stat")),
            "usage_usec lots\n",
        )
        .expect("w");
        // not containers
        write(
            &root.join("system.slice/sshd.service"),
            &[("cpu.stat", "usage_usec 1\n")],
        );

        let (readings, errors) = poll(&root, &proc_root, &RuntimeMeta::new(tmp.path()));
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].instance, E);
        assert!(
            errors[0].reason.contains("cpu.stat"),
            "{}",
            errors[0].reason
        );
        let by: BTreeMap<&str, &Reading> = readings
            .iter()
            .map(|r| (r.instance_id.as_str(), r))
            .collect();
        assert_eq!(by.keys().copied().collect::<Vec<_>>(), [A, B, C, D]);

        let app = by[B];
        assert_eq!(app.kind, "container");
        assert_eq!(app.hypervisor, "cgroup/containerd");
        assert_eq!(app.flavor.as_deref(), Some("burstable"));
        assert_eq!(app.counters.cpu_time_ns, 2_000_000_000);
        assert_eq!(
            app.memory_used_bytes,
            Some(200 << 20),
            "working set = current − inactive_file"
        );
        assert_eq!(app.memory_alloc_bytes, 536_870_912);
        assert_eq!(app.vcpu_millis, 500);
        assert_eq!(
            (app.counters.disk_read_bytes, app.counters.disk_write_bytes),
            (1010, 2020)
        );
        assert_eq!(
            (app.counters.net_rx_bytes, app.counters.net_tx_bytes),
            (0, 0),
            "the pod's traffic is the sandbox's"
        );
        assert!(app.name.contains(POD));
        let pause = by[A];
        assert_eq!(
            (pause.counters.net_rx_bytes, pause.counters.net_tx_bytes),
            (7_000, 3_000),
            "lo excluded"
        );
        assert_eq!(
            (pause.vcpu_millis, pause.memory_alloc_bytes),
            (0, 0),
            "no limit, no allocation"
        );
        let web = by[C];
        assert_eq!(
            (web.counters.net_rx_bytes, web.counters.net_tx_bytes),
            (50, 60)
        );
        assert_eq!(web.vcpu_millis, 2000);
        let host = by[D];
        assert_eq!(
            (host.counters.net_rx_bytes, host.counters.net_tx_bytes),
            (0, 0),
            "host network never counted"
        );
        assert!(readings
            .iter()
            .all(|r| r.state == "running" && r.incarnation.starts_with("cg")));
    }

    #[test]
    fn a_cgroup_is_read_through_its_directory_and_a_recreated_one_is_a_new_incarnation() {
        use std::os::unix::fs::MetadataExt;
        let tmp = tempfile::tempdir().expect("tmp");
        let write = |dir: &Path, usage: &str| {
            std::fs::create_dir_all(dir).expect("mkdir");
            for (f, t) in [
                ("cpu.stat", format!("usage_usec {usage}\nuser_usec 1\n")),
                ("memory.current", "4096\n".into()),
                ("memory.stat", "anon 1\ninactive_file 1024\n".into()),
                ("cpu.max", "150000 100000\n".into()),
                ("memory.max", "max\n".into()),
            ] {
                std::fs::write(dir.join(f), t).expect("write");
            }
        };
        let dir = tmp.path().join("kubepods.slice/cri-containerd-x.scope");
        write(&dir, "7");
        let first = read_stats(&dir).expect("read");
        assert_eq!(
            first.incarnation,
            std::fs::metadata(&dir).expect("stat").ino()
        );
        assert_eq!((first.cpu_usage_usec, first.working_set), (7, 3072));
        assert_eq!(
            (first.cpu_limit_millis, first.memory_limit),
            (Some(1500), None)
        );
        // no io.stat, cgroup.events or cgroup.procs: optional, as on a real node
        assert_eq!(
            (first.io_read, first.populated, first.first_pid),
            (0, true, None)
        );
        // recreated under the same path (the old one still exists, so its inode cannot be
        // reused): a new incarnation, counters from zero
        std::fs::rename(&dir, tmp.path().join("old")).expect("rename");
        write(&dir, "0");
        let second = read_stats(&dir).expect("read");
        assert_ne!(second.incarnation, first.incarnation);
        assert_eq!(second.cpu_usage_usec, 0);
        // a required file missing: its name in the reason
        std::fs::remove_file(dir.join("memory.current")).expect("rm");
        assert!(read_stats(&dir).is_err_and(|e| e.starts_with("memory.current: ")));
        assert!(read_stats(&tmp.path().join("gone")).is_err_and(|e| e.starts_with("cgroup: ")));
    }

    #[test]
    fn malformed_files_get_a_reason_never_a_panic() {
        assert!(cpu_max_millis("max").is_err());
        assert!(cpu_max_millis("100 0").is_err());
        assert_eq!(cpu_max_millis("max 100000"), Ok(None));
        assert_eq!(cpu_max_millis("150000 100000"), Ok(Some(1500)));
        assert_eq!(memory_max("max\n"), Ok(None));
        assert!(memory_max("lots").is_err());
        assert!(io_bytes("8:0 rbytes=x").is_err());
        assert!(io_bytes("rbytes=1").is_err());
        assert_eq!(io_bytes(""), Ok((0, 0)));
        assert!(net_dev("h\nh\neth0 1 2 3").is_err());
        assert!(flat_keyed("usage_usec", "cpu.stat").is_err());
        let tmp = tempfile::tempdir().expect("tmp");
        assert!(poll(
            &tmp.path().join("missing"),
            tmp.path(),
            &RuntimeMeta::new(tmp.path())
        )
        .1[0]
            .reason
            .contains("cgroup root"));
    }
}
