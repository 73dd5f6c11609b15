//! Reading samples out of Prometheus text exposition.

/// The sum of the samples of metric `name` whose labels include every pair of `labels`
/// (Prometheus text format); `None` if no sample matches.
///
/// ```
/// let text = "# TYPE x counter\nx_total{a=\"1\",b=\"2\"} 3\nx_total{a=\"1\",b=\"3\"} 4\n";
/// assert_eq!(mesh_lab::metric_value(text, "x_total", &[("a", "1")]), Some(7.0));
/// assert_eq!(mesh_lab::metric_value(text, "x_total", &[("b", "3")]), Some(4.0));
/// assert_eq!(mesh_lab::metric_value(text, "x_total", &[("b", "9")]), None);
/// ```
pub fn metric_value(metrics_text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut sum = None;
    for line in metrics_text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some(sample) = parse_sample(line) else {
            continue;
        };
        if sample.name != name {
            continue;
        }
        let matches = labels
            .iter()
            .all(|(k, v)| sample.labels.iter().any(|(sk, sv)| sk == k && sv == v));
        if matches {
            *sum.get_or_insert(0.0) += sample.value;
        }
    }
    sum
}

/// The value of sample `name` with `labels` in an exposition, for assertions: the sum of the
/// matching samples, or 0 when the metric's family is exposed but has no sample with these
/// labels yet (a counter's label set appears on its first increment). An error naming the
/// metric when no family of the exposition has samples called `name` (a renamed or
/// unregistered metric, or a counter asked for without its `_total`): a missing metric never
/// reads as 0.
///
/// ```
/// let text = "# TYPE x counter\nx_total{a=\"1\"} 3\n# TYPE up gauge\n";
/// assert_eq!(mesh_lab::exposed_value(text, "x_total", &[("a", "1")]), Ok(3.0));
/// assert_eq!(mesh_lab::exposed_value(text, "x_total", &[("a", "2")]), Ok(0.0));
/// assert_eq!(mesh_lab::exposed_value(text, "up", &[]), Ok(0.0));
/// assert!(mesh_lab::exposed_value(text, "x", &[]).is_err());
/// assert!(mesh_lab::exposed_value(text, "y_total", &[]).is_err());
/// ```
pub fn exposed_value(
    metrics_text: &str,
    name: &str,
    labels: &[(&str, &str)],
) -> Result<f64, String> {
    let families: Vec<(&str, &str)> = metrics_text
        .lines()
        .filter_map(|l| {
            let mut words = l.strip_prefix("# TYPE ")?.split_whitespace();
            Some((words.next()?, words.next()?))
        })
        .collect();
    if !families
        .iter()
        .any(|(family, kind)| sample_names(family, kind).any(|n| n == name))
    {
        let exposed: Vec<&str> = families.iter().map(|(family, _)| *family).collect();
        return Err(format!(
            "no metric family exposes samples named {name} (renamed? not registered? a \
             counter's samples end in _total); the families exposed: {exposed:?}"
        ));
    }
    Ok(metric_value(metrics_text, name, labels).unwrap_or(0.0))
}

/// The sample names a family of type `kind` (a `# TYPE` line) has in the text exposition.
fn sample_names<'a>(family: &'a str, kind: &str) -> impl Iterator<Item = String> + 'a {
    let suffixes: &[&str] = match kind {
        "counter" => &["_total", "_created"],
        "histogram" => &["_bucket", "_sum", "_count", "_created"],
        "summary" => &["", "_sum", "_count", "_created"],
        "gaugehistogram" => &["_bucket", "_gsum", "_gcount"],
        "info" => &["_info"],
        _ => &[""],
    };
    suffixes.iter().map(move |s| format!("{family}{s}"))
}

#[derive(Debug, PartialEq)]
struct Sample<'a> {
    name: &'a str,
    labels: Vec<(&'a str, String)>,
    value: f64,
}

/// Parses `name{k="v",...} value [timestamp]`; `None` for anything malformed.
fn parse_sample(line: &str) -> Option<Sample<'_>> {
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let name = &line[..name_end];
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(after) = rest.strip_prefix('{') {
        rest = after;
        loop {
            rest = rest.trim_start_matches([' ', ',']);
            if let Some(after) = rest.strip_prefix('}') {
                rest = after;
                break;
            }
            let (key, after) = rest.split_once('=')?;
            let after = after.trim_start().strip_prefix('"')?;
            let (value, after) = parse_quoted(after)?;
            labels.push((key.trim(), value));
            rest = after;
        }
    }
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        other => other.parse().ok()?,
    };
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// Reads a label value up to its closing quote (handling `\\`, `\"`, `\n`); returns it and the rest.
fn parse_quoted(s: &str) -> Option<(String, &str)> {
    let mut out = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((out, &s[i + 1..])),
            '\\' => match chars.next()?.1 {
                'n' => out.push('\n'),
                other => out.push(other),
            },
            other => out.push(other),
        }
    }
    None
}

/// One sample of a text exposition, as Prometheus's own Python client parses it.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct ParsedSample {
    /// The family's name (`istio_tcp_connections_opened`, without `_total`).
    pub family: String,
    /// The family's type (`counter`, `gauge`, `histogram`, ...).
    pub kind: String,
    /// The sample's name (`istio_tcp_connections_opened_total`).
    pub name: String,
    /// Its labels.
    pub labels: std::collections::BTreeMap<String, String>,
    /// Its value.
    pub value: f64,
}

/// A text exposition, as Prometheus's own Python client parses it.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct Exposition {
    /// Every family, also those without samples: name and type.
    pub families: Vec<(String, String)>,
    /// Every sample.
    pub samples: Vec<ParsedSample>,
}

/// `metrics_text` read with the OpenMetrics parser of the official Prometheus Python client
/// (`prometheus_client.openmetrics.parser`, installed by `cargo xtask test` into KMock's venv;
/// the agents serve OpenMetrics text): not the parser of this crate, so that what the tests
/// read is what Prometheus reads. An error when the venv is missing or the parser refuses the
/// text (it is strict: types, suffixes, `# EOF`).
pub fn parse_exposition(metrics_text: &str) -> anyhow::Result<Exposition> {
    use std::io::Write as _;
    const PARSE: &str = "import json, sys\n\
        from prometheus_client.openmetrics.parser import text_string_to_metric_families\n\
        fs = list(text_string_to_metric_families(sys.stdin.read()))\n\
        json.dump(dict(families=[(f.name, f.type) for f in fs],\n\
                       samples=[dict(family=f.name, kind=f.type, name=s.name, labels=s.labels,\n\
                                     value=s.value) for f in fs for s in f.samples]),\n\
                  sys.stdout)\n";
    let python = crate::kmock_python().ok_or_else(|| {
        anyhow::anyhow!(
            "KMock's venv, which has the Prometheus parser, is not there (cargo xtask test makes it)"
        )
    })?;
    let mut child = std::process::Command::new(&python)
        .args(["-c", PARSE])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(metrics_text.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        anyhow::bail!(
            "prometheus_client.openmetrics.parser refused the exposition: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples() {
        let text = r#"
# HELP mesh_connections_total Connections.
# TYPE mesh_connections_total counter
mesh_connections_total{direction="outbound",reason="ok"} 3
mesh_connections_total{direction="inbound",reason="ok"} 5 1700000000
mesh_connections_total{direction="outbound",reason="a \"quoted\", value",} 1
mesh_up 1
mesh_ratio{le="+Inf"} +Inf
broken{x="1" 7
"#;
        assert_eq!(metric_value(text, "mesh_connections_total", &[]), Some(9.0));
        assert_eq!(
            metric_value(text, "mesh_connections_total", &[("direction", "outbound")]),
            Some(4.0)
        );
        assert_eq!(
            metric_value(
                text,
                "mesh_connections_total",
                &[("reason", "a \"quoted\", value")]
            ),
            Some(1.0)
        );
        assert_eq!(metric_value(text, "mesh_up", &[]), Some(1.0));
        assert_eq!(metric_value(text, "mesh_up", &[("a", "b")]), None);
        assert_eq!(
            metric_value(text, "mesh_ratio", &[("le", "+Inf")]),
            Some(f64::INFINITY)
        );
        assert_eq!(metric_value(text, "broken", &[]), None);
        assert_eq!(metric_value(text, "absent", &[]), None);
    }

    #[test]
    fn exposed_values_tell_a_missing_family_from_a_missing_sample() {
        let text = r#"
# HELP mesh_opened Connections.
# TYPE mesh_opened counter
mesh_opened_total{direction="outbound"} 3
# HELP mesh_pods Pods.
# TYPE mesh_pods gauge
mesh_pods 2
# HELP mesh_closed Closed.
# TYPE mesh_closed counter
# HELP mesh_latency Latency.
# TYPE mesh_latency histogram
mesh_latency_count 4
# EOF
"#;
        let value = |name, labels| exposed_value(text, name, labels);
        assert_eq!(value("mesh_opened_total", &[]), Ok(3.0));
        assert_eq!(
            value("mesh_opened_total", &[("direction", "inbound")]),
            Ok(0.0)
        );
        assert_eq!(
            value("mesh_closed_total", &[]),
            Ok(0.0),
            "exposed, no sample yet"
        );
        assert_eq!(value("mesh_pods", &[]), Ok(2.0));
        assert_eq!(value("mesh_latency_count", &[]), Ok(4.0));
        for absent in [
            "mesh_renamed_total",
            "mesh_opened",
            "mesh_pods_total",
            "mesh_latency",
        ] {
            let err = value(absent, &[]).expect_err(absent);
            assert!(
                err.contains(absent) && err.contains("mesh_opened"),
                "{absent}: {err}"
            );
        }
    }
}
