//! `meterflow up` on the embedded broker: the main job produces settlement files whose
//! numbers agree with the simulated fleet's closed-form usage and the shipped prices.

use meterflow_collector::fleet::FleetConfig;
use meterflow_settler::files::all_manifests;
use meterflow_types::Dec;
use sha2::{Digest, Sha256};
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

    let manifests = all_manifests(&out).expect("manifests");
    let entities: HashSet<&str> = manifests.iter().map(|m| m.entity_id.as_str()).collect();
    assert!(
        entities.contains("entity-0") && entities.contains("entity-1"),
        "{entities:?}"
    );
    let mut ids = HashSet::new();
    // vcpu_hour quantity per (entity, window start) from the files
    let mut vcpu: BTreeMap<(String, String), (Dec, Dec)> = BTreeMap::new();
    for m in &manifests {
        let d = meterflow_settler::files::entity_dir(&out, &m.period, &m.entity_id);
        for (name, sha) in &m.files {
            let bytes = std::fs::read(d.join(name)).expect("file listed in manifest");
            assert_eq!(
                &hex::encode(Sha256::digest(&bytes)),
                sha,
                "checksum of {name}"
            );
        }
        let csv = m.files.keys().find(|k| k.ends_with(".csv")).expect("csv");
        let text = std::fs::read_to_string(d.join(csv)).expect("csv");
        let mut total = Dec::ZERO;
        let mut lines = 0;
        for l in text.lines().skip(1) {
            let f: Vec<&str> = l.split(',').collect();
            assert!(
                ids.insert(f[0].to_string()),
                "revenue event {} settled twice",
                f[0]
            );
            total += f[10].parse::<Dec>().expect("amount");
            lines += 1;
            if f[2] == "vcpu_hours" {
                vcpu.insert(
                    (f[1].to_string(), f[5].to_string()),
                    (f[8].parse().expect("q"), f[12].parse().expect("a")),
                );
            }
        }
        assert_eq!(lines, m.line_count);
        assert_eq!(
            m.totals.get("USD").map(String::as_str),
            Some(total.to_fixed(2).as_str()),
            "manifest total = sum of rounded lines"
        );
    }
    // Independent expectation: a window fully inside the run bills Σ vcpus of the
    // entity's instances vCPU-hours at 0.036 USD each (fleet model, rule price).
    let model = FleetConfig {
        instances: 6,
        entities: 2,
        seed: 1,
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
