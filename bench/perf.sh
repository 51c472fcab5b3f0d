#!/usr/bin/env bash
# The speed goals of the test suite (tests marked `perf`): wall-clock bounds that a loaded
# machine can miss, so tools/test.sh never runs them. Run them on a quiet machine; extra
# arguments go to pytest (e.g. bench/perf.sh -k first_byte).
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m pytest -p no:cacheprovider -m perf -s "$@" tests
