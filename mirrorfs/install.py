"""``mirrorfs install``: the command, the mount helper and the systemd units, in place.

Owns the text of the installed files. The units run ``/usr/local/bin/mirrorfs``, a small
wrapper around the interpreter mirrorfs runs in (a virtualenv's bin directory is no stable
path for units, fstab or ``mount -t``); the helper ``/sbin/mount.fuse.mirrorfs`` runs the same
command. With ``--root DIR`` everything goes under DIR and the files name each other there
(a test, or a self-contained tree), so what was installed is what runs.
``tools/systemd/`` holds the same units as installed with the root ``/``.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import mirrorfs

BIN = "usr/local/bin/mirrorfs"
HELPER = "sbin/mount.fuse.mirrorfs"
UNIT_DIR = "etc/systemd/system"
DOC_DIR = "usr/share/doc/mirrorfs"

SERVICE = """\
# A mirrorfs mount as a service: /etc/mirrorfs/NAME.toml mounted on /srv/NAME.
#   mirrorfs install          (puts this unit, {bin} and the mount helper in place)
#   systemctl daemon-reload && systemctl enable --now mirrorfs@media
# Type=notify: systemd considers the unit started only once the mount is live (READY=1).
# On stop, mirrorfs finishes uploads in flight (up to 30 s) and unmounts; the journal in
# LMDB keeps whatever is still pending, and the next start uploads it.
[Unit]
Description=mirrorfs mount %i
After=network-online.target
Wants=network-online.target

[Service]
Type=notify
NotifyAccess=main
ExecStartPre=/bin/mkdir -p /srv/%i
ExecStart={bin} mount --foreground /etc/mirrorfs/%i.toml /srv/%i
ExecStop={bin} umount /srv/%i
# Credentials can come from the environment instead of the config file:
# EnvironmentFile=-/etc/mirrorfs/%i.env
KillSignal=SIGTERM
TimeoutStopSec=90
Restart=on-failure
RestartSec=5

[Install]
WantedBy=multi-user.target
"""

MOUNT_UNIT = """\
# The same mount as a .mount unit (equivalent to the fstab line
#   /etc/mirrorfs/media.toml /srv/media fuse.mirrorfs defaults,_netdev 0 0
# ). Needs the mount helper {helper} (`mirrorfs install` puts it in place).
# The unit name must match the mount point: /srv/media -> srv-media.mount. An example:
# copy it to /etc/systemd/system/ under the name of your mount point.
[Unit]
Description=mirrorfs media mount
After=network-online.target
Wants=network-online.target

[Mount]
What=/etc/mirrorfs/media.toml
Where=/srv/media
Type=fuse.mirrorfs
Options=defaults,_netdev
TimeoutSec=90

[Install]
WantedBy=remote-fs.target
"""

MOUNT_HELPER = """\
#!/bin/sh
# mount(8) helper for `mount -t fuse.mirrorfs CONFIG MOUNTPOINT -o OPTIONS` and fstab lines
# (written by `mirrorfs install`). mount passes: SOURCE TARGET [-n] [-s] [-v] -o OPTS
src="$1"; dst="$2"; shift 2
opts=""
while [ $# -gt 0 ]; do
    case "$1" in
        -o) opts="$2"; shift 2 ;;
        -o*) opts="${{1#-o}}"; shift ;;
        *) shift ;;
    esac
done
exec {command} mount "$src" "$dst" ${{opts:+-o "$opts"}}
"""

WRAPPER = """\
#!/bin/sh
# The mirrorfs command at a stable path (written by `mirrorfs install`): units, fstab and
# `mount -t` name this file, not the virtualenv it runs from.
{env}exec {python} -m mirrorfs.cli "$@"
"""


def _import_path() -> str | None:
    """The directory to put on PYTHONPATH if this interpreter, started plainly, would not
    import this same mirrorfs (a source tree used through PYTHONPATH)."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(mirrorfs.__file__)))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", "import mirrorfs, os; print(os.path.dirname("
                        "os.path.dirname(os.path.abspath(mirrorfs.__file__))))"],
                       capture_output=True, text=True, env=env, cwd="/", check=False)
    return None if r.returncode == 0 and r.stdout.strip() == here else here


def render(root: str) -> dict[str, tuple[str, int]]:
    """Relative path -> (text, mode) of every installed file, for the root ``root``."""
    bin_path = os.path.join(root, BIN)
    extra = _import_path()
    env = f"export PYTHONPATH={shlex.quote(extra)}\n" if extra else ""
    return {
        BIN: (WRAPPER.format(env=env, python=shlex.quote(sys.executable)), 0o755),
        HELPER: (MOUNT_HELPER.format(command=shlex.quote(bin_path)), 0o755),
        f"{UNIT_DIR}/mirrorfs@.service": (SERVICE.format(bin=bin_path), 0o644),
        f"{DOC_DIR}/examples/srv-media.mount": (
            MOUNT_UNIT.format(helper=os.path.join(root, HELPER)), 0o644),
    }


def write(path: Path, text: str, mode: int) -> None:
    """Atomically (temp file + rename): a mount starting meanwhile never runs half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.chmod(mode)
    os.replace(tmp, path)


def install(root: str) -> list[str]:
    """Write every file under ``root``; returns their paths."""
    root = os.path.abspath(root)
    done = []
    for rel, (text, mode) in render(root).items():
        write(Path(root, rel), text, mode)
        done.append(os.path.join(root, rel))
    return done


def install_helper(directory: str) -> str:
    """Only the mount helper, running this interpreter (``mirrorfs install-helper``)."""
    path = Path(directory, os.path.basename(HELPER))
    write(path, MOUNT_HELPER.format(command=f"{shlex.quote(sys.executable)} -m mirrorfs.cli"),
          0o755)
    return str(path)
