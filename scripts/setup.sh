#!/usr/bin/env bash
# Creates .venv with the build and test tools, builds the Rust core once, as a release wheel
# for CPython 3.9 and later (dist/ptebatch-VERSION-cp39-abi3-*.whl), and installs that wheel
# into .venv, so the tests and the demo run what a user installs.
# Needs only python3 (3.9+) with venv, and cargo/rustc; everything else comes from PyPI and
# crates.io. pip's and maturin's output goes to .venv/setup.log and is shown only on failure:
# stdout stays the caller's.
# Working on the code: `VIRTUAL_ENV=$PWD/.venv .venv/bin/maturin develop --release` installs an
# editable copy instead (Python edits take effect at once); this script replaces it again.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
log=.venv/setup.log
: >"$log"
quietly() {
  if ! "$@" >>"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "setup: failed: $* (whole output: $log)" >&2
    exit 1
  fi
}
quietly .venv/bin/python -m pip install --upgrade pip
quietly .venv/bin/python -m pip install "maturin>=1.7,<2" "numpy>=1.23" "pytest>=7" "hypothesis>=6.80" \
    "pytest-benchmark>=4" "dask[distributed]>=2023.1" "matplotlib>=3.7" "tomli>=1.1; python_version < '3.11'"
echo "setup: building the release wheel (a few minutes the first time; log in $log)" >&2
rm -f dist/ptebatch-*.whl
quietly .venv/bin/maturin build --release --interpreter .venv/bin/python -o dist
quietly .venv/bin/python -m pip install --no-deps --force-reinstall dist/ptebatch-*.whl
