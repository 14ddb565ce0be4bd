#!/usr/bin/env bash
# Builds the documentation into site/: the user guide (docs/*.md) and the API reference,
# generated from the docstrings (the compiled core through its type stubs and the built
# module). Warnings are errors (mkdocs --strict): a broken link, a missing page or a
# docstring the renderer cannot read fails the build.
# Needs the package in .venv (scripts/setup.sh builds it; run here if it is missing).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! .venv/bin/python -c "import ptebatch._core" 2>/dev/null; then
  bash scripts/setup.sh
fi
.venv/bin/python -m pip install -q "mkdocs==1.6.1" "mkdocs-autorefs==1.4.5" "mkdocstrings==1.0.8" \
    "mkdocstrings-python==2.0.11" "griffelib==2.4.1" "markdown==3.11.3"
# Not --quiet: it hides the warnings that --strict counts, and the build would pass them.
.venv/bin/python -m mkdocs build --strict --clean
