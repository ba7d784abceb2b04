//! Cost of one collector poll of 1,000 instances: CPU time per poll and peak RSS, for a
//! synthetic cgroup v2 tree of containers (real file formats, Kubernetes layout) and for
//! the simulated hypervisor, each turned into samples and Avro bytes as the collector
//! does before producing. Baseline, in the same run: reading the same cgroup files with
//! nothing else (the syscalls no collector can avoid).
//!
//! `cargo run --release -p meterflow-collector --bin bench-poll -- [instances] [polls]`

use meterflow_collector::fleet::FleetConfig;
use meterflow_collector::sampler::Sampler;
use meterflow_collector::{cgroup, CollectorConfig, Sources};
use std::path::{Path, PathBuf};

/// Process CPU time (user + system) in seconds, from /proc/self/stat.
fn cpu_seconds() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = s.rsplit(')').next().unwrap_or_default();
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // fields 14 and 15 of stat are 12 and 13 after the command name
    (ticks(11) + ticks(12)) / 100.0
}

use meterflow_runtime::peak_rss_mib;

/// A containerd OCI bundle `config.json` of realistic size (about 6 KB: process, env,
/// mounts, annotations), as the collector finds under `run/containerd/…/<id>/`.
fn oci_config(id: &str, pod: &str) -> String {
    let env: Vec<String> = (0..40)
        .map(|k| format!("\"SERVICE_{k}_PORT=tcp://10.96.{k}.1:443\""))
        .collect();
    let mounts: Vec<String> = (0..20)
        .map(|k| format!("{{\"destination\":\"/var/run/secrets/{k}\",\"type\":\"bind\",\"source\":\"/var/lib/kubelet/pods/{pod}/volumes/{k}\",\"options\":[\"rbind\",\"ro\"]}}"))
        .collect();
    format!(
        "{{\"ociVersion\":\"1.1.0\",\"process\":{{\"args\":[\"/app\"],\"env\":[{}]}},\"mounts\":[{}],\
         \"annotations\":{{\"io.kubernetes.cri.container-type\":\"container\",\
         \"io.kubernetes.cri.container-name\":\"app\",\"io.kubernetes.cri.sandbox-id\":\"{id}\",\
         \"io.kubernetes.cri.sandbox-name\":\"pod-{pod}\",\"io.kubernetes.cri.sandbox-namespace\":\"bench\",\
         \"meterflow.dev/entity\":\"entity-{pod}\",\"meterflow.dev/user\":\"user\"}}}}",
        env.join(","),
        mounts.join(",")
    )
}

fn tree(base: &Path, n: usize) -> anyhow::Result<Vec<PathBuf>> {
    let root = base.join("cgroup");
    let task = base.join("run/containerd/io.containerd.runtime.v2.task/k8s.io");
    let mut dirs = Vec::new();
    for i in 0..n {
        let id = format!("{:064x}", i + 1);
        let pod = format!("{:08x}_0000_4000_8000_{:012x}", i / 4, i / 4);
        let d = root.join(format!(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{pod}.slice/cri-containerd-{id}.scope"
        ));
        std::fs::create_dir_all(task.join(&id))?;
        std::fs::write(task.join(&id).join("config.json"), oci_config(&id, &pod))?;
        std::fs::create_dir_all(&d)?;
        let w = |f: &str, t: String| std::fs::write(d.join(f), t);
        w("cpu.stat", format!("usage_usec {}\nuser_usec 1\nsystem_usec 1\nnr_periods 0\nnr_throttled 0\nthrottled_usec 0\n", i * 1000))?;
        w("memory.current", format!("{}\n", (i + 1) * 4096))?;
        w("memory.stat", "anon 4096\nfile 8192\nkernel 0\nactive_file 100\ninactive_file 200\nactive_anon 10\ninactive_anon 0\nshmem 0\nfile_mapped 0\nfile_dirty 0\n".into())?;
        w("memory.max", "536870912\n".into())?;
        w("cpu.max", "50000 100000\n".into())?;
        w(
            "io.stat",
            "8:0 rbytes=1000 wbytes=2000 rios=3 wios=4 dbytes=0 dios=0\n".into(),
        )?;
        w("cgroup.events", "populated 1\nfrozen 0\n".into())?;
        w("cgroup.procs", format!("{}\n", 1_000_000 + i))?;
        dirs.push(d);
    }
    Ok(dirs)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let n: usize = args.first().map(|s| s.parse()).transpose()?.unwrap_or(1000);
    let polls: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(200);
    let base = std::env::temp_dir().join(format!("meterflow-bench-poll-{}", std::process::id()));
    let root = base.join("cgroup");
    let dirs = tree(&base, n)?;
    let proc_root = base.join("proc"); // no processes: no network reads
    std::fs::create_dir_all(&proc_root)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;

    // baseline: read every file a poll reads, nothing else
    let files = [
        "cpu.stat",
        "memory.current",
        "memory.stat",
        "memory.max",
        "cpu.max",
        "io.stat",
        "cgroup.events",
        "cgroup.procs",
    ];
    let c0 = cpu_seconds();
    let mut bytes = 0usize;
    for _ in 0..polls {
        for d in &dirs {
            for f in files {
                bytes += std::fs::read_to_string(d.join(f))
                    .map(|s| s.len())
                    .unwrap_or(0);
            }
        }
    }
    let bare = (cpu_seconds() - c0) / polls as f64;
    anyhow::ensure!(bytes > 0);

    // containers: discovery + parse + labels (cached per container) + samples + Avro
    let meta = cgroup::RuntimeMeta::new(&base);
    let mut sampler = Sampler::new("bench", "bench", 10_000, 900_000, None)?;
    let c0 = cpu_seconds();
    for k in 0..polls {
        let (readings, errors) = cgroup::poll(&root, &proc_root, &meta);
        anyhow::ensure!(
            readings.len() == n && errors.is_empty() && readings.iter().all(|r| r.owner.is_some()),
            "{} readings, {errors:?}",
            readings.len()
        );
        for r in &readings {
            let s = sampler.observe(r, (k as i64 + 1) * 10_000)?;
            bytes += meterflow_avro::encode(&s).len();
        }
    }
    let containers = (cpu_seconds() - c0) / polls as f64;

    // simulated hypervisor: readings + samples + Avro
    let cfg = CollectorConfig {
        fleet: Some(FleetConfig {
            instances: n as u32,
            entities: 10,
            seed: 1,
            ..Default::default()
        }),
        ..Default::default()
    };
    let sources = Sources::open(&cfg, 0)?;
    let mut sampler = Sampler::new("bench2", "bench", 10_000, 900_000, None)?;
    let c0 = cpu_seconds();
    for k in 0..polls {
        let t = (k as i64 + 1) * 10_000;
        let (readings, _) = rt.block_on(sources.poll(t));
        for r in &readings {
            let s = sampler.observe(r, t)?;
            bytes += meterflow_avro::encode(&s).len();
        }
    }
    let fleet = (cpu_seconds() - c0) / polls as f64;
    let _ = std::fs::remove_dir_all(&base);
    std::hint::black_box(bytes);

    let pct = |s: f64| s / 10.0 * 100.0;
    println!("| one poll of {n} instances ({polls} polls) | CPU ms/poll | % of one core at 10 s | vs bare reads |");
    println!("|---|---:|---:|---:|");
    println!(
        "| bare reads of the same cgroup files (baseline) | {:.2} | {:.3} | 1.00 |",
        bare * 1e3,
        pct(bare)
    );
    println!(
        "| containers: cgroup walk + parse + sample + Avro | {:.2} | {:.3} | {:.2} |",
        containers * 1e3,
        pct(containers),
        containers / bare
    );
    println!(
        "| simulated hypervisor: read + sample + Avro | {:.2} | {:.3} | — |",
        fleet * 1e3,
        pct(fleet)
    );
    println!("\npeak RSS of the whole run: {:.1} MiB", peak_rss_mib());
    Ok(())
}
