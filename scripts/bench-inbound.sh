#!/usr/bin/env bash
# Inbound benchmark (issue 6) against the local PEC sandbox. See
# docs/BENCHMARKS.md, "Inbound (issue 6)".
#
#   scripts/bench-inbound.sh                      # RECEIPTS=10000 backlog, N=200 latency
#   RECEIPTS=2000 N=50 scripts/bench-inbound.sh   # a shorter run
#   STRACE=1 RECEIPTS=2000 LATENCY=0 scripts/bench-inbound.sh
#                      # also count the daemon's syscalls during the backlog
#                      # (strace -c -f -w slows the daemon: not a throughput run)
#   PERF=1 RECEIPTS=2000 LATENCY=0 scripts/bench-inbound.sh
#                      # also profile the daemon (perf record -g) during the backlog
#                      # (PERF_CALLGRAPH="--call-graph dwarf": callers resolved)
#   KEEP=/tmp/bench-in scripts/bench-inbound.sh   # keep the world and logs
#
# What it does:
# 1. builds the release binary and the helper (cargo example
#    `inbound-backlog`, benches/support/inbound_backlog.rs); starts
#    `pecgate sandbox --dir W` (needs Dovecot: scripts/setup);
# 2. backlog: the helper records RECEIPTS/2 letters as `submitted` in the
#    store (one certified recipient each) and APPENDs their signed receipts
#    (acceptance by provider "uno", completa delivery with a 2 KB document
#    by provider "due", signed with the sandbox's keys in W/pki) to the
#    office mailbox: RECEIPTS messages waiting in Dovecot. Then it starts
#    `pecgate run` and waits until the JSON log holds one receipt.accepted /
#    receipt.delivered event per receipt: fetch + archive + verify + match +
#    commit + sent-folder copy, all of it. Reports receipts/s (from the
#    daemon's first IMAP connection to the last receipt event, and from the
#    process launch), the daemon's CPU time (utime + stime) and its max RSS
#    (VmHWM), then checks in the store that every letter is `delivered`;
# 3. latency: with that daemon idle in IDLE, the helper makes N more letters
#    and, one at a time, APPENDs the acceptance and polls the store until
#    the letter is `accepted`: p50 / p90 / p99 / max;
# 4. stops the daemon and the sandbox with SIGTERM.
#
# The acceptance deadline is raised to 600 minutes for the run (the
# sandbox's 0.5 minute would make the timer report thousands of overdue
# letters while the backlog is read, which is not what is measured).
#
# Pinning: the daemon runs on DAEMON_CPU (default 1), the sandbox and Dovecot
# on SANDBOX_CPU (default 0), both at nice NICE (default -10 as root, else 0).
# PIN=0 disables taskset.
#
# Parameters (environment): RECEIPTS (even), N, LATENCY=0, STRACE=1,
# KEEP=DIR, DAEMON_CPU, SANDBOX_CPU, NICE, PIN, TIMEOUT (seconds for the
# backlog, default 900), PECGATE and HELPER (skip the build).
set -euo pipefail

RECEIPTS=${RECEIPTS:-10000}
N=${N:-200}
LATENCY=${LATENCY:-1}
STRACE=${STRACE:-0}
DAEMON_CPU=${DAEMON_CPU:-1}
SANDBOX_CPU=${SANDBOX_CPU:-0}
PIN=${PIN:-1}
TIMEOUT=${TIMEOUT:-900}
if [ "$(id -u)" -eq 0 ]; then NICE=${NICE:--10}; else NICE=${NICE:-0}; fi
LETTERS=$((RECEIPTS / 2))

cd "$(dirname "$0")/.."
repo=$PWD
target=$(cargo metadata --format-version 1 --no-deps |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
if [ -z "${PECGATE:-}" ] || [ -z "${HELPER:-}" ]; then
    cargo build --release --bin pecgate --example inbound-backlog
    PECGATE=${PECGATE:-$target/release/pecgate}
    HELPER=${HELPER:-$target/release/examples/inbound-backlog}
fi
command -v dovecot >/dev/null || [ -x /usr/sbin/dovecot ] ||
    { echo "bench-inbound: Dovecot is missing: run scripts/setup" >&2; exit 1; }

if [ -n "${KEEP:-}" ]; then
    work=$KEEP
    if [ -e "$work" ] && [ -n "$(ls -A "$work")" ] && [ ! -f "$work/bench-inbound.marker" ]; then
        echo "bench-inbound: KEEP=$work is not empty and not an earlier run's folder" >&2
        exit 1
    fi
    rm -rf "$work"
    mkdir -p "$work"
else
    work=$(mktemp -d /var/tmp/pecgate-bench-inbound.XXXXXX)
fi
touch "$work/bench-inbound.marker"
# Dovecot's mail processes (another user) must reach the world's folders.
chmod 0755 "$work"
W=$work/world
mkdir -p "$W"

# shellcheck source=scripts/bench-common.sh
. "$repo/scripts/bench-common.sh"

cpu_of() { # PID -> utime + stime in seconds
    python3 - "$1" <<'PY'
import os, sys
with open(f"/proc/{sys.argv[1]}/stat") as f:
    x = f.read().rsplit(")", 1)[1].split()
print((int(x[11]) + int(x[12])) / os.sysconf("SC_CLK_TCK"))
PY
}

bench_machine
echo "dovecot: $(dovecot --version 2>/dev/null || /usr/sbin/dovecot --version)"
src_state=$(git -C "$repo" status --porcelain -- src 2>/dev/null | wc -l)
echo "pecgate: $PECGATE ($("$PECGATE" --version)); tree at git $(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo '?'), $src_state uncommitted change(s) under src/"
echo "daemon on CPU $DAEMON_CPU, sandbox on CPU $SANDBOX_CPU (PIN=$PIN), nice $NICE; RECEIPTS=$RECEIPTS N=$N"
echo "work dir: $work"

bench_sandbox bench-inbound
echo "sandbox pid $sandbox_pid"

echo "== backlog: $LETTERS letters, $RECEIPTS receipts appended to the office mailbox"
"${run_sandbox[@]}" "$HELPER" setup --dir "$W" --letters "$LETTERS"
sync

export PECGATE__DEADLINES__ACCEPTANCE_MINUTES=600
log=$work/daemon.log
count_receipts() {
    grep -cE '"event":"receipt\.(accepted|delivered)"' "$log" 2>/dev/null || true
}
t_launch=$(date +%s.%N)
"${run_daemon[@]}" "$PECGATE" --config "$W/pecgate.toml" --log-format json run 2>>"$log" &
daemon_pid=$!
if [ "$STRACE" != 0 ]; then
    strace -c -f -w -o "$work/strace.txt" -p "$daemon_pid" 2>/dev/null &
    strace_pid=$!
elif [ "${PERF:-0}" != 0 ]; then
    # PERF_CALLGRAPH="--call-graph dwarf" resolves the callers of SQLite's
    # and libc's functions (the release build keeps no frame pointers).
    # shellcheck disable=SC2086
    perf record -F 499 ${PERF_CALLGRAPH:--g} -p "$daemon_pid" -o "$work/perf.data" 2>/dev/null >/dev/null &
    strace_pid=$!
fi
deadline=$((SECONDS + TIMEOUT))
while :; do
    c=$(count_receipts)
    [ "$c" -ge "$RECEIPTS" ] && break
    kill -0 "$daemon_pid" 2>/dev/null || { tail -n 20 "$log" >&2; echo "bench-inbound: the daemon died" >&2; exit 1; }
    if [ "$SECONDS" -ge "$deadline" ]; then
        echo "bench-inbound: timeout after $TIMEOUT s: $c of $RECEIPTS receipts applied" >&2
        exit 1
    fi
    sleep 0.1
done
t_done=$(date +%s.%N)
cpu=$(cpu_of "$daemon_pid")
hwm=$(grep -E 'VmHWM' "/proc/$daemon_pid/status" | tr -s ' \t' ' ')
if [ -n "$strace_pid" ]; then
    kill -INT "$strace_pid" 2>/dev/null || true
    wait "$strace_pid" 2>/dev/null || true
    strace_pid=""
fi
python3 - "$log" "$t_launch" "$t_done" "$RECEIPTS" "$cpu" "$hwm" <<'PY'
import datetime, json, sys
log, t_launch, t_done, n, cpu, hwm = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), sys.argv[6]
def ts(s):
    return datetime.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()
connected, receipts, other = None, [], {}
for line in open(log, encoding="utf-8", errors="replace"):
    if not line.startswith("{"):
        continue
    try:
        j = json.loads(line)
    except ValueError:
        continue
    ev = j.get("event")
    if ev == "mailbox.connected" and connected is None:
        connected = ts(j["timestamp"])
    elif ev in ("receipt.accepted", "receipt.delivered"):
        receipts.append(ts(j["timestamp"]))
    elif ev:
        other[ev] = other.get(ev, 0) + 1
last = max(receipts)
print(f"receipts applied (receipt.accepted + receipt.delivered events): {len(receipts)}")
print(f"launch -> imap connected: {connected - t_launch:.2f} s")
d = last - connected
print(f"BACKLOG: imap connected -> last receipt applied: {d:.2f} s = {len(receipts) / d:.0f} receipts/s "
      f"({d / len(receipts) * 1e3:.2f} ms per receipt); goal >= 1000/s: {'met' if len(receipts) / d >= 1000 else 'NOT met'}")
d2 = last - t_launch
print(f"         process launch -> last receipt applied: {d2:.2f} s = {len(receipts) / d2:.0f} receipts/s")
print(f"daemon CPU time (utime + stime, launch -> end): {cpu:.2f} s = {cpu / len(receipts) * 1e3:.2f} ms per receipt; {hwm.strip()}")
print("other events:", ", ".join(f"{k}: {v}" for k, v in sorted(other.items())))
PY
states=$("$PECGATE" --config "$W/pecgate.toml" list --json |
    python3 -c 'import sys, json, collections
c = collections.Counter(json.loads(l)["state"] for l in sys.stdin if l.strip())
print(", ".join(f"{k}: {v}" for k, v in sorted(c.items())))')
echo "letters in the store (pecgate list --json): $states"
if [ -s "$work/perf.data" ]; then
    echo "== perf report (daemon, on-CPU samples during the backlog), top self time"
    perf report -i "$work/perf.data" --no-children --sort symbol --stdio 2>/dev/null |
        grep -E '^ +[0-9]' | head -n 30
fi
if [ -s "$work/strace.txt" ]; then
    echo "== strace -c -f -w during the backlog (every thread of the daemon; $RECEIPTS receipts)"
    head -n 25 "$work/strace.txt"
fi

if [ "$LATENCY" != 0 ] && [ "$N" -gt 0 ]; then
    echo "== latency: $N acceptances appended one at a time, APPEND -> letter accepted in the store"
    sleep 2
    "${run_sandbox[@]}" "$HELPER" latency --dir "$W" --n "$N" >"$work/latency.txt"
    grep -v '^latency ' "$work/latency.txt"
fi

kill -TERM "$daemon_pid"
wait "$daemon_pid" || echo "bench-inbound: the daemon exited with $?" >&2
daemon_pid=""
echo "== stopping the sandbox"
kill -TERM "$sandbox_pid"
wait "$sandbox_pid" || true
sandbox_pid=""
echo "done"
