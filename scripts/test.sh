#!/usr/bin/env bash
# Every test: unit tests beside the code and the end-to-end tests in tests/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --tests
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/meterflow/target}"
export METERFLOW_TANSU="${METERFLOW_TANSU:-$HOME/.cache/meterflow/tansu/bin/tansu}"
export METERFLOW_MOTO="${METERFLOW_MOTO:-$HOME/.cache/meterflow/moto/bin/moto_server}"
# one build of the service binaries, in the same profile the tests use
cargo build --workspace --bins
cargo nextest run --workspace --no-fail-fast "$@"
