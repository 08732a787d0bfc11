#!/usr/bin/env python3
"""A runc that runs poststart hooks inside `start`, after the user process began, as
crun (since 0.14) and runc's unreleased main (commit 3cdda464) do; runc 1.1-1.3 run
them at the end of `create`. Put it in front of a real runc (ES_REAL_RUNC) to test the
product under that order on a host where crun cannot run (hybrid cgroups).

- `create`: the bundle's `hooks.poststart` are moved out of config.json (into
  `<bundle>/.es-deferred-poststart.json`), then the real runc runs the create.
- `start ID`: the real runc starts the container; then each deferred hook runs with
  the OCI state (status "running", the init pid) on its stdin, as crun does. A failing
  hook is reported on stderr and does not fail `start` (crun: a warning).
- `run --detach`: both of the above in one call. Everything else: the real runc.
"""
import json
import os
import subprocess
import sys

REAL = os.environ.get("ES_REAL_RUNC", "/usr/sbin/runc")
DEFERRED = ".es-deferred-poststart.json"
# runc's global flags that take a value (the rest are booleans).
GLOBAL_VALUES = {"log", "log-format", "root", "criu", "rootless"}


def split(args):
    """(global args, subcommand, subcommand args)."""
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("-"):
            return args[:i], a, args[i + 1:]
        name = a.lstrip("-")
        if "=" not in name and name in GLOBAL_VALUES:
            i += 1
        i += 1
    return args, None, []


def flag(args, names):
    for i, a in enumerate(args):
        body = a.lstrip("-")
        if not a.startswith("-"):
            continue
        if body in names and i + 1 < len(args):
            return args[i + 1]
        for n in names:
            if body.startswith(n + "="):
                return body[len(n) + 1:]
    return None


def positional(args, value_flags):
    """The subcommand's positional arguments (flags and their values skipped)."""
    out, i = [], 0
    while i < len(args):
        a = args[i]
        if a.startswith("-"):
            if a.lstrip("-") in value_flags:
                i += 1
        else:
            out.append(a)
        i += 1
    return out


def defer(bundle):
    path = os.path.join(bundle, "config.json")
    with open(path) as f:
        spec = json.load(f)
    hooks = (spec.get("hooks") or {}).pop("poststart", [])
    with open(os.path.join(bundle, DEFERRED), "w") as f:
        json.dump(hooks, f)
    tmp = path + ".es-tmp"
    with open(tmp, "w") as f:
        json.dump(spec, f)
    os.rename(tmp, path)


def run_deferred(globals_, cid):
    st = subprocess.run([REAL, *globals_, "state", cid], capture_output=True, text=True)
    if st.returncode != 0:
        sys.stderr.write(f"poststart-at-start: runc state {cid}: {st.stderr}")
        return
    state = json.loads(st.stdout)
    bundle = state["bundle"]
    try:
        with open(os.path.join(bundle, DEFERRED)) as f:
            hooks = json.load(f)
    except FileNotFoundError:
        return
    with open(os.path.join(bundle, "config.json")) as f:
        annotations = json.load(f).get("annotations") or {}
    oci = json.dumps({
        "ociVersion": "1.2.0", "id": cid, "status": "running",
        "pid": state["pid"], "bundle": bundle, "annotations": annotations,
    })
    if os.environ.get("ES_POSTSTART_LOG"):
        with open(os.environ["ES_POSTSTART_LOG"], "a") as f:
            f.write(f"poststart after start: {cid} pid {state['pid']} ({len(hooks)} hook(s))\n")
    for h in hooks:
        argv = h.get("args") or [h["path"]]
        env = dict(e.split("=", 1) for e in h.get("env") or [] if "=" in e)
        try:
            r = subprocess.run(argv, executable=h["path"], input=oci, text=True,
                               env=env, timeout=h.get("timeout") or None,
                               stdout=sys.stderr, stderr=sys.stderr)
            if r.returncode != 0:
                sys.stderr.write(f"poststart-at-start: hook {h['path']} exited {r.returncode}\n")
        except (OSError, subprocess.TimeoutExpired) as e:
            sys.stderr.write(f"poststart-at-start: hook {h['path']}: {e}\n")


def main():
    args = sys.argv[1:]
    globals_, cmd, rest = split(args)
    bundle_flags = ["bundle", "b"]
    create_values = {"bundle", "b", "console-socket", "pid-file", "preserve-fds", "pidfd-socket"}
    if cmd == "create":
        defer(flag(rest, bundle_flags) or os.getcwd())
        os.execv(REAL, [REAL, *args])
    if cmd == "start":
        rc = subprocess.run([REAL, *args]).returncode
        ids = positional(rest, set())
        if rc == 0 and ids:
            run_deferred(globals_, ids[0])
        sys.exit(rc)
    if cmd == "run" and ("--detach" in rest or "-d" in rest):
        defer(flag(rest, bundle_flags) or os.getcwd())
        rc = subprocess.run([REAL, *args]).returncode
        ids = positional(rest, create_values)
        if rc == 0 and ids:
            run_deferred(globals_, ids[0])
        sys.exit(rc)
    os.execv(REAL, [REAL, *args])


if __name__ == "__main__":
    main()
