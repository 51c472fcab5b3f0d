"""The README's main command, in its scripted form: the demo's round trip must pass."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.mountutil import REPO


def test_demo_check_round_trip(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, str(REPO / "tools" / "demo.py"), "--check",
                        "--dir", str(tmp_path / "demo")], capture_output=True, text=True,
                       timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "demo check: OK" in r.stdout
