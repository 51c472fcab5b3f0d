#!/usr/bin/env bash
# Set up mirrorfs on a fresh Debian machine: system packages (only those missing), then a
# virtualenv in .venv with mirrorfs and its test dependencies. Idempotent; safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
for pkg in fuse3 libfuse3-dev pkg-config gcc python3-dev vsftpd strace; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
# python3-dev is only needed if the interpreter has no headers of its own (pyenv builds do).
if [ ${#need[@]} -gt 0 ]; then
    py_inc=$(python3 -c 'import sysconfig;print(sysconfig.get_paths()["include"])')
    if [ -f "$py_inc/Python.h" ]; then
        need=("${need[@]/python3-dev}")
    fi
fi
need=($(printf '%s\n' "${need[@]}" | grep -v '^$' || true))
if [ ${#need[@]} -gt 0 ]; then
    echo "setup: installing Debian packages: ${need[*]}"
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup: need root to install ${need[*]} (run as root or install them)" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    # vsftpd's package starts a system daemon on port 21; the tests start their own.
    systemctl disable --now vsftpd >/dev/null 2>&1 || service vsftpd stop >/dev/null 2>&1 || true
fi
python3 -c 'import sys; assert sys.version_info >= (3, 11), "mirrorfs needs Python 3.11+"'
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
stamp=.venv/.mirrorfs-installed
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/pip install -q --upgrade pip >/dev/null
    .venv/bin/pip install -q -e ".[test,bench]"
    touch "$stamp"
fi
echo "setup: ready (.venv/bin/mirrorfs)"
