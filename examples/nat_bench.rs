//! NAT add/remove of one container through the product's own code
//! (`envoy_sidecar::nat::Nat::add` / `remove`), against a map that already holds N
//! other containers' elements, next to the per-rule iptables baseline (CNI portmap,
//! Garden's kawasaki: one `iptables -A ... -j DNAT` spawned per mapping, `-D` per
//! mapping) in a chain of its own preloaded with N × 6 rules. Driven by
//! `scripts/bench-scale.sh`; root only.
//!
//!     cargo run --release --example nat_bench -- run --counts 1,100,1000,3000 --reps 20 \
//!         --port-base 32000 --ip-base 198.18.32.0 --measured-port 50000 \
//!         --measured-ip 198.18.63.1 --host-ip 198.18.0.1 --chain ESBENCH
//!     cargo run --release --example nat_bench -- ensure-table
//!
//! A container is 6 mappings: 3 unproxied (host port -> app port 8080, 9999, 2222) and
//! 3 TLS (host port -> proxy port 61001, 61002, 61003), as `envoy-sidecar/ports=
//! 8080,9999,2222` gets them. Fill container i uses host ports `port-base + 6i ..+5`
//! and container IP `ip-base + i`; the measured one `measured-port ..+5` and
//! `measured-ip`. Per N, each repetition times, in an order alternating between
//! repetitions: `Nat::add` of the measured container, `Nat::remove` of it, 6 spawned
//! `iptables -A`, 6 spawned `iptables -D`; and, for the split of `Nat::remove`, one bare
//! ctnetlink delete of `--reply-src <measured-ip>` as `Nat::remove` makes it.
//! Prints one JSON object per N (samples in ms) on stdout. Everything it added
//! (fill elements, the measured container's elements, the chain) is removed before it
//! exits, also on error; the script's trap is the backstop for a kill.

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::Instant;

use envoy_sidecar::nat::{self, Mapping, Nat};

const APP_PORTS: [u16; 3] = [8080, 9999, 2222];
const PROXY_PORTS: [u16; 3] = [61001, 61002, 61003];
const WARMUP: usize = 2;

fn die(msg: impl std::fmt::Display) -> ! {
    eprintln!("nat_bench: error: {msg}");
    std::process::exit(1)
}

struct Args {
    counts: Vec<usize>,
    reps: usize,
    port_base: u16,
    ip_base: Ipv4Addr,
    measured_port: u16,
    measured_ip: Ipv4Addr,
    host_ip: Ipv4Addr,
    chain: String,
}

fn parse_args(mut it: impl Iterator<Item = String>) -> Args {
    let mut a = Args {
        counts: vec![1, 100, 1000, 3000],
        reps: 20,
        port_base: 32000,
        ip_base: Ipv4Addr::new(198, 18, 32, 0),
        measured_port: 50000,
        measured_ip: Ipv4Addr::new(198, 18, 63, 1),
        host_ip: Ipv4Addr::new(198, 18, 0, 1),
        chain: "ESBENCH".into(),
    };
    while let Some(flag) = it.next() {
        let v = it
            .next()
            .unwrap_or_else(|| die(format!("{flag} needs a value")));
        let bad = |what: &str| -> ! { die(format!("{flag} {v:?}: expected {what}")) };
        match flag.as_str() {
            "--counts" => {
                a.counts = v
                    .split(',')
                    .map(|s| s.parse().unwrap_or_else(|_| bad("counts like 1,100,1000")))
                    .collect();
            }
            "--reps" => a.reps = v.parse().unwrap_or_else(|_| bad("a number")),
            "--port-base" => a.port_base = v.parse().unwrap_or_else(|_| bad("a port")),
            "--ip-base" => a.ip_base = v.parse().unwrap_or_else(|_| bad("an IPv4 address")),
            "--measured-port" => a.measured_port = v.parse().unwrap_or_else(|_| bad("a port")),
            "--measured-ip" => a.measured_ip = v.parse().unwrap_or_else(|_| bad("an IPv4 address")),
            "--host-ip" => a.host_ip = v.parse().unwrap_or_else(|_| bad("an IPv4 address")),
            "--chain" => a.chain = v,
            _ => die(format!(
                "unknown flag {flag:?}; valid: --counts --reps --port-base --ip-base --measured-port --measured-ip --host-ip --chain"
            )),
        }
    }
    if a.reps == 0 || a.counts.is_empty() {
        die("--reps and --counts must not be empty/zero");
    }
    let max = a.counts.iter().copied().max().unwrap_or(0);
    let top = usize::from(a.port_base) + 6 * max;
    if top > usize::from(a.measured_port)
        && usize::from(a.port_base) < usize::from(a.measured_port) + 6
        || top > 65536
        || usize::from(a.measured_port) + 6 > 65536
    {
        die(format!(
            "fill ports {}..{} overlap the measured container's {}..{} or exceed 65535",
            a.port_base,
            top.saturating_sub(1),
            a.measured_port,
            usize::from(a.measured_port) + 5
        ));
    }
    a
}

/// The 6 mappings of a container with host ports `base..base+5` and address `ip`.
fn container(base: u16, ip: Ipv4Addr) -> Vec<Mapping> {
    let mut maps = Vec::with_capacity(6);
    for (k, &p) in APP_PORTS.iter().chain(PROXY_PORTS.iter()).enumerate() {
        let off = u16::try_from(k).expect("k < 6");
        maps.push(Mapping {
            host_port: base + off,
            container_ip: std::net::IpAddr::V4(ip),
            container_port: p,
            host_ip: None,
        });
    }
    maps
}

fn fill_container(a: &Args, i: usize) -> Vec<Mapping> {
    let base = u16::try_from(usize::from(a.port_base) + 6 * i).expect("checked in parse_args");
    let ip = Ipv4Addr::from(u32::from(a.ip_base) + u32::try_from(i).expect("small"));
    container(base, ip)
}

fn run_checked(cmd: &mut Command, what: &str) -> Result<(), String> {
    match cmd.stdout(Stdio::null()).stderr(Stdio::piped()).output() {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!(
            "{what}: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Err(format!("{what}: {e}")),
    }
}

fn feed(prog: &str, args: &[&str], input: &str, what: &str) -> Result<(), String> {
    use std::io::Write;
    let mut child = Command::new(prog)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{what}: running {prog}: {e}"))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(input.as_bytes())
        .map_err(|e| format!("{what}: writing to {prog}: {e}"))?;
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{what}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what}: {prog} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn ipt_rule(a: &Args, m: &Mapping) -> Vec<String> {
    vec![
        "-p".into(),
        "tcp".into(),
        "-d".into(),
        a.host_ip.to_string(),
        "--dport".into(),
        m.host_port.to_string(),
        "-j".into(),
        "DNAT".into(),
        "--to-destination".into(),
        format!("{}:{}", m.container_ip, m.container_port),
    ]
}

/// One spawned `iptables -w -t nat <op> CHAIN -p tcp -d HOST --dport P -j DNAT ...`.
fn iptables(op: &str, a: &Args, m: &Mapping) -> Result<(), String> {
    let mut cmd = Command::new("iptables");
    cmd.args(["-w", "-t", "nat", op, &a.chain])
        .args(ipt_rule(a, m));
    run_checked(
        &mut cmd,
        &format!("iptables {op} {} ... --dport {}", a.chain, m.host_port),
    )
}

/// What this run added and must remove before it exits (`clean`). A panic aborts in the
/// release profile: then the script's trap removes it.
struct Loaded {
    fill: Vec<Mapping>,
    chain: Option<String>,
}

impl Loaded {
    fn clean(&mut self) -> Result<(), String> {
        let mut errs = Vec::new();
        for chunk in self.fill.chunks(6000) {
            let script = nat::delete_script(chunk);
            if let Err(e) = feed("nft", &["-f", "-"], &script, "deleting the fill elements") {
                errs.push(e);
            }
        }
        self.fill.clear();
        if let Some(chain) = self.chain.take() {
            for op in ["-F", "-X"] {
                let st = Command::new("iptables")
                    .args(["-w", "-t", "nat", op, &chain])
                    .status();
                if !st.is_ok_and(|s| s.success()) {
                    errs.push(format!("iptables -t nat {op} {chain} failed"));
                }
            }
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(errs.join("; "))
        }
    }
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn run(a: &Args) -> Result<(), String> {
    let nat = Nat::default();
    nat.ensure_tables(&[envoy_sidecar::nat::Family::V4])
        .map_err(|e| format!("ensure_table: {e}"))?;
    let present = nat.list().map_err(|e| format!("listing the map: {e}"))?;
    let measured = container(a.measured_port, a.measured_ip);
    let max = a.counts.iter().copied().max().unwrap_or(0);
    let ours: Vec<u16> = (0..max)
        .flat_map(|i| fill_container(a, i))
        .chain(measured.iter().copied())
        .map(|m| m.host_port)
        .collect();
    if let Some(m) = present.iter().find(|m| ours.contains(&m.host_port)) {
        return Err(format!(
            "host port {} is already in the map ({}:{}): a leftover of an earlier run?",
            m.host_port, m.container_ip, m.container_port
        ));
    }
    let base_elems = present.len();

    let mut loaded = Loaded {
        fill: Vec::new(),
        chain: None,
    };
    let st = Command::new("iptables")
        .args(["-w", "-t", "nat", "-N", &a.chain])
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("iptables: {e}"))?;
    if !st.status.success() {
        return Err(format!(
            "iptables -t nat -N {}: {} (a leftover chain? remove it with iptables -t nat -F/-X {})",
            a.chain,
            String::from_utf8_lossy(&st.stderr).trim(),
            a.chain
        ));
    }
    loaded.chain = Some(a.chain.clone());

    let r = measure_all(a, &nat, &measured, &mut loaded, base_elems);
    // The measured container may be left half-added by a failure: remove it quietly.
    let _ = nat.remove(&measured);
    let c = loaded.clean();
    r.and(c)
}

fn measure_all(
    a: &Args,
    nat: &Nat,
    measured: &[Mapping],
    loaded: &mut Loaded,
    base_elems: usize,
) -> Result<(), String> {
    let mut counts = a.counts.clone();
    counts.sort_unstable();
    let mut have = 0usize;
    for &n in &counts {
        // Preload containers have..n: nft elements in one transaction, iptables rules
        // with one iptables-restore --noflush (the chain exists, is not redeclared).
        let t = Instant::now();
        let new: Vec<Mapping> = (have..n).flat_map(|i| fill_container(a, i)).collect();
        for chunk in new.chunks(6000) {
            let script = nat::add_script(chunk);
            loaded.fill.extend_from_slice(chunk);
            feed("nft", &["-f", "-"], &script, "preloading the map")?;
        }
        let mut restore = String::from("*nat\n");
        for m in &new {
            restore.push_str(&format!("-A {} {}\n", a.chain, ipt_rule(a, m).join(" ")));
        }
        restore.push_str("COMMIT\n");
        feed(
            "iptables-restore",
            &["-w", "--noflush"],
            &restore,
            "preloading the chain",
        )?;
        have = n;
        let elems = nat.list().map_err(|e| format!("listing: {e}"))?.len();
        if elems != base_elems + 6 * n {
            return Err(format!(
                "the map holds {elems} elements, expected {} + {}",
                base_elems,
                6 * n
            ));
        }
        let rules = Command::new("iptables")
            .args(["-w", "-t", "nat", "-S", &a.chain])
            .output()
            .map_err(|e| format!("iptables -S: {e}"))?;
        let nrules = String::from_utf8_lossy(&rules.stdout)
            .lines()
            .filter(|l| l.starts_with("-A "))
            .count();
        if nrules != 6 * n {
            return Err(format!(
                "chain {} holds {nrules} rules, expected {}",
                a.chain,
                6 * n
            ));
        }
        eprintln!(
            "nat_bench: N={n}: map {elems} elements, chain {nrules} rules (preload {:.0} ms)",
            ms_since(t)
        );

        let mut settle: Vec<f64> = Vec::new();
        let (mut add, mut rm, mut ia, mut id, mut ct) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for rep in 0..WARMUP + a.reps {
            let keep = rep >= WARMUP;
            let nft_pair = |add: &mut Vec<f64>,
                            rm: &mut Vec<f64>,
                            settle: &mut Vec<f64>|
             -> Result<(), String> {
                let t = Instant::now();
                nat.add(measured).map_err(|e| format!("Nat::add: {e}"))?;
                let d = ms_since(t);
                if keep {
                    add.push(d);
                }
                let t = Instant::now();
                nat.remove(measured)
                    .map_err(|e| format!("Nat::remove: {e}"))?;
                let d = ms_since(t);
                if keep {
                    rm.push(d);
                }
                // What remove leaves running (the conntrack flush, the socket close
                // that waits out the kernel's release of the elements), until done.
                let t = Instant::now();
                envoy_sidecar::nat::settle();
                let d = ms_since(t);
                if keep {
                    settle.push(d);
                }
                Ok(())
            };
            let ipt_pair = |ia: &mut Vec<f64>, id: &mut Vec<f64>| -> Result<(), String> {
                let t = Instant::now();
                for m in measured {
                    iptables("-A", a, m)?;
                }
                let d = ms_since(t);
                if keep {
                    ia.push(d);
                }
                let t = Instant::now();
                for m in measured {
                    iptables("-D", a, m)?;
                }
                let d = ms_since(t);
                if keep {
                    id.push(d);
                }
                Ok(())
            };
            if rep % 2 == 0 {
                nft_pair(&mut add, &mut rm, &mut settle)?;
                ipt_pair(&mut ia, &mut id)?;
            } else {
                ipt_pair(&mut ia, &mut id)?;
                nft_pair(&mut add, &mut rm, &mut settle)?;
            }
            // The conntrack flush Nat::remove makes once per container IP (ctnetlink),
            // alone on a socket of its own.
            let t = Instant::now();
            let _ = envoy_sidecar::sys::nfnetlink::ct_delete_reply_src(std::net::IpAddr::V4(
                a.measured_ip,
            ));
            let d = ms_since(t);
            if keep {
                ct.push(d);
            }
        }
        // Sanity: the measured container came and went; the fill is untouched.
        let after = nat.list().map_err(|e| format!("listing: {e}"))?;
        if after.len() != base_elems + 6 * n || measured.iter().any(|m| after.contains(m)) {
            return Err(format!(
                "after N={n}: the map holds {} elements (expected {}), measured present: {}",
                after.len(),
                base_elems + 6 * n,
                measured.iter().any(|m| after.contains(m))
            ));
        }
        let line = serde_json::json!({
            "n": n,
            "map_elements": elems,
            "chain_rules": nrules,
            "nat_add_ms": add,
            "nat_remove_ms": rm,
            "iptables_add_ms": ia,
            "iptables_delete_ms": id,
            "conntrack_flush_ms": ct,
            "nat_settle_ms": settle,
        });
        println!("{line}");
    }
    Ok(())
}

fn main() {
    let mut it = std::env::args().skip(1);
    match it.next().as_deref() {
        Some("ensure-table") => {
            if let Err(e) = Nat::default().ensure_tables(&[envoy_sidecar::nat::Family::V4]) {
                die(format!("ensure_table: {e}"));
            }
        }
        Some("run") => {
            let a = parse_args(it);
            if let Err(e) = run(&a) {
                die(e);
            }
        }
        _ => die("usage: nat_bench run [flags] | nat_bench ensure-table"),
    }
}
