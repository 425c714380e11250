//! What a reload (SIGHUP) reports about the config directory: the definitions as read
//! now, compared with the previous read. Nothing is applied here: the registry reads a
//! network's definition when it creates the network, so a changed file takes effect at
//! the next creation, and an active network keeps the config it was created from.

use crate::config::{ConfigDir, NetworkConfig, overlapping};
use std::collections::BTreeMap;

/// One network's definition as read: valid, or the reason it is not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Definition {
    Valid(Box<NetworkConfig>),
    Invalid(String),
}

/// Every definition of the config directory (files and built-ins), by network name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigView(pub BTreeMap<String, Definition>);

impl ConfigView {
    /// Reads the directory as `check-config` does: overlapping fixed subnets make both
    /// files invalid. Blocking file I/O: call it off the async runtime.
    pub fn read(dir: &ConfigDir) -> ConfigView {
        let results = dir.load_all();
        let valid: Vec<NetworkConfig> = results
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .cloned()
            .collect();
        let overlaps = overlapping(&valid);
        let mut map = BTreeMap::new();
        for result in results {
            match result {
                Ok(c) => {
                    let clash = overlaps
                        .iter()
                        .find(|e| crate::config::Source::File(e.path.clone()) == c.source);
                    let def = match clash {
                        Some(e) => Definition::Invalid(e.detail()),
                        None => Definition::Valid(Box::new(c.clone())),
                    };
                    map.insert(c.name.clone(), def);
                }
                Err(e) => {
                    let name = e
                        .path
                        .file_stem()
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or_else(|| e.path.display().to_string());
                    map.insert(name, Definition::Invalid(e.detail()));
                }
            }
        }
        ConfigView(map)
    }
}

/// A difference between two reads of the config directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Added(String),
    Removed(String),
    Changed(String),
    /// Invalid now (new, or was valid, or invalid for another reason); with the reason.
    Invalid(String, String),
    /// Was invalid, is valid now.
    Fixed(String),
}

impl Change {
    pub fn network(&self) -> &str {
        match self {
            Change::Added(n)
            | Change::Removed(n)
            | Change::Changed(n)
            | Change::Invalid(n, _)
            | Change::Fixed(n) => n,
        }
    }
}

/// The changes from `old` to `new`, in network name order.
pub fn changes(old: &ConfigView, new: &ConfigView) -> Vec<Change> {
    let mut out = Vec::new();
    let names: std::collections::BTreeSet<&String> = old.0.keys().chain(new.0.keys()).collect();
    for name in names {
        let change = match (old.0.get(name), new.0.get(name)) {
            (None, Some(Definition::Valid(_))) => Change::Added(name.clone()),
            (Some(_), None) => Change::Removed(name.clone()),
            (Some(a), Some(b)) if a == b => continue,
            (_, Some(Definition::Invalid(why))) => Change::Invalid(name.clone(), why.clone()),
            (Some(Definition::Invalid(_)), Some(Definition::Valid(_))) => {
                Change::Fixed(name.clone())
            }
            (Some(Definition::Valid(_)), Some(Definition::Valid(_))) => {
                Change::Changed(name.clone())
            }
            (None, None) => continue,
        };
        out.push(change);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(dir: &std::path::Path) -> ConfigView {
        ConfigView::read(&ConfigDir::new(dir))
    }

    #[test]
    fn added_changed_removed_invalid_and_fixed_files_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        std::fs::write(p.join("a.json"), r#"{"mode":"shared"}"#).unwrap();
        std::fs::write(p.join("b.json"), r#"{"mode":"shared"}"#).unwrap();
        std::fs::write(p.join("c.json"), "{").unwrap();
        let before = read(p);
        assert_eq!(changes(&before, &read(p)), vec![], "nothing changed");

        std::fs::write(p.join("a.json"), r#"{"mode":"host"}"#).unwrap();
        std::fs::remove_file(p.join("b.json")).unwrap();
        std::fs::write(p.join("c.json"), r#"{"mode":"shared"}"#).unwrap();
        std::fs::write(p.join("d.json"), r#"{"mode":"shared"}"#).unwrap();
        std::fs::write(p.join("e.json"), "not json").unwrap();
        let got = changes(&before, &read(p));
        assert_eq!(got[0], Change::Changed("a".into()));
        assert_eq!(got[1], Change::Removed("b".into()));
        assert_eq!(got[2], Change::Fixed("c".into()));
        assert_eq!(got[3], Change::Added("d".into()));
        assert!(
            matches!(&got[4], Change::Invalid(n, why) if n == "e" && why.contains("e.json")),
            "{got:?}"
        );
        assert_eq!(got.len(), 5, "{got:?}");
    }

    #[test]
    fn overlapping_fixed_subnets_make_both_files_invalid() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        let before = read(p);
        let net = r#"{"mode":"shared","subnet":"10.77.0.1","mask":"255.255.255.0"}"#;
        std::fs::write(p.join("x.json"), net).unwrap();
        std::fs::write(p.join("y.json"), net).unwrap();
        let got = changes(&before, &read(p));
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(
            got.iter().all(|c| matches!(c, Change::Invalid(..))),
            "{got:?}"
        );
    }
}
