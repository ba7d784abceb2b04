//! Layered configuration: the struct's defaults, then a TOML file, then environment
//! variables `METERFLOW__SECTION__KEY` (double underscore between levels). Unknown keys
//! anywhere are an error at start-up, never silently ignored.

use anyhow::{Context, Result};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::path::Path;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Where `/metrics` and `/healthz` listen, e.g. "127.0.0.1:9464"; none = off.
    pub listen: Option<String>,
}

pub fn load<C: DeserializeOwned + Serialize + Default>(file: Option<&Path>) -> Result<C> {
    load_from(file, std::env::vars())
}

pub fn load_from<C, I>(file: Option<&Path>, env: I) -> Result<C>
where
    C: DeserializeOwned + Serialize + Default,
    I: IntoIterator<Item = (String, String)>,
{
    let defaults = config::Config::try_from(&C::default()).context("serialising defaults")?;
    let mut b = config::Config::builder().add_source(defaults);
    if let Some(f) = file {
        anyhow::ensure!(f.exists(), "config file {} does not exist", f.display());
        b = b.add_source(config::File::from(f).format(config::FileFormat::Toml));
    }
    let vars: std::collections::HashMap<String, String> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with("METERFLOW__"))
        .collect();
    b = b.add_source(
        config::Environment::with_prefix("METERFLOW")
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true)
            .source(Some(vars)),
    );
    let c = b.build().context("reading configuration")?;
    c.try_deserialize().context("invalid configuration")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Inner {
        brokers: String,
        partitions: i32,
    }
    #[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Cfg {
        kafka: Inner,
        name: String,
    }

    #[test]
    fn layers_defaults_file_then_environment() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("c.toml");
        std::fs::write(
            &f,
            "name = \"file\"\n[kafka]\nbrokers = \"a:1\"\npartitions = 3\n",
        )
        .expect("write");
        let env = vec![("METERFLOW__KAFKA__PARTITIONS".to_string(), "7".to_string())];
        let c: Cfg = load_from(Some(&f), env).expect("loads");
        assert_eq!(
            c,
            Cfg {
                kafka: Inner {
                    brokers: "a:1".into(),
                    partitions: 7
                },
                name: "file".into()
            }
        );
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "[kafka]\nbrokerz = \"a:1\"\n").expect("write");
        let e = load_from::<Cfg, _>(Some(&f), vec![]).expect_err("rejected");
        assert!(format!("{e:#}").contains("brokerz"), "{e:#}");
        let env = vec![("METERFLOW__KAFKA__NOPE".to_string(), "1".to_string())];
        assert!(load_from::<Cfg, _>(None, env).is_err());
    }
}
