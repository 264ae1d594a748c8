#!/bin/sh
# Runs one fuzz target with the settings used for the recorded runs.
#   ./run.sh TARGET [SECONDS]      (needs cargo-fuzz and the nightly toolchain)
#   BUILD=-O ./run.sh TARGET       (release without debug assertions, see README)
# New inputs go to corpus/TARGET (git-ignored), crashes to artifacts/TARGET.
set -eu
cd "$(dirname "$0")"
t=${1:?target: classify | take_apart | daticert | verify}
secs=${2:-300}
case $t in
    daticert) dict=dicts/daticert.dict ;;
    *) dict=dicts/mime.dict ;;
esac
mkdir -p "corpus/$t" logs
# -jobs=1 -workers=1: one fuzzing process (libFuzzer's log: logs/fuzz-0.log).
cd logs
# shellcheck disable=SC2086
exec cargo +nightly fuzz run ${BUILD:-} --fuzz-dir .. "$t" "../corpus/$t" "../seeds/$t" -- \
    -dict="../$dict" -max_total_time="$secs" -max_len=65536 -rss_limit_mb=2048 \
    -timeout=10 -jobs=1 -workers=1 -print_final_stats=1
