//! One registry for everything tests must not share: addresses, interface and
//! namespace names, host port pools and TCP ports. A test takes a [`Slot`] with
//! [`next`] and derives all of these from the slot's index, so nothing is numbered by
//! hand and two tests never collide — not in one test binary, nor across the test
//! binaries (and engineers' runs) on the host at the same time.
//!
//! Uniqueness across processes: slot `i` is held by an open-file-description lock
//! (`F_OFD_SETLK`) on byte `i` of [`LOCK_FILE`]. Such a lock conflicts with every other
//! open of the file, in this process or another, and the kernel drops it when the
//! holder closes the file or dies, so a crashed test never keeps a slot. A test whose
//! slot was held by a crashed one finds that one's interfaces under the same names and
//! removes them first (see `net.rs`).
//!
//! Slot `i` (0 ≤ i < [`SLOTS`]) owns:
//! - `198.51.100.16i/28`: up to [`LINKS`] veth links, the `k`-th a /30 at `16i + 4k`
//!   (host `+1`, namespace `+2`), in namespace `es-s<i>n<k>` with host end `es-s<i>v<k>`;
//!   and `16i + 13`, an address that is never on an interface ([`Slot::unrouted_address`]);
//! - `203.0.113.16i/28`: one CNI bridge `es-s<i>br` (CNI network `es-s<i>net`);
//! - IPv6, for the tests that turn it on (documentation prefix `2001:db8::/32`; this
//!   host's eth0 may sit in `fd00::/64`): link `k` also gets `2001:db8:e5:<x>::/64`
//!   with `x = 0x100 + 16i + k` (host `::1`, namespace `::2`), and the bridge
//!   `2001:db8:e5:<0x1000 + i>::/64`;
//! - host ports `16384 + 1024i ..= 16384 + 1024i + 1023`, below the kernel's ephemeral
//!   range (32768-60999): the first [`POOL_MAX`] for the sandbox's host port pool
//!   ([`Slot::pool`]), the rest for listeners a test starts itself ([`Slot::tcp_port`]).
//!
//! Not handed out: `192.0.2.0/24` (this host's eth0 may sit in it), `203.0.113.224/28`
//! (the CRI pod network of `tests/env/containerd.sh`, bridge `es-br14`),
//! `198.51.100.224/27` (the benchmark scripts' links, `scripts/bench*.sh`, use
//! .228-.251; [`UNROUTED`] is .254) and `203.0.113.240/28` (spare).

use std::fs::{File, OpenOptions};
use std::ops::RangeInclusive;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// How many slots there are (tests wait for a free one when all are held).
pub const SLOTS: u32 = 14;
/// veth links per slot.
pub const LINKS: u32 = 3;
/// The largest host port pool a slot gives.
pub const POOL_MAX: u16 = 768;
/// World-writable, so that the tests that need no root share it with those that do.
pub const LOCK_FILE: &str = "/tmp/envoy-sidecar-test-slots.lock";
/// An address for configurations of tests without a network (a stand-in runc): it is
/// on no interface and no route leads to it.
pub const UNROUTED: &str = "198.51.100.254";

const PORT_BASE: u32 = 16384;
const PORT_BLOCK: u32 = 1024;
/// How long `next` waits for a slot before it fails the test.
const WAIT: Duration = Duration::from_secs(600);

struct Held {
    index: u32,
    /// The open file description that holds the lock on byte `index`.
    _lock: File,
}

/// Per slot, the next of its TCP ports this process hands out. Process-wide, not per
/// holding: a test that takes the slot after another test of the same binary must not
/// get that test's ports again while its sockets (an app's accepted connections, an
/// Envoy still exiting) may linger on them.
static NEXT_TCP: [AtomicU32; SLOTS as usize] = [const { AtomicU32::new(0) }; SLOTS as usize];

/// A slot held until the last clone drops (networks made from it hold a clone, so the
/// slot outlives them).
#[derive(Clone)]
pub struct Slot(Arc<Held>);

/// The next free slot; waits (up to 10 minutes) while all are held.
pub fn next() -> Slot {
    let start = Instant::now();
    loop {
        if let Some(slot) = (0..SLOTS).find_map(try_take) {
            return slot;
        }
        assert!(
            start.elapsed() < WAIT,
            "no free test slot within {WAIT:?} (all {SLOTS} of {LOCK_FILE} held)"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Slot `index` if no one holds it now.
pub fn try_take(index: u32) -> Option<Slot> {
    assert!(index < SLOTS);
    let f = open_lock_file();
    try_lock(&f, index).then(|| Slot(Arc::new(Held { index, _lock: f })))
}

fn open_lock_file() -> File {
    loop {
        match OpenOptions::new().read(true).write(true).open(LOCK_FILE) {
            Ok(f) => return f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => panic!("{LOCK_FILE}: {e}"),
        }
        match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o666)
            .open(LOCK_FILE)
        {
            Ok(f) => {
                // Whatever the umask: every user's tests take slots here.
                let _ = f.set_permissions(std::fs::Permissions::from_mode(0o666));
                return f;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => panic!("create {LOCK_FILE}: {e}"),
        }
    }
}

/// Write-lock byte `index` of `f` (an OFD lock: conflicts with every other open).
fn try_lock(f: &File, index: u32) -> bool {
    use nix::errno::Errno;
    use nix::fcntl::{FcntlArg, fcntl};
    let fl = libc::flock {
        l_type: i16::try_from(libc::F_WRLCK).unwrap(),
        l_whence: i16::try_from(libc::SEEK_SET).unwrap(),
        l_start: i64::from(index),
        l_len: 1,
        l_pid: 0,
    };
    match fcntl(f, FcntlArg::F_OFD_SETLK(&fl)) {
        Ok(_) => true,
        Err(Errno::EAGAIN | Errno::EACCES) => false,
        Err(e) => panic!("lock byte {index} of {LOCK_FILE}: {e}"),
    }
}

impl Slot {
    pub fn index(&self) -> u32 {
        self.0.index
    }

    /// `es-s<i>`: the prefix of every name this slot hands out.
    pub fn name(&self) -> String {
        format!("es-s{}", self.index())
    }

    fn port_base(&self) -> u32 {
        PORT_BASE + PORT_BLOCK * self.index()
    }

    /// The first `size` ports of this slot's host port pool.
    pub fn pool(&self, size: u16) -> RangeInclusive<u16> {
        assert!((1..=POOL_MAX).contains(&size), "pool size {size}");
        let start = u16::try_from(self.port_base()).unwrap();
        start..=start + (size - 1)
    }

    /// A TCP port of this slot's own, outside every pool, not handed out before by this
    /// process (until the slot's ports wrap around) and bindable right now on 0.0.0.0
    /// and on 127.0.0.1 (what the tests' apps and Envoys bind).
    pub fn tcp_port(&self) -> u16 {
        let first = self.port_base() + POOL_MAX as u32;
        let span = PORT_BLOCK - POOL_MAX as u32;
        for _ in 0..span {
            let k = NEXT_TCP[self.index() as usize].fetch_add(1, Ordering::SeqCst) % span;
            let p = u16::try_from(first + k).unwrap();
            let free = |ip: &str| std::net::TcpListener::bind((ip, p)).is_ok();
            if free("0.0.0.0") && free("127.0.0.1") {
                return p;
            }
        }
        panic!("slot {}: no free TCP port among its {span}", self.index());
    }

    pub fn tcp_ports(&self, n: usize) -> Vec<u16> {
        (0..n).map(|_| self.tcp_port()).collect()
    }

    /// `198.51.100.<16i + offset>`.
    fn link_net(&self, offset: u32) -> String {
        format!("198.51.100.{}", 16 * self.index() + offset)
    }

    /// The `k`-th veth link: `(namespace, host interface, host address, namespace
    /// address)`, a /30.
    pub fn link(&self, k: u32) -> (String, String, String, String) {
        assert!(k < LINKS, "a slot has {LINKS} links");
        (
            format!("{}n{k}", self.name()),
            format!("{}v{k}", self.name()),
            self.link_net(4 * k + 1),
            self.link_net(4 * k + 2),
        )
    }

    /// The `k`-th link's IPv6 addresses: `(host end, namespace)`, a /64.
    pub fn link6(&self, k: u32) -> (String, String) {
        assert!(k < LINKS, "a slot has {LINKS} links");
        let net = 0x100 + 16 * self.index() + k;
        (
            format!("2001:db8:e5:{net:x}::1"),
            format!("2001:db8:e5:{net:x}::2"),
        )
    }

    /// The CNI bridge's IPv6 subnet (a /64).
    pub fn bridge6(&self) -> String {
        format!("2001:db8:e5:{:x}::/64", 0x1000 + self.index())
    }

    /// An address of this slot's on no interface (for `[host] address` where nothing
    /// connects to it).
    pub fn unrouted_address(&self) -> String {
        self.link_net(13)
    }

    /// `(bridge, CNI network name, subnet)` of this slot's CNI bridge.
    pub fn bridge(&self) -> (String, String, String) {
        (
            format!("{}br", self.name()),
            format!("{}net", self.name()),
            format!("203.0.113.{}/28", 16 * self.index()),
        )
    }
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Slot({})", self.index())
    }
}
