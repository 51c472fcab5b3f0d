#!/usr/bin/env bash
# Set up mirrorfs on a fresh Debian machine: system packages (only those missing), then a
# virtualenv in .venv with mirrorfs and its test dependencies. Idempotent; safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
# systemd: its systemd-analyze checks the units `mirrorfs install` writes (tests);
# strace: test_fsync_fdatasync sees the daemon's sync calls
for pkg in fuse3 libfuse3-dev pkg-config gcc python3-dev patch vsftpd systemd strace; do
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
# pyfuse3 3.5 does not register a fallocate handler with libfuse (the kernel then answers
# EOPNOTSUPP for every mode). It has no wheel and is compiled here anyway, so we compile it
# with tools/patches/pyfuse3-3.5.0-fallocate.patch (one handler, written like its fsync), before
# mirrorfs's own install finds the requirement satisfied. Without the patch mirrorfs still
# works; only fallocate(2) is refused.
if ! .venv/bin/python -c 'import pyfuse3, sys; sys.exit(not hasattr(pyfuse3.Operations, "fallocate"))' 2>/dev/null; then
    # the built wheel is kept per patch and Python version: a fresh clone (CI) reuses it
    py=$(.venv/bin/python -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
    sum=$(sha256sum tools/patches/pyfuse3-3.5.0-fallocate.patch | cut -c1-12)
    wheels="${XDG_CACHE_HOME:-$HOME/.cache}/mirrorfs/pyfuse3-3.5.0-$sum-$py"
    if ! ls "$wheels"/pyfuse3-*.whl >/dev/null 2>&1; then
        echo "setup: building pyfuse3 3.5.0 with the fallocate handler"
        tmp=$(mktemp -d)
        .venv/bin/pip install -q --upgrade pip >/dev/null
        .venv/bin/pip download -q --no-deps --no-binary pyfuse3 pyfuse3==3.5.0 -d "$tmp"
        tar xzf "$tmp/pyfuse3-3.5.0.tar.gz" -C "$tmp"
        patch -s -d "$tmp/pyfuse3-3.5.0" -p1 < tools/patches/pyfuse3-3.5.0-fallocate.patch
        rm -f "$tmp/pyfuse3-3.5.0/src/pyfuse3/__init__.c"   # generated from the unpatched .pyx
        .venv/bin/pip wheel -q --no-deps -w "$tmp/wheel" "$tmp/pyfuse3-3.5.0"
        mkdir -p "$wheels"
        mv "$tmp"/wheel/pyfuse3-*.whl "$wheels/"
        rm -rf "$tmp"
    fi
    .venv/bin/pip install -q --no-deps --force-reinstall "$wheels"/pyfuse3-*.whl
fi
stamp=.venv/.mirrorfs-installed
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/pip install -q --upgrade pip >/dev/null
    .venv/bin/pip install -q -e ".[test,bench]"
    touch "$stamp"
fi
echo "setup: ready (.venv/bin/mirrorfs; \`.venv/bin/mirrorfs install\` puts /usr/local/bin/mirrorfs," \
     "the mount helper and the systemd units in place)"
