"""fd store request bodies, checked at the boundary into typed requests.

Theory of operation: the store's handlers act on a :class:`PutRequest` or a
:class:`GetRequest`, never on the raw JSON object, and both are built here
before a handler looks at an entry, a waiter or a quota. Every field is read
through ipcd.protocol.fields, so a value of the wrong type, out of its
range, or a list over its bound is ``BAD_REQUEST`` naming the field and
what it may hold, and the store is left exactly as it was. Sans-IO, and
independent of the store's state: the same body always parses the same way,
which is what lets the store keep parsed GET bodies by their bytes.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Final

from ipcd.protocol.errors import RemoteProtocolError
from ipcd.protocol.fields import bad_field, flag, id_set, is_unicode, seconds
from ipcd.protocol.ops import ErrorCode

NAME_MAX: Final = 128
# An fd name ends up in LISTEN_FDNAMES (systemd's FDNAME_MAX is 255), an
# environment variable: no ':' (it separates the names) and no control
# character (a NUL cannot be in the environment at all).
FD_NAME_MAX: Final = 255
# The most uids, and the most gids, one entry's access list may name.
ACCESS_LIST_MAX: Final = 64
# No ':': an entry's name is also its fds' default LISTEN_FDNAMES, which ':' separates.
_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@/-]*")
_FD_NAME_BAD: Final = re.compile("[:\x00-\x1f\x7f-\x9f]")

Args = dict[str, Any]


@dataclasses.dataclass(frozen=True, slots=True)
class PutRequest:
    name: str
    fd_names: tuple[str, ...]
    allow_uids: frozenset[int]
    allow_gids: frozenset[int]
    public: bool
    replace: bool
    ttl: float | None  # seconds, finite and > 0


@dataclasses.dataclass(frozen=True, slots=True)
class GetRequest:
    name: str
    wait: float  # seconds, 0 to max_wait


def is_valid_name(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= NAME_MAX and _NAME_RE.fullmatch(value) is not None


def check_name(value: Any) -> str:
    if not is_valid_name(value):
        shown = value[:80] if isinstance(value, str) else type(value).__name__
        raise RemoteProtocolError(
            f"bad name {shown!r}: up to {NAME_MAX} letters, digits and _ . @ / -, "
            "starting with a letter or digit",
            ErrorCode.BAD_REQUEST,
            fatal=False,
        )
    return str(value)


def parse_put(args: Args, nfds: int) -> PutRequest:
    """A PUT body that came with ``nfds`` fds (the caller checks their count)."""
    name = check_name(args.get("name"))
    return PutRequest(
        name=name,
        fd_names=_fd_names(args.get("names"), name, nfds),
        allow_uids=id_set(args.get("allow_uids"), "allow_uids", ACCESS_LIST_MAX),
        allow_gids=id_set(args.get("allow_gids"), "allow_gids", ACCESS_LIST_MAX),
        public=flag(args.get("public"), "public"),
        replace=flag(args.get("replace"), "replace"),
        ttl=None if args.get("ttl") is None else seconds(args["ttl"], "ttl", 0.0, positive=True),
    )


def parse_get(args: Args, max_wait: float) -> GetRequest:
    """A GET or TAKE body. ``wait`` is checked whether or not the name is
    stored, and a longer one than ``max_wait`` is cut to it (documented)."""
    name = check_name(args.get("name"))
    wait = seconds(args.get("wait"), "wait", 0.0, positive=False)
    return GetRequest(name, min(wait, max_wait))


def _fd_names(value: Any, name: str, nfds: int) -> tuple[str, ...]:
    if value is None or value == []:  # the default: the entry's name for each fd
        return (name,) * nfds
    wants = (
        f"a list of {nfds} fd names (one per fd), each 1 to {FD_NAME_MAX} characters "
        "without ':' or control characters"
    )
    if not isinstance(value, list) or len(value) != nfds:
        raise bad_field("names", wants)
    for item in value:
        if (
            not isinstance(item, str)
            or not 0 < len(item) <= FD_NAME_MAX
            or _FD_NAME_BAD.search(item) is not None
            or not is_unicode(item)
        ):
            raise bad_field("names", wants)
    return tuple(value)
