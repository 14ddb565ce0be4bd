#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh), then runs the main job, `ptebatch demo`: a fork
# study of 1 GiB of written memory per folio size, under 6.8 and the newest kernel modelled.
# Extra arguments go to `ptebatch demo` (try --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/ptebatch demo "$@"
