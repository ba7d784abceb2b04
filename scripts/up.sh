#!/usr/bin/env bash
# The main job: the whole pipeline on the embedded default, settlement files and a summary.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/meterflow/target}"
cargo build --workspace --bins
exec "$CARGO_TARGET_DIR/debug/meterflow" up "$@"
