"""The chat hub's data: its limits, sessions and rooms, and default nicks.

Theory of operation: plain records the hub (:mod:`ipcd.chat.hub`) keeps and
its operations (:mod:`ipcd.chat.operations`) read; a room's ``history`` is
its kept messages (:data:`~ipcd.chat.keptbytes.Kept`, oldest first, a suffix
of its sequence without gaps). A default nick comes from the password
database, cached for a minute: a lookup is six system calls, and a poster
that never joined pays it on every message.
"""

from __future__ import annotations

import dataclasses
import pwd
import re
import time
from collections import Counter, deque
from json.encoder import encode_basestring
from typing import Any

from ipcd.chat.keptbytes import Kept
from ipcd.chat.recentids import DEFAULT_PER_UID, DEFAULT_SECONDS
from ipcd.link.records import ServiceError
from ipcd.protocol import ErrorCode
from ipcd.protocol.chat import NICK_MAX, check_text, sanitize_text

Member = tuple[int, int]  # (worker pid, connection id)


def json_string(text: str) -> bytes:
    return encode_basestring(text).encode()


@dataclasses.dataclass(frozen=True)
class Limits:
    history: int = 100  # messages kept per room
    max_text: int = 16 * 1024  # bytes of UTF-8 text per message
    rooms_per_connection: int = 64
    max_rooms: int = 10_000
    reply_budget: int = 1 << 20  # bytes of history per reply or replay: a quarter of --max-outbuf
    rooms_per_uid: int = 1000  # rooms a uid created that still exist: a tenth of max_rooms
    joins_per_uid: int = 1024  # memberships all of a uid's connections hold together
    history_bytes_per_uid: int = 64 << 20  # bytes of one uid's messages kept in history
    history_bytes: int = 256 << 20  # bytes of history kept in all: see Hub.trim_history
    privileged_factor: int = 4  # root and the daemon's uid: this many times the per-uid budgets
    rate_limit: float = 5000.0  # posts per second per uid, daemon-wide (bursts of BURST_FACTOR seconds)
    message_ids_per_uid: int = DEFAULT_PER_UID  # SAY ids remembered per uid (ipcd.chat.recentids)
    message_id_window: float = DEFAULT_SECONDS  # ... for this many seconds at most


@dataclasses.dataclass(eq=False)
class Session:
    member: Member
    nick: str
    uid: int
    pid: int
    rooms: set[str] = dataclasses.field(default_factory=set)
    nick_json: bytes = b""  # the nick as JSON, for every message it sends

    def __post_init__(self) -> None:
        self.rename(self.nick)

    def rename(self, nick: str) -> None:
        self.nick = nick
        self.nick_json = json_string(nick)


@dataclasses.dataclass(eq=False)
class Room:
    name: str
    topic: str = ""
    seq: int = 0
    members: dict[Member, Session] = dataclasses.field(default_factory=dict)
    workers: Counter[int] = dataclasses.field(default_factory=Counter)
    history: deque[Kept] = dataclasses.field(default_factory=deque)
    last_used: int = 0  # the hub's message count when it was created or last posted to: eviction order
    name_json: bytes = b""
    creator: int | None = None  # the uid its room budget is charged to (None: the lobby)

    def __post_init__(self) -> None:
        self.name_json = json_string(self.name)

    @property
    def idle(self) -> bool:
        return not self.members


class ChatError(ServiceError):
    """Refused by the chat hub."""


_NAMES: dict[int, tuple[float, str]] = {}  # uid -> (looked up at, name)
_NAME_JSON: dict[int, tuple[float, bytes]] = {}  # uid -> (looked up at, name as JSON)
_NAME_TTL = 60.0


def user_name_json(uid: int, now: float) -> bytes:
    """:func:`user_name` as JSON, an unjoined poster's ``from`` on every
    message: cached as long (``now`` from any clock that only moves on)."""
    cached = _NAME_JSON.get(uid)
    if cached is not None and 0 <= now - cached[0] < _NAME_TTL:
        return cached[1]
    if len(_NAME_JSON) > 4096:
        _NAME_JSON.clear()
    encoded = json_string(user_name(uid))
    _NAME_JSON[uid] = (now, encoded)
    return encoded


def user_name(uid: int) -> str:
    """A default nick from the user name, made to fit the nick rules (with
    room left for a "-N" suffix). Cached for a minute: a passwd lookup is
    six system calls, and an unjoined poster pays it on every message."""
    now = time.monotonic()
    cached = _NAMES.get(uid)
    if cached is not None and now - cached[0] < _NAME_TTL:
        return cached[1]
    if len(_NAMES) > 4096:
        _NAMES.clear()
    name = _lookup_name(uid)
    _NAMES[uid] = (now, name)
    return name


def _lookup_name(uid: int) -> str:
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid{uid}"
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    if not (name[:1].isalpha() or name[:1] == "_"):
        name = f"u{name}"
    return name[: NICK_MAX - 4]


def is_unicode(text: str) -> bool:
    """False for a string holding a lone surrogate (JSON ``"\\ud800"``):
    it has no UTF-8 form, so encoding it would raise inside the master."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def message_text(value: Any, limit: int) -> str:
    """Message text: a string of at most ``limit`` UTF-8 bytes, valid
    Unicode, stripped of terminal controls."""
    try:
        return sanitize_text(check_text(value, limit))  # check_text encodes it once
    except UnicodeEncodeError:
        raise ChatError(ErrorCode.BAD_REQUEST, "text holds a lone surrogate: send valid Unicode") from None
