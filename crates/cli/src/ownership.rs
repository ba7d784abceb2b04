//! `meterflow ownership set|import`: explicit owner assignments, published to the
//! compacted ownership topic. Explicit assignments take precedence over owners the
//! collectors discover in metadata (see the enricher's `Owners`).

use anyhow::{Context, Result};
use meterflow_kafka::{KafkaConfig, Outbox};
use meterflow_types::Ownership;
use std::path::PathBuf;

#[derive(clap::Subcommand)]
pub enum OwnershipCmd {
    /// Assign an instance to a user and billing entity from a point in time on.
    Set {
        instance: String,
        #[arg(long)]
        user: String,
        #[arg(long)]
        entity: String,
        #[arg(long)]
        project: Option<String>,
        /// RFC 3339; default: now.
        #[arg(long)]
        valid_from: Option<String>,
        #[arg(long, default_value = "127.0.0.1:9092")]
        brokers: String,
    },
    /// Import assignments from CSV: `instance_id,user_id,entity_id,project,valid_from`
    /// (header first; project and valid_from may be empty). All lines are checked before
    /// anything is published.
    Import {
        file: PathBuf,
        #[arg(long, default_value = "127.0.0.1:9092")]
        brokers: String,
    },
}

fn time(s: Option<&str>) -> Result<i64> {
    match s.filter(|s| !s.is_empty()) {
        Some(s) => meterflow_types::time::parse_rfc3339(s).map_err(anyhow::Error::msg),
        None => Ok(meterflow_kafka::now_ms()),
    }
}

/// Parse an import file; the first bad line is an error naming it.
pub fn parse_csv(text: &str) -> Result<Vec<Ownership>> {
    let mut lines = text.lines().enumerate();
    let header = lines.next().map(|(_, h)| h.trim()).unwrap_or_default();
    anyhow::ensure!(
        header == "instance_id,user_id,entity_id,project,valid_from",
        "line 1: the header must be instance_id,user_id,entity_id,project,valid_from (got {header:?})"
    );
    let mut out = Vec::new();
    for (i, l) in lines {
        if l.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = l.split(',').map(str::trim).collect();
        anyhow::ensure!(
            f.len() == 5,
            "line {}: 5 fields expected, {} found",
            i + 1,
            f.len()
        );
        for (k, name) in [(0, "instance_id"), (1, "user_id"), (2, "entity_id")] {
            anyhow::ensure!(!f[k].is_empty(), "line {}: {name} is empty", i + 1);
        }
        out.push(Ownership {
            instance_id: f[0].into(),
            user_id: f[1].into(),
            entity_id: f[2].into(),
            project: (!f[3].is_empty()).then(|| f[3].to_string()),
            valid_from: time(Some(f[4])).with_context(|| format!("line {}", i + 1))?,
            source: "import".into(),
        });
    }
    Ok(out)
}

pub async fn run(cmd: OwnershipCmd) -> Result<()> {
    let (records, brokers) = match cmd {
        OwnershipCmd::Set {
            instance,
            user,
            entity,
            project,
            valid_from,
            brokers,
        } => (
            vec![Ownership {
                instance_id: instance,
                user_id: user,
                entity_id: entity,
                project,
                valid_from: time(valid_from.as_deref())?,
                source: "cli".into(),
            }],
            brokers,
        ),
        OwnershipCmd::Import { file, brokers } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            (
                parse_csv(&text).with_context(|| format!("{}", file.display()))?,
                brokers,
            )
        }
    };
    let cfg = KafkaConfig {
        brokers,
        ..KafkaConfig::default()
    };
    let mut out = Outbox::connect(&cfg, "meterflow-ownership")?;
    for o in &records {
        out.send(
            &cfg.topics.ownership,
            o.key().as_bytes(),
            &meterflow_avro::encode(o),
            None,
        )
        .await?;
    }
    out.flush().await?;
    println!(
        "{} ownership record(s) published to {}",
        records.len(),
        cfg.topics.ownership
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn import_files_are_checked_line_by_line() {
        let ok = "instance_id,user_id,entity_id,project,valid_from\n\
                  vm-1,alice,acme,web,2026-01-01T00:00:00Z\nvm-2,bob,globex,,2026-02-01T00:00:00Z\n";
        let v = super::parse_csv(ok).expect("parses");
        assert_eq!(v.len(), 2);
        assert_eq!(v[1].project, None);
        assert_eq!(v[0].valid_from, 1_767_225_600_000);
        assert_eq!(v[0].source, "import");
        for (bad, why) in [
            ("instance,user\n", "line 1"),
            (
                "instance_id,user_id,entity_id,project,valid_from\nvm-1,alice\n",
                "line 2",
            ),
            (
                "instance_id,user_id,entity_id,project,valid_from\nvm-1,,acme,,\n",
                "user_id is empty",
            ),
            (
                "instance_id,user_id,entity_id,project,valid_from\nvm-1,a,b,,yesterday\n",
                "line 2",
            ),
        ] {
            let e = format!("{:#}", super::parse_csv(bad).expect_err(bad));
            assert!(e.contains(why), "{e}");
        }
    }
}
