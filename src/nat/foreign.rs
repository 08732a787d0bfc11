//! Host ports other DNAT rules on the host already forward: CNI portmap's (nerdctl's
//! `-p`, in iptables or in its nftables backend), Docker's, an operator's own. A host
//! port one of them forwards is never handed out: which of two DNAT rules for one port
//! wins is undefined, so either container would lose its traffic.
//!
//! Read from the kernel's rules over netlink (native nftables and iptables-nft, whose
//! `--dport` matches are native expressions; `scan_rules`), falling back to `nft
//! --terse --json list ruleset` when a DNAT rule matches its port through a set (whose
//! elements the rule dump does not carry) or netlink fails; and, when the legacy
//! iptables `nat` tables are loaded, from `iptables-legacy-save -t nat` (and ip6). Only
//! rules that match a literal TCP destination port (one, a set or a range) and DNAT or
//! redirect count: the product's own rule looks the port up in a map and never does.
//!
//! Why netlink first: this runs on every proxied `create`, under the host-wide lock.
//! `nft --json list ruleset` costs an exec and libnftables' whole-ruleset JSON: 4.8 ms
//! on an empty host, 23 ms with the masquerade chains of 200 `ctr run --cni`
//! containers (measured, docs/BENCHMARKS.md); the rule dump parsed here costs a
//! fraction of a millisecond on the same rules.

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

/// What the kernel's rules (`sys::nfnetlink::dump_rules`) say about DNAT ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleScan {
    /// The TCP destination ports of every DNAT/redirect rule (complete).
    Ports(BTreeSet<u16>),
    /// A DNAT/redirect rule compares its destination port with a set: only `nft`
    /// lists the set's elements.
    NeedsNft,
}

// linux/netfilter/nf_tables.h: attributes of a rule and of its expressions.
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
const NFT_META_L4PROTO: u32 = 16;
const NFT_NAT_DNAT: u32 = 1;
const NFT_CMP_EQ: u32 = 0;
const NFT_CMP_LTE: u32 = 3;
const NFT_CMP_GTE: u32 = 5;
const NFT_RANGE_EQ: u32 = 0;
const NFT_LOOKUP_F_INV: u32 = 1;
const IPPROTO_TCP: u8 = 6;

/// What an expression loaded into a register, as far as DNAT ports care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Load {
    /// The transport header's bytes 2..4: the destination port (TCP, UDP, SCTP...).
    Dport,
    /// The layer-4 protocol (`meta l4proto`, IPv4 protocol, IPv6 next header).
    L4proto,
    Other,
}

/// The register attribute of expressions that write one, other than payload and meta
/// (which are read for what they load): kept so a register reused for something
/// else is not taken for the port.
fn dreg_attr(name: &str) -> Option<u16> {
    match name {
        "immediate" | "ct" | "exthdr" | "fib" | "numgen" | "hash" | "rt" | "socket" | "osf"
        | "xfrm" | "tunnel" | "inner" | "last" => Some(1),
        "bitwise" | "byteorder" => Some(2),
        "lookup" => Some(3),
        _ => None,
    }
}

/// One expression of a rule: its name and its data's attributes.
type Expr<'a> = (&'a [u8], Vec<(u16, &'a [u8])>);

/// Attribute `t` of a parsed attribute list.
fn get<'a>(d: &[(u16, &'a [u8])], t: u16) -> Option<&'a [u8]> {
    d.iter().find(|(x, _)| *x == t).map(|(_, v)| *v)
}

/// The `NFTA_DATA_VALUE` inside nested attribute `t` (a cmp's or range's operand).
fn value(d: &[(u16, &[u8])], t: u16) -> Option<Vec<u8>> {
    let nested = crate::sys::nfnetlink::attrs(get(d, t)?);
    get(&nested, NFTA_DATA_VALUE).map(<[u8]>::to_vec)
}

/// A NUL-terminated name attribute's bytes.
fn name_of(b: &[u8]) -> &[u8] {
    b.split(|c| *c == 0).next().unwrap_or(&[])
}

/// The DNAT/redirect ports of dumped rules (each the attributes after nfgenmsg), as
/// `parse_nft_json` reads them from `nft -j`: a rule counts when it has a DNAT
/// (`nat` of type DNAT, `redir`, or iptables-nft's `DNAT`/`REDIRECT` target) and
/// compares the destination port for equality with a value or a range; a rule that
/// tests another layer-4 protocol than TCP (`udp dport`, `-p udp`) does not.
pub fn scan_rules(rules: &[Vec<u8>]) -> RuleScan {
    use crate::sys::nfnetlink::attrs;
    let be32 = |v: Option<&[u8]>| {
        v.and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(u32::from_be_bytes)
    };
    let mut out = BTreeSet::new();
    for rule in rules {
        let Some((_, list)) = attrs(rule)
            .into_iter()
            .find(|(t, _)| *t == NFTA_RULE_EXPRESSIONS)
        else {
            continue;
        };
        let exprs: Vec<Expr<'_>> = attrs(list)
            .into_iter()
            .map(|(_, e)| {
                let a = attrs(e);
                let name = a
                    .iter()
                    .find(|(t, _)| *t == NFTA_EXPR_NAME)
                    .map(|(_, n)| name_of(n))
                    .unwrap_or(&[]);
                let data = a
                    .iter()
                    .find(|(t, _)| *t == NFTA_EXPR_DATA)
                    .map(|(_, d)| attrs(d))
                    .unwrap_or_default();
                (name, data)
            })
            .collect();
        let dnat = exprs.iter().any(|(name, d)| match *name {
            b"nat" => be32(get(d, 1)) == Some(NFT_NAT_DNAT),
            b"redir" => true,
            b"target" => matches!(
                get(d, 1).map(|n| n.split(|b| *b == 0).next().unwrap_or(&[])),
                Some(b"DNAT" | b"REDIRECT")
            ),
            _ => false,
        });
        if !dnat {
            continue;
        }
        let mut regs: std::collections::HashMap<u32, Load> = Default::default();
        let mut ports = BTreeSet::new();
        let (mut not_tcp, mut via_set) = (false, false);
        let (mut low, mut high) = (None, None);
        for (name, d) in &exprs {
            let reg = |t| be32(get(d, t));
            match *name {
                b"payload" => {
                    if let Some(r) = reg(1) {
                        let (base, off, len) = (reg(2), reg(3), reg(4));
                        let load = match (base, off, len) {
                            (Some(NFT_PAYLOAD_TRANSPORT_HEADER), Some(2), Some(2)) => Load::Dport,
                            (Some(NFT_PAYLOAD_NETWORK_HEADER), Some(9 | 6), Some(1)) => {
                                Load::L4proto
                            }
                            _ => Load::Other,
                        };
                        regs.insert(r, load);
                    }
                }
                b"meta" => {
                    if let Some(r) = reg(1) {
                        let load = if reg(2) == Some(NFT_META_L4PROTO) {
                            Load::L4proto
                        } else {
                            Load::Other
                        };
                        regs.insert(r, load);
                    }
                }
                b"cmp" => match (reg(1).and_then(|r| regs.get(&r)), reg(2), value(d, 3)) {
                    (Some(Load::Dport), Some(NFT_CMP_EQ), Some(v)) if v.len() == 2 => {
                        ports.insert(u16::from_be_bytes([v[0], v[1]]));
                    }
                    // nft writes `dport A-B` as two comparisons, gte then lte.
                    (Some(Load::Dport), Some(NFT_CMP_GTE), Some(v)) if v.len() == 2 => {
                        low = Some(u16::from_be_bytes([v[0], v[1]]));
                    }
                    (Some(Load::Dport), Some(NFT_CMP_LTE), Some(v)) if v.len() == 2 => {
                        high = Some(u16::from_be_bytes([v[0], v[1]]));
                    }
                    (Some(Load::L4proto), Some(NFT_CMP_EQ), Some(v)) if v != [IPPROTO_TCP] => {
                        not_tcp = true;
                    }
                    _ => {}
                },
                b"range" => {
                    if let (Some(Load::Dport), Some(NFT_RANGE_EQ), Some(a), Some(b)) = (
                        reg(1).and_then(|r| regs.get(&r)),
                        reg(2),
                        value(d, 3),
                        value(d, 4),
                    ) && a.len() == 2
                        && b.len() == 2
                    {
                        let (a, b) = (
                            u16::from_be_bytes([a[0], a[1]]),
                            u16::from_be_bytes([b[0], b[1]]),
                        );
                        if a <= b {
                            ports.extend(a..=b);
                        }
                    }
                }
                _ => {}
            }
            if *name == b"lookup" {
                let membership = get(d, 3).is_none();
                let inverted = reg(5).is_some_and(|f| f & NFT_LOOKUP_F_INV != 0);
                if membership
                    && !inverted
                    && reg(2).and_then(|r| regs.get(&r)) == Some(&Load::Dport)
                {
                    via_set = true;
                }
            }
            if let Some(t) = std::str::from_utf8(name).ok().and_then(dreg_attr)
                && let Some(r) = reg(t)
            {
                regs.insert(r, Load::Other);
            }
        }
        if not_tcp {
            continue;
        }
        if let (Some(a), Some(b)) = (low, high)
            && a <= b
        {
            ports.extend(a..=b);
        }
        if via_set {
            return RuleScan::NeedsNft;
        }
        out.extend(ports);
    }
    RuleScan::Ports(out)
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
    let scanned = crate::sys::nfnetlink::dump_rules().map(|r| scan_rules(&r));
    let mut out = match scanned {
        Ok(RuleScan::Ports(p)) => p,
        Ok(RuleScan::NeedsNft) | Err(_) => run(nft, &["--terse", "--json", "list", "ruleset"])
            .map(|t| parse_nft_json(&t))
            .unwrap_or_default(),
    };
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

    /// One netlink attribute (payload padded to 4 bytes).
    fn nla(ty: u16, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&u16::try_from(4 + payload.len()).unwrap().to_ne_bytes());
        v.extend_from_slice(&ty.to_ne_bytes());
        v.extend_from_slice(payload);
        v.resize(v.len().div_ceil(4) * 4, 0);
        v
    }
    fn be(x: u32) -> Vec<u8> {
        x.to_be_bytes().to_vec()
    }
    fn expr(name: &str, data: &[Vec<u8>]) -> Vec<u8> {
        let mut n = name.as_bytes().to_vec();
        n.push(0);
        nla(1, &[nla(1, &n), nla(2, &data.concat())].concat())
    }
    fn rule(exprs: &[Vec<u8>]) -> Vec<u8> {
        [nla(1, b"t\0"), nla(2, b"c\0"), nla(4, &exprs.concat())].concat()
    }
    fn data(v: &[u8]) -> Vec<u8> {
        nla(1, v)
    }
    fn dport(reg: u32) -> Vec<u8> {
        expr(
            "payload",
            &[
                nla(1, &be(reg)),
                nla(2, &be(2)),
                nla(3, &be(2)),
                nla(4, &be(2)),
            ],
        )
    }
    fn cmp(reg: u32, op: u32, v: &[u8]) -> Vec<u8> {
        expr(
            "cmp",
            &[nla(1, &be(reg)), nla(2, &be(op)), nla(3, &data(v))],
        )
    }
    fn l4proto(reg: u32) -> Vec<u8> {
        expr("meta", &[nla(1, &be(reg)), nla(2, &be(16))])
    }
    fn dnat() -> Vec<u8> {
        expr("nat", &[nla(1, &be(1))])
    }

    #[test]
    fn dnat_ports_of_dumped_rules() {
        let port = |p: u16| p.to_be_bytes();
        let rules = [
            // tcp dport 17777 dnat
            rule(&[
                l4proto(1),
                cmp(1, 0, &[6]),
                dport(1),
                cmp(1, 0, &port(17777)),
                dnat(),
            ]),
            // dport 17790-17791 (gte, lte) redirect
            rule(&[
                dport(1),
                cmp(1, 5, &port(17790)),
                cmp(1, 3, &port(17791)),
                expr("redir", &[]),
            ]),
            // udp dport 5353 dnat: not TCP
            rule(&[
                l4proto(1),
                cmp(1, 0, &[17]),
                dport(1),
                cmp(1, 0, &port(5353)),
                dnat(),
            ]),
            // tcp dport 17800 accept: no DNAT
            rule(&[
                dport(1),
                cmp(1, 0, &port(17800)),
                expr("immediate", &[nla(1, &be(0))]),
            ]),
            // dport != 17801
            rule(&[dport(1), cmp(1, 1, &port(17801)), dnat()]),
            // a register reused: the comparison is of what immediate put there
            rule(&[
                dport(1),
                expr("immediate", &[nla(1, &be(1))]),
                cmp(1, 0, &port(17802)),
                dnat(),
            ]),
            // SNAT with a dport: not DNAT
            rule(&[
                dport(1),
                cmp(1, 0, &port(17803)),
                expr("nat", &[nla(1, &be(0))]),
            ]),
            // iptables-nft's target, in a 32-bit register
            rule(&[
                dport(9),
                cmp(9, 0, &port(17804)),
                expr("target", &[nla(1, b"DNAT\0")]),
            ]),
            // the product's own: the port is a map's key (lookup with a dreg)
            rule(&[
                l4proto(9),
                dport(10),
                expr(
                    "lookup",
                    &[nla(1, b"ports\0"), nla(2, &be(10)), nla(3, &be(1))],
                ),
                dnat(),
            ]),
            // `dport != { ... }`: an inverted membership test is no list of ports
            rule(&[
                dport(1),
                expr(
                    "lookup",
                    &[nla(1, b"__set0\0"), nla(2, &be(1)), nla(5, &be(1))],
                ),
                dnat(),
            ]),
            // a rule without expressions, garbage
            rule(&[]),
            vec![1, 2, 3],
        ];
        assert_eq!(
            scan_rules(&rules),
            RuleScan::Ports([17777, 17790, 17791, 17804].into())
        );
        // `dport { ... } dnat`: the set's elements are not in the dump.
        let set = rule(&[
            dport(1),
            expr("lookup", &[nla(1, b"__set0\0"), nla(2, &be(1))]),
            dnat(),
        ]);
        assert_eq!(scan_rules(&[rules[0].clone(), set]), RuleScan::NeedsNft);
        assert_eq!(scan_rules(&[]), RuleScan::Ports(BTreeSet::new()));
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
