use super::*;
use crate::bench::results::Saved;

fn figure(key: &str, value: f64, direct: Option<f64>) -> Saved {
    Saved {
        key: key.to_owned(),
        scenario: key.split('.').next().unwrap_or("").to_owned(),
        name: format!("figure {key}"),
        unit: "u".to_owned(),
        value,
        direct,
    }
}

fn results() -> Results {
    let mut figures = Vec::new();
    for place in ["cross_node", "same_node"] {
        for streams in [1, 4] {
            for (path, v) in [("direct", 21.0), ("passthrough", 17.4), ("mesh", 6.0)] {
                figures.push(figure(
                    &format!("throughput.{place}.{streams}.{path}"),
                    v,
                    None,
                ));
            }
        }
    }
    // A broken measurement: left out, never drawn at NaN.
    figures.push(figure("throughput.same_node.4.mesh", f64::NAN, None));
    figures.retain(|f| !(f.key == "throughput.same_node.4.mesh" && f.value.is_finite()));
    for rate in ["1000", "max"] {
        figures.push(figure(
            &format!("churn.{rate}.mesh.conn_per_s"),
            900.0,
            Some(1000.0),
        ));
        figures.push(figure(
            &format!("churn.{rate}.passthrough.conn_per_s"),
            950.0,
            Some(1000.0),
        ));
        figures.push(figure(
            &format!("churn.{rate}.mesh.agent_cpu_per_1000_conns"),
            700.0,
            None,
        ));
        figures.push(figure(
            &format!("churn.{rate}.passthrough.agent_cpu_per_1000_conns"),
            f64::INFINITY,
            None,
        ));
    }
    let curve = |scale: f64| {
        [
            50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95, 99.99, 100.0,
        ]
        .iter()
        .map(|p| [*p, scale * (1.0 + p / 10.0)])
        .collect::<Vec<_>>()
    };
    let mut curves = crate::bench::Curves::new();
    curves.insert("latency.1000.direct".into(), curve(30.0));
    curves.insert("latency.1000.passthrough".into(), curve(70.0));
    curves.insert(
        "latency.1000.mesh".into(),
        vec![[50.0, 240.0], [90.0, f64::NAN]],
    );
    Results {
        environment: "test".into(),
        commit: "abc".into(),
        date: "2026-12-08".into(),
        quick: false,
        scenarios: vec![],
        figures,
        curves,
    }
}

/// A small well-formedness check: one root element, every tag closed in order, attributes
/// quoted, `&` only in the entities `escape` writes, nothing but whitespace outside the root.
fn check_xml(svg: &str) -> Result<(), String> {
    let mut stack: Vec<String> = Vec::new();
    let mut roots = 0;
    let mut rest = svg;
    if let Some(after) = rest.strip_prefix("<?xml") {
        rest = after.split_once("?>").ok_or("unclosed declaration")?.1;
    }
    while !rest.is_empty() {
        let Some(open) = rest.find('<') else {
            check_text(rest)?;
            if !rest.trim().is_empty() && stack.is_empty() {
                return Err(format!("text outside the root: {rest:?}"));
            }
            break;
        };
        let text = &rest[..open];
        check_text(text)?;
        if stack.is_empty() && !text.trim().is_empty() {
            return Err(format!("text outside the root: {text:?}"));
        }
        let close = rest[open..].find('>').ok_or("unclosed tag")? + open;
        let tag = &rest[open + 1..close];
        rest = &rest[close + 1..];
        if let Some(name) = tag.strip_prefix('/') {
            match stack.pop() {
                Some(top) if top == name => {}
                other => return Err(format!("</{name}> closes {other:?}")),
            }
            continue;
        }
        let (body, empty) = match tag.strip_suffix('/') {
            Some(body) => (body, true),
            None => (tag, false),
        };
        let name: String = body.chars().take_while(|c| !c.is_whitespace()).collect();
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(format!("bad tag name in <{tag}>"));
        }
        check_attributes(&body[name.len()..])?;
        if stack.is_empty() {
            roots += 1;
        }
        if !empty {
            stack.push(name);
        }
    }
    if !stack.is_empty() {
        return Err(format!("unclosed: {stack:?}"));
    }
    if roots != 1 {
        return Err(format!("{roots} root elements"));
    }
    Ok(())
}

fn check_attributes(mut attrs: &str) -> Result<(), String> {
    loop {
        attrs = attrs.trim_start();
        if attrs.is_empty() {
            return Ok(());
        }
        let (name, after) = attrs
            .split_once("=\"")
            .ok_or(format!("unquoted attribute in {attrs:?}"))?;
        if name.is_empty() || name.contains(|c: char| c.is_whitespace() || c == '"') {
            return Err(format!("bad attribute name {name:?}"));
        }
        let (value, after) = after
            .split_once('"')
            .ok_or(format!("unterminated value in {attrs:?}"))?;
        check_text(value)?;
        attrs = after;
    }
}

fn check_text(text: &str) -> Result<(), String> {
    for (i, _) in text.match_indices('&') {
        let entity = &text[i..];
        if !["&amp;", "&lt;", "&gt;", "&quot;"]
            .iter()
            .any(|e| entity.starts_with(e))
        {
            return Err(format!("bare & in {text:?}"));
        }
    }
    if text.contains('<') || text.contains('>') {
        return Err(format!("markup in text {text:?}"));
    }
    Ok(())
}

#[test]
fn the_checker_catches_what_it_should() {
    assert!(check_xml("<svg a=\"1\"><g/><text>x &amp; y</text></svg>\n").is_ok());
    assert!(check_xml("<svg><g></svg>").is_err());
    assert!(check_xml("<svg a=1></svg>").is_err());
    assert!(check_xml("<svg>a & b</svg>").is_err());
    assert!(check_xml("<svg></svg><svg></svg>").is_err());
}

#[test]
fn every_plot_is_well_formed_without_nan() {
    let written = plots(&results());
    let names: Vec<&str> = written.iter().map(|(name, _)| *name).collect();
    assert_eq!(
        names,
        [
            "bench-latency.svg",
            "bench-throughput.svg",
            "bench-churn.svg"
        ]
    );
    for (name, svg) in &written {
        if let Err(e) = check_xml(svg) {
            panic!("{name} is not well-formed XML: {e}\n{svg}");
        }
        for bad in ["NaN", "inf"] {
            assert!(!svg.contains(bad), "{name} contains {bad}:\n{svg}");
        }
    }
    // The latency plot: the p100 point (the maximum) is off the axis, so 9 points per full
    // curve, and the mesh curve keeps only its number.
    let latency = &written[0].1;
    assert_eq!(latency.matches("<polyline").count(), 3);
    assert_eq!(latency.matches("<circle").count(), 9 + 9 + 1);
    // Throughput: 12 bars less the NaN one; churn: 6 rate bars, 2 CPU bars (two infinite).
    assert_eq!(written[1].1.matches("<rect x=").count(), 11 + 3);
    assert_eq!(written[2].1.matches("<rect x=").count(), 8 + 3 + 2);
}

#[test]
fn nothing_to_plot_makes_no_file() {
    let mut r = results();
    r.figures.clear();
    r.curves.clear();
    assert!(plots(&r).is_empty());
}

#[test]
fn axes() {
    assert!((x_of(99.0) - 2.0).abs() < 1e-9);
    assert!((x_of(99.99) - 4.0).abs() < 1e-9);
    assert_eq!(nice_ceiling(0.0), 1.0);
    assert_eq!(nice_ceiling(f64::NAN), 1.0);
    assert_eq!(nice_ceiling(3.0), 3.0);
    assert_eq!(nice_ceiling(3.1), 4.0);
    assert_eq!(nice_ceiling(587.0), 600.0);
    assert_eq!(nice_ceiling(5133.0), 6000.0);
    assert_eq!(nice_ceiling(200.0), 200.0);
    assert_eq!(nice_ceiling(0.63), 0.8);
    assert_eq!(nice_ceiling(9.5), 10.0);
    assert_eq!(escape(r#"a<b>&"c""#), "a&lt;b&gt;&amp;&quot;c&quot;");
}
