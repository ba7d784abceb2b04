#!/usr/bin/env bash
# Installs what meterflow needs on a fresh Debian machine with a Rust toolchain:
# libvirt headers, pkg-config, cargo-nextest, and (for the tests) the Tansu broker,
# built once into ~/.cache/meterflow/tansu and reused, and moto's S3-compatible server
# (a Python package, in a virtualenv under ~/.cache/meterflow/moto) for the tests that
# write settlement files to S3.
set -euo pipefail
need_apt=()
for p in libvirt-dev pkg-config build-essential; do
  dpkg -s "$p" >/dev/null 2>&1 || need_apt+=("$p")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/meterflow/target}"
if [ "${1:-}" = "--tests" ]; then
  command -v cargo-nextest >/dev/null 2>&1 || cargo install cargo-nextest --locked
  TANSU="$HOME/.cache/meterflow/tansu/bin/tansu"
  if [ ! -x "$TANSU" ]; then
    echo "building the Tansu broker once (about 20-30 minutes)..." >&2
    cargo install tansu --version 0.6.0 --locked --features dynostore,libsql --root "$HOME/.cache/meterflow/tansu"
  fi
  MOTO="$HOME/.cache/meterflow/moto"
  if [ ! -x "$MOTO/bin/moto_server" ]; then
    python3 -m venv "$MOTO" 2>/dev/null || {
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
      python3 -m venv "$MOTO"
    }
    "$MOTO/bin/pip" install -q 'moto[server]==5.2.5'
  fi
fi
