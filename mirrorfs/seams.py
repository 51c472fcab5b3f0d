"""Test-only seams: points where a test can make the daemon die.

With ``MIRRORFS_TEST_CRASH_AT=<name>`` in its environment the daemon SIGKILLs itself when it
reaches :func:`crash_point` ``(<name>)``, so that a test can put a crash exactly into one
window of a multi-step remote operation (tests/test_proof.py). Unset, it costs one string
comparison.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)

_CRASH_AT = os.environ.get("MIRRORFS_TEST_CRASH_AT", "")


def crash_point(name: str) -> None:
    if _CRASH_AT and _CRASH_AT == name:
        log.info("test seam: SIGKILL at %s", name)
        os.kill(os.getpid(), signal.SIGKILL)
