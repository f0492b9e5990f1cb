#!/usr/bin/env bash
# The one check CI runs unchanged: lint, types, tests (warnings are errors; per-test timeout).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
echo "== ruff";   ruff check .
echo "== mypy";   mypy
echo "== pytest"; python -m pytest "$@"
