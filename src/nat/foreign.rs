//! Host ports other DNAT rules on the host already forward: CNI portmap's (nerdctl's
//! `-p`, in iptables or in its nftables backend), Docker's, an operator's own. A host
//! port one of them forwards is never handed out: which of two DNAT rules for one port
//! wins is undefined, so either container would lose its traffic.
//!
//! Read from `nft --terse --json list ruleset` (native nftables and iptables-nft,
//! whose `--dport` matches are native expressions; `--terse` leaves out set elements,
//! so the product's own map of thousands of ports costs nothing) and, when the legacy
//! iptables `nat` tables are loaded, from `iptables-legacy-save -t nat` (and ip6). Only
//! rules that match a literal TCP destination port (one, a set or a range) and DNAT or
//! redirect count: the product's own rule looks the port up in a map and never does.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::Value;

/// TCP destination ports of the DNAT/redirect rules in `nft -j` output.
pub fn parse_nft_json(text: &str) -> BTreeSet<u16> {
    let mut out = BTreeSet::new();
    let Ok(v) = serde_json::from_str::<Value>(text) else {
        return out;
    };
    let Some(items) = v.get("nftables").and_then(Value::as_array) else {
        return out;
    };
    for rule in items.iter().filter_map(|i| i.get("rule")) {
        let Some(expr) = rule.get("expr").and_then(Value::as_array) else {
            continue;
        };
        if !expr.iter().any(is_dnat) {
            continue;
        }
        for m in expr.iter().filter_map(|e| e.get("match")) {
            let left = &m["left"]["payload"];
            let proto = left["protocol"].as_str();
            if left["field"] != "dport" || !matches!(proto, Some("tcp" | "th")) || m["op"] != "==" {
                continue;
            }
            ports_of(&m["right"], &mut out);
        }
    }
    out
}

fn is_dnat(e: &Value) -> bool {
    e.get("dnat").is_some()
        || e.get("redirect").is_some()
        || e.get("xt").is_some_and(|x| {
            x["type"] == "target" && matches!(x["name"].as_str(), Some("DNAT" | "REDIRECT"))
        })
}

/// A port, `{"set": [..]}` of ports or ranges, or `{"range": [a, b]}`.
fn ports_of(v: &Value, out: &mut BTreeSet<u16>) {
    if let Some(p) = v.as_u64().and_then(|p| u16::try_from(p).ok()) {
        out.insert(p);
    } else if let Some(set) = v.get("set").and_then(Value::as_array) {
        set.iter().for_each(|x| ports_of(x, out));
    } else if let Some([a, b]) = v.get("range").and_then(Value::as_array).map(Vec::as_slice)
        && let (Some(a), Some(b)) = (a.as_u64(), b.as_u64())
    {
        let port = |x: u64| u16::try_from(x.min(65535)).unwrap_or(u16::MAX);
        out.extend(port(a)..=port(b));
    }
}

/// TCP destination ports of the `-j DNAT` / `-j REDIRECT` rules in `iptables-save`
/// output: `--dport N`, `--dport A:B`, `--dports A,B:C`.
pub fn parse_iptables_save(text: &str) -> BTreeSet<u16> {
    let mut out = BTreeSet::new();
    for line in text.lines().filter(|l| l.starts_with("-A ")) {
        let words: Vec<&str> = line.split_whitespace().collect();
        let target = words.windows(2).find(|w| w[0] == "-j").map(|w| w[1]);
        if !matches!(target, Some("DNAT" | "REDIRECT")) {
            continue;
        }
        let tcp = words.windows(2).any(|w| w[0] == "-p" && w[1] == "tcp");
        if !tcp {
            continue;
        }
        for w in words.windows(2) {
            if w[0] == "--dport" || w[0] == "--dports" || w[0] == "--destination-port" {
                for part in w[1].split(',') {
                    let mut ends = part.splitn(2, ':').map(|p| p.parse::<u16>().ok());
                    match (ends.next().flatten(), ends.next()) {
                        (Some(a), None) => {
                            out.insert(a);
                        }
                        (Some(a), Some(Some(b))) if a <= b => out.extend(a..=b),
                        _ => {}
                    }
                }
            }
        }
    }
    out
}

/// Every TCP host port a DNAT or redirect rule on the host names. Tools that are
/// missing or fail add nothing: the product's own records and the host's listeners
/// still guard the pool.
pub fn host_dnat_ports(nft: &Path) -> BTreeSet<u16> {
    let mut out = run(nft, &["--terse", "--json", "list", "ruleset"])
        .map(|t| parse_nft_json(&t))
        .unwrap_or_default();
    for (names, tools) in [
        (
            "/proc/net/ip_tables_names",
            ["iptables-legacy-save", "iptables-save"],
        ),
        (
            "/proc/net/ip6_tables_names",
            ["ip6tables-legacy-save", "ip6tables-save"],
        ),
    ] {
        let loaded =
            std::fs::read_to_string(names).is_ok_and(|t| t.lines().any(|l| l.trim() == "nat"));
        if !loaded {
            continue;
        }
        if let Some(tool) = tools
            .iter()
            .map(|t| super::find_tool(t))
            .find(|p| p.is_file())
            && let Some(t) = run(&tool, &["-t", "nat"])
        {
            out.extend(parse_iptables_save(&t));
        }
    }
    out
}

fn run(tool: &Path, args: &[&str]) -> Option<String> {
    let o = Command::new(tool)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As nft 1.0.6 prints iptables-nft's portmap rules, native ones, the product's own.
    #[test]
    fn dnat_ports_of_nft_json() {
        let text = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
          {"table": {"family": "ip", "name": "nat", "handle": 1}},
          {"rule": {"family": "ip", "table": "nat", "chain": "CNI-DN-1", "handle": 3, "expr": [
            {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 17777}},
            {"counter": {"packets": 0, "bytes": 0}}, {"xt": {"type": "target", "name": "DNAT"}}]}},
          {"rule": {"family": "ip", "table": "nat", "chain": "CNI-HOSTPORT-DNAT", "handle": 4, "expr": [
            {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}},
            {"xt": {"type": "match", "name": "multiport"}}, {"jump": {"target": "CNI-DN-1"}}]}},
          {"rule": {"family": "ip", "table": "t", "chain": "pre", "handle": 5, "expr": [
            {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": {"set": [17780, {"range": [17790, 17791]}]}}},
            {"dnat": {"addr": "198.51.100.2", "port": 80}}]}},
          {"rule": {"family": "ip6", "table": "t", "chain": "pre", "handle": 6, "expr": [
            {"match": {"op": "==", "left": {"payload": {"protocol": "th", "field": "dport"}}, "right": {"range": [17782, 17783]}}},
            {"redirect": {"port": 80}}]}},
          {"rule": {"family": "ip", "table": "t", "chain": "pre", "handle": 7, "expr": [
            {"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}}, "right": 5353}},
            {"dnat": {"addr": "198.51.100.2"}}]}},
          {"rule": {"family": "ip", "table": "t", "chain": "in", "handle": 8, "expr": [
            {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 17800}},
            {"accept": null}]}},
          {"rule": {"family": "ip", "table": "t", "chain": "in", "handle": 9, "expr": [
            {"match": {"op": "!=", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 17801}},
            {"dnat": {"addr": "198.51.100.2"}}]}},
          {"rule": {"family": "ip", "table": "envoy_sidecar", "chain": "prerouting", "handle": 10, "expr": [
            {"match": {"op": "==", "left": {"fib": {"result": "type", "flags": ["daddr"]}}, "right": "local"}},
            {"dnat": {"family": "ip", "addr": {"map": {"key": {"concat": [{"meta": {"key": "l4proto"}}, {"payload": {"protocol": "th", "field": "dport"}}]}, "data": "@ports"}}}}]}}
        ]}"#;
        let got: Vec<u16> = parse_nft_json(text).into_iter().collect();
        assert_eq!(got, [17777, 17780, 17782, 17783, 17790, 17791]);
        assert!(parse_nft_json("not json").is_empty());
        assert!(parse_nft_json("{}").is_empty());
    }

    #[test]
    fn dnat_ports_of_iptables_save() {
        let text = "*nat\n:PREROUTING ACCEPT [0:0]\n\
            -A PREROUTING -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT\n\
            -A CNI-HOSTPORT-DNAT -p tcp -m comment --comment \"x\" -m multiport --dports 8080,9000:9001 -j CNI-DN-1\n\
            -A CNI-DN-1 -p tcp -m tcp --dport 8080 -j DNAT --to-destination 10.4.0.2:80\n\
            -A CNI-DN-1 -p tcp -m multiport --dports 9000:9001,9005 -j DNAT --to-destination 10.4.0.2:90\n\
            -A CNI-DN-1 -p udp -m udp --dport 5353 -j DNAT --to-destination 10.4.0.2:53\n\
            -A OUTPUT -p tcp -m tcp --dport 7000 -j REDIRECT --to-ports 70\n\
            -A POSTROUTING -p tcp -m tcp --dport 6000 -j MASQUERADE\n\
            -A X -p tcp --dport 9:1 -j DNAT --to-destination 10.4.0.2\n\
            COMMIT\n";
        let got: Vec<u16> = parse_iptables_save(text).into_iter().collect();
        assert_eq!(got, [7000, 8080, 9000, 9001, 9005]);
    }
}
