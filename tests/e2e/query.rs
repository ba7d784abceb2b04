//! On-demand metering over the bus: three collector processes on three libvirt
//! test-driver nodes, a real broker, `meterflow query`.

use meterflow_avro::{InstancesMsg, SamplesMsg};
use meterflow_kafka::KafkaConfig;
use meterflow_tests::{bin, meterflow, Proc, Tansu};
use meterflow_types::{Dec, Sample};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

/// The fixture node with its domains' UUIDs made unique to `node` (a hex digit).
fn node_xml(dir: &Path, node: char) -> std::path::PathBuf {
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/libvirt-node.xml");
    let mut text = std::fs::read_to_string(fx).expect("fixture");
    for d in ['1', '2', '3', '4'] {
        let old = format!("{}-", d.to_string().repeat(8));
        let new = format!("{node}{}-", d.to_string().repeat(7));
        text = text.replace(&old, &new);
    }
    let path = dir.join(format!("node-{node}.xml"));
    std::fs::write(&path, text).expect("node xml");
    path
}

fn collector(dir: &Path, brokers: &str, node: char) -> Proc {
    let cfg = dir.join(format!("collector-{node}.toml"));
    let xml = node_xml(dir, node);
    std::fs::write(
        &cfg,
        format!(
            "node_id = \"node-{node}\"\nsite = \"eu-{node}\"\npoll_interval = \"1s\"\n\
             libvirt_uri = \"test://{}\"\nstate_file = \"collector-{node}.state\"\n\
             [kafka]\nbrokers = \"{brokers}\"\npartitions = 4\n",
            xml.display()
        ),
    )
    .expect("config");
    Proc::start(
        &format!("collector-{node}"),
        &bin("meterflow-collector"),
        &["--config", cfg.to_str().expect("utf8")],
        &[("METERFLOW_LOG", "info")],
        dir,
    )
}

fn samples(cfg: &KafkaConfig) -> Vec<Sample> {
    let mut out = Vec::new();
    meterflow_kafka::scan_topic(cfg, &cfg.topics.samples, Duration::from_secs(30), |r| {
        if let Ok(SamplesMsg::Sample(s)) =
            meterflow_avro::decode_samples_msg(r.payload.as_deref().unwrap_or_default())
        {
            out.push(s);
        }
    })
    .expect("scan samples");
    out
}

fn nodes(cfg: &KafkaConfig) -> usize {
    meterflow_kafka::read_latest(cfg, &cfg.topics.instances)
        .expect("instances")
        .into_iter()
        .filter(|(_, r)| {
            matches!(
                meterflow_avro::decode_instances_msg(r.payload.as_deref().unwrap_or_default()),
                Ok(InstancesMsg::Node(_))
            )
        })
        .count()
}

fn query(brokers: &str, extra: &[&str]) -> (Option<i32>, serde_json::Value) {
    let mut args = vec!["query", "--json", "--timeout", "6", "--brokers", brokers];
    args.extend_from_slice(extra);
    let out = meterflow(&args);
    let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "query output: {e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code(), v)
}

#[test]
fn every_node_answers_a_query_a_stopped_one_is_named_and_usage_equals_the_samples_topic() {
    let dir = tempfile::tempdir().expect("tmp");
    let broker = Tansu::start(dir.path());
    let cfg = broker.with_topics();
    let mut procs: Vec<Proc> = ['a', 'b', 'c']
        .iter()
        .map(|n| collector(dir.path(), &cfg.brokers, *n))
        .collect();
    meterflow_tests::wait_until(
        Duration::from_secs(60),
        || nodes(&cfg) == 3 && samples(&cfg).len() >= 3 * 3 * 5,
        || {
            procs
                .iter()
                .map(|p| p.tail(10))
                .collect::<Vec<_>>()
                .join("\n")
        },
    );
    // a range well behind every node's last poll
    let to = meterflow_kafka::now_ms() - 1_500;
    let from = to - 3_000;
    let (f, t) = (
        meterflow_types::time::fmt_rfc3339(from),
        meterflow_types::time::fmt_rfc3339(to),
    );
    // all three answer
    let (code, all) = query(&cfg.brokers, &["--from", &f, "--to", &t]);
    assert_eq!(code, Some(0), "{all:#}");
    assert_eq!(all["missing"].as_array().map(Vec::len), Some(0), "{all:#}");
    // 4 domains per node, one of them shut off
    let rows = all["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 12, "{all:#}");
    assert_eq!(
        rows.iter().filter(|r| r["state"] == "running").count(),
        9,
        "{all:#}"
    );
    // one node stops: named, the others' answer is still whole
    procs[2].kill9();
    let (code, part) = query(&cfg.brokers, &["--from", &f, "--to", &t]);
    assert_eq!(code, Some(3), "{part:#}");
    assert_eq!(part["missing"], serde_json::json!(["node-c"]), "{part:#}");
    assert_eq!(part["answered"], serde_json::json!(["node-a", "node-b"]));
    let rows = part["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 8, "{part:#}");
    // each instance's usage equals what the samples topic holds for the range
    let topic = samples(&cfg);
    for r in rows {
        let id = r["instance_id"].as_str().expect("id");
        let mine: Vec<&Sample> = topic
            .iter()
            .filter(|s| s.instance_id == id && s.interval_end > from && s.interval_end <= to)
            .collect();
        assert_eq!(
            r["samples"].as_i64(),
            Some(mine.len() as i64),
            "{id}: {r:#}"
        );
        let cpu_ns: i128 = mine.iter().map(|s| s.deltas.cpu_time_ns as i128).sum();
        let vcpu_ms: i128 = mine
            .iter()
            .map(|s| s.vcpu_millis as i128 * s.interval_ms() as i128)
            .sum();
        let rx: i64 = mine.iter().map(|s| s.deltas.net_rx_bytes).sum();
        let dec =
            |v: &serde_json::Value| -> Dec { v.as_str().unwrap_or("0").parse().expect("decimal") };
        if mine.is_empty() {
            assert!(r["usage"].as_object().is_none_or(|u| u.is_empty()), "{r:#}");
            continue;
        }
        assert_eq!(
            dec(&r["usage"]["cpu_seconds"]),
            Dec::from_raw(cpu_ns),
            "{id}"
        );
        assert_eq!(
            dec(&r["usage"]["vcpu_seconds"]),
            Dec::from_raw(vcpu_ms * 1_000),
            "{id}"
        );
        assert_eq!(dec(&r["usage"]["net_rx_bytes"]), Dec::from_int(rx), "{id}");
        assert_eq!(r["state"], "running");
        assert!(mine.len() >= 2, "{id}: a 3 s range of 1 s polls");
    }
    // by user: the owner from the cluster state (alice owns web-1 on every node)
    let (_, alice) = query(
        &cfg.brokers,
        &[
            "--user",
            "alice",
            "--metrics",
            "cpu,vcpu",
            "--from",
            &f,
            "--to",
            &t,
        ],
    );
    let rows = alice["rows"].as_array().expect("rows");
    let who: BTreeMap<String, String> = rows
        .iter()
        .map(|r| {
            (
                r["node_id"].as_str().unwrap_or_default().to_string(),
                format!("{}/{}", r["user_id"], r["entity_id"]),
            )
        })
        .collect();
    assert_eq!(
        who,
        [
            ("node-a".to_string(), "\"alice\"/\"acme\"".to_string()),
            ("node-b".to_string(), "\"alice\"/\"acme\"".to_string())
        ]
        .into(),
        "{alice:#}"
    );
    for r in rows {
        let keys: Vec<&String> = r["usage"].as_object().expect("usage").keys().collect();
        assert_eq!(keys, ["cpu_seconds", "vcpu_seconds"], "{r:#}");
        assert!(r["live"]["vcpus"].is_string(), "{r:#}");
    }
    for p in &mut procs {
        p.kill9();
    }
    drop(broker);
}
