#!/usr/bin/env bash
# Creates .venv with the build and test tools and builds the Rust core into it (release).
# Needs only python3 (3.9+) with venv, and cargo/rustc; everything else comes from PyPI and
# crates.io.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "maturin>=1.7,<2" "numpy>=1.23" "pytest>=7" "hypothesis>=6.80" "pytest-benchmark>=4"
# maturin installs into $VIRTUAL_ENV when one is active: make it this checkout's .venv.
VIRTUAL_ENV="$PWD/.venv" .venv/bin/maturin develop --release -q
