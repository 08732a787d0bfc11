//! A container in the private containerd, removed when its handle drops, and what tests
//! read of a container from the host (environment, memory cgroup).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use super::containerd::ctr;
use super::wait::poll;

/// The port annotation.
pub const PORTS: &str = "envoy-sidecar/ports";
/// What the test image's httpd serves at `/`.
pub const HELLO: &str = "hello from envoy-sidecar test app";
pub const MIB: u64 = 1 << 20;

/// The test image's app: busybox httpd on 8080, in the foreground.
pub fn httpd() -> Vec<&'static str> {
    vec!["/bin/httpd", "-f", "-p", "8080", "-h", "/www"]
}

/// The app on three ports: 9999 and 2222 in the background, 8080 in the foreground.
pub fn httpd3() -> Vec<&'static str> {
    vec![
        "/bin/sh",
        "-c",
        "httpd -p 9999 -h /www && httpd -p 2222 -h /www && exec httpd -f -p 8080 -h /www",
    ]
}

pub struct Container {
    pub id: String,
}

impl Container {
    pub fn pid(&self) -> u32 {
        let out = ctr(&["task", "ls"]);
        let t = String::from_utf8_lossy(&out.stdout);
        t.lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.first() == Some(&self.id.as_str())).then(|| f[1].parse().unwrap())
            })
            .unwrap_or_else(|| panic!("task {} not in `ctr task ls`: {t}", self.id))
    }

    /// `ctr task exec`; the command's output is captured through files in the
    /// container (read from the host via /proc/<pid>/root), because ctr's own output
    /// copy of a short-lived exec is sometimes empty under load.
    pub fn exec(&self, exec_id: &str, cmd: &str) -> Output {
        let base = format!("/tmp/.es-exec-{exec_id}");
        let wrapped = format!("( {cmd} ) >{base}.out 2>{base}.err; echo $? >{base}.rc");
        let out = ctr(&[
            "task",
            "exec",
            "--exec-id",
            exec_id,
            &self.id,
            "/bin/sh",
            "-c",
            &wrapped,
        ]);
        let root = format!("/proc/{}/root", self.pid());
        let read = |ext: &str| std::fs::read(format!("{root}{base}.{ext}")).unwrap_or_default();
        let rc = String::from_utf8_lossy(&read("rc")).trim().parse::<i32>();
        let Ok(rc) = rc else {
            return out; // the exec itself failed: ctr's own report says why
        };
        use std::os::unix::process::ExitStatusExt;
        Output {
            status: std::process::ExitStatus::from_raw(rc << 8),
            stdout: read("out"),
            stderr: read("err"),
        }
    }

    /// Kill and remove now (also done on drop).
    pub fn remove(&self) {
        ctr(&["task", "kill", "-s", "SIGKILL", &self.id]);
        let _ = poll(Duration::from_secs(5), Duration::from_millis(100), || {
            let out = ctr(&["task", "rm", &self.id]);
            out.status.success() || String::from_utf8_lossy(&out.stderr).contains("not found")
        });
        ctr(&["containers", "rm", &self.id]);
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Parse `KEY=VALUE` lines (from `env`).
pub fn env_map(out: &str) -> BTreeMap<String, String> {
    out.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The memory cgroup directory of `pid` on the host (cgroup v1 or v2).
pub fn memory_cgroup_dir(pid: u32) -> PathBuf {
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    for line in cg.lines() {
        let parts: Vec<&str> = line.splitn(3, ':').collect();
        if parts[1].split(',').any(|c| c == "memory") {
            return format!("/sys/fs/cgroup/memory{}", parts[2]).into();
        }
    }
    let line = cg
        .lines()
        .find(|l| l.starts_with("0::"))
        .expect("cgroup v2 line");
    format!("/sys/fs/cgroup{}", &line[3..]).into()
}

/// The memory cgroup limit of `pid`, read from the host (cgroup v1 or v2).
pub fn memory_limit_of(pid: u32) -> String {
    let dir = memory_cgroup_dir(pid);
    let v1 = dir.join("memory.limit_in_bytes");
    let file = if v1.exists() {
        v1
    } else {
        dir.join("memory.max")
    };
    std::fs::read_to_string(&file)
        .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
        .trim()
        .to_string()
}

/// An app that counts the connections it accepts: busybox `nc -ll` on 8080 running
/// `/data/count.sh` per connection, which appends a line to `/data/conns` (a directory
/// of the sandbox, bind-mounted) and answers [`HELLO`].
pub struct CountingApp {
    data: PathBuf,
}

impl CountingApp {
    /// With `read_request`, the script reads the request (to the blank line) before it
    /// answers: closing a socket with unread data resets the connection.
    pub fn new(dir: &std::path::Path, read_request: bool) -> CountingApp {
        let data = dir.join("data");
        std::fs::create_dir_all(&data).unwrap();
        let read = if read_request {
            "cr=$(printf '\\r')\n\
             while IFS= read -r l; do [ -z \"$l\" ] || [ \"$l\" = \"$cr\" ] && break; done\n"
        } else {
            ""
        };
        super::util::write_script(
            &data.join("count.sh"),
            &format!("#!/bin/sh\necho conn >> /data/conns\n{read}printf '{HELLO}\\n'\n"),
        );
        CountingApp { data }
    }

    /// The ctr option that mounts the data directory.
    pub fn mount(&self) -> String {
        format!(
            "--mount=type=bind,src={},dst=/data,options=rbind:rw",
            self.data.display()
        )
    }

    /// The container's command.
    pub fn cmd(&self) -> Vec<&'static str> {
        vec!["/bin/nc", "-ll", "-p", "8080", "-e", "/data/count.sh"]
    }

    /// Connections accepted so far.
    pub fn conns(&self) -> usize {
        std::fs::read_to_string(self.data.join("conns"))
            .unwrap_or_default()
            .lines()
            .count()
    }
}
