#!/usr/bin/env bash
# Sets everything up, then runs every test: the pure-Rust core (cargo test, no Python),
# the Python suite (pytest: API, reference, Rust-vs-reference properties), and a quick
# smoke run of the benchmarks (small tables, timing disabled); first, mypy's stubtest checks
# the hand-written type stubs against the built module.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pip install -q "mypy>=1.10"
.venv/bin/python -m mypy.stubtest ptebatch._core
cargo test --quiet
PTEBATCH_AGREE_EXAMPLES=25 PTEBATCH_SIM_EXAMPLES=40 .venv/bin/pytest -q tests
PTEBATCH_BENCH_PTES=65536 PTEBATCH_BENCH_FORK_BYTES=$((4 << 20)) PTEBATCH_BENCH_FORK_REF_BYTES=$((1 << 20)) \
    .venv/bin/pytest -q benches --benchmark-disable
