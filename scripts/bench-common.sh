# shellcheck shell=bash
# What scripts/bench-inbound.sh and scripts/bench-outbound.sh share. Sourced
# (not run) once $work, $W, NICE, DAEMON_CPU and SANDBOX_CPU are set: it
# defines how the daemon and the sandbox are started (nice, and pinned with
# taskset unless PIN=0 or taskset is missing), the clean-up on exit (every
# process the benchmark started; the work folder unless KEEP is set), and
# two steps of the report.

if [ "${PIN:-1}" != 0 ] && command -v taskset >/dev/null; then
    run_daemon=(nice -n "$NICE" taskset -c "$DAEMON_CPU")
    run_sandbox=(nice -n "$NICE" taskset -c "$SANDBOX_CPU")
else
    run_daemon=(nice -n "$NICE")
    run_sandbox=(nice -n "$NICE")
fi

sandbox_pid=""
daemon_pid=""
sampler_pid=""
strace_pid=""
cleanup() {
    local rc=$?
    [ -n "$strace_pid" ] && kill -INT "$strace_pid" 2>/dev/null || true
    [ -n "$sampler_pid" ] && kill "$sampler_pid" 2>/dev/null || true
    if [ -n "$daemon_pid" ] && kill -0 "$daemon_pid" 2>/dev/null; then
        kill -TERM "$daemon_pid" 2>/dev/null || true
        wait "$daemon_pid" 2>/dev/null || true
    fi
    if [ -n "$sandbox_pid" ] && kill -0 "$sandbox_pid" 2>/dev/null; then
        kill -TERM "$sandbox_pid" 2>/dev/null || true
        wait "$sandbox_pid" 2>/dev/null || true
    fi
    if [ -z "${KEEP:-}" ]; then rm -rf "$work"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The first lines of the report: the machine and its load.
bench_machine() {
    echo "== machine"
    echo "nproc: $(nproc); $(grep -m1 'model name' /proc/cpuinfo)"
    echo "memory: $(grep MemTotal /proc/meminfo | tr -s ' ')"
    echo "kernel: $(uname -r); file system of $work: $(df -T "$work" | awk 'NR==2 {print $2}')"
    echo "load: $(cut -d' ' -f1-3 /proc/loadavg)"
}

# bench_sandbox NAME: starts `pecgate sandbox` in $W (log: $work/sandbox.log,
# pid: $sandbox_pid) and waits up to 30 s for its sandbox.json; NAME is the
# script's name in the error.
bench_sandbox() {
    echo "== sandbox"
    "${run_sandbox[@]}" "$PECGATE" sandbox --dir "$W" >"$work/sandbox.log" 2>&1 &
    sandbox_pid=$!
    for _ in $(seq 300); do
        [ -s "$W/sandbox.json" ] && break
        kill -0 "$sandbox_pid" 2>/dev/null || { cat "$work/sandbox.log" >&2; exit 1; }
        sleep 0.1
    done
    [ -s "$W/sandbox.json" ] || { echo "$1: the sandbox did not start" >&2; exit 1; }
}
