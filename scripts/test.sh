#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh builds the release wheel and installs it into .venv),
# then runs every test: mypy's stubtest checks the hand-written type stubs against the built
# module; cargo test the pure-Rust core (no Python); pytest the Python suite (API, reference,
# Rust-vs-reference properties, the CLI, and the wheel installed into a fresh virtualenv); and a
# quick smoke run of the benchmarks (small tables, timing disabled); then the documentation
# site is built with warnings as errors (scripts/docs.sh).
# PTEBATCH_SKIP_LIVE=1 skips the tests that read other processes' /proc files or, as root, set
# (and restore) the kernel's mTHP controls.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! .venv/bin/python -m pip install "mypy>=1.10" >>.venv/setup.log 2>&1; then
  tail -n 40 .venv/setup.log >&2
  exit 1
fi
.venv/bin/python -m mypy.stubtest ptebatch._core
cargo test --quiet
PTEBATCH_AGREE_EXAMPLES=25 PTEBATCH_SIM_EXAMPLES=40 .venv/bin/pytest -q tests
PTEBATCH_BENCH_PTES=65536 PTEBATCH_BENCH_FORK_BYTES=$((4 << 20)) PTEBATCH_BENCH_FORK_REF_BYTES=$((1 << 20)) \
    PTEBATCH_BENCH_SCALE_BYTES=$((64 << 20)) \
    .venv/bin/pytest -q benches --benchmark-disable
# The documentation site builds without a warning (API reference from the docstrings).
bash scripts/docs.sh >>.venv/setup.log 2>&1 || { tail -n 40 .venv/setup.log >&2; echo "test.sh: the docs do not build" >&2; exit 1; }
echo "test.sh: all tests passed"
