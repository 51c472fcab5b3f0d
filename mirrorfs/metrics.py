"""Prometheus metrics: the ``stats`` dictionary as typed metric families.

Owns the mapping from stats fields to metric names, types and help texts, and the optional
scrape endpoint (``metrics_listen``). The families are built from whatever ``collect_stats``
returns, so a stats field added later shows up without a change here: a number becomes a
gauge (a counter if its name says it only grows), a table keyed by mirror names becomes a
family with a ``mirror`` label. :data:`FIELDS` only adds help texts, counter types and unit
suffixes to the fields it knows. The text is written by prometheus_client's exposition code.

The endpoint is prometheus_client's HTTP server, which runs in its own thread; a scrape asks
the trio thread for the statistics (``trio.from_thread.run_sync``), because the trio thread
owns LMDB writes and every mirror's runtime state.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest, write_to_textfile
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mirrorfs.admin import collect_stats
from mirrorfs.config import parse_listen

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from mirrorfs.daemon import Daemon

log = logging.getLogger(__name__)

PREFIX = "mirrorfs"
# Sections of the stats dictionary whose fields carry a ``mirror`` label, and the name their
# metrics take ("mirrors" -> mirrorfs_mirror_uploads_total{mirror="s3"}).
SECTION_NAMES = {"mirrors": "mirror"}
# Other tables keyed by names, and (metric section, label) of their fields: the supervised
# tasks of the daemon ("tasks" -> mirrorfs_task_restarts_total{task="uploader:s3"}).
LABELLED_TABLES = {"tasks": ("task", "task")}
# Numbers whose name says they only grow (until the cache directory is recreated).
COUNTER_SUFFIXES = ("restarts", "failures", "errors")


@dataclass(frozen=True)
class Field:
    help: str
    counter: bool = False
    unit: str = ""  # appended to the metric name (Prometheus naming: _bytes, _seconds...)


# (section, field) -> what it is. Section "" is the top level; "mirror" the per-mirror table.
FIELDS: dict[tuple[str, str], Field] = {
    ("", "files"): Field("Regular files in the mount."),
    ("", "dirs"): Field("Directories in the mount."),
    ("", "symlinks"): Field("Symbolic links in the mount."),
    ("", "bytes"): Field("Bytes held by the files of the mount (local or not)."),
    ("", "local_files"): Field("Files whose content is on local disk."),
    ("", "local_bytes"): Field("Bytes of content on local disk (bounded by cache_size)."),
    ("", "dirty_files"): Field("Files with a change not yet on every mirror."),
    ("", "dirty_bytes"): Field("Bytes of files with a change not yet on every mirror."),
    ("", "remote_only_files"): Field("Files held by the mirrors only (streamed on read)."),
    ("", "remote_only_bytes"): Field("Bytes held by the mirrors only."),
    ("", "hits"): Field("Opens of files whose content was on local disk.", counter=True),
    ("", "misses"): Field("Opens of remote-only files (a download).", counter=True),
    ("", "downloads"): Field("Downloads of remote-only files.", counter=True),
    ("", "download_bytes"): Field("Bytes downloaded from the mirrors.", counter=True),
    ("", "evictions"): Field("Local copies dropped to keep the cache bound.", counter=True),
    ("", "evicted_bytes"): Field("Bytes of local copies dropped.", counter=True),
    ("", "verify_failures"): Field("Downloaded chunks whose xxhash did not match.",
                                   counter=True),
    ("", "whole_hash_downloads"): Field("Downloads checked by a whole-file hash only.",
                                        counter=True),
    ("", "unverified_downloads"): Field("Downloads of objects with no hash (size only).",
                                        counter=True),
    ("", "read_errors"): Field("Reads answered with EIO.", counter=True),
    ("", "quarantined"): Field("Change-log records or objects from a mirror that failed their "
                               "schema and were skipped (mirrorfs problems).", counter=True),
    ("", "journal_length"): Field("Jobs in the journal, all mirrors (pending and failed)."),
    ("", "cache_size"): Field("The cache bound (cache_size).", unit="bytes"),
    ("", "dirty_limit"): Field("The bound on dirty data (dirty_limit).", unit="bytes"),
    ("", "online"): Field("1 when the daemon answered, 0 when read from LMDB offline."),
    ("mirror", "jobs"): Field("Jobs queued for the mirror (pending and failed)."),
    ("mirror", "pending"): Field("Jobs waiting or running for the mirror."),
    ("mirror", "failed"): Field("Jobs that failed for good (see `mirrorfs queue`)."),
    ("mirror", "in_flight"): Field("Transfers running now."),
    ("mirror", "uploaded"): Field("Files whose current version the mirror holds."),
    ("mirror", "uploaded_bytes"): Field("Bytes of the files the mirror holds."),
    ("mirror", "uploads"): Field("Uploads finished.", counter=True),
    ("mirror", "upload_bytes"): Field("Bytes uploaded.", counter=True),
    ("mirror", "deletes"): Field("Remote deletes finished.", counter=True),
    ("mirror", "renames"): Field("Remote renames finished.", counter=True),
    ("mirror", "last_success"): Field("Time of the last finished job (Unix time).",
                                      unit="timestamp_seconds"),
    ("mirror", "oldest_pending_age"): Field("Age of the oldest pending job.", unit="seconds"),
    ("mirror", "up"): Field("1 when the mirror answers, 0 when it is down."),
    ("mirror", "paused"): Field("1 when uploads to the mirror are paused."),
    ("mirror", "paused_since"): Field("When uploads to the mirror were paused (Unix time).",
                                      unit="timestamp_seconds"),
    ("pull", "last_pull"): Field("Time of the last finished pull (Unix time).",
                                 unit="timestamp_seconds"),
    ("pull", "lag"): Field("Seconds since the last finished pull.", unit="seconds"),
    ("pull", "in_progress"): Field("1 while a pull runs."),
    ("pull", "applied"): Field("Change records of other nodes applied.", counter=True),
    ("pull", "conflicts"): Field("Conflicts resolved.", counter=True),
    ("task", "restarts"): Field("Restarts of a background task after an unexpected exception "
                                "(see the daemon log for its traceback).", counter=True),
    ("task", "running"): Field("1 while the background task runs (0: between a failure and "
                               "its restart, or ended)."),
}


@dataclass(frozen=True)
class Sample:
    family: str  # the family name (a counter's samples add _total)
    counter: bool
    help: str
    labels: tuple[tuple[str, str], ...]
    value: float
    path: tuple[str, ...]  # where it is in the stats dictionary (<mirror> for the name)


def family_name(section: str, field: str) -> str:
    meta = FIELDS.get((section, field))
    name = f"{PREFIX}_{section}_{field}" if section else f"{PREFIX}_{field}"
    name = re.sub(r"[^a-zA-Z0-9_]", "_", name)  # a table keyed by task names, say
    if meta is not None and meta.unit and not name.endswith("_" + meta.unit):
        name += "_" + meta.unit
    return name


def _number(v: Any) -> float | None:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, int | float):
        return float(v)
    return None


def samples(stats: Mapping[str, Any]) -> Iterator[Sample]:
    """Every number in ``stats`` as a sample; strings, lists and None are left out."""
    mirrors = set((stats.get("mirrors") or {}).keys())

    def by_mirror(d: Mapping[str, Any]) -> bool:
        return bool(d) and bool(mirrors) and set(d) <= mirrors and all(
            isinstance(v, Mapping) for v in d.values())

    def walk(section: str, d: Mapping[str, Any], labels: tuple[tuple[str, str], ...],
             path: tuple[str, ...]) -> Iterator[Sample]:
        for key, v in d.items():
            if isinstance(v, Mapping):
                if not labels and not section and key in LABELLED_TABLES:
                    sub, label = LABELLED_TABLES[key]
                    for name, inner in v.items():
                        if isinstance(inner, Mapping):
                            yield from walk(sub, inner, ((label, str(name)),),
                                            (*path, key, f"<{label}>"))
                elif not labels and by_mirror(v):
                    sub = SECTION_NAMES.get(key, key)
                    for mirror, inner in v.items():
                        yield from walk(_join(section, sub), inner, (("mirror", mirror),),
                                        (*path, key, "<mirror>"))
                else:
                    yield from walk(_join(section, key), v, labels, (*path, key))
                continue
            value = _number(v)
            if value is None:
                continue
            meta = FIELDS.get((section, key))
            counter = meta.counter if meta else any(
                p.endswith(COUNTER_SUFFIXES) for p in (*path, key))
            text = meta.help if meta else f"The stats field {'.'.join((*path, key))}."
            yield Sample(family_name(section, key), counter, text, labels, value,
                         (*path, key))

    yield from walk("", stats, (), ())


def _join(section: str, key: str) -> str:
    return f"{section}_{key}" if section else key


def families(stats: Mapping[str, Any]) -> list[Metric]:
    """One family per metric name, every sample of it (all mirrors) inside."""
    out: dict[str, Metric] = {}
    for s in samples(stats):
        fam = out.get(s.family)
        names = [k for k, _ in s.labels]
        if fam is None:
            cls = CounterMetricFamily if s.counter else GaugeMetricFamily
            fam = out[s.family] = cls(s.family, s.help, labels=names)
        if s.counter and s.value < 0:
            continue  # a counter cannot go down; never seen, but never emit an invalid one
        fam.add_metric([v for _, v in s.labels], s.value)  # type: ignore[attr-defined]
    return list(out.values())


class StatsCollector(Collector):
    """A prometheus_client collector over a function returning the stats dictionary."""

    def __init__(self, get_stats: Callable[[], Mapping[str, Any]]) -> None:
        self.get_stats = get_stats

    def collect(self) -> Iterator[Metric]:
        yield from families(self.get_stats())


def registry_for(get_stats: Callable[[], Mapping[str, Any]]) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(StatsCollector(get_stats))
    return reg


def exposition(stats: Mapping[str, Any]) -> bytes:
    """The Prometheus text format of ``stats`` (``mirrorfs stats --prometheus``)."""
    return generate_latest(registry_for(lambda: stats))


def write_textfile(path: str, stats: Mapping[str, Any]) -> None:
    """Atomically (temp file + rename), for node_exporter's textfile collector."""
    write_to_textfile(path, registry_for(lambda: stats))


def start_server(daemon: Daemon, listen: str) -> WSGIServer | None:
    """Serve /metrics at ``listen`` from prometheus_client's thread; None if it cannot bind
    (the mount matters more than its metrics: a warning, and the mount goes on)."""
    import trio
    from prometheus_client import start_http_server
    from prometheus_client.process_collector import ProcessCollector

    token = trio.lowlevel.current_trio_token()

    def get_stats() -> Mapping[str, Any]:
        # In the HTTP thread: the trio thread computes them, between two of its own tasks.
        return trio.from_thread.run_sync(collect_stats, daemon, trio_token=token)

    reg = registry_for(get_stats)
    ProcessCollector(registry=reg)  # the daemon's CPU, memory and open files
    host, port = parse_listen(listen)
    try:
        server, _thread = start_http_server(port, addr=host, registry=reg)
    except OSError as exc:
        log.warning("cannot serve metrics on %s: %s", listen, exc)
        return None
    log.info("serving Prometheus metrics on http://%s:%d/metrics",
             f"[{host}]" if ":" in host else host, port)
    return server


def stop_server(server: WSGIServer | None) -> None:
    if server is not None:
        server.shutdown()
        server.server_close()
