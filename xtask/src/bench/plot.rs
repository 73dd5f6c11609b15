//! SVG plots of a results file, written by hand (no plotting crate): the round-trip latency by
//! percentile at 1000/s, the throughput bars and the churn bars. The bench writes them next to
//! results.json; `--render-docs` writes them to docs/figures/ from the same file. A value that
//! is not a number is left out of a plot, never drawn at NaN.

use std::fmt::Write as _;

use super::{fmt_value, results::Results};

/// Colour of each path, the same in every plot.
const PATHS: [(&str, &str, &str); 3] = [
    ("direct", "direct (no agent)", "#7f7f7f"),
    ("passthrough", "capture-only passthrough", "#4c78a8"),
    ("mesh", "full mesh", "#f58518"),
];
/// The percentiles marked on the latency plot's axis.
const TICKS: [f64; 5] = [50.0, 90.0, 99.0, 99.9, 99.99];

/// The file name of every plot.
pub const FILES: [&str; 3] = [
    "bench-latency.svg",
    "bench-throughput.svg",
    "bench-churn.svg",
];

/// Every plot `results` has the figures for: (file name, SVG).
pub fn plots(results: &Results) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    if let Some(svg) = latency(results) {
        out.push((FILES[0], svg));
    }
    if let Some(svg) = throughput(results) {
        out.push((FILES[1], svg));
    }
    if let Some(svg) = churn(results) {
        out.push((FILES[2], svg));
    }
    out
}

/// What each plot shows, for the alt text of its link.
pub fn title(file: &str) -> &'static str {
    match file {
        "bench-latency.svg" => "Round trip by percentile at 1000/s (mesh-labtool rr)",
        "bench-throughput.svg" => "Throughput (iperf3)",
        "bench-churn.svg" => "Connection churn",
        _ => "bench plot",
    }
}

/// (a) rr's round trip at 1000/s by percentile, x on a log scale of 1/(1-p).
fn latency(r: &Results) -> Option<String> {
    let series: Vec<Line> = PATHS
        .iter()
        .filter_map(|(path, label, colour)| {
            let curve = r.curves.get(&format!("latency.1000.{path}"))?;
            let points = curve
                .iter()
                .filter(|[p, us]| (50.0..=99.99).contains(p) && us.is_finite())
                .map(|[p, us]| (x_of(*p), *us))
                .collect();
            Some(Line {
                label,
                colour,
                points,
            })
        })
        .collect();
    (!series.is_empty()).then(|| {
        line_chart(
            "Round trip at 1000/s by percentile (mesh-labtool rr, 1 KiB)",
            "µs",
            &series,
        )
    })
}

/// Position of percentile `p` on the x axis: log10 of 1/(1-p).
fn x_of(p: f64) -> f64 {
    (1.0 / (1.0 - p / 100.0)).log10()
}

/// (b) iperf3 throughput per place and stream count.
fn throughput(r: &Results) -> Option<String> {
    let mut groups = Vec::new();
    for (place, place_label) in [("cross_node", "cross-node"), ("same_node", "same-node")] {
        for streams in [1, 4] {
            let bars = PATHS
                .iter()
                .map(|(path, _, _)| {
                    r.get(&format!("throughput.{place}.{streams}.{path}"))
                        .map(|f| f.value)
                })
                .collect();
            let s = if streams == 1 { "" } else { "s" };
            groups.push(Group {
                label: format!("{place_label}, {streams} stream{s}"),
                bars,
            });
        }
    }
    let panel = Panel {
        title: "Throughput (iperf3)",
        unit: "Gbit/s",
        series: &PATHS,
        groups,
    };
    panel.has_bars().then(|| bar_chart(&[panel]))
}

/// (c) new connections per second, and agent CPU per 1000 of them.
fn churn(r: &Results) -> Option<String> {
    let value = |key: String| r.get(&key).map(|f| f.value);
    let mut rates = Vec::new();
    let mut cpu = Vec::new();
    for (rate, label) in [("1000", "at 1000/s"), ("max", "as fast as it goes")] {
        let direct = r
            .get(&format!("churn.{rate}.mesh.conn_per_s"))
            .and_then(|f| f.direct);
        rates.push(Group {
            label: label.to_owned(),
            bars: vec![
                direct,
                value(format!("churn.{rate}.passthrough.conn_per_s")),
                value(format!("churn.{rate}.mesh.conn_per_s")),
            ],
        });
        cpu.push(Group {
            label: label.to_owned(),
            bars: vec![
                value(format!("churn.{rate}.passthrough.agent_cpu_per_1000_conns")),
                value(format!("churn.{rate}.mesh.agent_cpu_per_1000_conns")),
            ],
        });
    }
    let agents = [
        ("passthrough", "passthrough (one agent)", PATHS[1].2),
        ("mesh", "full mesh (both agents)", PATHS[2].2),
    ];
    let panels = [
        Panel {
            title: "New connections per second",
            unit: "conn/s",
            series: &PATHS,
            groups: rates,
        },
        Panel {
            title: "Agent CPU per 1000 new connections",
            unit: "CPU ms",
            series: &agents,
            groups: cpu,
        },
    ];
    panels
        .iter()
        .any(Panel::has_bars)
        .then(|| bar_chart(&panels))
}

/// One line of a line chart: (x, y) points in data units.
struct Line {
    label: &'static str,
    colour: &'static str,
    points: Vec<(f64, f64)>,
}

/// Bars side by side for each group, one per series; `None` for a bar not measured.
struct Group {
    label: String,
    bars: Vec<Option<f64>>,
}

struct Panel<'a> {
    title: &'static str,
    unit: &'static str,
    /// (key, label, colour) of each series.
    series: &'a [(&'static str, &'static str, &'static str)],
    groups: Vec<Group>,
}

impl Panel<'_> {
    fn has_bars(&self) -> bool {
        self.groups
            .iter()
            .flat_map(|g| &g.bars)
            .any(|b| b.is_some_and(f64::is_finite))
    }
}

const WIDTH: f64 = 640.0;
const HEIGHT: f64 = 380.0;
/// Plot area inside a chart: left, top, right, bottom margins.
const MARGIN: (f64, f64, f64, f64) = (64.0, 40.0, 40.0, 90.0);

fn line_chart(title: &str, unit: &str, series: &[Line]) -> String {
    let (left, top, right, bottom) = MARGIN;
    let (w, h) = (WIDTH - left - right, HEIGHT - top - bottom);
    let (x0, x1) = (x_of(TICKS[0]), x_of(TICKS[4]));
    let top_value = nice_ceiling(
        series
            .iter()
            .flat_map(|s| s.points.iter().map(|(_, y)| *y))
            .fold(0.0, f64::max),
    );
    let px = |x: f64| left + (x - x0) / (x1 - x0) * w;
    let py = |y: f64| top + h - y / top_value * h;
    let mut svg = header(WIDTH, HEIGHT, title);
    let _ = writeln!(
        svg,
        r#"<text x="{left:.1}" y="22" font-weight="bold">{}</text>"#,
        escape(title)
    );
    y_axis(&mut svg, left, top, w, h, top_value, unit);
    for p in TICKS {
        let x = px(x_of(p));
        let _ = writeln!(
            svg,
            r##"<line x1="{x:.1}" y1="{top:.1}" x2="{x:.1}" y2="{:.1}" stroke="#e0e0e0"/>"##,
            top + h
        );
        let _ = writeln!(
            svg,
            r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">p{p}</text>"#,
            top + h + 16.0
        );
    }
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">percentile (log scale of 1/(1-p))</text>"#,
        left + w / 2.0,
        top + h + 36.0
    );
    for s in series {
        let points: Vec<String> = s
            .points
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y)))
            .collect();
        let _ = writeln!(
            svg,
            r#"<polyline fill="none" stroke="{}" stroke-width="2" points="{}"/>"#,
            s.colour,
            points.join(" ")
        );
        for (x, y) in &s.points {
            let _ = writeln!(
                svg,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{}"><title>{}: {} {unit}</title></circle>"#,
                px(*x),
                py(*y),
                s.colour,
                escape(s.label),
                fmt_value(*y)
            );
        }
    }
    let legend: Vec<(&str, &str)> = series.iter().map(|s| (s.label, s.colour)).collect();
    legend_row(&mut svg, left, HEIGHT - 24.0, &legend);
    svg.push_str("</svg>\n");
    svg
}

fn bar_chart(panels: &[Panel<'_>]) -> String {
    let (left, top, right, bottom) = MARGIN;
    let total = WIDTH * panels.len() as f64;
    let title = panels
        .iter()
        .map(|p| p.title)
        .collect::<Vec<_>>()
        .join("; ");
    let mut svg = header(total, HEIGHT, &title);
    for (i, panel) in panels.iter().enumerate() {
        let offset = WIDTH * i as f64;
        let (w, h) = (WIDTH - left - right, HEIGHT - top - bottom);
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="22" font-weight="bold">{}</text>"#,
            offset + left,
            escape(panel.title)
        );
        let finite = |b: &Option<f64>| b.filter(|v| v.is_finite());
        let top_value = nice_ceiling(
            panel
                .groups
                .iter()
                .flat_map(|g| g.bars.iter().filter_map(finite))
                .fold(0.0, f64::max),
        );
        y_axis(&mut svg, offset + left, top, w, h, top_value, panel.unit);
        let slot = w / panel.groups.len().max(1) as f64;
        let bar = slot * 0.8 / panel.series.len().max(1) as f64;
        for (g, group) in panel.groups.iter().enumerate() {
            let x0 = offset + left + slot * g as f64 + slot * 0.1;
            for (b, value) in group.bars.iter().enumerate() {
                let (Some(v), Some((_, label, colour))) = (finite(value), panel.series.get(b))
                else {
                    continue;
                };
                let bh = v.max(0.0) / top_value * h;
                let x = x0 + bar * b as f64;
                let _ = writeln!(
                    svg,
                    r#"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{bh:.1}" fill="{colour}"><title>{}, {}: {} {}</title></rect>"#,
                    top + h - bh,
                    bar * 0.9,
                    escape(&group.label),
                    escape(label),
                    fmt_value(v),
                    escape(panel.unit)
                );
                let _ = writeln!(
                    svg,
                    r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10">{}</text>"#,
                    x + bar * 0.45,
                    top + h - bh - 3.0,
                    fmt_value(v)
                );
            }
            let _ = writeln!(
                svg,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                x0 + slot * 0.4,
                top + h + 16.0,
                escape(&group.label)
            );
        }
        let legend: Vec<(&str, &str)> = panel.series.iter().map(|(_, l, c)| (*l, *c)).collect();
        legend_row(&mut svg, offset + left, HEIGHT - 24.0, &legend);
    }
    svg.push_str("</svg>\n");
    svg
}

fn header(width: f64, height: f64, title: &str) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
         <svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width:.0}\" height=\"{height:.0}\" \
         viewBox=\"0 0 {width:.0} {height:.0}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <title>{}</title>\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n",
        escape(title)
    )
}

/// The y axis of a plot area (`left`, `top`, `w`, `h`) from 0 to `top_value`: five grid lines
/// with their values, and the unit above.
fn y_axis(svg: &mut String, left: f64, top: f64, w: f64, h: f64, top_value: f64, unit: &str) {
    for i in 0..=5 {
        let v = top_value * f64::from(i) / 5.0;
        let y = top + h - h * f64::from(i) / 5.0;
        let _ = writeln!(
            svg,
            r##"<line x1="{left:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{}"/>"##,
            left + w,
            if i == 0 { "#000000" } else { "#e0e0e0" }
        );
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            left - 6.0,
            y + 4.0,
            if i == 0 { "0".to_owned() } else { fmt_value(v) }
        );
    }
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
        left - 6.0,
        top - 18.0,
        escape(unit)
    );
}

fn legend_row(svg: &mut String, left: f64, y: f64, entries: &[(&str, &str)]) {
    let mut x = left;
    for (label, colour) in entries {
        let _ = writeln!(
            svg,
            r#"<rect x="{x:.1}" y="{:.1}" width="12" height="12" fill="{colour}"/><text x="{:.1}" y="{y:.1}">{}</text>"#,
            y - 10.0,
            x + 16.0,
            escape(label)
        );
        x += 24.0 + 7.0 * label.chars().count() as f64;
    }
}

/// The smallest round number (1, 1.5, 2, 2.5, 3, 4, 5, 6 or 8 times a power of ten) at or
/// above `v`: the top of an axis with five grid lines (1 for nothing to show).
fn nice_ceiling(v: f64) -> f64 {
    if !v.is_finite() || v <= 0.0 {
        return 1.0;
    }
    let magnitude = 10f64.powf(v.log10().floor());
    [1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|c| *c >= v)
        .unwrap_or(10.0 * magnitude)
}

/// Text safe inside an XML element or a quoted attribute.
fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests;
