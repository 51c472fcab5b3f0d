"""The config file (TOML) turned into frozen dataclasses, with one-line errors.

Every option is declared once in a table below with its type, default and help; unknown keys
are errors (a typo must not silently fall back to a default). Secrets may be given inline,
through ``*_file`` keys naming a file, or through environment variables; a config file that
holds a secret and is readable by others draws a warning.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import stat
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import urlparse

from mirrorfs.errors import ConfigError

log = logging.getLogger(__name__)

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


def parse_size(value: object) -> int:
    """Sizes are ints (bytes) or strings like ``"10G"``, ``"512MiB"`` (binary units)."""
    if isinstance(value, bool):
        raise ValueError("expected a size like 10G or a number of bytes")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("must not be negative")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    raise ValueError(f"expected a size like 10G or a number of bytes, got {value!r}")


def _duration(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a number of seconds, got {value!r}")
    if value < 0:
        raise ValueError("must not be negative")
    return float(value)


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {value!r}")
    return value


def _pos_int(value: object) -> int:
    v = _int(value)
    if v < 1:
        raise ValueError("must be at least 1")
    return v


def _str_list(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"expected a list of strings, got {value!r}")
    return tuple(value)


def _choice(*choices: str) -> Callable[[object], str]:
    def check(value: object) -> str:
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {value!r}")
        return str(value)

    return check


def _url(value: object) -> str:
    s = _str(value)
    u = urlparse(s)
    if u.scheme not in ("http", "https") or not u.netloc:
        raise ValueError(f"expected an http:// or https:// URL, got {s!r}")
    return s


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or a bare ``PORT`` (loopback) -> (host, port)."""
    value = value.strip()
    if value.isdigit():
        host, port = "127.0.0.1", value
    else:
        host, sep, port = value.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"expected HOST:PORT or a port number, got {value!r}")
        host = host.strip("[]") or "127.0.0.1"
    if not 0 < int(port) < 65536:
        raise ValueError(f"port out of range in {value!r}")
    return host, int(port)



def _listen(value: object) -> str:
    s = _str(value)
    if s:
        parse_listen(s)
    return s


def _log_level(value: object) -> str:
    s = _str(value).upper()
    if s not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError(f"expected DEBUG, INFO, WARNING or ERROR, got {value!r}")
    return s


# key -> (checker, default, help). A default of REQUIRED means the key must be given.
REQUIRED = object()
Opt = tuple[Callable[[object], Any], Any, str]

TOP_OPTIONS: dict[str, Opt] = {
    "cache_dir": (_str, REQUIRED, "directory holding file contents and the LMDB registry"),
    "cache_size": (parse_size, parse_size("10G"), "bound on cached content (clean + dirty)"),
    "min_free": (parse_size, parse_size("1G"), "free space to keep on the cache disk"),
    "dirty_limit": (parse_size, parse_size("5G"),
                    "bound on data not yet on every mirror; writers wait beyond it"),
    "upload_delay": (_duration, 30.0, "seconds of quiet after the last change before upload"),
    "log_level": (_log_level, "INFO", "DEBUG, INFO, WARNING or ERROR"),
    "paused": (_bool, False, "start every mount with uploads paused (a `mirrorfs pause` is "
               "kept across mounts by itself, until `mirrorfs resume`)"),
    "xattrs": (_bool, False,
               "serve extended attributes (user.* and user.mirrorfs.*); costs a kernel round "
               "trip per write(2), see README"),
    "attr_timeout": (_duration, 300.0,
                     "seconds the kernel may cache attributes and entries (names changed "
                     "by pulls and imports are invalidated at once)"),
    "read_ahead_kb": (_int, 1024,
                      "kernel read-ahead of the mount in KiB (bigger: faster cold sequential "
                      "reads; 0 leaves the kernel default)"),
    "stream_direct_io": (_bool, False,
                         "reads of a file being downloaded bypass the kernel page cache: "
                         "faster cold reads with large reads; slower with small reads, and "
                         "mmap(MAP_SHARED) of such an open fails (ENODEV), see README"),
    "read_order": (_str_list, (), "mirror names to read from, first healthy wins"),
    "node_id": (_str, "", "this node's identity for multi-node pulls (default: host name)"),
    "metrics_listen": (_listen, "",
                       "serve Prometheus metrics at HOST:PORT (e.g. 127.0.0.1:9464; a bare "
                       "port listens on loopback only); empty: off"),
    "mirrors": (lambda v: v, {}, "one table per mirror"),
}

COMMON_MIRROR: dict[str, Opt] = {
    "type": (_choice("s3", "ftp", "dir"), REQUIRED, "s3, ftp or dir"),
    "include": (_str_list, (), "glob patterns of paths this mirror takes (default: all)"),
    "exclude": (_str_list, (), "glob patterns of paths this mirror skips"),
    "delete_policy": (_choice("immediate", "delayed", "never"), "immediate",
                      "immediate, delayed (undo window) or never (archive)"),
    "delete_delay": (_duration, 3600.0, "seconds a delete waits under delete_policy=delayed"),
    "concurrency": (_pos_int, 4, "parallel transfers to this mirror"),
    "url_base": (_url, None, "public URL prefix for `mirrorfs url`"),
    "pull": (_bool, False, "apply other nodes' changes on this mirror (multi-node)"),
    "pull_interval": (_duration, 30.0, "seconds between pulls"),
    "pull_batch": (_pos_int, 1000, "keys per pull step"),
    "rescan_interval": (_duration, 600.0,
                        "seconds between listing passes that find objects written by others"),
    "leader": (_str, "remote", "whose version wins a conflict: a node_id, or remote"),
    "audit_interval": (_duration, 86400.0,
                       "seconds between audits that compare the mirror with the registry "
                       "(0: off)"),
    "audit_deep": (_bool, False, "audits read every object and check its xxhash"),
}

MIRROR_OPTIONS: dict[str, dict[str, Opt]] = {
    "s3": {
        "bucket": (_str, REQUIRED, "bucket name"),
        "endpoint_url": (_url, None, "S3-API endpoint (default: AWS)"),
        "region": (_str, "us-east-1", "region"),
        "prefix": (_str, "", "key prefix inside the bucket"),
        "access_key_id": (_str, None, "credentials (else environment or AWS profile)"),
        "secret_access_key": (_str, None, "secret; prefer secret_access_key_file"),
        "secret_access_key_file": (_str, None, "file holding the secret"),
        "profile": (_str, None, "AWS profile name"),
        "addressing_style": (_choice("auto", "path", "virtual"), "auto", "path or virtual"),
        "signature_version": (_str, None, "e.g. s3v4"),
        "storage_class": (_str, None, "e.g. STANDARD_IA"),
        "request_checksum_calculation": (_choice("when_supported", "when_required"), None,
                                         "botocore request checksums"),
        "response_checksum_validation": (_choice("when_supported", "when_required"), None,
                                         "botocore response checksum validation"),
        "verify_tls": (_bool, True, "verify TLS certificates"),
        "ca_bundle": (_str, None, "CA bundle path for TLS verification"),
        "multipart_threshold": (parse_size, parse_size("64M"), "upload in parts from this size"),
        "multipart_chunksize": (parse_size, parse_size("8M"), "part size"),
        "connect_timeout": (_duration, 10.0, "seconds"),
        "read_timeout": (_duration, 60.0, "seconds"),
    },
    "ftp": {
        "host": (_str, REQUIRED, "server host"),
        "port": (_pos_int, 21, "server port"),
        "user": (_str, "anonymous", "login"),
        "password": (_str, "", "password; prefer password_file"),
        "password_file": (_str, None, "file holding the password"),
        "passive": (_bool, True, "passive mode"),
        "tls": (_bool, False, "explicit FTPS (AUTH TLS)"),
        "verify_tls": (_bool, True, "verify the server certificate"),
        "ca_bundle": (_str, None, "CA bundle path"),
        "base_dir": (_str, "/", "remote base directory"),
        "connections": (_pos_int, 2, "connection pool size"),
        "timeout": (_duration, 30.0, "seconds"),
    },
    "dir": {
        "path": (_str, REQUIRED, "directory to mirror into"),
    },
}

SECRET_KEYS = ("secret_access_key", "password")


def mirror_defaults(kind: str) -> dict[str, Any]:
    """Every option of a ``kind`` mirror that has a default, with it. The specs above are the
    one place defaults are declared: a remote fills what its options lack from here (the
    daemon's remotes get full tables from the config; tests build remotes from a few keys)."""
    spec = {**COMMON_MIRROR, **MIRROR_OPTIONS[kind]}
    return {key: default for key, (_check, default, _help) in spec.items()
            if default is not REQUIRED}


@dataclass(frozen=True)
class MirrorConfig:
    name: str
    type: str
    include: tuple[str, ...]
    exclude: tuple[str, ...]
    delete_policy: str
    delete_delay: float
    concurrency: int
    url_base: str | None
    pull: bool
    pull_interval: float
    pull_batch: int
    rescan_interval: float
    leader: str
    audit_interval: float
    audit_deep: bool
    options: dict[str, Any] = field(hash=False, compare=False)

    def __repr__(self) -> str:
        """The dataclass repr with secrets (password, secret key) redacted: a repr ends up in
        logs and tracebacks."""
        parts = [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self)
                 if f.name != "options"]
        return f"MirrorConfig({', '.join(parts)}, options={redacted(self.options)!r})"

    def identity(self) -> str:
        """What makes two configs point at the same remote store (cursors are kept per it)."""
        o = self.options
        if self.type == "s3":
            return f"s3:{o.get('endpoint_url') or 'aws'}:{o['bucket']}:{o['prefix']}"
        if self.type == "ftp":
            return f"ftp:{o['host']}:{o['port']}:{o['base_dir']}"
        return f"dir:{os.path.abspath(o['path'])}"


@dataclass(frozen=True)
class Config:
    path: str
    cache_dir: str
    cache_size: int
    min_free: int
    dirty_limit: int
    upload_delay: float
    log_level: str
    paused: bool
    xattrs: bool
    attr_timeout: float
    read_ahead_kb: int
    stream_direct_io: bool
    read_order: tuple[str, ...]
    node_id: str
    mirrors: tuple[MirrorConfig, ...]
    metrics_listen: str = ""


def _check_table(path: str, where: str, table: dict[str, Any],
                 spec: dict[str, Opt]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in table:
        if key not in spec:
            raise ConfigError(path, f"{where}{key}", "unknown key")
    for key, (check, default, _help) in spec.items():
        if key in table:
            try:
                out[key] = check(table[key])
            except ValueError as exc:
                raise ConfigError(path, f"{where}{key}", str(exc)) from None
        elif default is REQUIRED:
            raise ConfigError(path, f"{where}{key}", "missing (required)")
        else:
            out[key] = default
    return out


def _read_secret_file(path: str, key: str, name: str) -> str:
    try:
        with open(name, encoding="utf-8") as f:
            return f.read().strip()
    except OSError as exc:
        raise ConfigError(path, key, f"cannot read {name}: {exc.strerror}") from None


def _mirror(path: str, name: str, table: object) -> MirrorConfig:
    where = f"mirrors.{name}."
    if not isinstance(table, dict):
        raise ConfigError(path, where.rstrip("."), "expected a table")
    kind = table.get("type")
    if kind not in MIRROR_OPTIONS:
        raise ConfigError(path, f"{where}type",
                          "missing (required)" if kind is None
                          else f"expected one of s3, ftp, dir, got {kind!r}")
    spec = {**COMMON_MIRROR, **MIRROR_OPTIONS[kind]}
    values = _check_table(path, where, table, spec)
    common = {k: values.pop(k) for k in COMMON_MIRROR}
    if kind == "s3" and values.get("secret_access_key_file"):
        values["secret_access_key"] = _read_secret_file(
            path, f"{where}secret_access_key_file", values["secret_access_key_file"])
    if kind == "ftp" and values.get("password_file"):
        values["password"] = _read_secret_file(path, f"{where}password_file",
                                               values["password_file"])
    if kind == "dir":
        values["path"] = os.path.abspath(os.path.expanduser(values["path"]))
    if kind == "s3" and not re.fullmatch(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]", values["bucket"]):
        raise ConfigError(path, f"{where}bucket", f"not a valid bucket name: {values['bucket']!r}")
    values["url_base"] = common["url_base"]
    return MirrorConfig(name=name, options=values, **common)


def load_config(path: str) -> Config:
    """Parse and check ``path``; raise ConfigError with a one-line message on any problem."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(path, "(file)", "does not exist") from None
    except PermissionError:
        raise ConfigError(path, "(file)", "cannot be read: permission denied") from None
    except IsADirectoryError:
        raise ConfigError(path, "(file)", "is a directory") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, "(syntax)", str(exc)) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(path, "(syntax)", f"not UTF-8 text (byte {exc.start})") from None
    values = _check_table(path, "", raw, TOP_OPTIONS)
    mirrors_raw = values.pop("mirrors")
    if not isinstance(mirrors_raw, dict):
        raise ConfigError(path, "mirrors", "expected a table of mirror tables")
    mirrors = tuple(_mirror(path, name, table) for name, table in mirrors_raw.items())
    for name in values["read_order"]:
        if name not in mirrors_raw:
            raise ConfigError(path, "read_order", f"names unknown mirror {name!r}")
    base = os.path.dirname(os.path.abspath(path))
    cache_dir = os.path.join(base, os.path.expanduser(values.pop("cache_dir")))
    _warn_if_secret_readable(path, mirrors_raw)
    if not values["node_id"]:
        values["node_id"] = socket.gethostname()
    return Config(path=os.path.abspath(path), cache_dir=os.path.normpath(cache_dir),
                  mirrors=mirrors, **values)


def _warn_if_secret_readable(path: str, mirrors_raw: dict[str, Any]) -> None:
    has_secret = any(isinstance(t, dict) and any(t.get(k) for k in SECRET_KEYS)
                     for t in mirrors_raw.values())
    if has_secret and os.stat(path).st_mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("%s holds credentials and is readable by other users; "
                    "chmod 600 it or use *_file keys", path)


def redacted(options: dict[str, Any]) -> dict[str, Any]:
    """Options safe to print or log."""
    return {k: ("***" if k in SECRET_KEYS and v else v) for k, v in options.items()}
