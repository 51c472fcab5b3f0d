"""The admin commands: one table of every command the control socket serves, and which of
them also run offline (on an unmounted cache, through ``mirrorfs <command>`` with no daemon).

Owns the table only; each command lives with what it works on (admin.py: the journal, pins,
pauses, stats; maintenance.py: import and verify; pull.py: the change feeds).
"""

from __future__ import annotations

from dataclasses import dataclass

from mirrorfs import admin, maintenance, pull
from mirrorfs.control import Command


@dataclass(frozen=True)
class Spec:
    run: Command
    #: works without the running daemon (LMDB only: no mirror, no kernel)
    offline: bool = False


TABLE: dict[str, Spec] = {
    "stats": Spec(admin.cmd_stats, offline=True),
    "queue": Spec(admin.cmd_queue, offline=True),
    "retry": Spec(admin.cmd_retry, offline=True),
    "pause": Spec(admin.cmd_pause, offline=True),
    "resume": Spec(admin.cmd_resume, offline=True),
    "state": Spec(admin.cmd_state, offline=True),
    "evict": Spec(admin.cmd_evict),
    "pin": Spec(admin.cmd_pin, offline=True),
    "unpin": Spec(admin.cmd_unpin, offline=True),
    "drain": Spec(admin.cmd_drain),
    "move": Spec(admin.cmd_move),
    "backfill": Spec(admin.cmd_backfill, offline=True),
    "url": Spec(admin.cmd_url, offline=True),
    "import": Spec(maintenance.cmd_import),
    "verify": Spec(maintenance.cmd_verify),
    "pull": Spec(pull.cmd_pull),
    "conflicts": Spec(pull.cmd_conflicts, offline=True),
    "problems": Spec(pull.cmd_problems, offline=True),
}

#: what the control socket of a running daemon serves
COMMANDS: dict[str, Command] = {name: spec.run for name, spec in TABLE.items()}
#: what runs on an unmounted cache
OFFLINE: dict[str, Command] = {name: spec.run for name, spec in TABLE.items() if spec.offline}
