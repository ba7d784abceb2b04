//! Rule sets as published on the control topic (`meterflow rules apply`).
//!
//! A rule set is a list of files: rules named `<rule>@<version>.sql` and reference tables.
//! Applying a candidate at an event time `T` merges it with the active set so the result
//! prices every window by event time alone: a rule version the candidate drops or
//! replaces ends at `T` (`valid_to`), a version the candidate brings starts at `T`
//! (`valid_from`), and unchanged versions stay as they were. Earlier versions stay in the
//! set, so late usage of a window before `T` is still priced as it was.
//!
//! Refused, with the reason: a rule whose body changed under the same version (give it a
//! new version), a reference table whose contents changed under the same name (the rules
//! before `T` would see the new prices: give it a new name), a candidate version that ends
//! before `T`, and a switch time that is not a window start of every rule it changes.

use crate::rules::{parse_rule, RuleHeader, RuleSource};
use meterflow_types::time::fmt_rfc3339;
use meterflow_types::{Millis, RuleSet};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The control topic's key for the rule set.
pub const KEY: &[u8] = b"ruleset";

/// Largest rule set (all files) that fits one control record.
pub const MAX_BYTES: usize = 900 * 1024;

/// Files of a rule set: name → content.
pub type Files = BTreeMap<String, Vec<u8>>;

fn is_table(name: &str) -> bool {
    name.ends_with(".csv") || name.ends_with(".parquet")
}

/// The rules (`*.sql`) and reference tables (`*.csv`, `*.parquet`) of a directory, with
/// each rule renamed `<rule>@<version>.sql`.
pub fn read_dir(dir: &Path) -> Result<Files, String> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| format!("reading rules dir {}: {e}", dir.display()))?;
    let mut files = Files::new();
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    for p in paths {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let sql = name.ends_with(".sql");
        if !sql && !is_table(&name) {
            continue;
        }
        let bytes = std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        let name = if sql {
            let text = String::from_utf8(bytes.clone())
                .map_err(|_| format!("{}: not UTF-8", p.display()))?;
            let h = parse_rule(&p, &text).map_err(|e| e.to_string())?.header;
            rule_file_name(&h)?
        } else {
            name
        };
        if files.insert(name.clone(), bytes).is_some() {
            return Err(format!(
                "{}: a second file for {name} in {}",
                p.display(),
                dir.display()
            ));
        }
    }
    if !files.keys().any(|n| n.ends_with(".sql")) {
        return Err(format!("no *.sql rules in {}", dir.display()));
    }
    Ok(files)
}

fn rule_file_name(h: &RuleHeader) -> Result<String, String> {
    if h.name.is_empty()
        || !h
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
        || h.name.starts_with('.')
    {
        return Err(format!(
            "rule name {:?}: use letters, digits, '_', '-' and '.'",
            h.name
        ));
    }
    Ok(format!("{}@{}.sql", h.name, h.version))
}

/// Write a rule set's files into `dir` (created empty), for the rule engine to load.
pub fn materialize(files: &Files, dir: &Path) -> Result<(), String> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for (name, bytes) in files {
        if name.contains('/') || name.starts_with('.') {
            return Err(format!("rule set file name {name:?} is not a plain name"));
        }
        std::fs::write(dir.join(name), bytes).map_err(|e| format!("{name}: {e}"))?;
    }
    Ok(())
}

/// The headers of a rule set's rules.
pub fn headers(files: &Files) -> Result<Vec<RuleHeader>, String> {
    files
        .iter()
        .filter(|(n, _)| n.ends_with(".sql"))
        .map(|(n, b)| parse(n, b).map(|(_, s)| s.header))
        .collect()
}

pub fn files_of(rs: &RuleSet) -> Files {
    rs.files.iter().cloned().collect()
}

fn parse(name: &str, bytes: &[u8]) -> Result<(String, RuleSource), String> {
    let text = String::from_utf8(bytes.to_vec()).map_err(|_| format!("{name}: not UTF-8"))?;
    let src = parse_rule(Path::new(name), &text).map_err(|e| e.to_string())?;
    Ok((text, src))
}

/// A rule's text without its validity lines: what must not change under one version.
fn body(text: &str) -> String {
    text.lines()
        .filter(|l| !is_validity_line(l))
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_validity_line(line: &str) -> bool {
    let Some(c) = line.trim_start().strip_prefix("--") else {
        return false;
    };
    let key = c.trim_start();
    key.starts_with("valid_from:") || key.starts_with("valid_to:")
}

/// `text` with its validity lines replaced by `from`/`to`, placed at the end of the
/// header.
fn with_validity(text: &str, from: Option<Millis>, to: Option<Millis>) -> String {
    let mut out = String::new();
    let mut placed = false;
    for line in text.lines() {
        let t = line.trim_start();
        let header = t.starts_with("--");
        if !placed && !header && !t.is_empty() {
            if let Some(f) = from {
                out.push_str(&format!("-- valid_from: {}\n", fmt_rfc3339(f)));
            }
            if let Some(x) = to {
                out.push_str(&format!("-- valid_to: {}\n", fmt_rfc3339(x)));
            }
            placed = true;
        }
        if is_validity_line(line) {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// What a merge changes, one line each, for the person applying it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Starts(String),
    Ends(String),
    Dropped(String),
    Table(String),
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::Starts(r) => write!(f, "+ {r} starts at the switch"),
            Change::Ends(r) => write!(f, "- {r} ends at the switch"),
            Change::Dropped(r) => write!(f, "x {r} was to start after the switch: dropped"),
            Change::Table(t) => write!(f, "+ table {t}"),
        }
    }
}

/// Merge `candidate` into `active` at event time `at` (see the module docs).
pub fn merge(
    active: &Files,
    candidate: &Files,
    at: Millis,
) -> Result<(Files, Vec<Change>), String> {
    let when = fmt_rfc3339(at);
    let mut out = Files::new();
    let mut changes = Vec::new();
    for (name, bytes) in active.iter().filter(|(n, _)| is_table(n)) {
        if let Some(c) = candidate.get(name) {
            if c != bytes {
                return Err(format!(
                    "table {name} differs from the active one: the rules priced before {when} would see the new contents. Give the new table a new name and point the new rule versions at it"
                ));
            }
        }
        out.insert(name.clone(), bytes.clone());
    }
    for (name, bytes) in candidate.iter().filter(|(n, _)| is_table(n)) {
        if !out.contains_key(name) {
            out.insert(name.clone(), bytes.clone());
            changes.push(Change::Table(name.clone()));
        }
    }
    let rules = |f: &Files| -> Result<Vec<(String, String, RuleSource)>, String> {
        f.iter()
            .filter(|(n, _)| n.ends_with(".sql"))
            .map(|(n, b)| parse(n, b).map(|(t, s)| (n.clone(), t, s)))
            .collect()
    };
    let (active_rules, candidate_rules) = (rules(active)?, rules(candidate)?);
    let key = |s: &RuleSource| format!("{}@{}", s.header.name, s.header.version);
    let check = |name: &str, text: String| -> Result<String, String> {
        parse_rule(Path::new(name), &text).map_err(|e| {
            format!("{e} (the switch at {when} must be a window start of every rule it changes)")
        })?;
        Ok(text)
    };
    for (name, text, src) in &active_rules {
        let h = &src.header;
        if let Some((_, ctext, csrc)) = candidate_rules.iter().find(|(_, _, c)| key(c) == key(src))
        {
            if body(ctext) != body(text) {
                return Err(format!(
                    "rule {} changed but kept its version: give the new rule a new version",
                    key(src)
                ));
            }
            if (csrc.header.valid_from, csrc.header.valid_to) != (h.valid_from, h.valid_to) {
                return Err(format!(
                    "rule {}: its validity differs from the active one; a change takes a new version",
                    key(src)
                ));
            }
            out.insert(name.clone(), text.clone().into_bytes());
            continue;
        }
        if h.valid_from.is_some_and(|f| f >= at) {
            changes.push(Change::Dropped(key(src)));
            continue;
        }
        if h.valid_to.is_some_and(|t| t <= at) {
            out.insert(name.clone(), text.clone().into_bytes()); // history, unchanged
            continue;
        }
        let t = check(name, with_validity(text, h.valid_from, Some(at)))?;
        changes.push(Change::Ends(key(src)));
        out.insert(name.clone(), t.into_bytes());
    }
    for (name, text, src) in &candidate_rules {
        if active_rules.iter().any(|(_, _, a)| key(a) == key(src)) {
            continue;
        }
        let h = &src.header;
        if h.valid_to.is_some_and(|t| t <= at) {
            return Err(format!(
                "rule {} ends ({}) before the switch at {when}: it would price nothing",
                key(src),
                h.valid_to.map(fmt_rfc3339).unwrap_or_default()
            ));
        }
        let from = h.valid_from.map_or(at, |f| f.max(at));
        let t = check(name, with_validity(text, Some(from), h.valid_to))?;
        changes.push(Change::Starts(key(src)));
        out.insert(name.clone(), t.into_bytes());
    }
    let size: usize = out.iter().map(|(n, b)| n.len() + b.len()).sum();
    if size > MAX_BYTES {
        return Err(format!(
            "the rule set takes {size} bytes; one control record holds {MAX_BYTES}: move large reference tables out"
        ));
    }
    Ok((out, changes))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Millis = 3_600_000;

    fn rule(name: &str, version: i32, extra: &str, price: &str) -> (String, Vec<u8>) {
        (
            format!("{name}@{version}.sql"),
            format!(
                "-- name: {name}\n-- version: {version}\n-- window: 1h\n-- currency: EUR\n{extra}\nSELECT entity_id, 'h' AS unit, SUM(vcpu_seconds) AS quantity, {price} AS unit_price, SUM(vcpu_seconds) * {price} AS amount FROM usage GROUP BY entity_id\n"
            )
            .into_bytes(),
        )
    }

    fn header(files: &Files, name: &str) -> RuleHeader {
        let (_, src) = parse(name, &files[name]).expect("parses");
        src.header
    }

    #[test]
    fn a_new_version_starts_where_the_old_one_ends_and_history_stays() {
        let active: Files = [rule("cpu", 1, "", "0.01"), rule("mem", 1, "", "0.02")].into();
        let candidate: Files = [rule("cpu", 2, "", "0.03"), rule("mem", 1, "", "0.02")].into();
        let (merged, changes) = merge(&active, &candidate, 10 * HOUR).expect("merges");
        assert_eq!(
            merged.keys().collect::<Vec<_>>(),
            ["cpu@1.sql", "cpu@2.sql", "mem@1.sql"]
        );
        assert_eq!(header(&merged, "cpu@1.sql").valid_to, Some(10 * HOUR));
        assert_eq!(header(&merged, "cpu@2.sql").valid_from, Some(10 * HOUR));
        assert_eq!(header(&merged, "mem@1.sql").valid_to, None);
        assert_eq!(merged["mem@1.sql"], active["mem@1.sql"]);
        assert_eq!(
            changes,
            vec![Change::Ends("cpu@1".into()), Change::Starts("cpu@2".into())]
        );
        // the next switch keeps cpu@1 as it is and ends cpu@2
        let next: Files = [rule("cpu", 3, "", "0.04")].into();
        let (again, _) = merge(&merged, &next, 20 * HOUR).expect("merges");
        assert_eq!(again["cpu@1.sql"], merged["cpu@1.sql"]);
        let h2 = header(&again, "cpu@2.sql");
        assert_eq!(
            (h2.valid_from, h2.valid_to),
            (Some(10 * HOUR), Some(20 * HOUR))
        );
        assert_eq!(header(&again, "mem@1.sql").valid_to, Some(20 * HOUR));
        assert_eq!(header(&again, "cpu@3.sql").valid_from, Some(20 * HOUR));
    }

    #[test]
    fn unsafe_merges_are_refused_with_the_reason() {
        let active: Files = [rule("cpu", 1, "", "0.01")].into();
        let e = merge(&active, &[rule("cpu", 1, "", "0.02")].into(), HOUR).expect_err("body");
        assert!(e.contains("new version"), "{e}");
        let e = merge(&active, &[rule("cpu", 2, "", "0.02")].into(), HOUR + 60_000)
            .expect_err("not a window start");
        assert!(e.contains("window start"), "{e}");
        let e = merge(
            &active,
            &[rule("cpu", 2, "-- valid_to: 1970-01-01T00:00:00Z", "0.02")].into(),
            HOUR,
        )
        .expect_err("ends before");
        assert!(e.contains("before the switch"), "{e}");
        let mut a = active.clone();
        a.insert("rates.csv".into(), b"a\n1\n".to_vec());
        let mut c: Files = [rule("cpu", 2, "", "0.02")].into();
        c.insert("rates.csv".into(), b"a\n2\n".to_vec());
        let e = merge(&a, &c, HOUR).expect_err("table changed");
        assert!(e.contains("new name"), "{e}");
    }

    #[test]
    fn validity_lines_are_replaced_not_added() {
        let (_, t) = rule("cpu", 1, "-- valid_from: 1970-01-01T01:00:00Z", "1");
        let text = String::from_utf8(t).expect("utf8");
        let out = with_validity(&text, Some(HOUR), Some(3 * HOUR));
        assert_eq!(out.matches("valid_from").count(), 1);
        assert_eq!(out.matches("valid_to").count(), 1);
        let h = parse_rule(Path::new("x.sql"), &out).expect("parses").header;
        assert_eq!((h.valid_from, h.valid_to), (Some(HOUR), Some(3 * HOUR)));
        assert_eq!(body(&out), body(&text));
    }
}
