#!/usr/bin/env bash
# Outbound benchmark (issue 5) against the local PEC sandbox. See
# docs/BENCHMARKS.md, "Outbound (issue 5)".
#
#   scripts/bench-outbound.sh                  # N=200 latency letters, BATCH=10000
#   N=50 BATCH=2000 scripts/bench-outbound.sh  # a shorter run
#   STRACE=1 BATCH=2000 scripts/bench-outbound.sh
#                      # also count the daemon's syscalls during the batch
#                      # (strace -c -f -w: slows the daemon down; the batch
#                      # figures of such a run are not throughput figures)
#   STRACE=calls BATCH=10000 SEND=0 scripts/bench-outbound.sh
#                      # every file-system call of the intake with its duration
#                      # (strace -f -T -ttt -y), summed per 1,000 letters queued
#                      # and per kind of path: which call grows with the batch
#   SEND=0 scripts/bench-outbound.sh   # stop once every batch letter is queued
#                      # (the intake figures only; the sender still runs meanwhile)
#   KEEP=/tmp/bench-out scripts/bench-outbound.sh   # keep the world and logs
#   NODELAY=1 scripts/bench-outbound.sh
#                      # experiment: the daemon runs with an LD_PRELOAD shim
#                      # (built here with cc) that sets TCP_NODELAY on every
#                      # TCP socket it connects, which is what the fix proposed
#                      # for src/smtp.rs does (docs/BENCHMARKS.md)
#
# What it does:
# 1. builds the release binary; measures the disk (a 2 KB file written
#    durably from 1, 4 and 8 threads; without fsync, then one sync(2)); starts
#    `pecgate sandbox --dir W` (needs Dovecot: scripts/setup);
# 2. latency: starts `pecgate run` with pacing off and a 0.05 s settle, then
#    drops N letters one at a time (document and envelope written under a
#    temporary name, then renamed into the outbox; the next letter only after
#    the previous one was submitted) and computes, from the daemon's JSON log,
#    drop -> dispatch.submitted (the provider's 250) per letter: p50, p99, max;
# 3. batch: stops the daemon, puts BATCH letters (envelope + one DOC_BYTES
#    document each) into the outbox at once, starts the daemon again and
#    measures (a) intake throughput (start -> every letter `queued`: scan,
#    claim, validation, sent folder, store), (b) compose + submit throughput
#    through the sandbox (includes the simulated provider), (c) the daemon's
#    resident memory, sampled every 100 ms (max VmRSS) and VmHWM at the end;
# 4. stops the daemon and the sandbox with SIGTERM.
#
# Pinning: the daemon runs on DAEMON_CPU (default 1), the sandbox and Dovecot
# on SANDBOX_CPU (default 0), both at nice NICE (default -10 as root, else 0).
#
# Parameters (environment): N, BATCH, DOC_BYTES (2048), DAEMON_CPU,
# SANDBOX_CPU, NICE, SUBMIT_TIMEOUT (seconds to wait for the batch to be
# submitted, default 1800), LATENCY=0 or BATCH=0 to skip a phase, STRACE=1,
# STRACE=calls, SEND=0, NODELAY=1, KEEP=DIR, PECGATE=/path/to/pecgate (skips
# the build).
set -euo pipefail

N=${N:-200}
BATCH=${BATCH:-10000}
DOC_BYTES=${DOC_BYTES:-2048}
DAEMON_CPU=${DAEMON_CPU:-1}
SANDBOX_CPU=${SANDBOX_CPU:-0}
SUBMIT_TIMEOUT=${SUBMIT_TIMEOUT:-1800}
LATENCY=${LATENCY:-1}
STRACE=${STRACE:-0}
SEND=${SEND:-1}
export SEND
NODELAY=${NODELAY:-0}
if [ "$(id -u)" -eq 0 ]; then NICE=${NICE:--10}; else NICE=${NICE:-0}; fi

cd "$(dirname "$0")/.."
repo=$PWD
if [ -z "${PECGATE:-}" ]; then
    cargo build --release --bin pecgate
    target=$(cargo metadata --format-version 1 --no-deps |
        sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
    PECGATE=$target/release/pecgate
fi
command -v dovecot >/dev/null || [ -x /usr/sbin/dovecot ] ||
    { echo "bench-outbound: Dovecot is missing: run scripts/setup" >&2; exit 1; }
command -v python3 >/dev/null || { echo "bench-outbound: python3 is needed" >&2; exit 1; }

if [ -n "${KEEP:-}" ]; then
    work=$KEEP
    if [ -e "$work" ] && [ -n "$(ls -A "$work")" ] && [ ! -f "$work/analyse.py" ]; then
        echo "bench-outbound: KEEP=$work is not empty and not an earlier run's folder" >&2
        exit 1
    fi
    rm -rf "$work"
    mkdir -p "$work"
else
    work=$(mktemp -d /var/tmp/pecgate-bench-outbound.XXXXXX)
fi
# Dovecot's mail processes (another user) must reach the world's folders.
chmod 0755 "$work"
W=$work/world
mkdir -p "$W"

# shellcheck source=scripts/bench-common.sh
. "$repo/scripts/bench-common.sh"

# The analysis: python3, standard library only.
cat >"$work/analyse.py" <<'PY'
import json, os, re, sys, datetime, math, collections

def ts(s):
    return datetime.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()

def events(path):
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                j = json.loads(line)
            except ValueError:
                continue
            if "timestamp" in j:
                j["t"] = ts(j["timestamp"])
                out.append(j)
    return out

def pct(xs, p):
    """Nearest-rank percentile."""
    xs = sorted(xs)
    k = max(1, math.ceil(p / 100 * len(xs)))
    return xs[k - 1]

def ms(x):
    return f"{x * 1000:.1f} ms"

def summary(name, xs):
    if not xs:
        return f"{name}: none"
    return (f"{name}: n={len(xs)} p50={ms(pct(xs, 50))} p90={ms(pct(xs, 90))} "
            f"p99={ms(pct(xs, 99))} max={ms(max(xs))} mean={ms(sum(xs) / len(xs))}")

def latency(log, drops):
    drop = {}
    with open(drops) as f:
        for line in f:
            name, t = line.split()
            drop[name] = float(t)
    claimed, queued, by_id, submitted = {}, {}, {}, {}
    for e in events(log):
        ev = e.get("event")
        if ev == "letter.claimed":
            claimed[e["letter"]] = e["t"]
        elif ev == "dispatch.queued":
            queued[e["letter"]] = e["t"]
            by_id[e["letter"]] = e["dispatch_id"]
        elif ev == "dispatch.submitted":
            submitted[e["dispatch_id"]] = e["t"]
    total, to_claim, to_queue, to_submit = [], [], [], []
    missing = []
    for name, t0 in drop.items():
        did = by_id.get(name)
        if did is None or did not in submitted:
            missing.append(name)
            continue
        t3 = submitted[did]
        total.append(t3 - t0)
        to_claim.append(claimed[name] - t0)
        to_queue.append(queued[name] - claimed[name])
        to_submit.append(t3 - queued[name])
    print(summary("drop -> submitted (250)", total))
    print(summary("  drop -> letter.claimed (settle + watcher)", to_claim))
    print(summary("  claimed -> dispatch.queued (validation, sent folder, store)", to_queue))
    print(summary("  queued -> dispatch.submitted (compose, archive, SMTP)", to_submit))
    if missing:
        print(f"NOT SUBMITTED: {len(missing)} letters, e.g. {missing[:3]}")
        return 1
    return 0

def batch(log, rss, start, batch_n):
    start = float(start)
    batch_n = int(batch_n)
    evs = events(log)
    def times(name):
        return [e["t"] for e in evs if e.get("event") == name]
    started = times("daemon.started")
    claimed, queued, submitted = times("letter.claimed"), times("dispatch.queued"), times("dispatch.submitted")
    rejected = times("letter.rejected")
    io = []
    try:
        with open(os.path.join(os.path.dirname(rss), "io.txt")) as f:
            for line in f:
                x = line.split()
                if len(x) == 4:
                    io.append((float(x[0]), int(x[1]), int(x[2]), int(x[3])))
    except OSError:
        pass
    def io_between(t0, t1):
        xs = [s for s in io if t0 <= s[0] <= t1]
        if len(xs) < 2:
            return ""
        own = (xs[-1][1] - xs[0][1]) / 2**20
        dev = (xs[-1][3] - xs[0][3]) * 512 / 2**20
        return f", disk {dev:.0f} MiB ({own:.0f} by pecgate), {(xs[-1][2] - xs[0][2]) / (xs[-1][0] - xs[0][0]):.0f} writes/s"
    samples = []
    with open(rss) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 4:
                samples.append((float(parts[0]), int(parts[1]), int(parts[2]), float(parts[3])))
    def cpu_between(t0, t1):
        xs = [s for s in samples if t0 <= s[0] <= t1]
        if len(xs) < 2:
            return None
        return xs[-1][3] - xs[0][3], xs[-1][0] - xs[0][0]
    t_started = started[0] if started else start
    print(f"process launched -> daemon.started: {ms(t_started - start)} "
          f"(the intake task starts before daemon.started is logged)")
    print(f"letters claimed: {len(claimed)}, queued: {len(queued)}, submitted: {len(submitted)}, rejected: {len(rejected)}")
    if claimed:
        d = max(claimed[-1] - claimed[0], 1e-9)
        print(f"launch -> first claim: {ms(claimed[0] - start)} (start-up + scan of the outbox)")
        print(f"claims (the first pass claims every letter before taking any in): {d:.2f} s, "
              f"{len(claimed) / d:.0f} letters/s, {ms(d / len(claimed))} per letter")
    if queued:
        d = max(queued[-1] - claimed[-1], 1e-9)
        print(f"take-in (validation + sent folder + store), last claim -> last queued: {d:.2f} s, "
              f"{len(queued) / d:.0f} letters/s, {ms(d / len(queued))} per letter")
        d = queued[-1] - start
        print(f"(a) INTAKE, process launch -> all {len(queued)} queued: {d:.2f} s = {len(queued) / d:.0f} letters/s "
              f"({ms(d / len(queued))} per letter)")
        c = cpu_between(start, queued[-1])
        if c:
            print(f"    daemon CPU time in that interval: {c[0]:.2f} s of {c[1]:.2f} s wall "
                  f"({100 * c[0] / c[1]:.0f}% of one core; {ms(c[0] / len(queued))} CPU per letter)")
        # Per 1,000 letters queued: does the intake slow down as the batch
        # proceeds? (and how many letters the sender submitted meanwhile)
        seg = []
        prev = claimed[0] if claimed else start
        for i in range(999, len(queued), 1000):
            d = max(queued[i] - prev, 1e-9)
            c = cpu_between(prev, queued[i])
            cpu = f", CPU {100 * c[0] / c[1]:.0f}%" if c and c[1] > 0 else ""
            sent = sum(1 for x in submitted if x <= queued[i])
            seg.append(f"{i + 1}: {1000 / d:.0f}/s{cpu}{io_between(prev, queued[i])}, {sent} sent")
            prev = queued[i]
        if seg:
            print("    per 1,000 letters queued:\n      " + "\n      ".join(seg))
    if submitted:
        t0 = queued[-1] if queued else t_started
        d = submitted[-1] - t0
        print(f"(b) COMPOSE + SUBMIT, through the sandbox provider: first 250 {ms(submitted[0] - t0)} after the "
              f"last queued; last queued -> all {len(submitted)} submitted: {d:.2f} s = {len(submitted) / d:.1f} letters/s "
              f"({ms(d / len(submitted))} per letter)")
        c = cpu_between(t0, submitted[-1])
        if c:
            print(f"    daemon CPU time in that interval: {c[0]:.2f} s of {c[1]:.2f} s wall "
                  f"({100 * c[0] / c[1]:.0f}% of one core; {ms(c[0] / len(submitted))} CPU per letter)")
        d3 = submitted[-1] - start
        print(f"    whole batch, launch -> all submitted: {d3:.2f} s = {len(submitted) / d3:.1f} letters/s")
    if samples:
        peak = max(samples, key=lambda s: s[1])
        def phase(t):
            if queued and t <= queued[-1]:
                return "intake"
            if submitted and t <= submitted[-1]:
                return "sending"
            return "after"
        hwm = max(s[2] for s in samples)
        print(f"(c) RSS: {len(samples)} samples every 100 ms; max VmRSS {peak[1] / 1024:.1f} MiB "
              f"at +{peak[0] - start:.1f} s ({phase(peak[0])}); VmHWM {hwm / 1024:.1f} MiB; "
              f"goal < 64 MiB: {'met' if hwm < 64 * 1024 else 'NOT met'}")
        for name in ("intake", "sending"):
            xs = [s[1] for s in samples if phase(s[0]) == name]
            if xs:
                print(f"    {name}: max VmRSS {max(xs) / 1024:.1f} MiB, median {sorted(xs)[len(xs) // 2] / 1024:.1f} MiB")
    ok = len(queued) == batch_n and (len(submitted) == batch_n or os.environ.get("SEND") == "0")
    return 0 if ok else 1

def calls(trace, log):
    """strace -f -T -ttt -y lines, per 1,000 letters queued: calls and seconds
    per (syscall, kind of path)."""
    queued = [e["t"] for e in events(log) if e.get("event") == "dispatch.queued"]
    if len(queued) < 1000:
        return 0
    bounds = queued[999::1000]
    line_re = re.compile(r"^\d+\s+(\d+\.\d+) (\w+)\((.*)\)\s+=\s+(-?\d+).*<([\d.]+)>$")
    def kind(args):
        for pat, name in (("-wal>", "store WAL"), ("-journal", "store journal"), (".sqlite", "store db"),
                          ("pecgate.db", "store db"), ("/.processing/", "outbox/.processing/*"),
                          (".processing>", "outbox/.processing"), ("/outbox/rejected", "rejected"),
                          ("/sent/", "sent/…/<id>/*"), ("/archive/", "archive"), ("/outbox", "outbox")):
            if pat in args:
                return name
        return "other"
    segs = [collections.Counter() for _ in bounds]
    count = [collections.Counter() for _ in bounds]
    unfinished_re = re.compile(r"^(\d+)\s+(\d+\.\d+) (\w+)\((.*) <unfinished \.\.\.>$")
    resumed_re = re.compile(r"^(\d+)\s+\d+\.\d+ <\.\.\. (\w+) resumed>(.*)\)\s+=\s+(-?\d+).*<([\d.]+)>$")
    started = {}
    with open(trace, errors="replace") as f:
        for line in f:
            line = line.strip()
            m = line_re.match(line)
            if m:
                t, call, args, dur = float(m[1]), m[2], m[3], float(m[5])
            elif (u := unfinished_re.match(line)):
                started[u[1]] = (float(u[2]), u[3], u[4])
                continue
            elif (r := resumed_re.match(line)) and r[1] in started:
                t, call, args = started.pop(r[1])
                args, dur = args + r[3], float(r[5])
            else:
                continue
            i = next((k for k, b in enumerate(bounds) if t <= b), None)
            if i is None:
                continue
            key = (call, kind(args))
            segs[i][key] += dur
            count[i][key] += 1
    keys = sorted({k for s in segs for k in s}, key=lambda k: -sum(s[k] for s in segs))
    print("per 1,000 letters queued: calls / total ms in the call (strace -T, every thread)")
    print(f"{'call':<10} {'path':<22} " + " ".join(f"{(i + 1) * 1000:>13}" for i in range(len(bounds))))
    for k in keys[:18]:
        print(f"{k[0]:<10} {k[1]:<22} " + " ".join(
            f"{count[i][k]:>6}/{segs[i][k] * 1000:>6.0f}" for i in range(len(bounds))))
    return 0

if __name__ == "__main__":
    if sys.argv[1] == "calls":
        sys.exit(calls(*sys.argv[2:]))
    if sys.argv[1] == "latency":
        sys.exit(latency(*sys.argv[2:]))
    sys.exit(batch(*sys.argv[2:]))
PY

# Sampler: "unix-time VmRSS-kB VmHWM-kB cpu-seconds" every 100 ms while the
# process lives (cpu = user + system time of the whole process).
cat >"$work/rss.py" <<'PY'
import os, re, sys, time
pid, out = sys.argv[1], sys.argv[2]
tick = os.sysconf("SC_CLK_TCK")
# io.txt: "unix-time daemon-write-bytes device-writes device-write-sectors"
# (whole disks of the machine, every process: to tell the daemon's own disk
# traffic from everyone else's on a shared machine).
def disks():
    w = sec = 0
    with open("/proc/diskstats") as d:
        for line in d:
            x = line.split()
            if re.fullmatch(r"(vd|sd|xvd)[a-z]+|nvme\d+n\d+", x[2]):
                w, sec = w + int(x[7]), sec + int(x[9])
    return w, sec
io = open(os.path.join(os.path.dirname(out), "io.txt"), "w")
with open(out, "w") as f:
    while True:
        try:
            with open(f"/proc/{pid}/io") as s:
                wb = dict(l.split(": ") for l in s.read().splitlines())["write_bytes"]
            io.write(f"{time.time():.3f} {wb} {' '.join(map(str, disks()))}\n")
            io.flush()
        except (OSError, KeyError, ValueError):
            pass
        try:
            with open(f"/proc/{pid}/status") as s:
                st = s.read()
            with open(f"/proc/{pid}/stat") as s:
                fields = s.read().rsplit(")", 1)[1].split()
            cpu = (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            break
        v = dict(l.split(":", 1) for l in st.splitlines() if ":" in l)
        try:
            rss, hwm = int(v["VmRSS"].split()[0]), int(v["VmHWM"].split()[0])
        except (KeyError, ValueError):
            break
        f.write(f"{time.time():.3f} {rss} {hwm} {cpu:.2f}\n")
        f.flush()
        time.sleep(0.1)
PY

# Makes BATCH letters in the outbox: bench-b-NNNNN.toml + bench-b-NNNNN.pdf.
cat >"$work/make.py" <<'PY'
import os, sys
outbox, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
head = b"%PDF-1.4\n% pecgate outbound benchmark\n"
for i in range(1, n + 1):
    name = f"bench-b-{i:05d}"
    body = head + f"letter {i}\n".encode()
    body += b"x" * max(0, size - len(body) - 6) + b"\n%%EOF"
    with open(os.path.join(outbox, name + ".pdf"), "wb") as f:
        f.write(body)
    with open(os.path.join(outbox, name + ".toml"), "w") as f:
        f.write(f'to = ["mario.rossi@pec.cittadini.sandbox.test"]\n'
                f'subject = "Benchmark batch letter {i}"\n'
                f'body = "Gentile signor Rossi,\\nin allegato il documento n. {i}.\\n"\n'
                f'attachments = ["{name}.pdf"]\nprotocol = "2026/B{i:07d}"\n')
PY

preload=()
if [ "$NODELAY" != 0 ]; then
    cat >"$work/nodelay.c" <<'C'
/* Sets TCP_NODELAY on every TCP socket before connect(2). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
int connect(int fd, const struct sockaddr *addr, socklen_t len) {
    static int (*real)(int, const struct sockaddr *, socklen_t);
    if (!real) real = (int (*)(int, const struct sockaddr *, socklen_t))dlsym(RTLD_NEXT, "connect");
    if (addr && (addr->sa_family == AF_INET || addr->sa_family == AF_INET6)) {
        int type = 0, one = 1;
        socklen_t tl = sizeof type;
        if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &tl) == 0 && type == SOCK_STREAM)
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    return real(fd, addr, len);
}
C
    cc -shared -fPIC -O2 -o "$work/nodelay.so" "$work/nodelay.c" -ldl
    preload=(env "LD_PRELOAD=$work/nodelay.so")
fi

bench_machine
src_state=$(git -C "$repo" status --porcelain -- src 2>/dev/null | wc -l)
echo "pecgate: $PECGATE ($("$PECGATE" --version)); tree at git $(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo '?'), $src_state uncommitted change(s) under src/ at the start"
echo "daemon on CPU $DAEMON_CPU, sandbox on CPU $SANDBOX_CPU, nice $NICE; N=$N BATCH=$BATCH DOC_BYTES=$DOC_BYTES"
[ "$NODELAY" = 0 ] || echo "EXPERIMENT: daemon with TCP_NODELAY forced by LD_PRELOAD=$work/nodelay.so"
echo "work dir: $work"

echo "== disk: a 2 KB file written, fsync'ed and renamed (python3), in $work"
python3 - "$work/disk-probe" <<'PY'
import os, sys, threading, time
d = sys.argv[1]
os.makedirs(d)
def put(path, sync):
    fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT, 0o640)
    os.write(fd, b"x" * 2048)
    if sync:
        os.fsync(fd)
    os.close(fd)
    os.rename(path + ".tmp", path)
def run(threads, n=400):
    names = [f"{d}/t{threads}-{i}" for i in range(n)]
    ts = [threading.Thread(target=lambda c=names[k::threads]: [put(p, True) for p in c])
          for k in range(threads)]
    t = time.perf_counter()
    for x in ts: x.start()
    for x in ts: x.join()
    return (time.perf_counter() - t) / n * 1e6
fsync_dir = []
for i in range(200):
    t = time.perf_counter()
    put(f"{d}/dir{i}", True)
    fd = os.open(d, os.O_RDONLY)
    t1 = time.perf_counter()
    os.fsync(fd)
    fsync_dir.append(time.perf_counter() - t1)
    os.close(fd)
print(f"fsync of the folder after a rename: {sorted(fsync_dir)[100] * 1e6:.0f} us (median)")
for k in (1, 4, 8):
    print(f"write + fsync + rename, {k} thread(s): {run(k):.0f} us per file")
t = time.perf_counter()
for i in range(400):
    put(f"{d}/n{i}", False)
t1 = time.perf_counter()
os.sync()
t2 = time.perf_counter()
print(f"write + rename without fsync: {(t1 - t) / 400 * 1e6:.0f} us per file; "
      f"then one sync(2) for all 400: {(t2 - t1) * 1e3:.1f} ms")
PY
rm -rf "$work/disk-probe"

bench_sandbox bench-outbound
echo "sandbox pid $sandbox_pid, $(head -n 3 "$work/sandbox.log" | tail -n 2 | tr -s ' ' | tr '\n' ';')"

export PECGATE__MAILBOX__PROTOCOLLO__PACE__PER_MINUTE=1000000
export PECGATE__MAILBOX__PROTOCOLLO__PACE__PER_DAY=100000000
export PECGATE__OUTBOX__SETTLE_SECONDS=0.05
export PECGATE__OUTBOX__RESCAN_SECONDS=0.2

start_daemon() { # LOG
    "${preload[@]}" "${run_daemon[@]}" "$PECGATE" --config "$W/pecgate.toml" --log-format json run 2>>"$1" &
    daemon_pid=$!
}
wait_started() { # LOG
    for _ in $(seq 300); do
        grep -q '"daemon.started"' "$1" 2>/dev/null && return 0
        kill -0 "$daemon_pid" 2>/dev/null || { cat "$1" >&2; exit 1; }
        sleep 0.05
    done
    echo "bench-outbound: the daemon did not start" >&2
    exit 1
}
stop_daemon() {
    kill -TERM "$daemon_pid"
    local rc=0
    wait "$daemon_pid" || rc=$?
    daemon_pid=""
    [ "$rc" -eq 0 ] || echo "bench-outbound: the daemon exited with $rc" >&2
}
count() { # EVENT LOG
    grep -c "\"event\":\"$1\"" "$2" 2>/dev/null || true
}

outbox=$W/outbox
doc=$work/doc.pdf
python3 - "$doc" "$DOC_BYTES" <<'PY'
import sys
head = b"%PDF-1.4\n% pecgate outbound benchmark\n"
size = int(sys.argv[2])
open(sys.argv[1], "wb").write(head + b"x" * max(0, size - len(head) - 6) + b"\n%%EOF")
PY

if [ "$LATENCY" != 0 ] && [ "$N" -gt 0 ]; then
    echo "== latency: $N letters, one at a time, drop -> dispatch.submitted"
    log=$work/latency.log
    start_daemon "$log"
    wait_started "$log"
    : >"$work/drops.txt"
    for i in $(seq 1 "$N"); do
        name=bench-l-$(printf %05d "$i")
        cp "$doc" "$outbox/.$name.pdf.part"
        cat >"$outbox/.$name.toml.part" <<EOF
to = ["mario.rossi@pec.cittadini.sandbox.test"]
subject = "Benchmark latency letter $i"
body = "Gentile signor Rossi,\nin allegato il documento n. $i.\n"
attachments = ["$name.pdf"]
protocol = "2026/L$(printf %07d "$i")"
EOF
        mv "$outbox/.$name.pdf.part" "$outbox/$name.pdf"
        t0=$(date +%s.%N)
        mv "$outbox/.$name.toml.part" "$outbox/$name.toml"
        echo "$name.toml $t0" >>"$work/drops.txt"
        # The next letter only once this one has been submitted (250).
        deadline=$((SECONDS + 60))
        until [ "$(count dispatch.submitted "$log")" -ge "$i" ]; do
            if [ "$SECONDS" -ge "$deadline" ]; then
                echo "bench-outbound: letter $i not submitted within 60 s" >&2
                tail -n 5 "$log" >&2
                exit 1
            fi
            sleep 0.01
        done
    done
    stop_daemon
    python3 "$work/analyse.py" latency "$log" "$work/drops.txt"
fi

if [ "$BATCH" -gt 0 ]; then
    echo "== batch: $BATCH letters at once (daemon stopped while they are written)"
    python3 "$work/make.py" "$outbox" "$BATCH" "$DOC_BYTES"
    sync
    sleep 1 # older than the settle time
    log=$work/batch.log
    t_launch=$(date +%s.%N)
    start_daemon "$log"
    python3 "$work/rss.py" "$daemon_pid" "$work/rss.txt" &
    sampler_pid=$!
    poll=0.5
    if [ "$STRACE" = calls ]; then
        strace -f -T -ttt -y -e trace=fsync,fdatasync,rename,renameat,renameat2,openat,getdents64,mkdir,mkdirat,unlink,unlinkat,rmdir,pwrite64 \
            -o "$work/strace-calls.txt" -p "$daemon_pid" 2>/dev/null &
        strace_pid=$!
        poll=0.1
    elif [ "$STRACE" != 0 ]; then
        strace -c -f -w -o "$work/strace-intake.txt" -p "$daemon_pid" 2>/dev/null &
        strace_pid=$!
        poll=0.1
    fi
    wait_started "$log"
    deadline=$((SECONDS + SUBMIT_TIMEOUT))
    queued_at=""
    while :; do
        q=$(count dispatch.queued "$log")
        s=$(count dispatch.submitted "$log")
        if [ -z "$queued_at" ] && [ "$q" -ge "$BATCH" ]; then
            queued_at=$SECONDS
            echo "all $BATCH queued; sending ..."
            if [ -n "$strace_pid" ]; then
                kill -INT "$strace_pid" 2>/dev/null || true
                wait "$strace_pid" 2>/dev/null || true
                strace_pid=""
                echo "(strace: $s letters were already submitted when the intake count stopped)"
            fi
            [ "$SEND" = 0 ] && break
            if [ "$STRACE" = 1 ]; then
                strace -c -f -w -o "$work/strace-send.txt" -p "$daemon_pid" 2>/dev/null &
                strace_pid=$!
            fi
        fi
        [ "$s" -ge "$BATCH" ] && break
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "bench-outbound: timeout after $SUBMIT_TIMEOUT s: $q queued, $s submitted" >&2
            break
        fi
        sleep "$poll"
    done
    hwm=$(grep -E 'VmHWM|VmRSS' "/proc/$daemon_pid/status" | tr -s ' \t' ' ' | tr '\n' ' ')
    echo "at the end: $hwm"
    if [ -n "$strace_pid" ]; then
        kill -INT "$strace_pid" 2>/dev/null || true
        wait "$strace_pid" 2>/dev/null || true
        strace_pid=""
    fi
    stop_daemon
    wait "$sampler_pid" 2>/dev/null || true
    sampler_pid=""
    rc=0
    python3 "$work/analyse.py" batch "$log" "$work/rss.txt" "$t_launch" "$BATCH" || rc=$?
    states=$("$PECGATE" --config "$W/pecgate.toml" list --json |
        python3 -c 'import sys, json, collections
c = collections.Counter(json.loads(l)["state"] for l in sys.stdin if "Benchmark batch" in l)
print(", ".join(f"{k}: {v}" for k, v in sorted(c.items())))')
    echo "batch letters in the store (pecgate list --json): $states"
    if [ -s "$work/strace-calls.txt" ]; then
        echo "== strace -f -T, intake phase"
        python3 "$work/analyse.py" calls "$work/strace-calls.txt" "$log" || true
    fi
    for phase in intake send; do
        if [ -s "$work/strace-$phase.txt" ]; then
            echo "== strace -c -f -w, $phase phase (time in syscalls, every thread of the daemon; $BATCH letters)"
            head -n 25 "$work/strace-$phase.txt"
        fi
    done
    [ "$rc" -eq 0 ] || { echo "bench-outbound: not every batch letter was queued and submitted" >&2; exit "$rc"; }
fi
echo "== stopping the sandbox"
kill -TERM "$sandbox_pid"
wait "$sandbox_pid" || true
sandbox_pid=""
echo "done"
