"""Time one command with a monotonic clock: `timeit.py LOG CMD...` runs CMD with its
output in LOG, prints the elapsed milliseconds and exits with CMD's status (the bench
scripts' one timer)."""
import subprocess, sys, time
log, cmd = sys.argv[1], sys.argv[2:]
with open(log, "wb") as f:
    t0 = time.monotonic_ns()
    r = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)
    t1 = time.monotonic_ns()
print(f"{(t1 - t0) / 1e6:.3f}")
sys.exit(r.returncode)
