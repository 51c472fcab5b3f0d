#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite through real FUSE mounts and loopback
# servers. Extra arguments go to pytest (e.g. tools/test.sh -k rename -x).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
.venv/bin/ruff check mirrorfs tests bench tools
.venv/bin/mypy mirrorfs tests
.venv/bin/lint-imports  # the layer contracts in pyproject.toml
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
