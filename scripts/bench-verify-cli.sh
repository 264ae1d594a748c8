#!/usr/bin/env bash
# Times `pecgate verify --json` over N signed acceptance receipts (default
# 10,000) and, for comparison, `openssl smime -verify` run once per file
# over a sample of them. See docs/BENCHMARKS.md.
#
#   scripts/bench-verify-cli.sh            # N=10000 SAMPLE=200 RUNS=5
#   N=1000 RUNS=3 scripts/bench-verify-cli.sh
#   KEEP=/tmp/receipts scripts/bench-verify-cli.sh   # keep the receipts
#   PECGATE=/path/to/other/pecgate KEEP=/tmp/receipts scripts/bench-verify-cli.sh
#                                      # time another build on the same files
#
# Uses hyperfine when installed (apt-get install hyperfine), else
# /usr/bin/time. pecgate and openssl are pinned to one core (CPU, default
# 0) with taskset when it exists: the goal is stated per core. On a shared
# machine, `nice -n -10 scripts/bench-verify-cli.sh` (as root) steadies the
# figures.
set -euo pipefail

N=${N:-10000}
SAMPLE=${SAMPLE:-200}
RUNS=${RUNS:-5}

cd "$(dirname "$0")/.."
cargo build --release --bin pecgate --example make-receipts
target=$(cargo metadata --format-version 1 --no-deps |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
pecgate=${PECGATE:-$target/release/pecgate}
make_receipts="$target/release/examples/make-receipts"

if [ -n "${KEEP:-}" ]; then
    work=$KEEP
    mkdir -p "$work"
else
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
fi
if [ ! -d "$work/receipts" ] || [ "$(find "$work/receipts" -name '*.eml' | wc -l)" -ne "$N" ]; then
    rm -rf "$work/receipts" "$work/ca"
    "$make_receipts" "$work" "$N"
fi

pin=()
if command -v taskset >/dev/null; then
    pin=(taskset -c "${CPU:-0}")
fi

echo "== machine"
echo "nproc: $(nproc); $(grep -m1 'model name' /proc/cpuinfo)"
echo "load: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "$("$pecgate" --version); $(openssl version)"
echo "receipts: $N in $work/receipts ($(du -sh "$work/receipts" | cut -f1))"

echo "== sanity: every receipt valid"
valid=$("$pecgate" verify --trust "$work/ca" --json "$work/receipts" |
    grep -c '"status":"valid"' || true)
echo "$valid of $N valid"
[ "$valid" -eq "$N" ] || { echo "not every receipt verified" >&2; exit 1; }

cmd="${pin[*]} $pecgate verify --trust $work/ca --json $work/receipts"
echo "== pecgate verify --json over $N files: $cmd"
if command -v hyperfine >/dev/null; then
    hyperfine --warmup 1 --runs "$RUNS" --export-json "$work/hyperfine-pecgate.json" \
        "$cmd > /dev/null"
else
    /usr/bin/time -f "wall %e s, user %U s, sys %S s, max RSS %M KB" \
        "${pin[@]}" "$pecgate" verify --trust "$work/ca" --json "$work/receipts" >/dev/null
fi
echo "-- max RSS"
/usr/bin/time -f "wall %e s, user %U s, sys %S s, max RSS %M KB" \
    "${pin[@]}" "$pecgate" verify --trust "$work/ca" --json "$work/receipts" >/dev/null

echo "== openssl smime -verify, one process per file, over $SAMPLE files"
find "$work/receipts" -name '*.eml' | sort >"$work/all.txt"
head -n "$SAMPLE" "$work/all.txt" >"$work/sample.txt"
cat >"$work/openssl-loop.sh" <<LOOP
#!/usr/bin/env bash
set -e
while read -r f; do
    openssl smime -verify -CAfile "$work/ca/ca.pem" -partial_chain -no-CApath -no-CAstore \
        -in "\$f" -out /dev/null 2>/dev/null
done <"$work/sample.txt"
LOOP
chmod +x "$work/openssl-loop.sh"
if command -v hyperfine >/dev/null; then
    hyperfine --warmup 1 --runs "$RUNS" --export-json "$work/hyperfine-openssl.json" \
        "${pin[*]} $work/openssl-loop.sh"
else
    /usr/bin/time -f "wall %e s for $SAMPLE files" "${pin[@]}" "$work/openssl-loop.sh"
fi
echo "(divide by $SAMPLE for the cost per file)"
