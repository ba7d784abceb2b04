#!/usr/bin/env bash
# The proof (RELIABILITY.md, BENCHMARKS.md): the chaos runs, the decoders fuzzed for a
# bounded time, and the benchmarks, each printing its own figures. Not a CI job: it takes
# about an hour on 2 cores. `FUZZ_SECONDS` (default 60) bounds each fuzz target;
# `SKIP=chaos,fuzz,bench` leaves parts out; the benchmarks' run directories go under
# `BENCH_ROOT` (default /var/tmp) and are removed when the last benchmark has run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --tests
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/meterflow/target}"
export METERFLOW_TANSU="${METERFLOW_TANSU:-$HOME/.cache/meterflow/tansu/bin/tansu}"
skip() { [[ ",${SKIP:-}," == *",$1,"* ]]; }
rel="$CARGO_TARGET_DIR/release"
echo "== $(date -u +%FT%TZ) on $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB"
cargo build --release --workspace --bins

if ! skip chaos; then
  echo "== chaos: 1,000,000 samples, 50 SIGKILLs, members added and removed (Tansu in memory)"
  "$rel/chaos" 1000000 50 1
  echo "== chaos: 20,000 samples, 4 SIGKILLs, the broker SIGKILLed twice (Tansu on sqlite)"
  "$rel/chaos" --persistent 20000 4 1
fi

if ! skip fuzz; then
  # cargo-fuzz needs the compiler's unstable flags; RUSTC_BOOTSTRAP lets the one stable
  # toolchain here take them
  command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
  export RUSTC_BOOTSTRAP=1
  for t in $(cd fuzz && cargo fuzz list); do
    echo "== fuzz $t (${FUZZ_SECONDS:-60} s)"
    log="$(mktemp)"
    if ! (cd fuzz && cargo fuzz run "$t" --target-dir "$HOME/.cache/meterflow/fuzz-target" -- \
      -max_total_time="${FUZZ_SECONDS:-60}" -rss_limit_mb=2048 -print_final_stats=1) >"$log" 2>&1; then
      tail -60 "$log"
      echo "fuzz target $t failed (crash input under fuzz/artifacts/$t)" >&2
      exit 1
    fi
    grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb|Done)' "$log" || true
  done
fi

if ! skip bench; then
  echo "== benchmarks"
  # Their run directories (broker data, logs, settlement files) go to a directory of
  # their own, kept until every benchmark has run: files created where thousands were
  # just deleted cost the settler a scan per file on some filesystems (BENCHMARKS.md,
  # "Creating files where files were just deleted").
  METERFLOW_BENCH_DIR="$(mktemp -d "${BENCH_ROOT:-/var/tmp}/meterflow-bench.XXXXXX")"
  export METERFLOW_BENCH_DIR
  "$rel/bench-pipeline" stages 200 1001
  # each stage five times more against its relay (the medians: single runs scatter on
  # a machine whose speed moves within minutes)
  "$rel/bench-pipeline" enricher-ab 200 1001 5
  "$rel/bench-pipeline" rater-ab 200 1001 5
  "$rel/bench-pipeline" settler-ab 200 1001 5 day
  "$rel/bench-pipeline" settler-ab 200 1001 5 month
  "$rel/bench-pipeline" chain 200 1001
  "$rel/bench-pipeline" 200 1001
  "$rel/bench-pipeline" latency 200 1200 60 300
  "$rel/bench-pipeline" rater-memory 200 8 720
  "$rel/bench-pipeline" probes 200 1001
  "$rel/bench-poll" 1000 200
  "$rel/bench-rules" 200000 100 20
  "$rel/bench-rerate" 1000 43200
  rm -rf "$METERFLOW_BENCH_DIR"
fi
echo "== proof done"
