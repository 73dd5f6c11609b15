//! Scenario 6, policy changes on established connections: how soon after a policy change the
//! connections it now denies are cut, on each enforcement path (an HBONE stream from another
//! node, a plaintext connection, a same-node delivery), while an allowed one goes on. The lab
//! test (tests/tests/policy.rs) checks that they are cut; this measures how soon, twice: from
//! the state file written to the client seeing its connection end (the agents read the file
//! every `state_poll_interval_ms`, 100 ms in the lab), and from the agent starting to reload the
//! state to its log line of the close (both timestamps from the agent's own log).

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mesh_lab::{traffic::serve, Lab, Running};
use serde_yaml::Value;

use super::Figure;

/// Echo servers of this scenario listen here.
const PORT: u16 = 7100;
const CLIENT: &str = "cluster.local/ns/shop/sa/client";
/// How long a cut may take before the scenario fails.
const DEADLINE: Duration = Duration::from_secs(10);

/// One enforcement path: a stream the policy change denies, and how the deciding agent's close
/// line is recognised.
struct Path {
    name: &'static str,
    /// The path in figure keys.
    key: &'static str,
    client: &'static str,
    addr: String,
    node: &'static str,
    needle: String,
}

pub fn run(lab: &Lab, rounds: usize, out: &mut Vec<Figure>) -> Result<()> {
    let _servers = [serve(lab, "shop/api", PORT), serve(lab, "shop/db", PORT)];
    let api = format!("{}:{PORT}", lab.pod("shop/api").ip);
    let db = format!("{}:{PORT}", lab.pod("shop/db").ip);
    let paths = [
        Path {
            name: "HBONE stream from another node",
            key: "hbone",
            client: "shop/db",
            addr: api.clone(),
            node: "n2",
            needle: "identity=spiffe://cluster.local/ns/shop/sa/db".into(),
        },
        Path {
            name: "plaintext connection",
            key: "plaintext",
            client: "legacy/client",
            addr: api.clone(),
            node: "n2",
            needle: format!("src={}:", lab.pod("legacy/client").ip),
        },
        Path {
            name: "same-node delivery",
            key: "same_node",
            client: "shop/client",
            addr: db,
            node: "n1",
            needle: "policy=shop/deny-client-to-db".into(),
        },
    ];
    let mut seen: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    let mut agent: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    for _ in 0..rounds {
        set_policies(lab, &[])?;
        let mut kept = stream(lab, "shop/client", &api)?;
        let mut denied = paths
            .iter()
            .map(|p| stream(lab, p.client, &p.addr))
            .collect::<Result<Vec<_>>>()?;
        let logged_before: Vec<usize> = paths.iter().map(|p| lab.agent_log(p.node).len()).collect();
        let reloads = reload_counts(lab)?;
        let written = Instant::now();
        write_policies(lab, &[allow_client(), deny_client_to_db()]);
        let cut = wait_cut(&paths, &mut denied, written)?;
        wait_reloaded(lab, &reloads)?;
        if let Some(status) = kept.try_wait() {
            bail!("the allowed stream ended ({status}) with the denied ones");
        }
        kept.close_stdin();
        let status = kept.wait(DEADLINE);
        if !status.success() {
            bail!("the allowed stream failed ({status}): {}", kept.stderr());
        }
        for (i, p) in paths.iter().enumerate() {
            seen[i].push(cut[i].as_secs_f64() * 1000.0);
            agent[i].push(agent_ms(lab, p, logged_before[i])?);
        }
    }
    set_policies(lab, &[])?;
    for (i, p) in paths.iter().enumerate() {
        let mut figure = |key: &str, name: String, value: f64| {
            out.push(Figure {
                scenario: "policy",
                key: format!("policy.{}.{key}", p.key),
                name,
                unit: "ms",
                value,
                direct: None,
            });
        };
        let n = seen[i].len();
        figure(
            "cut_median",
            format!(
                "{}: cut after the state file changed, median of {n}",
                p.name
            ),
            median(&mut seen[i]),
        );
        figure(
            "cut_max",
            format!("{}: cut after the state file changed, max of {n}", p.name),
            max(&seen[i]),
        );
        figure(
            "agent_close_max",
            format!(
                "{}: closed after the agent began the reload, max of {n}",
                p.name
            ),
            max(&agent[i]),
        );
    }
    Ok(())
}

/// Waits until every denied stream has ended; when each did, from `written`. Fails if one
/// ends cleanly or outlives [`DEADLINE`].
fn wait_cut(paths: &[Path], denied: &mut [Running], written: Instant) -> Result<Vec<Duration>> {
    let mut cut: Vec<Option<Duration>> = vec![None; denied.len()];
    while cut.iter().any(Option::is_none) {
        for (i, s) in denied.iter_mut().enumerate() {
            if cut[i].is_some() {
                continue;
            }
            if let Some(status) = s.try_wait() {
                if status.success() {
                    bail!("{} ended cleanly instead of being cut", paths[i].name);
                }
                cut[i] = Some(written.elapsed());
            }
        }
        if written.elapsed() > DEADLINE {
            let open: Vec<&str> = paths
                .iter()
                .zip(&cut)
                .filter(|(_, c)| c.is_none())
                .map(|(p, _)| p.name)
                .collect();
            bail!("not cut {DEADLINE:?} after the policy change: {open:?}");
        }
        // Polling the children: the resolution of the figure, well under the poll interval.
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(cut.into_iter().flatten().collect())
}

/// From the start of the agent's reload (its first `state reloaded` line after `offset`, less
/// the parse, diff and apply times it reports) to its log line of the close.
fn agent_ms(lab: &Lab, path: &Path, offset: usize) -> Result<f64> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let log = lab.agent_log(path.node);
        let new = log.get(offset..).unwrap_or_default();
        // The close may be logged before the reload's own line, which comes at its end.
        let close = new.lines().find(|l| {
            l.contains("connection closed by a policy change") && l.contains(&path.needle)
        });
        let reload = new.lines().find(|l| l.contains("state reloaded"));
        if let (Some(close), Some(reload)) = (close, reload) {
            let start = log_secs(reload)
                .zip(reload_secs(reload))
                .map(|(at, took)| at - took)
                .with_context(|| format!("no time in {reload}"))?;
            let closed = log_secs(close).with_context(|| format!("no time in {close}"))?;
            return Ok((closed - start) * 1000.0);
        }
        if Instant::now() > deadline {
            bail!(
                "{} did not log the close of the {} by the policy change",
                path.node,
                path.name
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Seconds of a log line's leading RFC 3339 UTC timestamp (`2026-12-02T14:04:21.854511Z`),
/// from an arbitrary origin: only differences count.
fn log_secs(line: &str) -> Option<f64> {
    let (date, time) = line
        .split_whitespace()
        .next()?
        .strip_suffix('Z')?
        .split_once('T')?;
    let mut ymd = date.split('-').map(str::parse::<i64>);
    let (y, m, d) = (ymd.next()?.ok()?, ymd.next()?.ok()?, ymd.next()?.ok()?);
    let mut hms = time.split(':');
    let h: f64 = hms.next()?.parse().ok()?;
    let min: f64 = hms.next()?.parse().ok()?;
    let s: f64 = hms.next()?.parse().ok()?;
    // Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's days_from_civil).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    Some(days as f64 * 86_400.0 + h * 3600.0 + min * 60.0 + s)
}

/// The seconds a `state reloaded` line says the reload took (`parse_ms`, `diff_ms`,
/// `apply_us`).
fn reload_secs(line: &str) -> Option<f64> {
    let field = |name: &str| -> Option<f64> {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(name))?
            .parse()
            .ok()
    };
    Some(field("parse_ms=")? / 1e3 + field("diff_ms=")? / 1e3 + field("apply_us=")? / 1e6)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().reduce(f64::max).unwrap_or(f64::NAN)
}

/// A long-lived echo connection (`mesh-labtool stream`) that has made progress.
fn stream(lab: &Lab, client: &str, addr: &str) -> Result<Running> {
    let mut s = Running::spawn(
        &format!("stream from {client} to {addr}"),
        lab.try_command(client, mesh_lab::labtool_bin())?.args([
            "stream",
            "--to",
            addr,
            "--chunk",
            "4096",
            "--interval-ms",
            "5",
        ]),
    );
    s.wait_line("progress", DEADLINE);
    Ok(s)
}

/// Replaces the policies of the state file and waits until both agents have applied them.
fn set_policies(lab: &Lab, policies: &[Value]) -> Result<()> {
    let before = reload_counts(lab)?;
    write_policies(lab, policies);
    wait_reloaded(lab, &before)
}

fn write_policies(lab: &Lab, policies: &[Value]) {
    let mut state = lab.read_state();
    state["policies"] = Value::Sequence(policies.to_vec());
    lab.write_state(&state);
}

/// Successful state reloads of n1 and n2 so far.
fn reload_counts(lab: &Lab) -> Result<[f64; 2]> {
    let count = |node: &str| {
        mesh_lab::exposed_value(
            &lab.metrics(node),
            "mesh_state_reloads_total",
            &[("result", "ok")],
        )
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("metrics of {node}"))
    };
    Ok([count("n1")?, count("n2")?])
}

fn wait_reloaded(lab: &Lab, before: &[f64; 2]) -> Result<()> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let now = reload_counts(lab)?;
        if now[0] > before[0] && now[1] > before[1] {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the agents did not reload the state within {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An AuthorizationPolicy object as Kubernetes holds it; `spec` in YAML flow style.
fn policy(name: &str, spec: &str) -> Value {
    let text = format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
         metadata: {{name: {name}, namespace: shop}}\nspec: {spec}\n"
    );
    serde_yaml::from_str(&text).expect("a well-formed policy")
}

/// Admits only shop/client's identity to shop/api: shop/db's HBONE stream and the plaintext
/// connection are denied.
fn allow_client() -> Value {
    policy(
        "allow-client",
        &format!(
            "{{selector: {{matchLabels: {{app: api}}}}, action: ALLOW, \
             rules: [{{from: [{{source: {{principals: [\"{CLIENT}\"]}}}}]}}]}}"
        ),
    )
}

/// Denies shop/client's identity at shop/db: the same-node delivery is denied.
fn deny_client_to_db() -> Value {
    policy(
        "deny-client-to-db",
        &format!(
            "{{selector: {{matchLabels: {{app: db}}}}, action: DENY, \
             rules: [{{from: [{{source: {{principals: [\"{CLIENT}\"]}}}}]}}]}}"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_times() {
        let a = log_secs("2026-12-02T23:59:59.900000Z  INFO x").expect("a time");
        let b = log_secs("2026-12-03T00:00:00.150000Z  INFO y").expect("a time");
        assert!((b - a - 0.25).abs() < 1e-6, "{}", b - a);
        let epoch = log_secs("1970-01-01T00:00:00Z").expect("the epoch");
        assert_eq!(epoch, 0.0);
        let leap = log_secs("2024-03-01T00:00:00Z").expect("a time")
            - log_secs("2024-02-28T00:00:00Z").expect("a time");
        assert_eq!(leap, 2.0 * 86_400.0);
        assert_eq!(log_secs("no time here"), None);
        let line = "2026-12-02T14:04:21.854511Z  INFO mesh_agent::discovery::file: state reloaded \
                    path=/x parse_ms=1.5 diff_ms=0.5 apply_us=1000 workloads=4";
        let took = reload_secs(line).expect("the reload's times");
        assert!((took - 0.003).abs() < 1e-9, "{took}");
    }
}
