//! The period index: `period=<label>/index.json`, one document per period listing every
//! entity settled in it — each version's manifest (and its SHA-256), status, line count,
//! totals and file checksums — and the period's totals per currency.
//!
//! The master (the settler member that owns rated partition 0, elected by the group
//! protocol) writes it once every rated partition has closed the period. It is built from
//! the manifests alone (no clock, no member state), so any master builds the same bytes,
//! and it is created, never replaced (`Store::create`: a hard link locally, a conditional
//! put on S3): a master lost mid-close and its successor write it once between them.
//! A correction version after the index gets a new index version (`v2.index.json`,
//! linking the previous one).

use crate::files::{existing, version_name, Manifest};
use crate::store::Store;
use anyhow::{Context, Result};
use meterflow_types::decimal::minor_units;
use meterflow_types::Dec;
use meterflow_types::Millis;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

pub const INDEX_SCHEMA_VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeriodIndex {
    pub schema_version: u32,
    pub period: String,
    pub period_start: String,
    pub period_end: String,
    pub version: u32,
    pub previous: Option<String>,
    /// `incomplete` when any entity's latest version is.
    pub status: String,
    pub entity_count: usize,
    pub line_count: usize,
    /// Per currency, over every entity and version.
    pub totals: BTreeMap<String, String>,
    pub entities: Vec<IndexedEntity>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexedEntity {
    pub entity_id: String,
    /// Relative to the period directory: `entity=<id>`.
    pub directory: String,
    /// Status of the latest version.
    pub status: String,
    /// Per currency, over the entity's versions.
    pub totals: BTreeMap<String, String>,
    pub versions: Vec<IndexedVersion>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexedVersion {
    pub version: u32,
    pub manifest: String,
    pub manifest_sha256: String,
    pub status: String,
    pub line_count: usize,
    pub totals: BTreeMap<String, String>,
    pub files: BTreeMap<String, String>,
}

/// The period directories under a settlement root (`period=<label>`).
pub async fn period_dirs(store: &Store) -> Result<Vec<String>> {
    Ok(store
        .dirs("")
        .await?
        .into_iter()
        .filter(|d| d.starts_with("period="))
        .collect())
}

/// Index versions already written for a period, in order.
pub async fn indexes(store: &Store, period_dir: &str) -> Result<Vec<PeriodIndex>> {
    crate::files::read_versions(store, period_dir, "index.json").await
}

/// The end of a period directory's period (from any of its manifests), if it has one.
pub async fn period_end(store: &Store, period_dir: &str) -> Result<Option<Millis>> {
    for e in store.dirs(period_dir).await? {
        if let Some(m) = existing(store, &format!("{period_dir}/{e}")).await?.first() {
            return meterflow_types::time::parse_rfc3339(&m.period_end)
                .map(Some)
                .map_err(anyhow::Error::msg);
        }
    }
    Ok(None)
}

fn add(totals: &mut BTreeMap<String, Dec>, from: &BTreeMap<String, String>) -> Result<()> {
    for (c, v) in from {
        let d: Dec = v
            .parse()
            .map_err(|e| anyhow::anyhow!("total {v:?} in {c}: {e:?}"))?;
        let t = totals.entry(c.clone()).or_insert(Dec::ZERO);
        *t = t.checked_add(d)?;
    }
    Ok(())
}

fn fixed(t: &BTreeMap<String, Dec>) -> BTreeMap<String, String> {
    t.iter()
        .map(|(c, d)| (c.clone(), d.to_fixed(minor_units(c))))
        .collect()
}

/// Build the index of a period directory from its manifests (version and previous left
/// for the writer).
pub async fn build(store: &Store, period_dir: &str) -> Result<Option<PeriodIndex>> {
    let ents = store.dirs(period_dir).await?;
    let mut entities = Vec::new();
    let mut totals: BTreeMap<String, Dec> = BTreeMap::new();
    let mut line_count = 0;
    let mut head: Option<Manifest> = None;
    for ent in ents {
        let dir = format!("{period_dir}/{ent}");
        let versions = existing(store, &dir).await?;
        let Some(last) = versions.last() else {
            continue;
        };
        let mut et: BTreeMap<String, Dec> = BTreeMap::new();
        let mut indexed = Vec::new();
        for m in &versions {
            add(&mut et, &m.totals)?;
            line_count += m.line_count;
            let name = version_name(m.version, "manifest.json");
            let bytes = store
                .get(&format!("{dir}/{name}"))
                .await?
                .with_context(|| format!("{dir}/{name} vanished"))?;
            indexed.push(IndexedVersion {
                version: m.version,
                manifest: name,
                manifest_sha256: hex::encode(Sha256::digest(&bytes)),
                status: m.status.clone(),
                line_count: m.line_count,
                totals: m.totals.clone(),
                files: m.files.clone(),
            });
        }
        for (c, v) in &et {
            let t = totals.entry(c.clone()).or_insert(Dec::ZERO);
            *t = t.checked_add(*v)?;
        }
        entities.push(IndexedEntity {
            entity_id: last.entity_id.clone(),
            directory: ent,
            status: last.status.clone(),
            totals: fixed(&et),
            versions: indexed,
        });
        head.get_or_insert_with(|| last.clone());
    }
    let Some(head) = head else {
        return Ok(None);
    };
    let status = if entities.iter().any(|e| e.status == "incomplete") {
        "incomplete"
    } else {
        "complete"
    };
    Ok(Some(PeriodIndex {
        schema_version: INDEX_SCHEMA_VERSION,
        period: head.period,
        period_start: head.period_start,
        period_end: head.period_end,
        version: 0,
        previous: None,
        status: status.into(),
        entity_count: entities.len(),
        line_count,
        totals: fixed(&totals),
        entities,
    }))
}

/// Write the next index version of a period if its manifests changed since the last one
/// (or it has none). Returns the index written, None when there was nothing to write or
/// another master wrote the same version first.
pub async fn write(store: &Store, period_dir: &str) -> Result<Option<PeriodIndex>> {
    let Some(mut index) = build(store, period_dir).await? else {
        return Ok(None);
    };
    let before = indexes(store, period_dir).await?;
    if let Some(last) = before.last() {
        let mut same = index.clone();
        same.version = last.version;
        same.previous = last.previous.clone();
        if &same == last {
            return Ok(None);
        }
    }
    index.version = before.len() as u32 + 1;
    index.previous = (index.version > 1).then(|| version_name(index.version - 1, "index.json"));
    let path = format!("{period_dir}/{}", version_name(index.version, "index.json"));
    let bytes = serde_json::to_vec_pretty(&index)?;
    if store.create(&path, bytes.clone()).await? {
        return Ok(Some(index));
    }
    // there already: another master's, complete — or this version cut short by a crash
    // before its sync (which `indexes` took as not written), replaced
    if crate::files::unreadable(store, &path).await? {
        store.put(&path, bytes).await?;
        tracing::info!(index = %store.describe(&path), "an index cut short by a crash written again");
        return Ok(Some(index));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::{write_version, VersionOpts};
    use meterflow_types::RatedEvent;

    fn ev(id: &str, entity: &str, amount: &str) -> (i32, i64, RatedEvent) {
        (
            0,
            1,
            RatedEvent {
                id: id.into(),
                rule_id: "vcpu_hours".into(),
                rule_version: 1,
                entity_id: entity.into(),
                resource_id: String::new(),
                window_start: 0,
                window_end: 3_600_000,
                unit: "vcpu_hour".into(),
                quantity: "1".parse().expect("dec"),
                unit_price: "1".parse().expect("dec"),
                amount: amount.parse().expect("dec"),
                currency: "EUR".into(),
                adjustment: false,
                usage_records: 1,
                source_partition: 0,
            },
        )
    }

    #[tokio::test]
    async fn an_index_lists_every_entity_once_and_is_written_once_per_change() {
        let root = tempfile::tempdir().expect("tmp");
        let store = Store::local(root.path()).expect("store");
        let opts = VersionOpts::default();
        let bounds = (0, 86_400_000);
        write_version(&store, "d", bounds, "a", vec![ev("1", "a", "1.005")], &opts)
            .await
            .expect("a");
        write_version(&store, "d", bounds, "b", vec![ev("2", "b", "2.004")], &opts)
            .await
            .expect("b");
        let dir = "period=d";
        assert_eq!(
            period_end(&store, dir).await.expect("end"),
            Some(86_400_000)
        );
        let first = write(&store, dir).await.expect("index").expect("written");
        assert_eq!(first.version, 1);
        assert_eq!(first.entity_count, 2);
        // lines rounded once (1.00 + 2.00), totals summed from the rounded lines
        assert_eq!(first.totals["EUR"], "3.00");
        assert_eq!(first.status, "complete");
        // unchanged manifests: nothing new; a second master finds it written
        assert!(write(&store, dir).await.expect("again").is_none());
        // a correction: the next index version, linking the first
        let incomplete = VersionOpts {
            incomplete: Some("deadline".into()),
            ..VersionOpts::default()
        };
        write_version(
            &store,
            "d",
            bounds,
            "a",
            vec![ev("3", "a", "0.50")],
            &incomplete,
        )
        .await
        .expect("v2");
        let second = write(&store, dir).await.expect("index").expect("written");
        assert_eq!(
            (second.version, second.previous.as_deref()),
            (2, Some("index.json"))
        );
        assert_eq!(second.totals["EUR"], "3.50");
        assert_eq!(second.status, "incomplete");
        assert_eq!(second.entities[0].versions.len(), 2);
        assert_eq!(indexes(&store, dir).await.expect("read").len(), 2);
        // creation never replaces
        assert!(!store
            .create("period=d/index.json", b"other".to_vec())
            .await
            .expect("create"));
        let path = root.path().join("period=d/index.json");
        assert_eq!(
            serde_json::from_slice::<PeriodIndex>(&std::fs::read(&path).expect("read"))
                .expect("json"),
            first
        );
    }

    #[tokio::test]
    async fn an_index_cut_short_by_a_crash_is_written_again() {
        let root = tempfile::tempdir().expect("tmp");
        let store = Store::local(root.path()).expect("store");
        let bounds = (0, 86_400_000);
        write_version(
            &store,
            "d",
            bounds,
            "a",
            vec![ev("1", "a", "1")],
            &VersionOpts::default(),
        )
        .await
        .expect("a");
        let dir = "period=d";
        let first = write(&store, dir).await.expect("index").expect("written");
        // a power loss after its creation, before its sync: left empty
        let path = root.path().join("period=d/index.json");
        std::fs::write(&path, b"").expect("cut");
        assert!(indexes(&store, dir).await.expect("read").is_empty());
        let again = write(&store, dir)
            .await
            .expect("index")
            .expect("written again");
        assert_eq!(again, first);
        assert_eq!(indexes(&store, dir).await.expect("read"), vec![first]);
    }
}
