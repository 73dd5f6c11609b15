//! `cargo xtask bench --render-docs [RESULTS.json]`: the figure tables of docs/performance.md,
//! rendered from a results file between two markers, and the plots into docs/figures/. Only
//! what lies between the markers is replaced; the prose around them stays hand-written. A
//! `--quick` run is refused: its figures say nothing about speed.

use std::{fmt::Write as _, path::Path};

use anyhow::{bail, ensure, Context, Result};

use super::{fmt_value, plot, results::Results};
use crate::build;

/// The line before the rendered block.
pub const BEGIN: &str = "<!-- bench:begin latest -->";
/// The line after it.
pub const END: &str = "<!-- bench:end latest -->";
/// The document rendered into, from the workspace root.
const DOC: &str = "docs/performance.md";
/// Where the plots go, from the workspace root; linked from [`DOC`] relative to it.
const FIGURES: &str = "docs/figures";

/// Renders `results_path` into docs/performance.md and its plots into docs/figures/.
pub fn docs(results_path: &Path) -> Result<()> {
    let results = Results::load(results_path)?;
    ensure!(
        !results.quick,
        "{} is from a --quick run (a second or two per scenario: it checks the harness, its \
         figures say nothing about speed); render the docs from a full run: `cargo xtask bench` \
         then `cargo xtask bench --render-docs`",
        results_path.display()
    );
    let root = build::root();
    let doc_path = root.join(DOC);
    let doc = std::fs::read_to_string(&doc_path)
        .with_context(|| format!("reading {}", doc_path.display()))?;
    let plots = plot::plots(&results);
    let names: Vec<&str> = plots.iter().map(|(name, _)| *name).collect();
    let source = results_path
        .strip_prefix(&root)
        .unwrap_or(results_path)
        .display()
        .to_string();
    let rendered = replace_between(&doc, &block(&results, &source, &names), DOC)?;
    let figures = root.join(FIGURES);
    std::fs::create_dir_all(&figures).with_context(|| format!("creating {}", figures.display()))?;
    for (name, svg) in &plots {
        let path = figures.join(name);
        std::fs::write(&path, svg).with_context(|| format!("writing {}", path.display()))?;
        println!("written: {}", path.display());
    }
    std::fs::write(&doc_path, rendered)
        .with_context(|| format!("writing {}", doc_path.display()))?;
    println!(
        "written: {} (between `{BEGIN}` and `{END}`), from {source}",
        doc_path.display()
    );
    Ok(())
}

/// The rendered block: the run, links to the `plots` (file names in docs/figures/), then one
/// table per scenario in the order the run measured them.
pub fn block(results: &Results, source: &str, plots: &[&str]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "<!-- rendered by `cargo xtask bench --render-docs` from {source}: edit the bench, not \
         this block -->\n"
    );
    let date = if results.date.is_empty() {
        "date not recorded"
    } else {
        &results.date
    };
    let commit = if results.commit.is_empty() {
        "not recorded"
    } else {
        &results.commit
    };
    // The environment line names the commit already, unless an older file left it out.
    if results.environment.contains(&format!("commit {commit}")) {
        let _ = writeln!(out, "Run of {date}: {}.", results.environment);
    } else {
        let _ = writeln!(
            out,
            "Run of {date}, commit {commit}: {}.",
            results.environment
        );
    }
    if !results.scenarios.is_empty() {
        let _ = writeln!(out, "Scenarios: {}.", results.scenarios.join(", "));
    }
    for name in plots {
        let _ = write!(out, "\n![{}](figures/{name})\n", plot::title(name));
    }
    let mut scenarios: Vec<&str> = Vec::new();
    for f in &results.figures {
        if !scenarios.contains(&f.scenario.as_str()) {
            scenarios.push(&f.scenario);
        }
    }
    for scenario in scenarios {
        let _ = write!(
            out,
            "\n### {scenario}\n\n| measurement | value | direct | ratio | key |\n|---|---|---|---|---|\n"
        );
        for f in results.figures.iter().filter(|f| f.scenario == scenario) {
            let (direct, ratio) = (f.direct_cell(), f.ratio_cell());
            let _ = writeln!(
                out,
                "| {} | {} {} | {direct} | {ratio} | `{}` |",
                f.name.replace('|', "\\|"),
                fmt_value(f.value),
                f.unit,
                f.key
            );
        }
    }
    out
}

/// `doc` with the lines between [`BEGIN`] and [`END`] replaced by `block`; `file` names the
/// document in errors. A marker is a line of its own (the prose may quote it).
pub fn replace_between(doc: &str, block: &str, file: &str) -> Result<String> {
    let marker = |m: &str| -> Result<usize> {
        let mut offset = 0;
        let mut found = doc.split_inclusive('\n').filter_map(|line| {
            let at = offset;
            offset += line.len();
            (line.trim_end() == m).then_some(at)
        });
        match (found.next(), found.next()) {
            (Some(i), None) => Ok(i),
            (None, _) => bail!(
                "{file} has no `{m}` marker: the rendered tables go between `{BEGIN}` and \
                 `{END}`, each on a line of its own"
            ),
            (Some(_), Some(_)) => bail!("{file} has `{m}` on more than one line"),
        }
    };
    let begin = marker(BEGIN)?;
    let end = marker(END)?;
    ensure!(
        begin < end,
        "{file} has `{END}` before `{BEGIN}`: the rendered block goes between them"
    );
    let inside = begin + BEGIN.len();
    Ok(format!(
        "{}\n{}\n{}",
        &doc[..inside],
        block.trim_end(),
        &doc[end..]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const RESULTS: &str = r#"{"environment": "kernel 6.18, AMD EPYC, 2 cores, commit abc1234",
        "commit": "abc1234", "date": "2026-12-08", "quick": false,
        "scenarios": ["latency", "memory"], "figures": [
        {"key": "latency.1000.mesh.p50", "scenario": "latency",
         "name": "1000/s, full mesh round trip p50", "unit": "µs", "value": 239.0,
         "direct": 36.0},
        {"key": "memory.idle.n1", "scenario": "memory", "name": "agent RSS, idle, n1",
         "unit": "MiB", "value": 12.3, "direct": null},
        {"key": "latency.1000.mesh_added.p50", "scenario": "latency",
         "name": "1000/s, latency added by the mesh p50", "unit": "µs", "value": 203.0,
         "direct": null}]}"#;

    const DOC: &str = "# Performance\n\nProse quoting `<!-- bench:begin latest -->`.\n\n<!-- \
                       bench:begin latest -->\nold table\n<!-- bench:end latest -->\n\nMore \
                       prose.\n";

    #[test]
    fn the_block_is_rendered_between_the_markers_only() {
        let results = Results::parse(RESULTS).expect("results");
        let block = block(
            &results,
            "target/bench/results.json",
            &["bench-latency.svg"],
        );
        assert_eq!(
            block,
            "<!-- rendered by `cargo xtask bench --render-docs` from target/bench/results.json: \
             edit the bench, not this block -->\n\n\
             Run of 2026-12-08: kernel 6.18, AMD EPYC, 2 cores, commit abc1234.\n\
             Scenarios: latency, memory.\n\n\
             ![Round trip by percentile at 1000/s (mesh-labtool rr)](figures/bench-latency.svg)\n\n\
             ### latency\n\n\
             | measurement | value | direct | ratio | key |\n|---|---|---|---|---|\n\
             | 1000/s, full mesh round trip p50 | 239 µs | 36.0 µs | 664% | `latency.1000.mesh.p50` |\n\
             | 1000/s, latency added by the mesh p50 | 203 µs |  |  | `latency.1000.mesh_added.p50` |\n\n\
             ### memory\n\n\
             | measurement | value | direct | ratio | key |\n|---|---|---|---|---|\n\
             | agent RSS, idle, n1 | 12.3 MiB |  |  | `memory.idle.n1` |\n"
        );
        let once = replace_between(DOC, &block, "doc.md").expect("markers");
        assert!(once.starts_with(
            "# Performance\n\nProse quoting `<!-- bench:begin latest -->`.\n\n<!-- bench:begin \
             latest -->\n<!-- rendered"
        ));
        assert!(once.ends_with("`memory.idle.n1` |\n<!-- bench:end latest -->\n\nMore prose.\n"));
        assert!(!once.contains("old table"));
        // Deterministic: rendering again changes nothing.
        let twice = replace_between(&once, &block, "doc.md").expect("markers");
        assert_eq!(once, twice);
    }

    #[test]
    fn a_quick_run_is_refused() {
        let path = std::env::temp_dir().join(format!("bench-quick-{}.json", std::process::id()));
        std::fs::write(
            &path,
            RESULTS.replace("\"quick\": false", "\"quick\": true"),
        )
        .expect("writing a temporary file");
        let err = docs(&path).expect_err("a --quick run");
        let _ = std::fs::remove_file(&path);
        assert!(
            err.to_string()
                .contains("is from a --quick run (a second or two per scenario"),
            "{err}"
        );
    }

    #[test]
    fn a_missing_or_misplaced_marker_is_named() {
        let no_begin = DOC.replace(&format!("{BEGIN}\n"), "");
        let err = replace_between(&no_begin, "x", "docs/performance.md").expect_err("no begin");
        assert!(
            err.to_string()
                .starts_with("docs/performance.md has no `<!-- bench:begin latest -->` marker"),
            "{err}"
        );
        let no_end = DOC.replace(&format!("{END}\n"), "");
        let err = replace_between(&no_end, "x", "docs/performance.md").expect_err("no end");
        assert!(
            err.to_string()
                .starts_with("docs/performance.md has no `<!-- bench:end latest -->` marker"),
            "{err}"
        );
        let swapped = format!("{END}\n{BEGIN}\n");
        let err = replace_between(&swapped, "x", "d.md").expect_err("swapped");
        assert!(err.to_string().contains("before"), "{err}");
        let twice = format!("{DOC}{BEGIN}\n");
        let err = replace_between(&twice, "x", "d.md").expect_err("twice");
        assert!(err.to_string().contains("on more than one line"), "{err}");
    }
}
