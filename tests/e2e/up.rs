//! `meterflow up` on the embedded broker: the main job produces settlement files whose
//! numbers agree with the simulated fleet's closed-form usage and the shipped prices.

use meterflow_collector::fleet::FleetConfig;
use meterflow_tests::settled::Settled;
use meterflow_tests::{meterflow, meterflow_ok, utf8};
use meterflow_types::Dec;
use std::collections::{BTreeMap, HashSet};
use std::process::Command;

#[test]
fn up_settles_every_entity_exactly_and_no_event_twice() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("settlements");
    let st = Command::new(meterflow_tests::bin("meterflow"))
        .args([
            "up",
            "--duration",
            "10",
            "--instances",
            "6",
            "--entities",
            "2",
            "--period",
            "day",
        ])
        .arg("--out")
        .arg(&out)
        .env("METERFLOW_LOG", "warn")
        .output()
        .expect("runs meterflow up");
    let stdout = String::from_utf8_lossy(&st.stdout);
    assert!(
        st.status.success(),
        "meterflow up failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&st.stderr)
    );
    assert!(
        stdout.contains("ephemeral"),
        "says the embedded broker is ephemeral: {stdout}"
    );
    assert!(
        stdout.contains("entity-0") && stdout.contains("entity-1"),
        "summary table: {stdout}"
    );

    // files agree with their manifests (checksums, CSV = Parquet, totals = Σ rounded lines)
    let settled = Settled::read(&out);
    settled.assert_no_id_twice();
    let entities: HashSet<&str> = settled
        .manifests
        .iter()
        .map(|m| m.entity_id.as_str())
        .collect();
    assert!(
        entities.contains("entity-0") && entities.contains("entity-1"),
        "{entities:?}"
    );
    // vCPU-hour quantity and amount per (entity, window start)
    let vcpu: BTreeMap<(String, i64), (Dec, Dec)> = settled
        .lines
        .iter()
        .filter(|l| l.rule == "vcpu_hours")
        .map(|l| {
            (
                (l.entity.clone(), l.window_start),
                (l.quantity, l.unrounded),
            )
        })
        .collect();
    // Independent expectation: a window fully inside the run bills Σ vcpus of the
    // entity's instances vCPU-hours at 0.036 USD each (fleet model, rule price).
    let model = FleetConfig {
        instances: 6,
        entities: 2,
        seed: 1,
        ..Default::default()
    }
    .model();
    let mut full_windows = 0;
    for e in ["entity-0", "entity-1"] {
        let vcpus: i64 = model
            .iter()
            .filter(|i| i.entity_id == e)
            .map(|i| i.vcpus as i64)
            .sum();
        let windows: Vec<_> = vcpu.iter().filter(|((ent, _), _)| ent == e).collect();
        assert!(windows.len() >= 3, "{e}: {} windows", windows.len());
        // skip the last window (cut by the end of the run)
        for ((_, ws), (q, a)) in &windows[..windows.len() - 1] {
            assert_eq!(*q, Dec::from_int(vcpus), "{e} window {ws}: vCPU-hours");
            assert_eq!(
                *a,
                Dec::from_scaled(vcpus as i128 * 36, 3).expect("dec"),
                "{e} window {ws}: amount"
            );
            full_windows += 1;
        }
    }
    assert!(full_windows >= 4);
}

#[test]
fn collect_once_prints_one_json_object_per_libvirt_domain() {
    let st = Command::new(meterflow_tests::bin("meterflow"))
        .args([
            "collect",
            "--once",
            "--print",
            "--libvirt-uri",
            "test:///default",
        ])
        .env("METERFLOW_LOG", "warn")
        .output()
        .expect("runs");
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let text = String::from_utf8_lossy(&st.stdout);
    let objs: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(objs.len(), 1, "test:///default has one domain: {text}");
    let o = &objs[0];
    assert_eq!(o["name"], "test");
    assert_eq!(o["state"], "running");
    assert_eq!(o["sample"]["seq"], 1);
    assert!(o["sample"]["interval_end"].as_i64() > o["sample"]["interval_start"].as_i64());
    assert!(o["sample"]["deltas"]["cpu_time_ns"].as_i64().expect("cpu") >= 0);
}

#[test]
fn up_listen_lets_other_clients_reach_the_embedded_broker() {
    let dir = tempfile::tempdir().expect("tmp");
    let port = meterflow_tests::free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut up = meterflow_tests::Proc::start(
        "up",
        &meterflow_tests::bin("meterflow"),
        &[
            "up",
            "--duration",
            "6",
            "--instances",
            "3",
            "--entities",
            "1",
            "--libvirt-uri",
            "",
            "--listen",
            &listen,
            "--out",
            dir.path().join("out").to_str().expect("utf8"),
        ],
        &[("METERFLOW_LOG", "warn")],
        dir.path(),
    );
    let cfg = meterflow_kafka::KafkaConfig {
        brokers: listen.clone(),
        ..Default::default()
    };
    // a client that only knows the --listen address sees samples arrive
    meterflow_tests::wait_until(
        std::time::Duration::from_secs(60),
        || {
            meterflow_kafka::high_watermarks(&cfg, &cfg.topics.samples)
                .map(|v| v.iter().map(|(_, h)| h).sum::<i64>() > 0)
                .unwrap_or(false)
        },
        || format!("no samples visible through {listen}:\n{}", up.tail(20)),
    );
    let st = up.wait(std::time::Duration::from_secs(120));
    assert!(st.is_some_and(|s| s.success()), "{}", up.tail(30));
    assert!(up.log().contains(&format!("reachable at {listen}")));
}

#[test]
fn collect_reads_every_domain_of_a_custom_test_node_with_owner_metadata() {
    let node = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/libvirt-node.xml");
    let uri = format!("test://{}", node.display());
    let st = Command::new(meterflow_tests::bin("meterflow"))
        .args(["collect", "--once", "--print", "--libvirt-uri", &uri])
        .env("METERFLOW_LOG", "warn")
        .output()
        .expect("runs");
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let text = String::from_utf8_lossy(&st.stdout);
    let by_name: BTreeMap<String, serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json line"))
        .map(|o| (o["name"].as_str().unwrap_or_default().to_string(), o))
        .collect();
    assert_eq!(
        by_name.keys().map(String::as_str).collect::<Vec<_>>(),
        ["db-1", "scratch", "stopped-1", "web-1"],
        "{text}"
    );
    let web = &by_name["web-1"];
    assert_eq!(web["instance_id"], "11111111-1111-4111-8111-111111111111");
    assert_eq!(web["owner"]["entity_id"], "acme", "meterflow metadata");
    assert_eq!(web["owner"]["user_id"], "alice");
    assert_eq!(web["owner"]["project"], "web");
    assert_eq!(web["labels"]["team"], "storefront", "labels from metadata");
    assert_eq!(web["labels"]["tier"], "gold");
    assert_eq!(web["site"], "eu-west-2", "site from metadata");
    assert_eq!(web["sample"]["site"], "eu-west-2");
    assert_eq!(web["vcpu_millis"], 2000);
    assert_eq!(web["memory_alloc_bytes"], 2_i64 << 30);
    let db = &by_name["db-1"];
    assert_eq!(
        db["owner"]["entity_id"], "p-globex",
        "Nova project is the entity"
    );
    assert_eq!(db["owner"]["user_id"], "u-bob");
    assert_eq!(db["flavor"], "m1.large");
    assert_eq!(db["vcpu_millis"], 4000);
    assert!(
        by_name["scratch"]["owner"].is_null(),
        "no metadata, no owner invented"
    );
    for (name, o) in &by_name {
        if name == "stopped-1" {
            assert_eq!(o["state"], "shutoff");
            assert!(
                o["sample"].is_null(),
                "a shut-off domain is registered, not sampled"
            );
            continue;
        }
        assert_eq!(o["state"], "running");
        assert!(
            o["sample"]["deltas"]["cpu_time_ns"]
                .as_i64()
                .expect("cpu delta")
                > 0
        );
    }
}

#[test]
fn collect_prints_vms_and_containers_from_a_test_node_and_a_cgroup_root() {
    let fx = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let uri = format!("test://{}", fx.join("libvirt-node.xml").display());
    let text = meterflow_ok(&[
        "collect",
        "--once",
        "--print",
        "--gap",
        "0",
        "--libvirt-uri",
        &uri,
        "--cgroup-root",
        utf8(&fx.join("cgroup-node/cgroup")),
        "--proc-root",
        utf8(&fx.join("cgroup-node/proc")),
        "--runtime-root",
        utf8(&fx.join("cgroup-node/host")),
    ]);
    let objs: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    let kinds: Vec<&str> = objs.iter().filter_map(|o| o["kind"].as_str()).collect();
    assert_eq!(kinds.iter().filter(|k| **k == "vm").count(), 4, "{text}");
    assert_eq!(
        kinds.iter().filter(|k| **k == "container").count(),
        3,
        "{text}"
    );
    let app = objs
        .iter()
        .find(|o| {
            o["instance_id"]
                .as_str()
                .is_some_and(|i| i.starts_with("bbbb"))
        })
        .expect("the pod's app container");
    assert_eq!(app["vcpu_millis"], 2500, "cpu.max 250000/100000");
    assert_eq!(app["memory_alloc_bytes"], 536_870_912);
    assert_eq!(
        app["memory_used_bytes"],
        268_435_456 - 67_108_864,
        "working set"
    );
    assert_eq!(app["flavor"], "burstable");
    assert_eq!(app["sample"]["counters"]["cpu_time_ns"], 3_000_000_000_i64);
    assert_eq!(
        app["sample"]["counters"]["net_tx_bytes"], 0,
        "pod traffic is the sandbox's"
    );
    let sandbox = objs
        .iter()
        .find(|o| {
            o["instance_id"]
                .as_str()
                .is_some_and(|i| i.starts_with("aaaa"))
        })
        .expect("the pod's sandbox");
    assert_eq!(sandbox["sample"]["counters"]["net_tx_bytes"], 654_321);
    // owner and labels from the runtimes' records: the pod's annotations (on its
    // sandbox) reach every container of the pod; a Docker container's own labels
    for c in [sandbox, app] {
        assert_eq!(c["owner"]["entity_id"], "acme", "{c}");
        assert_eq!(c["owner"]["user_id"], "alice");
        assert_eq!(c["owner"]["project"], "storefront");
        assert_eq!(c["labels"]["k8s.namespace"], "shop");
        assert_eq!(c["labels"]["k8s.pod"], "shop-7d9f");
    }
    assert_eq!(app["labels"]["k8s.container"], "app");
    assert!(app["labels"].get("io.kubernetes.cri.image-name").is_none());
    let docker = objs
        .iter()
        .find(|o| {
            o["instance_id"]
                .as_str()
                .is_some_and(|i| i.starts_with("cccc"))
        })
        .expect("the docker container");
    assert_eq!(docker["owner"]["entity_id"], "globex");
    assert_eq!(docker["owner"]["user_id"], "bob");
    assert_eq!(docker["labels"]["team"], "finance");
    assert!(docker["labels"]
        .get("org.opencontainers.image.version")
        .is_none());
}

#[test]
fn rules_test_checks_every_rule_against_its_golden_file() {
    let rules = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../rules");
    let run = |dir: &std::path::Path| meterflow(&["rules", "test", utf8(dir)]);
    let out = meterflow_ok(&["rules", "test", utf8(&rules)]);
    assert!(out.contains("3 rule(s) match"), "{out}");
    // the pricing-model examples (flat, graduated and volume tiers from a rate card,
    // package, minimum commitment) against theirs
    let out = meterflow_ok(&["rules", "test", utf8(&rules.join("examples"))]);
    assert!(out.contains("6 rule(s) match"), "{out}");
    // a changed rate card changes the price: the tiers come from the table, not the SQL
    let tmp = tempfile::tempdir().expect("tmp");
    for f in ["tiered_volume.sql", "tiered_volume.golden.json"] {
        std::fs::copy(rules.join("examples").join(f), tmp.path().join(f)).expect("copy");
    }
    std::fs::write(
        tmp.path().join("tiers.csv"),
        "tier,from_units,to_units,unit_price\n1,0,100,0.050\n2,100,1000,0.030\n3,1000,,0.020\n",
    )
    .expect("tiers");
    let changed = run(tmp.path());
    assert!(!changed.status.success());
    let err = String::from_utf8_lossy(&changed.stdout).to_string()
        + &String::from_utf8_lossy(&changed.stderr);
    assert!(
        err.contains("tiered_volume") && err.contains("entity c"),
        "{err}"
    );

    // a wrong expectation fails, naming the rule and the entity
    let tmp = tempfile::tempdir().expect("tmp");
    for f in [
        "vcpu_hours.sql",
        "vcpu_hours.golden.json",
        "memory_gb_hours.sql",
    ] {
        std::fs::copy(rules.join(f), tmp.path().join(f)).expect("copy");
    }
    let g = tmp.path().join("vcpu_hours.golden.json");
    let text = std::fs::read_to_string(&g)
        .expect("golden")
        .replace("0.072", "0.073");
    std::fs::write(&g, text).expect("write");
    let bad = run(tmp.path());
    let out = String::from_utf8_lossy(&bad.stdout);
    assert!(!bad.status.success(), "{out}");
    assert!(
        out.contains(
            "vcpu_hours.sql: entity acme: got [quantity 2 amount 0.072], expected [quantity 2 amount 0.073]"
        ),
        "{out}"
    );
    assert!(out.contains("memory_gb_hours.sql: no golden file"), "{out}");
}

/// A rule file with a header.
fn rule(dir: &std::path::Path, file: &str, header: &str, price: &str) {
    std::fs::write(
        dir.join(file),
        format!(
            "{header}-- currency: USD\n\
             SELECT entity_id, 'vcpu_hour' AS unit, SUM(vcpu_seconds) / 3600 AS quantity,\n\
             {price} AS unit_price, SUM(vcpu_seconds) / 3600 * {price} AS amount\n\
             FROM usage GROUP BY entity_id\n"
        ),
    )
    .expect("rule file");
}

#[test]
fn hopping_windows_and_rule_versions_by_validity_price_exactly() {
    let dir = tempfile::tempdir().expect("tmp");
    let rules = dir.path().join("rules");
    std::fs::create_dir_all(&rules).expect("dir");
    let start = "2026-03-01T00:00:00Z";
    let switch = "2026-03-01T04:00:00Z";
    rule(
        &rules,
        "quarter.sql",
        "-- name: vcpu_quarter\n-- version: 1\n-- window: 15m\n",
        "0.036",
    );
    rule(
        &rules,
        "hourly_every_quarter.sql",
        "-- name: vcpu_hop\n-- version: 1\n-- window: 1h\n-- slide: 15m\n",
        "0.036",
    );
    rule(
        &rules,
        "priced_v1.sql",
        &format!("-- name: vcpu_priced\n-- version: 1\n-- window: 1h\n-- valid_to: {switch}\n"),
        "0.036",
    );
    rule(
        &rules,
        "priced_v2.sql",
        &format!("-- name: vcpu_priced\n-- version: 2\n-- window: 1h\n-- valid_from: {switch}\n"),
        "0.05",
    );
    let out = dir.path().join("settlements");
    meterflow_ok(&[
        "up",
        "--duration",
        "10",
        "--instances",
        "4",
        "--entities",
        "2",
        "--period",
        "day",
        "--libvirt-uri",
        "",
        "--start",
        start,
        "--rules",
        utf8(&rules),
        "--out",
        utf8(&out),
    ]);
    let settled = Settled::read(&out);
    settled.assert_no_id_twice();
    let q = |rule: &str| -> BTreeMap<(String, i64), (Dec, Dec)> {
        settled
            .lines
            .iter()
            .filter(|l| l.rule == rule)
            .map(|l| {
                (
                    (l.entity.clone(), l.window_start),
                    (l.quantity, l.unrounded),
                )
            })
            .collect()
    };
    let (quarter, hop, priced) = (q("vcpu_quarter"), q("vcpu_hop"), q("vcpu_priced"));
    // every hopping window equals the sum of its four quarters, to the nano
    let t0 = meterflow_types::time::parse_rfc3339(start).expect("t");
    let t_switch = meterflow_types::time::parse_rfc3339(switch).expect("t");
    let quarter_ms = 900_000;
    let mut checked = 0;
    for ((e, ws), (hq, _)) in &hop {
        let parts: Vec<_> = (0..4)
            .filter_map(|k| quarter.get(&(e.clone(), ws + k * quarter_ms)))
            .collect();
        // only windows fully inside the run (after the first poll, before the cut)
        if *ws < t0 || parts.len() < 4 || !hop.contains_key(&(e.clone(), ws + 4 * quarter_ms)) {
            continue;
        }
        let sum = parts
            .iter()
            .try_fold(Dec::ZERO, |acc, (x, _)| acc.checked_add(*x))
            .expect("sum");
        assert_eq!(*hq, sum, "{e} hopping window {ws}");
        checked += 1;
    }
    assert!(checked >= 20, "{checked} hopping windows checked");
    // hopping windows start every quarter hour: four times as many as hourly ones
    let starts: std::collections::BTreeSet<i64> = hop.keys().map(|(_, ws)| *ws).collect();
    assert!(starts.iter().any(|ws| ws % 3_600_000 == quarter_ms));
    // versions by validity: v1 (0.036) before the switch, v2 (0.05) from it on
    let model = FleetConfig {
        instances: 4,
        entities: 2,
        seed: 1,
        ..Default::default()
    }
    .model();
    let mut before = 0;
    let mut after = 0;
    for ((e, ws), (qty, amount)) in &priced {
        let vcpus: i64 = model
            .iter()
            .filter(|i| &i.entity_id == e)
            .map(|i| i.vcpus as i64)
            .sum();
        if *qty != Dec::from_int(vcpus) {
            continue; // a window cut by the start or end of the run
        }
        let (price_milli, n) = if *ws < t_switch {
            (36, &mut before)
        } else {
            (50, &mut after)
        };
        assert_eq!(
            *amount,
            Dec::from_scaled(vcpus as i128 * price_milli, 3).expect("dec"),
            "{e} window {ws}"
        );
        *n += 1;
    }
    assert!(
        before >= 4 && after >= 4,
        "{before} windows before, {after} after the switch"
    );
}
