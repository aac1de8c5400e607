"""Daemon settings: defaults < TOML file < environment (IPCD_*) < flags.

Theory of operation: one table, :data:`OPTIONS`, declares every setting once
(name, type, default, help). The ``ipcd`` command builds its click options
from it (click reads the flag, else the ``IPCD_*`` variable), the TOML loader
validates file keys against it, and ``--help`` documents it. What the user
gave on the command line or in the environment is kept as *overrides*, so a
reload (SIGHUP) re-reads the file and the flags still win.
"""

from __future__ import annotations

import dataclasses
import grp
import math
import os
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

from ipcd.paths import DEFAULT_SOCKET_DIR, DGRAM_SOCKET, LOCK_FILE, STREAM_SOCKET

READ_BUFFER_SIZE: Final = 256 * 1024  # a worker's one read buffer: also the largest datagram served


class SettingsError(Exception):
    """A setting has a bad value; the message says which and what to do."""


def _positive_int(value: Any) -> int:
    number = int(value)
    if number < 1:
        raise ValueError("must be at least 1")
    return number


def _non_negative_float(value: Any) -> float:
    number = float(value)
    if not 0 <= number < math.inf:  # also nan: STATUS shows settings as JSON, which has no nan or inf
        raise ValueError("must be a finite number, not negative")
    return number


def _positive_float(value: Any) -> float:
    number = float(value)
    if not 0 < number < math.inf:
        raise ValueError("must be a finite number more than 0")
    return number


def _octal_mode(value: Any) -> int:
    mode = value if isinstance(value, int) else int(str(value), 8)
    if not 0 <= mode <= 0o777:
        raise ValueError("must be an octal mode like 0666")
    return mode


def _log_level(value: Any) -> str:
    level = str(value).lower()
    if level not in ("debug", "info", "warning", "error"):
        raise ValueError("must be one of debug, info, warning, error")
    return level


def _size(value: Any) -> int:
    """A byte count: 65536, "64K", "4M"."""
    text = str(value).strip().upper()
    factor = 1
    for suffix, mult in (("K", 1024), ("M", 1024**2), ("G", 1024**3)):
        if text.endswith(suffix):
            text, factor = text[:-1], mult
            break
    number = int(text) * factor
    if number < 1:
        raise ValueError("must be at least 1 byte")
    return number


def _state_dir(value: Any) -> Path | None:
    """A directory, or "" for none (history is then not kept across restarts)."""
    text = str(value)
    return Path(os.path.abspath(text)) if text else None


def default_state_dir() -> Path:
    """Where history is kept unless --state-dir says: the dir systemd made
    for the unit (StateDirectory=), else /var/lib/ipcd for root, else the
    user's state dir (XDG)."""
    given = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    if given:
        return Path(given)
    if os.geteuid() == 0:
        return Path("/var/lib/ipcd")
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "ipcd"


def _group(value: Any) -> str:
    name = str(value)
    if name and not name.isdigit():
        try:
            grp.getgrnam(name)
        except KeyError:
            raise ValueError(f"no group named {name!r}") from None
    return name


@dataclasses.dataclass(frozen=True)
class OptionSpec:
    name: str  # settings field; the flag is --name-with-dashes
    parse: Callable[[Any], Any]
    help: str
    metavar: str
    reloadable: bool = True

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def envvar(self) -> str:
        return "IPCD_" + self.name.upper()


OPTIONS: Final[tuple[OptionSpec, ...]] = (
    OptionSpec("socket_dir", Path, "Directory of stream.sock and dgram.sock.", "DIR", reloadable=False),
    OptionSpec("workers", _positive_int, "Worker processes to pre-fork (default: CPU count).", "N"),
    OptionSpec("log_level", _log_level, "debug, info, warning or error.", "LEVEL"),
    OptionSpec("socket_mode", _octal_mode, "Mode of the sockets (default 0666).", "MODE", reloadable=False),
    OptionSpec(
        "socket_group",
        _group,
        "Group owning the sockets (with a narrower --socket-mode).",
        "GROUP",
        reloadable=False,
    ),
    OptionSpec("max_frame_size", _size, "Largest frame accepted, header included (default 1M).", "BYTES"),
    OptionSpec("max_fds", _positive_int, "Most fds accepted with one frame (default 16, at most 253).", "N"),
    OptionSpec(
        "max_outbuf", _size, "Outbound buffer per connection before it is cut off (default 4M).", "BYTES"
    ),
    OptionSpec(
        "send_timeout",
        _non_negative_float,
        "Cut off a connection whose pending output makes no progress this long (default 30; 0 off).",
        "SECS",
    ),
    OptionSpec(
        "idle_timeout", _non_negative_float, "Close connections silent this long (default 0: never).", "SECS"
    ),
    OptionSpec(
        "drain_timeout",
        _non_negative_float,
        "On reload, time old workers get to finish their connections (default 30).",
        "SECS",
    ),
    OptionSpec(
        "history_size", _positive_int, "Chat messages kept per room for late joiners (default 100).", "N"
    ),
    OptionSpec(
        "history_bytes",
        _size,
        "Bytes of room history the daemon keeps in all (and in its state file); past it the rooms "
        "posted to least recently lose their oldest messages first (default 256M).",
        "BYTES",
    ),
    OptionSpec(
        "state_dir",
        _state_dir,
        "Directory of the history journal, which keeps rooms' history and seqs across restarts "
        "(default: $STATE_DIRECTORY, else /var/lib/ipcd for root, else $XDG_STATE_HOME/ipcd); "
        "'' keeps no file (under systemd, history then lasts across restarts in its fd store).",
        "DIR",
        reloadable=False,
    ),
    OptionSpec(
        "sync_interval",
        _non_negative_float,
        "Seconds between fsyncs of the history journal: what a power loss can lose at most "
        "(default 0: left to the kernel's writeback, about 30 s; a crash of ipcd loses nothing "
        "acknowledged either way).",
        "SECS",
    ),
    OptionSpec("max_message", _size, "Largest chat message text, in bytes (default 16K).", "BYTES"),
    OptionSpec(
        "rate_limit",
        _positive_float,
        "Chat posts/s each uid may make (all its connections and datagrams, on every worker), "
        "bursts of 2x; a stream past it is slowed down, a datagram refused (default 5000).",
        "N",
    ),
    OptionSpec(
        "rooms_per_connection", _positive_int, "Chat rooms one connection may join (default 64).", "N"
    ),
    OptionSpec(
        "fd_quota", _positive_int, "Stored fds each uid may hold in the hand-off store (default 64).", "N"
    ),
    OptionSpec(
        "waiters_per_uid",
        _positive_int,
        "GETs and TAKEs each uid may have waiting (--wait) for names not stored yet (default 1024).",
        "N",
    ),
    OptionSpec(
        "rooms_per_uid",
        _positive_int,
        "Chat rooms created by one uid that may exist at once, of the daemon's 10000 (default 1000).",
        "N",
    ),
    OptionSpec(
        "joins_per_uid",
        _positive_int,
        "Room memberships all of one uid's connections may hold together (default 1024).",
        "N",
    ),
    OptionSpec(
        "history_bytes_per_uid",
        _size,
        "Bytes of one uid's messages kept in room history; past it its oldest kept messages "
        "(and older ones of their rooms) are trimmed (default 64M).",
        "BYTES",
    ),
    OptionSpec(
        "message_ids_per_uid",
        _positive_int,
        "Message ids of one uid's recent SAYs the daemon remembers, so that a resent post is not "
        "posted twice (default 4096).",
        "N",
    ),
    OptionSpec(
        "message_id_window",
        _positive_float,
        "Seconds a SAY's message id is remembered at most (default 600).",
        "SECS",
    ),
    OptionSpec(
        "connections_per_uid",
        _positive_int,
        "Connections one uid may hold open at once (default 4096, or an eighth of what the workers' "
        "fd limit lets them hold if that is less).",
        "N",
    ),
    OptionSpec(
        "partial_bytes_per_uid",
        _size,
        "Bytes of partly received frames one uid's connections may hold in each worker; the read "
        "past it cuts its connection off (default 16M).",
        "BYTES",
    ),
    OptionSpec(
        "forward_bytes_per_uid",
        _size,
        "Bytes of requests one uid's connections may have waiting in each worker to reach the "
        "master; past it they are not read until the master catches up (default 16M).",
        "BYTES",
    ),
    OptionSpec(
        "privileged_budget_factor",
        _positive_int,
        "Root and the daemon's own uid get this many times each per-uid budget above (default 4).",
        "N",
    ),
    OptionSpec(
        "stop_timeout",
        _non_negative_float,
        "On stop, time workers get before they are killed (default 10).",
        "SECS",
    ),
    OptionSpec(
        "worker_timeout",
        _non_negative_float,
        "Kill a worker that misses heartbeats this long (default 30; 0 off).",
        "SECS",
    ),
)
OPTIONS_BY_NAME: Final = {spec.name: spec for spec in OPTIONS}


@dataclasses.dataclass(frozen=True)
class Settings:
    socket_dir: Path = DEFAULT_SOCKET_DIR
    workers: int = dataclasses.field(default_factory=lambda: os.cpu_count() or 1)
    log_level: str = "info"
    socket_mode: int = 0o666
    socket_group: str = ""
    max_frame_size: int = 1 << 20
    max_fds: int = 16
    max_outbuf: int = 4 << 20
    send_timeout: float = 30.0
    idle_timeout: float = 0.0
    drain_timeout: float = 30.0
    history_size: int = 100
    history_bytes: int = 256 << 20
    state_dir: Path | None = dataclasses.field(default_factory=default_state_dir)
    sync_interval: float = 0.0
    max_message: int = 16 * 1024
    rate_limit: float = 5000.0
    rooms_per_connection: int = 64
    fd_quota: int = 64
    waiters_per_uid: int = 1024
    rooms_per_uid: int = 1000
    joins_per_uid: int = 1024
    history_bytes_per_uid: int = 64 << 20
    message_ids_per_uid: int = 4096
    message_id_window: float = 600.0
    connections_per_uid: int = 0  # 0: not set, see ipcd.server.uidbudgets.connection_limit
    partial_bytes_per_uid: int = 16 << 20
    forward_bytes_per_uid: int = 16 << 20
    privileged_budget_factor: int = 4
    stop_timeout: float = 10.0
    worker_timeout: float = 30.0
    config_file: Path | None = None

    @property
    def stream_path(self) -> Path:
        return self.socket_dir / STREAM_SOCKET

    @property
    def dgram_path(self) -> Path:
        return self.socket_dir / DGRAM_SOCKET

    @property
    def lock_path(self) -> Path:
        return self.socket_dir / LOCK_FILE

    @property
    def reply_budget(self) -> int:
        """Bytes of history one reply or JOIN replay may hold: a quarter of
        the output buffer, so a page always fits (and a reader that reads
        never meets the slow-consumer bound through its own requests)."""
        return max(self.max_outbuf // 4, 1)

    @property
    def pause_threshold(self) -> int:
        """Queued reply bytes at which a worker stops reading a connection."""
        return max(self.max_outbuf // 4, 64 * 1024)

    @property
    def connection_fd_budget(self) -> int:
        """fds one connection may have queued for it, or reserved by its
        GETs and TAKEs in flight (``max_fds`` each), before the worker
        holds its next GET or TAKE (see ipcd.server.flow)."""
        return max(4 * self.max_fds, 64)

    @property
    def channel_fd_budget(self) -> int:
        """fds queued on one worker's channel at which the master stops
        reading that worker's requests until the worker has taken them."""
        return 4 * self.connection_fd_budget

    @property
    def channel_byte_budget(self) -> int:
        """Bytes queued on one worker's channel at which the master stops
        reading that worker's requests until the worker has taken them."""
        return max(2 * self.max_outbuf, 8 << 20)


def _parse(name: str, value: Any, source: str) -> Any:
    spec = OPTIONS_BY_NAME[name]
    try:
        parsed = spec.parse(value)
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"{source}: {spec.flag.lstrip('-')} = {value!r}: {exc}") from None
    if name == "max_fds" and parsed > 253:
        raise SettingsError(f"{source}: max-fds = {value!r}: the kernel passes at most 253 fds at once")
    if name == "max_frame_size" and parsed < 16:
        raise SettingsError(f"{source}: max-frame-size = {value!r}: must hold a 16-byte header")
    return parsed


def read_config_file(path: Path) -> dict[str, Any]:
    """Settings from a TOML file. Keys are the flag names (``max-outbuf``
    or ``max_outbuf``), optionally under an ``[ipcd]`` table."""
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise SettingsError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config file {path} is not valid TOML: {exc}") from None
    table = data.get("ipcd", data)
    if not isinstance(table, dict):
        raise SettingsError(f"config file {path}: [ipcd] must be a table")
    values: dict[str, Any] = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in OPTIONS_BY_NAME:
            known = ", ".join(spec.flag.lstrip("-") for spec in OPTIONS)
            raise SettingsError(f"config file {path}: unknown key {key!r} (known: {known})")
        values[name] = _parse(name, value, f"config file {path}")
    return values


def load_settings(overrides: Mapping[str, Any], config_file: Path | None = None) -> Settings:
    """Merge defaults, the config file and overrides (flags and environment,
    already merged by click: the flag wins over the variable)."""
    values: dict[str, Any] = {}
    if config_file is not None:
        values.update(read_config_file(config_file))
    for name, value in overrides.items():
        if value is not None:
            values[name] = _parse(name, value, OPTIONS_BY_NAME[name].flag)
    if "socket_dir" not in values:
        values["socket_dir"] = DEFAULT_SOCKET_DIR
    values["socket_dir"] = Path(os.path.abspath(values["socket_dir"]))
    return Settings(config_file=config_file, **values)


def reload_settings(current: Settings, overrides: Mapping[str, Any]) -> tuple[Settings, list[str]]:
    """Re-read the config file for SIGHUP. Returns the new settings and the
    names of changed settings that only take effect on restart (kept as they were)."""
    fresh = load_settings(overrides, current.config_file)
    kept: list[str] = []
    for spec in OPTIONS:
        if not spec.reloadable and getattr(fresh, spec.name) != getattr(current, spec.name):
            kept.append(spec.flag.lstrip("-"))
            fresh = dataclasses.replace(fresh, **{spec.name: getattr(current, spec.name)})
    return fresh, kept
