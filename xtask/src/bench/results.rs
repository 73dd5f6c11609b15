//! `target/bench/results.json`: what a run measured, as a later run, `--compare` and
//! `--render-docs` read it. Every figure carries a stable `key` (`latency.1000.mesh.p99`) that
//! stays the same from run to run while its human `name` may say more (counts, scales). Files
//! written before keys existed are read with keys derived from scenario and name.

use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Deserializer, Serialize};

use super::{Curves, Figure};

/// One results file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Results {
    /// Kernel, CPU, cores and commit, one line ([`super::measure::environment`]).
    pub environment: String,
    /// `git describe --always --dirty` of the tree measured (empty in older files).
    #[serde(default)]
    pub commit: String,
    /// UTC date of the run, `YYYY-MM-DD` (empty in older files).
    #[serde(default)]
    pub date: String,
    /// A `--quick` run: seconds per scenario, for checking the harness only.
    pub quick: bool,
    /// The scenarios the run was asked for (empty in older files).
    #[serde(default)]
    pub scenarios: Vec<String>,
    pub figures: Vec<Saved>,
    /// Percentile curves, `[percentile, µs]`, by path (`latency.1000.mesh`).
    #[serde(default)]
    pub curves: Curves,
}

/// One figure as written to the file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Saved {
    /// Stable machine key; derived from scenario and name when an older file has none.
    #[serde(default)]
    pub key: String,
    pub scenario: String,
    pub name: String,
    pub unit: String,
    /// A broken measurement (NaN, infinite) is written as `null` and read back as NaN.
    #[serde(deserialize_with = "nan_if_null")]
    pub value: f64,
    pub direct: Option<f64>,
}

impl Saved {
    /// Value over direct, when there is a direct value other than zero.
    pub fn ratio(&self) -> Option<f64> {
        self.direct.filter(|d| *d != 0.0).map(|d| self.value / d)
    }

    /// The direct value with its unit, for a table cell (empty without one).
    pub fn direct_cell(&self) -> String {
        self.direct
            .map(|d| format!("{} {}", super::fmt_value(d), self.unit))
            .unwrap_or_default()
    }

    /// The ratio as a percentage, for a table cell (empty without one).
    pub fn ratio_cell(&self) -> String {
        self.ratio()
            .map(|r| format!("{:.0}%", r * 100.0))
            .unwrap_or_default()
    }
}

impl From<&Figure> for Saved {
    fn from(f: &Figure) -> Saved {
        Saved {
            key: f.key.clone(),
            scenario: f.scenario.to_owned(),
            name: f.name.clone(),
            unit: f.unit.to_owned(),
            value: f.value,
            direct: f.direct,
        }
    }
}

impl Results {
    /// Reads a results file; figures without a key get one derived from scenario and name.
    pub fn load(path: &Path) -> Result<Results> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Results::parse(&text).with_context(|| {
            format!(
                "{} is not a results file of `cargo xtask bench`",
                path.display()
            )
        })
    }

    pub fn parse(text: &str) -> Result<Results> {
        let mut results: Results = serde_json::from_str(text)?;
        for f in &mut results.figures {
            if f.key.is_empty() {
                f.key = derived_key(&f.scenario, &f.name);
            }
        }
        Ok(results)
    }

    /// The figure with `key`.
    pub fn get(&self, key: &str) -> Option<&Saved> {
        self.figures.iter().find(|f| f.key == key)
    }
}

/// The key of a figure written before keys existed: `scenario.` and the name in lower case,
/// every run of other characters than letters and digits made one `_`
/// (`latency`, `1000/s, full mesh round trip p50` -> `latency.1000_s_full_mesh_round_trip_p50`).
pub fn derived_key(scenario: &str, name: &str) -> String {
    let mut slug = String::new();
    for c in name.chars() {
        if c.is_ascii_alphanumeric() {
            slug.push(c.to_ascii_lowercase());
        } else if !slug.is_empty() && !slug.ends_with('_') {
            slug.push('_');
        }
    }
    let slug = slug.trim_end_matches('_');
    format!("{scenario}.{slug}")
}

fn nan_if_null<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn older_files_get_keys_from_scenario_and_name() {
        let old = r#"{"environment": "kernel 6.18", "quick": true, "figures": [
            {"scenario": "latency", "name": "1000/s, full mesh round trip p99.9", "unit": "µs",
             "value": 12.5, "direct": 3.0},
            {"scenario": "churn", "name": "max: rate", "unit": "conn/s", "value": null,
             "direct": null}
        ]}"#;
        let results = Results::parse(old).expect("an old file");
        assert_eq!(
            results.figures[0].key,
            "latency.1000_s_full_mesh_round_trip_p99_9"
        );
        assert_eq!(results.figures[0].ratio(), Some(12.5 / 3.0));
        assert_eq!(results.figures[1].key, "churn.max_rate");
        assert!(results.figures[1].value.is_nan());
        assert!(results.curves.is_empty() && results.commit.is_empty());
        let new = r#"{"environment": "e", "quick": false, "figures": [
            {"key": "latency.1000.mesh.p50", "scenario": "latency", "name": "n", "unit": "µs",
             "value": 1.0, "direct": null}]}"#;
        let results = Results::parse(new).expect("a new file");
        assert_eq!(
            results.get("latency.1000.mesh.p50").map(|f| f.value),
            Some(1.0)
        );
    }
}
