"""Chat request bodies: names, limits and parsing, sans-IO.

Theory of operation: chat bodies are UTF-8 JSON objects (a C client needs a
small JSON writer, not a schema compiler). Everything a client sends is
checked here, once, at the boundary, into typed values or a non-fatal
``RemoteProtocolError`` with the code a client should see. Identity is
never taken from a body: the sender's uid comes from the kernel.
"""

from __future__ import annotations

import re
from json.encoder import encode_basestring
from typing import Any, Final, NamedTuple

from ipcd.protocol.errors import RemoteProtocolError
from ipcd.protocol.fields import integer
from ipcd.protocol.messages import decode_json
from ipcd.protocol.ops import ErrorCode

DEFAULT_ROOM: Final = "lobby"
NAME_MAX: Final = 64
NICK_MAX: Final = 32
TOPIC_MAX: Final = 256
MESSAGE_ID_MAX: Final = 64
_ROOM_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_NICK_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
# Visible ASCII but the two characters JSON escapes: an id goes into JSON as is.
_MESSAGE_ID_RE: Final = re.compile(rf"[\x21\x23-\x5b\x5d-\x7e]{{1,{MESSAGE_ID_MAX}}}")


def _bad(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(message, ErrorCode.BAD_REQUEST, fatal=False)


def check_room(value: Any) -> str:
    return _check_name(value, "room", "room name", NAME_MAX, _ROOM_RE, "a letter or digit")


def check_nick(value: Any, field: str = "nick") -> str:
    """A nick, in the field ``field`` (``to`` for MSG), named in the error."""
    called = "nick" if field == "nick" else f"nick in {field!r}"
    return _check_name(value, field, called, NICK_MAX, _NICK_RE, "a letter or '_'")


def _check_name(value: Any, what: str, called: str, limit: int, pattern: re.Pattern[str], first: str) -> str:
    if not isinstance(value, str) or not value:
        raise _bad(f"{what} must be a non-empty string")
    if len(value) > limit or not pattern.fullmatch(value):
        raise _bad(
            f"bad {called} {value[:80]!r}: use up to {limit} letters, digits, '_', '.' or '-', "
            f"starting with {first}"
        )
    return value


def check_text(value: Any, limit: int) -> str:
    if not isinstance(value, str):
        raise _bad("text must be a string")
    size = len(value.encode())
    if size > limit:
        raise RemoteProtocolError(
            f"message of {size} bytes is over the limit of {limit}", ErrorCode.LIMIT_EXCEEDED, fatal=False
        )
    return value


def check_message_id(value: Any) -> bytes | None:
    """A SAY's client-chosen message id (None when absent), as ASCII bytes."""
    if value is None:
        return None
    if not isinstance(value, str) or not _MESSAGE_ID_RE.fullmatch(value):
        shown = value[:80] if isinstance(value, str) else value
        raise _bad(
            f"bad message id {shown!r}: use 1 to {MESSAGE_ID_MAX} visible ASCII characters "
            "(no space, '\"' or '\\')"
        )
    return value.encode()


def check_count(value: Any, limit: int, name: str) -> int:
    """A count of messages, 0 to INT_MAX (missing: 0); more than ``limit``
    is cut to it, as documented, once it is known to be an integer."""
    return min(integer(value, name, 0), limit)


def check_cursor(value: Any, name: str) -> int | None:
    """A paging cursor: a sequence number, or None for "from the newest"."""
    return None if value is None else integer(value, f"{name} (a seq)", 0)


def parse_body(body: bytes) -> dict[str, Any]:
    return decode_json(body)


# C0 but tab and newline, DEL, C1. A regex scan, not str.translate: translate
# looks every character up in a mapping, about 100 ns each (0.8 ms for a
# 16 KiB message); the scan is a hundred times faster and most texts hold none.
_CONTROLS: Final = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def sanitize_text(text: str) -> str:
    """Drop terminal control characters (C0 such as ESC and BEL, DEL, and the
    C1 range with its 8-bit CSI) but keep tabs and newlines: a message must
    not be able to drive the reader's terminal."""
    return _CONTROLS.sub("", text)


class Say(NamedTuple):
    """A checked SAY body: the room, the text as a JSON string literal
    (sanitized, UTF-8), ready to go into every MESSAGE made of it, and the
    client's message id (b"" without one: see ipcd.chat.recentids)."""

    room: str
    text_json: bytes
    message_id: bytes = b""


# The body most clients send, compact with the room first, whose text needs no
# escape and holds no control: its JSON string is the text's JSON as is.
_PLAIN_SAY: Final = re.compile(
    rb'\{"room":"([A-Za-z0-9][A-Za-z0-9_.-]{0,%d})","text":("[^"\\\x00-\x1f\x7f]*")\}' % (NAME_MAX - 1)
)
# The same with a message id, as a client that sorts its keys writes it.
_PLAIN_SAY_ID: Final = re.compile(
    rb'\{"id":"([\x21\x23-\x5b\x5d-\x7e]{1,%d})",' % MESSAGE_ID_MAX + _PLAIN_SAY.pattern[2:]
)
_UTF8_C1: Final = re.compile(rb"\xc2[\x80-\x9f]")  # U+0080-U+009F in UTF-8


def prepare_say(body: bytes, max_text: int) -> Say:
    """Check a SAY body once, where it comes in (the worker), so the hub
    only sequences it: no JSON is parsed or text escaped in the master."""
    plain = _PLAIN_SAY.fullmatch(body)
    if plain is not None:
        text_json = plain.group(2)
        if len(text_json) - 2 <= max_text and (text_json.isascii() or _is_clean_utf8(text_json)):
            return Say(plain.group(1).decode(), text_json)
    elif (with_id := _PLAIN_SAY_ID.fullmatch(body)) is not None:
        text_json = with_id.group(3)
        if len(text_json) - 2 <= max_text and (text_json.isascii() or _is_clean_utf8(text_json)):
            return Say(with_id.group(2).decode(), text_json, with_id.group(1))
    return parse_say(body, max_text)


def parse_say(body: bytes, max_text: int) -> Say:
    """:func:`prepare_say` for any body: parsed, checked, cleaned, encoded."""
    args = parse_body(body)
    room = check_room(args.get("room", DEFAULT_ROOM))
    message_id = check_message_id(args.get("id"))
    try:
        text = sanitize_text(check_text(args.get("text"), max_text))  # check_text encodes it once
    except UnicodeEncodeError:
        raise _bad("text holds a lone surrogate: send valid Unicode") from None
    return Say(room, encode_basestring(text).encode(), message_id or b"")


def _is_clean_utf8(raw: bytes) -> bool:
    """Valid UTF-8 (so no surrogates) without C1 controls."""
    try:
        raw.decode()
    except UnicodeDecodeError:
        return False
    return _UTF8_C1.search(raw) is None
