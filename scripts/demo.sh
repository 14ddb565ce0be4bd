#!/usr/bin/env bash
# The main job: sets everything up, then prints the fork batches of a generated page table
# for every layout and kernel version. Extra arguments go to `ptebatch demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/ptebatch demo "$@"
