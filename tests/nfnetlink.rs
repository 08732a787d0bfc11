//! `sys::nfnetlink` against the real kernel, each test in private network namespaces
//! of its own (`es-nfnl-<pid>-<test>-*`) with a table of its own: the host's
//! `envoy_sidecar` table and conntrack entries are never touched.
//!
//! What is checked is what `nft add element` / `nft delete element` / `conntrack -D
//! --reply-src` do today, so the NAT hot path can use netlink instead of spawning them.

mod common;

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::*;
use envoy_sidecar::nat::{self, Mapping, Refusal};
use envoy_sidecar::sys::netns;
use envoy_sidecar::sys::nfnetlink::{self, ElemOp, NFPROTO_IPV4};

const TABLE: &str = "es_nfnl_test";
const MAP: &str = "ports";

/// Three namespaces: `h` ("the host", holding the table and the DNAT rule), `c` (a
/// client on 10.77.1.2, reaching h at 10.77.1.1) and `s` (a server on 10.77.2.2 behind
/// h's 10.77.2.1). All removed on drop, with the processes started in them.
struct Lab {
    prefix: String,
    children: Vec<Child>,
}

const H_CLIENT_SIDE: &str = "10.77.1.1";
const CLIENT: &str = "10.77.1.2";
const SERVER: &str = "10.77.2.2";

impl Lab {
    fn new(test: &str) -> Lab {
        let prefix = format!("es-nfnl-{}-{test}", std::process::id());
        let lab = Lab {
            prefix,
            children: Vec::new(),
        };
        for n in ["h", "c", "s"] {
            let name = lab.ns(n);
            let _ = Command::new("ip").args(["netns", "del", &name]).output();
            sh(&format!(
                "ip netns add {name} && ip -n {name} link set lo up"
            ));
        }
        let (h, c, s) = (lab.ns("h"), lab.ns("c"), lab.ns("s"));
        sh(&format!(
            "ip -n {h} link add hc type veth peer name eth0 netns {c} && \
             ip -n {h} link add hs type veth peer name eth0 netns {s} && \
             ip -n {h} addr add {H_CLIENT_SIDE}/30 dev hc && ip -n {h} link set hc up && \
             ip -n {h} addr add 10.77.2.1/30 dev hs && ip -n {h} link set hs up && \
             ip -n {c} addr add {CLIENT}/30 dev eth0 && ip -n {c} link set eth0 up && \
             ip -n {c} route add default via {H_CLIENT_SIDE} && \
             ip -n {s} addr add {SERVER}/30 dev eth0 && ip -n {s} link set eth0 up && \
             ip -n {s} route add default via 10.77.2.1 && \
             ip netns exec {h} sysctl -qw net.ipv4.ip_forward=1"
        ));
        // The product's skeleton, under our table name.
        lab.nft_script(&nat::skeleton().replace(nat::TABLE, TABLE));
        lab
    }

    /// `nft -f -` in h with `script`; it must succeed.
    fn nft_script(&self, script: &str) {
        let mut nft = Command::new("ip")
            .args(["netns", "exec", &self.ns("h"), "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        nft.stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        assert!(nft.wait().unwrap().success(), "nft -f: {script}");
    }

    fn ns(&self, n: &str) -> String {
        format!("{}-{n}", self.prefix)
    }

    /// Run `f` on a thread inside namespace `n` (netlink sockets belong to it).
    fn run_in<T: Send + 'static>(&self, n: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        let ns = File::open(format!("/var/run/netns/{}", self.ns(n))).unwrap();
        netns::run_in(&ns, f).unwrap()
    }

    fn exec(&self, n: &str, cmd: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.ns(n)])
            .args(cmd)
            .output()
            .unwrap()
    }

    /// A process in namespace `n`, stdin kept open (`ip netns exec` execs it: the pid
    /// is the process's own); killed on drop.
    fn spawn(&mut self, n: &str, cmd: &[&str]) {
        let c = Command::new("ip")
            .args(["netns", "exec", &self.ns(n)])
            .args(cmd)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.children.push(c);
    }

    fn nft(&self, args: &[&str]) -> Output {
        let mut cmd = vec!["nft"];
        cmd.extend_from_slice(args);
        self.exec("h", &cmd)
    }

    /// The map as nft lists it, parsed by the product's parser.
    fn listed(&self) -> Vec<Mapping> {
        let o = self.nft(&["-j", "list", "map", "ip", TABLE, MAP]);
        assert!(o.status.success(), "{}", text(&o));
        nat::parse_listing(&String::from_utf8_lossy(&o.stdout)).unwrap()
    }

    fn change(&self, op: ElemOp, table: &str, maps: &[Mapping]) -> std::io::Result<()> {
        let (table, elems) = (table.to_string(), nat::netlink_elements(maps));
        self.run_in("h", move || {
            nfnetlink::change_set_elements(op, NFPROTO_IPV4, &table, MAP, &elems)
        })
    }

    /// `conntrack -L --reply-src ip` in h: one line per entry.
    fn tracked(&self, ip: &str) -> usize {
        let o = self.exec("h", &["conntrack", "-L", "--reply-src", ip]);
        String::from_utf8_lossy(&o.stdout).lines().count()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for n in ["h", "c", "s"] {
            // Deleting a namespace destroys its veth ends with it.
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(n)])
                .output();
        }
    }
}

fn m(host_port: u16, last: u8, container_port: u16) -> Mapping {
    Mapping {
        host_port,
        container_ip: IpAddr::V4(Ipv4Addr::new(10, 77, 2, last)),
        container_port,
        host_ip: None,
    }
}

fn errno(r: std::io::Result<()>) -> Option<i32> {
    r.err().and_then(|e| e.raw_os_error())
}

#[test]
fn elements_added_over_netlink_are_what_nft_lists_and_back() {
    if !can_run_without_containerd("elements_added_over_netlink_are_what_nft_lists_and_back") {
        return;
    }
    let lab = Lab::new("rt");
    let maps = [m(61008, 5, 8080), m(61011, 5, 61001), m(65535, 255, 1)];
    lab.change(ElemOp::Add, TABLE, &maps).unwrap();
    let mut want = maps.to_vec();
    want.sort();
    assert_eq!(lab.listed(), want);
    let o = lab.nft(&["list", "map", "ip", TABLE, MAP]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("tcp . 61008 : 10.77.2.5 . 8080"),
        "{}",
        text(&o)
    );

    // The reverse: nft adds, netlink deletes (keys only).
    let o = lab.nft(&[
        "add",
        "element",
        "ip",
        TABLE,
        MAP,
        "{ tcp . 62000 : 10.77.2.9 . 9090 }",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    lab.change(ElemOp::Delete, TABLE, &[m(62000, 9, 9090), maps[0]])
        .unwrap();
    assert_eq!(lab.listed(), vec![maps[1], maps[2]]);
}

#[test]
fn identical_re_add_is_fine_and_a_conflict_applies_nothing() {
    if !can_run_without_containerd("identical_re_add_is_fine_and_a_conflict_applies_nothing") {
        return;
    }
    let lab = Lab::new("add");
    let a = [m(61008, 5, 8080), m(61011, 5, 61001)];
    lab.change(ElemOp::Add, TABLE, &a).unwrap();
    // A repeated hook: the same elements again.
    lab.change(ElemOp::Add, TABLE, &a).unwrap();
    lab.change(ElemOp::Add, TABLE, &a[..1]).unwrap();
    assert_eq!(lab.listed(), a.to_vec());

    // Another container's IP on a taken host port, with a new port in the same batch.
    let r = lab.change(ElemOp::Add, TABLE, &[m(61020, 6, 80), m(61008, 6, 8080)]);
    let e = r.unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EEXIST), "{e}");
    assert_eq!(Refusal::of(&e), Refusal::Exists);
    assert_eq!(lab.listed(), a.to_vec(), "nothing of the batch applied");
    // Same host port, same IP, other container port: also another value.
    assert_eq!(
        errno(lab.change(ElemOp::Add, TABLE, &[m(61011, 5, 1)])),
        Some(libc::EEXIST)
    );
    assert_eq!(lab.listed(), a.to_vec());
}

#[test]
fn deleting_an_absent_element_applies_nothing_and_missing_tables_are_enoent() {
    if !can_run_without_containerd(
        "deleting_an_absent_element_applies_nothing_and_missing_tables_are_enoent",
    ) {
        return;
    }
    let lab = Lab::new("del");
    let a = [m(61008, 5, 8080), m(61011, 5, 61001)];
    lab.change(ElemOp::Add, TABLE, &a).unwrap();
    let e = lab
        .change(ElemOp::Delete, TABLE, &[a[0], m(61099, 5, 1)])
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}");
    assert_eq!(Refusal::of(&e), Refusal::Missing);
    assert_eq!(lab.listed(), a.to_vec(), "the present one stays");
    lab.change(ElemOp::Delete, TABLE, &a).unwrap();
    assert!(lab.listed().is_empty());

    for op in [ElemOp::Add, ElemOp::Delete] {
        assert_eq!(
            errno(lab.change(op, "es_nfnl_no_such_table", &a)),
            Some(libc::ENOENT),
            "{op:?} to a missing table"
        );
        let elems = nat::netlink_elements(&a);
        let r = lab.run_in("h", move || {
            nfnetlink::change_set_elements(op, NFPROTO_IPV4, TABLE, "no_such_map", &elems)
        });
        assert_eq!(errno(r), Some(libc::ENOENT), "{op:?} to a missing map");
    }
}

#[test]
fn conntrack_entries_replied_from_an_address_are_deleted_and_others_kept() {
    if !can_run_without_containerd(
        "conntrack_entries_replied_from_an_address_are_deleted_and_others_kept",
    ) {
        return;
    }
    let mut lab = Lab::new("ct");
    lab.change(ElemOp::Add, TABLE, &[m(61001, 2, 8080)])
        .unwrap();
    // A server behind the mapping and one in h itself (not DNAT'd: its reply comes
    // from h's own address), and a client holding a connection open to each.
    lab.spawn("s", &["busybox", "nc", "-l", "-p", "8080"]);
    lab.spawn("h", &["busybox", "nc", "-l", "-p", "9000"]);
    wait_until("both servers listening", Duration::from_secs(10), || {
        let s = lab.exec("s", &["busybox", "netstat", "-ltn"]);
        let h = lab.exec("h", &["busybox", "netstat", "-ltn"]);
        String::from_utf8_lossy(&s.stdout).contains(":8080")
            && String::from_utf8_lossy(&h.stdout).contains(":9000")
    });
    lab.spawn("c", &["busybox", "nc", H_CLIENT_SIDE, "61001"]);
    lab.spawn("c", &["busybox", "nc", H_CLIENT_SIDE, "9000"]);
    wait_until("both connections tracked", Duration::from_secs(10), || {
        lab.tracked(SERVER) == 1 && lab.tracked(H_CLIENT_SIDE) == 1
    });
    let o = lab.exec("h", &["conntrack", "-L", "--reply-src", SERVER]);
    let line = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        line.contains(&format!("dst={H_CLIENT_SIDE} sport="))
            && line.contains("dport=61001")
            && line.contains(&format!("src={SERVER} dst={CLIENT} sport=8080")),
        "the DNAT'd connection: {line}"
    );

    let before = lab.run_in("h", nfnetlink::ct_count).unwrap();
    assert!(before >= 2, "{before} tracked");
    let server: IpAddr = SERVER.parse().unwrap();
    let n = lab
        .run_in("h", move || nfnetlink::ct_delete_reply_src(server))
        .unwrap();
    assert_eq!(n, 1, "one entry replied from {SERVER}");
    assert_eq!(lab.tracked(SERVER), 0, "deleted");
    assert_eq!(
        lab.tracked(H_CLIENT_SIDE),
        1,
        "the other entry is left alone"
    );
    // Nothing left to delete: zero, not an error.
    let n = lab
        .run_in("h", move || nfnetlink::ct_delete_reply_src(server))
        .unwrap();
    assert_eq!(n, 0);
}

/// IPv6 in the lab: h's links get `2001:db8:77:1::1` (client side) and
/// `2001:db8:77:2::1` (server side), c and s `::2` on theirs, without duplicate address
/// detection, IPv6 forwarding on in h.
const H6_CLIENT_SIDE: &str = "2001:db8:77:1::1";
const SERVER6: &str = "2001:db8:77:2::2";

#[test]
fn dual_stack_mappings_go_in_one_transaction_forward_ipv6_and_are_flushed() {
    if !can_run_without_containerd(
        "dual_stack_mappings_go_in_one_transaction_forward_ipv6_and_are_flushed",
    ) {
        return;
    }
    let mut lab = Lab::new("v6");
    let (h, c, s) = (lab.ns("h"), lab.ns("c"), lab.ns("s"));
    sh(&format!(
        "ip -n {h} addr add {H6_CLIENT_SIDE}/64 dev hc nodad && \
         ip -n {h} addr add 2001:db8:77:2::1/64 dev hs nodad && \
         ip -n {c} addr add 2001:db8:77:1::2/64 dev eth0 nodad && \
         ip -n {c} -6 route add default via {H6_CLIENT_SIDE} && \
         ip -n {s} addr add {SERVER6}/64 dev eth0 nodad && \
         ip -n {s} -6 route add default via 2001:db8:77:2::1 && \
         ip netns exec {h} sysctl -qw net.ipv6.conf.all.forwarding=1"
    ));
    let v6: Ipv6Addr = SERVER6.parse().unwrap();
    let maps = vec![
        m(61001, 2, 8080),
        Mapping {
            host_port: 61001,
            container_ip: IpAddr::V6(v6),
            container_port: 8080,
            host_ip: None,
        },
    ];
    // The product's own table, in h: the first IPv6 mapping creates the ip6 table.
    let add = maps.clone();
    lab.run_in("h", move || nat::Nat::default().add(&add))
        .unwrap();
    let listed = lab.run_in("h", || nat::Nat::default().list()).unwrap();
    let mut want = maps.clone();
    want.sort();
    assert_eq!(listed, want, "both families listed back");
    let o = lab.nft(&["list", "map", "ip6", nat::TABLE, nat::MAP]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains(&format!("tcp . 61001 : {SERVER6} . 8080")),
        "{}",
        text(&o)
    );

    // A real TCP connection over IPv6 through the DNAT, held open.
    lab.spawn("s", &["busybox", "nc", "-l", "-p", "8080"]);
    wait_until("server listening", Duration::from_secs(10), || {
        let o = lab.exec("s", &["busybox", "netstat", "-ltn"]);
        String::from_utf8_lossy(&o.stdout).contains(":8080")
    });
    lab.spawn("c", &["busybox", "nc", H6_CLIENT_SIDE, "61001"]);
    let tracked6 = |lab: &Lab| {
        let o = lab.exec(
            "h",
            &["conntrack", "-L", "-f", "ipv6", "--reply-src", SERVER6],
        );
        String::from_utf8_lossy(&o.stdout).lines().count()
    };
    wait_until(
        "the IPv6 connection tracked",
        Duration::from_secs(10),
        || tracked6(&lab) == 1,
    );
    let o = lab.exec(
        "h",
        &["conntrack", "-L", "-f", "ipv6", "--reply-src", SERVER6],
    );
    let line = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        line.contains(&format!("dst={H6_CLIENT_SIDE}")) && line.contains("dport=61001"),
        "DNAT'd over IPv6: {line}"
    );

    // Removal: both families' elements in one transaction, then the flush.
    let rm = maps.clone();
    lab.run_in("h", move || {
        let r = nat::Nat::default().remove(&rm);
        nat::settle();
        r
    })
    .unwrap();
    assert_eq!(
        lab.run_in("h", || nat::Nat::default().list()).unwrap(),
        Vec::<Mapping>::new()
    );
    assert_eq!(
        tracked6(&lab),
        0,
        "the IPv6 entry replied from {SERVER6} is flushed"
    );
    let _ = c;
}

/// nerdctl's `-p ADDR:H:C`: a mapping bound to one host address forwards connections
/// to that address only (real TCP from the client namespace); a table made before
/// address-bound mappings existed gets their map and rules on the first one.
#[test]
fn an_address_bound_mapping_forwards_that_address_only_and_old_tables_are_upgraded() {
    if !can_run_without_containerd(
        "an_address_bound_mapping_forwards_that_address_only_and_old_tables_are_upgraded",
    ) {
        return;
    }
    let mut lab = Lab::new("at");
    let h = lab.ns("h");
    // A second address of h's on the client's side.
    sh(&format!("ip -n {h} addr add 10.77.9.1/32 dev hc"));
    // The product's table as an earlier version made it: no `ports_at`.
    let old = nat::skeleton().replace(&nat::skeleton_at(nat::Family::V4), "");
    assert!(!old.contains("ports_at"), "{old}");
    let mut nft = Command::new("ip")
        .args(["netns", "exec", &h, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    nft.stdin.take().unwrap().write_all(old.as_bytes()).unwrap();
    assert!(nft.wait().unwrap().success(), "old skeleton");

    let bound = Mapping {
        host_ip: Some(H_CLIENT_SIDE.parse().unwrap()),
        ..m(61002, 2, 8080)
    };
    let add = vec![bound];
    lab.run_in("h", move || nat::Nat::default().add(&add))
        .unwrap();
    assert_eq!(
        lab.run_in("h", || nat::Nat::default().list()).unwrap(),
        vec![bound]
    );
    let o = lab.nft(&["list", "map", "ip", nat::TABLE, nat::MAP_AT]);
    assert!(
        String::from_utf8_lossy(&o.stdout)
            .contains(&format!("{H_CLIENT_SIDE} . tcp . 61002 : {SERVER} . 8080")),
        "{}",
        text(&o)
    );

    lab.spawn("s", &["sh", "-c", "echo served | busybox nc -l -p 8080"]);
    wait_until("server listening", Duration::from_secs(10), || {
        let o = lab.exec("s", &["busybox", "netstat", "-ltn"]);
        String::from_utf8_lossy(&o.stdout).contains(":8080")
    });
    let connect = |to: &str| {
        let o = lab.exec(
            "c",
            &[
                "sh",
                "-c",
                &format!("echo hi | timeout 5 busybox nc -w 2 {to} 61002"),
            ],
        );
        text(&o)
    };
    // The other address of h's: not forwarded (h itself refuses).
    let other = connect("10.77.9.1");
    assert!(
        !other.contains("served") && other.contains("refused"),
        "{other}"
    );
    let got = connect(H_CLIENT_SIDE);
    assert!(got.contains("served"), "the bound address: {got}");

    let rm = vec![bound];
    lab.run_in("h", move || {
        let r = nat::Nat::default().remove(&rm);
        nat::settle();
        r
    })
    .unwrap();
    assert!(
        lab.run_in("h", || nat::Nat::default().list())
            .unwrap()
            .is_empty()
    );
}

/// The foreign-DNAT check reads the kernel's rules over netlink (`nat::foreign::
/// scan_rules`) instead of `nft --json list ruleset` on every create. Both readings of
/// the same real ruleset must agree: native nftables (literal, range, `!=`, UDP,
/// accept-only, redirect, IPv6), iptables-nft's portmap shape, and the product's own map
/// rule (the lab's skeleton); a DNAT through a set of ports is left to `nft`, and the
/// whole check (`host_dnat_ports`) then still finds the set's ports.
#[test]
fn dnat_ports_read_over_netlink_agree_with_nft_json() {
    use envoy_sidecar::nat::foreign::{self, RuleScan};
    if !can_run_without_containerd("dnat_ports_read_over_netlink_agree_with_nft_json") {
        return;
    }
    let lab = Lab::new("dnat");
    let rules = "table ip es_foreign_t {
      chain pre { type nat hook prerouting priority -100;
        tcp dport 17780 dnat to 198.51.100.2:80
        tcp dport 17790-17791 dnat to 198.51.100.2
        udp dport 5353 dnat to 198.51.100.2
        tcp dport 17800 accept
        tcp dport != 17801 dnat to 198.51.100.2
        meta l4proto tcp th dport 17810 dnat to 198.51.100.2
        ip saddr 198.51.100.9 counter
      }
      chain out { type nat hook output priority -100; tcp dport 17782 redirect to :80; }
    }
    table ip6 es_foreign_t6 {
      chain pre { type nat hook prerouting priority -100; tcp dport 17783 dnat to [2001:db8::2]:80; }
    }
    table inet es_foreign_filter {
      chain in { type filter hook input priority 0; tcp dport 17840 drop; }
    }";
    lab.nft_script(rules);
    // portmap's iptables-nft shape: `-p tcp --dport H -j DNAT`, and a UDP one.
    for (proto, port) in [("tcp", "17777"), ("udp", "17778")] {
        let o = lab.exec(
            "h",
            &[
                "iptables-nft",
                "-t",
                "nat",
                "-A",
                "PREROUTING",
                "-p",
                proto,
                "--dport",
                port,
                "-j",
                "DNAT",
                "--to-destination",
                "10.77.2.2:80",
            ],
        );
        assert!(o.status.success(), "iptables-nft: {}", text(&o));
    }

    let scan = || {
        lab.run_in("h", || {
            nfnetlink::dump_rules().map(|r| foreign::scan_rules(&r))
        })
    };
    let json = || {
        let o = lab.nft(&["--terse", "--json", "list", "ruleset"]);
        assert!(o.status.success(), "{}", text(&o));
        foreign::parse_nft_json(&String::from_utf8_lossy(&o.stdout))
    };
    let want: std::collections::BTreeSet<u16> =
        [17777, 17780, 17782, 17783, 17790, 17791, 17810].into();
    assert_eq!(scan().unwrap(), RuleScan::Ports(want.clone()), "netlink");
    assert_eq!(json(), want, "nft --json");

    // A set of ports: netlink defers to nft, and the whole check still has them.
    let o = lab.nft(&[
        "add",
        "rule",
        "ip",
        "es_foreign_t",
        "pre",
        "tcp",
        "dport",
        "{",
        "17830,",
        "17831",
        "}",
        "dnat",
        "to",
        "198.51.100.2",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(scan().unwrap(), RuleScan::NeedsNft);
    let nft_path = nat::Nat::default().nft;
    let all = lab.run_in("h", move || foreign::host_dnat_ports(&nft_path));
    let mut with_set = want;
    with_set.extend([17830, 17831]);
    assert_eq!(all, with_set);
    assert_eq!(json(), with_set);
}
