//! The tables of `mesh-agent inspect`, made from the agent's JSON answers.

use serde_json::Value;

use super::cli::{Error, Output, What};

/// Columns aligned, two spaces apart, headers first.
fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.zip(&widths).enumerate() {
            if i + 1 == widths.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.trim_end().to_owned() + "\n"
    };
    let mut out = line(&mut headers.iter().copied());
    for row in rows {
        out.push_str(&line(&mut row.iter().map(String::as_str)));
    }
    out
}

/// A JSON value as a cell: strings as they are, lists comma-separated, null as `-`.
fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(items) if items.is_empty() => "-".into(),
        Value::Array(items) => items.iter().map(cell).collect::<Vec<_>>().join(","),
        Value::Object(map) if map.is_empty() => "-".into(),
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| format!("{k}={}", cell(v)))
            .collect::<Vec<_>>()
            .join(" "),
        other => other.to_string(),
    }
}

fn list(v: &Value) -> &[Value] {
    v.as_array().map_or(&[], Vec::as_slice)
}

/// Seconds as `1h2m`, `3m4s` or `5s`.
fn duration(secs: u64) -> String {
    match secs {
        s if s >= 3600 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        s if s >= 60 => format!("{}m{}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

pub fn from_dump(
    what: &What,
    dump: &Value,
    connections: Option<&Value>,
    output: Output,
) -> Result<String, Error> {
    let pick = |v: &Value| match output {
        Output::Json => Ok(serde_json::to_string_pretty(v).unwrap_or_default() + "\n"),
        Output::Table => Err(()),
    };
    Ok(match what {
        What::Workloads => pick(&dump["workloads"]).unwrap_or_else(|()| workloads(dump)),
        What::Services => pick(&dump["services"]).unwrap_or_else(|()| services(dump)),
        What::Policies => pick(&dump["policies"]).unwrap_or_else(|()| policies(dump)),
        What::Certs => pick(&dump["certificates"]).unwrap_or_else(|()| certs(dump)),
        What::Ebpf => {
            let ebpf = serde_json::json!({
                "programs": dump["ebpf"]["programs"],
                "maps": dump["ebpf"]["maps"],
                "links": list(&dump["workloads"]).iter()
                    .filter(|w| !list(&w["links"]).is_empty())
                    .map(|w| serde_json::json!({"workload": w["workload"], "links": w["links"]}))
                    .collect::<Vec<_>>(),
            });
            pick(&ebpf).unwrap_or_else(|()| ebpf_tables(&ebpf))
        }
        What::Workload { pod } => {
            let Some(w) = list(&dump["workloads"])
                .iter()
                .find(|w| w["workload"] == *pod)
            else {
                return Err(Error::Check(format!(
                    "no workload {pod} on node {}: `inspect workloads` lists this node's (each \
                     node's agent knows its own pods)",
                    cell(&dump["node"])
                )));
            };
            let conns: Vec<&Value> = connections
                .map(|c| list(&c["connections"]))
                .unwrap_or_default()
                .iter()
                .filter(|c| c["pod"] == *pod)
                .collect();
            let identity = w["identity"].as_str().unwrap_or_default();
            let cert = list(&dump["certificates"])
                .iter()
                .find(|c| c["identity"] == identity);
            match output {
                Output::Json => {
                    let v = serde_json::json!({
                        "workload": w,
                        "certificate": cert,
                        "connections": conns,
                    });
                    serde_json::to_string_pretty(&v).unwrap_or_default() + "\n"
                }
                Output::Table => workload(w, cert, &conns),
            }
        }
        What::Connections | What::Why { .. } | What::Check { .. } => String::new(),
    })
}

fn workloads(dump: &Value) -> String {
    let rows: Vec<Vec<String>> = list(&dump["workloads"])
        .iter()
        .map(|w| {
            vec![
                cell(&w["workload"]),
                cell(&w["ips"]),
                cell(&w["capture"]["state"]),
                cell(&w["policies"]),
                cell(&w["identity"]),
            ]
        })
        .collect();
    table(
        &["WORKLOAD", "ADDRESSES", "CAPTURE", "POLICIES", "IDENTITY"],
        &rows,
    )
}

fn services(dump: &Value) -> String {
    let mut rows = Vec::new();
    for s in list(&dump["services"]) {
        for p in list(&s["ports"]) {
            rows.push(vec![
                cell(&s["service"]),
                cell(&s["vips"]),
                format!("{}->{}", cell(&p["port"]), cell(&p["target_port"])),
                cell(&p["protocol"]),
                cell(&p["endpoints"]),
                cell(&s["waypoint"]),
            ]);
        }
    }
    table(
        &[
            "SERVICE",
            "ADDRESSES",
            "PORT",
            "PROTOCOL",
            "ENDPOINTS",
            "WAYPOINT",
        ],
        &rows,
    )
}

fn policies(dump: &Value) -> String {
    let rows: Vec<Vec<String>> = list(&dump["policies"])
        .iter()
        .map(|p| {
            let selects = match list(&p["targets"]) {
                [] => match cell(&p["selector"]) {
                    s if s == "-" => "every workload of its namespace".to_owned(),
                    s => s,
                },
                _ => cell(&p["targets"]),
            };
            let state = match &p["invalid"] {
                Value::Null => "ok".to_owned(),
                why => format!("INVALID (denies all): {}", cell(why)),
            };
            vec![
                cell(&p["policy"]),
                cell(&p["action"]),
                selects,
                cell(&p["rules"]),
                state,
            ]
        })
        .collect();
    table(&["POLICY", "ACTION", "SELECTS", "RULES", "STATE"], &rows)
}

fn certs(dump: &Value) -> String {
    let rows: Vec<Vec<String>> = list(&dump["certificates"])
        .iter()
        .map(|c| {
            vec![
                cell(&c["identity"]),
                if c["valid"] == true { "yes" } else { "NO" }.to_owned(),
                duration(c["expires_in_secs"].as_u64().unwrap_or(0)),
                cell(&c["serial"]),
                cell(&c["issuer"]),
            ]
        })
        .collect();
    table(
        &["IDENTITY", "VALID", "EXPIRES IN", "SERIAL", "ISSUER"],
        &rows,
    )
}

/// The columns of a connection.
const CONNECTION: [&str; 11] = [
    "POD",
    "DIR",
    "SRC",
    "DST",
    "PEER",
    "PEER IDENTITY",
    "VIA",
    "DECISION",
    "AGE",
    "SENT",
    "RECEIVED",
];

pub fn connections(conns: &Value) -> String {
    let rows: Vec<Vec<String>> = list(conns).iter().map(connection_row).collect();
    table(&CONNECTION, &rows)
}

fn connection_row(c: &Value) -> Vec<String> {
    let outbound = c["direction"] == "outbound";
    let (peer, peer_id) = if outbound {
        (&c["dst_workload"], &c["dst_identity"])
    } else {
        (&c["src_workload"], &c["src_identity"])
    };
    let decision = match (&c["decision"], &c["policy"]) {
        (Value::Null, _) => "-".to_owned(),
        (d, p) if *p == "-" => format!("{} (no policy)", cell(d)),
        (d, p) => format!("{} ({})", cell(d), cell(p)),
    };
    vec![
        cell(&c["pod"]),
        cell(&c["direction"]),
        cell(&c["src"]),
        cell(&c["dst"]),
        cell(peer),
        cell(peer_id),
        cell(&c["transport"]),
        decision,
        duration(c["age_ms"].as_u64().unwrap_or(0) / 1000),
        cell(&c["sent"]),
        cell(&c["received"]),
    ]
}

fn ebpf_tables(ebpf: &Value) -> String {
    let programs: Vec<Vec<String>> = list(&ebpf["programs"])
        .iter()
        .map(|p| vec![cell(&p["name"]), cell(&p["id"]), cell(&p["problem"])])
        .collect();
    let maps: Vec<Vec<String>> = list(&ebpf["maps"])
        .iter()
        .map(|m| {
            vec![
                cell(&m["name"]),
                cell(&m["id"]),
                cell(&m["entries"]),
                cell(&m["max_entries"]),
                cell(&m["problem"]),
            ]
        })
        .collect();
    let mut links = Vec::new();
    for w in list(&ebpf["links"]) {
        for l in list(&w["links"]) {
            links.push(link_row(Some(&w["workload"]), l));
        }
    }
    format!(
        "{}\n{}\n{}",
        table(&["PROGRAM", "ID", "PROBLEM"], &programs),
        table(&["MAP", "ID", "ENTRIES", "MAX", "PROBLEM"], &maps),
        table(&["WORKLOAD", "PROGRAM", "LINK", "RUNS", "STATE"], &links)
    )
}

fn link_row(workload: Option<&Value>, l: &Value) -> Vec<String> {
    let state = if l["attached"] == true {
        "attached".to_owned()
    } else {
        format!("NOT ATTACHED: {}", cell(&l["problem"]))
    };
    let mut row = vec![
        cell(&l["program"]),
        cell(&l["link_id"]),
        cell(&l["prog_id"]),
        state,
    ];
    if let Some(w) = workload {
        row.insert(0, cell(w));
    }
    row
}

fn workload(w: &Value, cert: Option<&Value>, conns: &[&Value]) -> String {
    let mut out = format!(
        "workload:  {}\naddresses: {}\ncapture:   {} ({})\nidentity:  {}\n",
        cell(&w["workload"]),
        cell(&w["ips"]),
        cell(&w["capture"]["state"]),
        cell(&w["capture"]["why"]),
        cell(&w["identity"]),
    );
    out.push_str(&match cert {
        Some(c) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let renew = c["renew_at"].as_u64().unwrap_or(0).saturating_sub(now);
            format!(
                "cert:      serial {}, expires in {}, renewed in {}, issued by {}\n",
                cell(&c["serial"]),
                duration(c["expires_in_secs"].as_u64().unwrap_or(0)),
                duration(renew),
                cell(&c["issuer"])
            )
        }
        None => "cert:      none held (minted at capture)\n".to_owned(),
    });
    out.push_str(&format!(
        "policies:  {}\n",
        match cell(&w["policies"]) {
            s if s == "-" => "none select it: every connection is allowed".to_owned(),
            s => s,
        }
    ));
    let links: Vec<Vec<String>> = list(&w["links"])
        .iter()
        .map(|l| link_row(None, l))
        .collect();
    if !links.is_empty() {
        out.push('\n');
        out.push_str(&table(&["PROGRAM", "LINK", "RUNS", "STATE"], &links));
    }
    out.push('\n');
    if conns.is_empty() {
        out.push_str("no connections now\n");
    } else {
        let rows: Vec<Vec<String>> = conns.iter().map(|c| connection_row(c)).collect();
        out.push_str(&table(&CONNECTION, &rows));
    }
    out
}

pub fn why(a: &Value) -> String {
    let mut out = format!(
        "{}: {}\n\n",
        cell(&a["verdict"]).to_uppercase(),
        cell(&a["summary"])
    );
    let end = |e: &Value| {
        let at = match &e["port"] {
            Value::Null => cell(&e["address"]),
            port => format!("{}:{}", cell(&e["address"]), cell(port)),
        };
        format!(
            "{} {} at {at}, node {}, identity {}, {}",
            cell(&e["kind"]),
            cell(&e["name"]),
            cell(&e["node"]),
            cell(&e["identity"]),
            if e["meshed"] == true {
                "in the mesh"
            } else {
                "not in the mesh"
            }
        )
    };
    out.push_str(&format!("source:      {}\n", end(&a["source"])));
    out.push_str(&format!("destination: {}\n", end(&a["destination"])));
    out.push_str(&format!(
        "capture:     {}: {}\n",
        if a["capture"]["ok"] == true {
            "yes"
        } else {
            "no"
        },
        cell(&a["capture"]["why"])
    ));
    if let Some(r) = a.get("route").filter(|r| !r.is_null()) {
        let to = match (&r["endpoint"], &r["peer"]) {
            (Value::Null, _) => String::new(),
            (e, Value::Null) => format!(" to {}", cell(e)),
            (e, p) => format!(
                " to {} ({}, which must prove {})",
                cell(e),
                cell(p),
                cell(&r["peer_identity"])
            ),
        };
        let service = match &r["service"] {
            Value::Null => String::new(),
            s => format!(" {}", cell(s)),
        };
        out.push_str(&format!(
            "route:       {} via {}{service}{to}: {}\n",
            cell(&r["transport"]),
            cell(&r["via"]),
            cell(&r["why"])
        ));
    }
    if let Some(p) = a.get("policy").filter(|p| !p.is_null()) {
        let by = match (&p["policy"], &p["rule"]) {
            (Value::Null, _) => "no policy".to_owned(),
            (policy, Value::Null) => format!("policy {}", cell(policy)),
            (policy, rule) => format!("policy {} rule {}", cell(policy), cell(rule)),
        };
        let seen = match &p["identity"] {
            Value::Null => format!("plaintext from {}", cell(&p["source_address"])),
            id => format!("{} from {}", cell(id), cell(&p["source_address"])),
        };
        out.push_str(&format!(
            "policy:      {} at {} by {by} ({}), seeing {seen}; in force: {}\n",
            if p["allowed"] == true {
                "allow"
            } else {
                "deny"
            },
            cell(&p["workload"]),
            cell(&p["reason"]),
            match cell(&p["in_force"]) {
                s if s == "-" => "none".to_owned(),
                s => s,
            }
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_their_columns() {
        let t = table(
            &["A", "LONGER"],
            &[
                vec!["wide cell".into(), "x".into()],
                vec!["y".into(), "z".into()],
            ],
        );
        assert_eq!(t, "A          LONGER\nwide cell  x\ny          z\n");
    }

    #[test]
    fn cells_read_json_as_an_operator_would() {
        assert_eq!(cell(&serde_json::json!(null)), "-");
        assert_eq!(cell(&serde_json::json!(["a", "b"])), "a,b");
        assert_eq!(cell(&serde_json::json!({"allow": ["p"]})), "allow=p");
        assert_eq!(duration(3725), "1h2m");
        assert_eq!(duration(61), "1m1s");
    }
}
