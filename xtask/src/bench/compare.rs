//! `cargo xtask bench --compare OLD.json`: two runs figure by figure, matched by key (or, for a
//! file written before keys existed, by scenario and name). Per
//! figure the old and the new value, the change in percent and, where the figure has a direct
//! value, the old and the new ratio to it; a change beyond [`FLAG_PERCENT`] either way is
//! flagged (whether up is better depends on the figure: the reader judges). Figures in only one
//! of the files are listed as such.

use std::fmt::Write as _;

use super::{
    fmt_value,
    results::{Results, Saved},
};

/// Changes beyond this many percent, up or down, are flagged.
pub const FLAG_PERCENT: f64 = 10.0;
/// The mark of a flagged change.
pub const FLAG: &str = "<< beyond ±10%";

/// The comparison of `old` (read from `old_name`) and `new` (from `new_name`) as markdown.
pub fn compare(old: &Results, old_name: &str, new: &Results, new_name: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "old: {old_name}: {}", describe(old));
    let _ = writeln!(out, "new: {new_name}: {}", describe(new));
    if old.quick != new.quick {
        let _ = writeln!(
            out,
            "note: one run is --quick and the other is not: their figures do not compare"
        );
    }
    let _ = writeln!(
        out,
        "\n| key | measurement | old | new | change | old ratio | new ratio | |\n\
         |---|---|---|---|---|---|---|---|"
    );
    let (mut compared, mut flagged) = (0, 0);
    for n in &new.figures {
        let Some(o) = counterpart(old, n) else {
            continue;
        };
        compared += 1;
        let change = change_percent(o.value, n.value);
        let flag = change.is_some_and(|c| c.abs() > FLAG_PERCENT);
        flagged += usize::from(flag);
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            n.key,
            n.name,
            with_unit(o),
            with_unit(n),
            change.map_or("n/a".to_owned(), |c| format!("{c:+.1}%")),
            o.ratio_cell(),
            n.ratio_cell(),
            if flag { FLAG } else { "" },
        );
    }
    let only = |a: &Results, b: &Results| -> Vec<String> {
        a.figures
            .iter()
            .filter(|f| counterpart(b, f).is_none())
            .map(|f| format!("- {} ({}): {}", f.key, f.name, with_unit(f)))
            .collect()
    };
    for (label, list) in [
        ("only in old", only(old, new)),
        ("only in new", only(new, old)),
    ] {
        if !list.is_empty() {
            let _ = writeln!(out, "\n{label} ({}):\n{}", list.len(), list.join("\n"));
        }
    }
    let _ = writeln!(
        out,
        "\n{compared} figures in both; {flagged} changed by more than {FLAG_PERCENT}%."
    );
    out
}

/// The figure of `run` that `f` compares with: the one with its key, else (a file from before
/// keys, whose keys are derived from names) the one with its scenario and name.
fn counterpart<'a>(run: &'a Results, f: &Saved) -> Option<&'a Saved> {
    run.get(&f.key).or_else(|| {
        run.figures
            .iter()
            .find(|o| o.scenario == f.scenario && o.name == f.name)
    })
}

/// Environment, date and `--quick` of a run, one line.
fn describe(r: &Results) -> String {
    let date = if r.date.is_empty() {
        String::new()
    } else {
        format!("{}, ", r.date)
    };
    let quick = if r.quick { " (--quick)" } else { "" };
    format!("{date}{}{quick}", r.environment)
}

/// `new` against `old` in percent; none when either is not a number or `old` is zero.
fn change_percent(old: f64, new: f64) -> Option<f64> {
    let c = (new - old) / old.abs() * 100.0;
    (old != 0.0 && c.is_finite()).then_some(c)
}

fn with_unit(f: &Saved) -> String {
    format!("{} {}", fmt_value(f.value), f.unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: &str = r#"{"environment": "kernel 6.18, commit aaa", "date": "2026-12-01",
        "quick": false, "figures": [
        {"key": "latency.1000.mesh.p50", "scenario": "latency", "name": "mesh p50",
         "unit": "µs", "value": 200.0, "direct": 40.0},
        {"key": "latency.1000.mesh.p99", "scenario": "latency", "name": "mesh p99",
         "unit": "µs", "value": 500.0, "direct": 100.0},
        {"key": "churn.max.mesh.conn_per_s", "scenario": "churn", "name": "max rate",
         "unit": "conn/s", "value": 0.0, "direct": null},
        {"key": "memory.idle.n1", "scenario": "memory", "name": "idle n1", "unit": "MiB",
         "value": 12.0, "direct": null}]}"#;
    const NEW: &str = r#"{"environment": "kernel 6.18, commit bbb", "date": "2026-12-08",
        "quick": true, "figures": [
        {"key": "latency.1000.mesh.p50", "scenario": "latency", "name": "mesh p50",
         "unit": "µs", "value": 210.0, "direct": 42.0},
        {"key": "latency.1000.mesh.p99", "scenario": "latency", "name": "mesh p99",
         "unit": "µs", "value": 400.0, "direct": 100.0},
        {"key": "churn.max.mesh.conn_per_s", "scenario": "churn", "name": "max rate",
         "unit": "conn/s", "value": 10.0, "direct": null},
        {"key": "latency.sockperf.1000.mesh.p50", "scenario": "latency",
         "name": "sockperf p50", "unit": "µs", "value": 150.0, "direct": 50.0}]}"#;

    fn row<'a>(table: &'a str, key: &str) -> &'a str {
        table
            .lines()
            .find(|l| l.starts_with(&format!("| {key} |")))
            .unwrap_or_else(|| panic!("no row for {key} in\n{table}"))
    }

    #[test]
    fn figures_are_matched_by_key_and_big_changes_flagged() {
        let old = Results::parse(OLD).expect("old");
        let new = Results::parse(NEW).expect("new");
        let table = compare(&old, "old.json", &new, "new.json");
        assert!(table.starts_with(
            "old: old.json: 2026-12-01, kernel 6.18, commit aaa\n\
             new: new.json: 2026-12-08, kernel 6.18, commit bbb (--quick)\n\
             note: one run is --quick"
        ));
        // +5%: not flagged; old ratio 500%, new 500%.
        assert_eq!(
            row(&table, "latency.1000.mesh.p50"),
            "| latency.1000.mesh.p50 | mesh p50 | 200 µs | 210 µs | +5.0% | 500% | 500% |  |"
        );
        // -20%: flagged.
        assert_eq!(
            row(&table, "latency.1000.mesh.p99"),
            format!(
                "| latency.1000.mesh.p99 | mesh p99 | 500 µs | 400 µs | -20.0% | 500% | 400% \
                 | {FLAG} |"
            )
        );
        // From zero: no percentage, no flag.
        assert_eq!(
            row(&table, "churn.max.mesh.conn_per_s"),
            "| churn.max.mesh.conn_per_s | max rate | 0.00 conn/s | 10.0 conn/s | n/a |  |  |  |"
        );
        assert!(table.contains("\nonly in old (1):\n- memory.idle.n1 (idle n1): 12.0 MiB\n"));
        assert!(table.contains(
            "\nonly in new (1):\n- latency.sockperf.1000.mesh.p50 (sockperf p50): 150 µs\n"
        ));
        assert!(table.ends_with("\n3 figures in both; 1 changed by more than 10%.\n"));
    }

    #[test]
    fn files_without_keys_match_by_name() {
        // Written before keys: no key, the name as now.
        let keyless = OLD.replace(r#""key": "latency.1000.mesh.p50", "#, "");
        let old = Results::parse(&keyless).expect("old");
        assert_eq!(old.figures[0].key, "latency.mesh_p50");
        let new = Results::parse(NEW).expect("new");
        let table = compare(&old, "old.json", &new, "new.json");
        assert!(row(&table, "latency.1000.mesh.p50").contains("| +5.0% |"));
        assert!(!table.contains("latency.mesh_p50"), "{table}");
    }

    #[test]
    fn changes_are_relative_to_the_old_value() {
        assert_eq!(change_percent(100.0, 111.0).map(|c| c.round()), Some(11.0));
        assert_eq!(change_percent(-10.0, -5.0), Some(50.0));
        assert_eq!(change_percent(0.0, 1.0), None);
        assert_eq!(change_percent(f64::NAN, 1.0), None);
    }
}
