#!/usr/bin/env bash
# Set up (if needed) and run the demo: loopback S3 (moto) and FTP (pyftpdlib) servers, a
# directory mirror, and a mirrorfs mount on ./demo/mnt. Ctrl-C unmounts and stops everything.
# `tools/demo.sh --check` runs a scripted round trip instead and exits (used by the tests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh >&2
exec .venv/bin/python tools/demo.py "$@"
