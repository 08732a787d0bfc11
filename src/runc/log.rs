//! Errors of the wrapper itself, written where containerd looks for runc's: the
//! `--log` file, as the last `level=error` line. containerd's shim turns that line into
//! the error the `ctr`/`nerdctl`/kubelet user sees ("OCI runtime create failed: ...").

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;

use crate::sys::fs::now_rfc3339;

/// One log line in runc's shape: JSON (`--log-format json`) or logrus text.
pub fn format_line(level: &str, msg: &str, json: bool) -> String {
    let time = now_rfc3339();
    if json {
        serde_json::json!({"level": level, "msg": msg, "time": time}).to_string()
    } else {
        format!("time={time:?} level={level} msg={msg:?}")
    }
}

/// Append to runc's log file; failures here have nowhere better to go than stderr.
pub fn append(log: &Path, level: &str, msg: &str, json: bool) {
    let line = format_line(level, msg, json);
    let r = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .and_then(|mut f| writeln!(f, "{line}"));
    if let Err(e) = r {
        eprintln!("envoy-sidecar-runc: cannot write {}: {e}", log.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_shape_containerd_reads() {
        let l = format_line("error", "annotation \"x\" bad\nline", true);
        let v: serde_json::Value = serde_json::from_str(&l).unwrap();
        assert_eq!(v["level"], "error");
        assert_eq!(v["msg"], "annotation \"x\" bad\nline");
        assert!(v["time"].as_str().unwrap().ends_with('Z'));
        assert!(!l.contains('\n'));
        let t = format_line("error", "a \"b\"", false);
        assert!(t.contains("level=error msg=\"a \\\"b\\\"\""), "{t}");
    }
}
