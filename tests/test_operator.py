"""Issue 18: what operators expect -- metrics, exit statuses, mount refusals, state that
survives a remount, installed units. Real mounts and servers throughout."""

from __future__ import annotations

import json
import math
import os
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from mirrorfs.metrics import FIELDS
from tests.mountutil import REPO
from tests.servers import free_port
from tests.test_mirrors import CLI, admin, drain

MiB = 1 << 20


def run(*args: str, timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout, **kw)


# ----------------------------------------------------------------------------- metrics


def parse(text: str) -> dict[str, Any]:
    """Family name -> family; fails on a name seen twice (samples grouped by mirror, say)."""
    out: dict[str, Any] = {}
    for fam in text_string_to_metric_families(text):
        assert fam.name not in out, f"family {fam.name} appears twice"
        out[fam.name] = fam
    return out


def json_leaves(st: dict[str, Any]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """What `stats --json` says, keyed the way the metrics name it (independently of
    mirrorfs.metrics: the field tables are the interface, the walk is the test's own)."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

    def name(section: str, key: str) -> str:
        meta = FIELDS.get((section, key))
        n = f"mirrorfs_{section}_{key}" if section else f"mirrorfs_{key}"
        return n + "_" + meta.unit if meta is not None and meta.unit else n

    for k, v in st.items():
        if isinstance(v, bool | int | float) and v is not None:
            out[(name("", k), ())] = float(v)
    for section, table in (("mirror", st["mirrors"]), ("pull", st["pull"])):
        for mirror, fields in table.items():
            for k, v in fields.items():
                if isinstance(v, bool | int | float) and v is not None:
                    out[(name(section, k), (("mirror", mirror),))] = float(v)
    return out


def check_exposition(text: str, st: dict[str, Any]) -> dict[str, Any]:
    fams = parse(text)
    mine = {n: f for n, f in fams.items() if n.startswith("mirrorfs_")}
    for n, f in fams.items():
        assert f.type in ("counter", "gauge"), (n, f.type)  # never "unknown"
        assert f.documentation, n  # every family has HELP
    got = {}
    for f in mine.values():
        for s in f.samples:
            if f.type == "counter":
                assert s.name == f.name + "_total", s.name  # counters end in _total
            got[(f.name, tuple(sorted(s.labels.items())))] = s.value
    want = json_leaves(st)
    assert set(got) == set(want), (set(got) ^ set(want))
    for key, v in want.items():
        if key[0].endswith("_age_seconds"):  # grows between the two reads
            assert abs(got[key] - v) < 60, key
        else:
            assert got[key] == v or (math.isnan(v) and math.isnan(got[key])), (key, got[key], v)
    return mine


def test_prometheus_output_and_endpoint_typed_and_equal_to_json(make_mount: Any, s3: Any,
                                                                tmp_path: Path) -> None:
    port = free_port()
    dm = tmp_path / "dm"
    dm.mkdir()
    m = make_mount({"s3": {"type": "s3", **s3.options()}, "dm": {"type": "dir", "path": str(dm)}},
                   upload_delay=3600, metrics_listen=f"127.0.0.1:{port}")
    (m.path / "a").write_bytes(os.urandom(MiB))
    (m.path / "b").write_bytes(b"b" * 1000)
    drain(m)
    assert not admin(m, "evict", str(m.path / "a"))["kept"]
    (m.path / "a").read_bytes()  # a miss and a download
    (m.path / "b").read_bytes()  # a hit
    (m.path / "pending").write_bytes(b"p")
    admin(m, "pause", "dm")
    st = admin(m, "stats")
    text = run("stats", "--prometheus", "-c", str(m.config)).stdout
    fams = check_exposition(text, st)
    # the figures an operator graphs, by name
    assert fams["mirrorfs_files"].type == "gauge"
    assert fams["mirrorfs_files"].samples[0].value == 3
    up = fams["mirrorfs_mirror_uploads"]
    assert up.type == "counter"
    assert {s.labels["mirror"]: s.value for s in up.samples} == {"s3": 2, "dm": 2}
    assert {s.labels["mirror"] for s in fams["mirrorfs_mirror_pending"].samples} == {"s3", "dm"}
    assert fams["mirrorfs_misses"].samples[0].value >= 1
    assert fams["mirrorfs_mirror_paused"].samples[0].labels and \
        {s.labels["mirror"]: s.value for s in fams["mirrorfs_mirror_paused"].samples} == \
        {"s3": 0, "dm": 1}
    # the scrape endpoint serves the same families from the daemon
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        scraped = r.read().decode()
    check_exposition(scraped, admin(m, "stats"))
    assert "process_resident_memory_bytes" in scraped
    # --textfile writes the same text atomically, also offline
    m.umount()
    prom = tmp_path / "mirrorfs.prom"
    r = run("stats", "--textfile", str(prom), "-c", str(m.config))
    assert r.returncode == 0, r.stderr
    check_exposition(prom.read_text(), admin(m, "stats"))
    assert not [p for p in os.listdir(tmp_path) if p.startswith("mirrorfs.prom.")]


def test_metrics_endpoint_is_off_by_default_and_on_loopback(make_mount: Any) -> None:
    m = make_mount()
    assert "serving Prometheus metrics" not in m.log_text()
    port = free_port()
    m2 = make_mount(name="m2", metrics_listen=str(port))  # a bare port: loopback only
    assert f"serving Prometheus metrics on http://127.0.0.1:{port}/metrics" in m2.log_text()
    conns = open("/proc/net/tcp").read().splitlines()[1:]
    listening = [c.split()[1] for c in conns if c.split()[3] == "0A"]
    assert f"0100007F:{port:04X}" in listening, listening
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        assert b"# TYPE mirrorfs_files gauge" in r.read()


def test_grafana_dashboard_uses_metrics_that_exist() -> None:
    """Every metric the dashboard names by name is one `stats --prometheus` writes."""
    import re

    from mirrorfs.metrics import family_name

    dash = json.loads((REPO / "tools" / "grafana" / "mirrorfs.json").read_text())
    known = set()
    for (section, key), meta in FIELDS.items():
        n = family_name(section, key)
        known.add(n + "_total" if meta.counter else n)
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    named = {n for e in exprs for n in re.findall(r"\b(mirrorfs_[a-z_]+)\b", e)
             if not re.search(re.escape(n) + r"\.\*", e)}
    assert named and named <= known, named - known
    assert {"mirrorfs_mirror_pending", "mirrorfs_mirror_up", "mirrorfs_local_bytes",
            "mirrorfs_dirty_bytes", "mirrorfs_hits_total"} <= named
