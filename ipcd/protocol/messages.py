"""Bodies of the frames whose content has structure.

ERROR bodies are binary (``u16 code`` + UTF-8 message) so a C client can read
them without a JSON parser. Control bodies that are read by people and
scripts (STATUS) are UTF-8 JSON objects: they change shape as the daemon
grows, and JSON lets old clients ignore keys they do not know.

JSON is written as UTF-8, not ASCII with ``\\uXXXX`` escapes: a character
takes its 1-4 UTF-8 bytes instead of 6 (12 beyond U+FFFF), so a body's size
is its text's size and the reply limits hold for non-Latin text too.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any, Final

from ipcd.protocol.errors import RemoteProtocolError
from ipcd.protocol.ops import ErrorCode

_ERROR_HEAD: Final = struct.Struct("!H")
# Built once: json.dumps() with options builds an encoder on every call,
# which cost the chat hub more than the encoding itself.
_UTF8_JSON: Final = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), sort_keys=True)
_ASCII_JSON: Final = json.JSONEncoder(separators=(",", ":"), sort_keys=True)


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON (RFC 8259 has no NaN or Infinity)")


def _finite_float(text: str) -> float:
    number = float(text)
    if math.isinf(number):  # 1e999: a literal JSON allows, but no finite number
        raise ValueError(f"number {text[:40]} is out of range")
    return number


# Strict: Python's json reads NaN, Infinity and -Infinity by default, and a
# literal such as 1e999 as inf. None of them is a number any field takes, so
# no body may carry one: refused here, once, for every op and both sides.
_JSON_DECODER: Final = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite_float)


def encode_error(code: ErrorCode, message: str) -> bytes:
    return _ERROR_HEAD.pack(int(code)) + message.encode("utf-8", "replace")


def decode_error(body: bytes) -> tuple[int, str]:
    """(code, message) of an ERROR body. Unknown codes are returned as ints."""
    if len(body) < _ERROR_HEAD.size:
        raise RemoteProtocolError("ERROR frame body shorter than its code", ErrorCode.MALFORMED, fatal=False)
    (code,) = _ERROR_HEAD.unpack_from(body)
    return code, body[_ERROR_HEAD.size :].decode("utf-8", "replace")


def encode_json(obj: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON with sorted keys. Never raises for a string: one
    with no UTF-8 form (a lone surrogate, or a path that ``os`` decoded
    with surrogateescape) sends the whole body ASCII-escaped instead, which
    is still JSON and decodes to the same strings. Text a client sends is
    refused at the door when it is not valid Unicode (ipcd.protocol.chat),
    so only the daemon's own descriptions of the system can take that path."""
    text = _UTF8_JSON.encode(obj)
    try:
        return text.encode()
    except UnicodeEncodeError:
        return _ASCII_JSON.encode(obj).encode()


def decode_json(body: bytes) -> dict[str, Any]:
    """Parse a JSON-object body; anything else is the peer's protocol error."""
    try:
        obj = _JSON_DECODER.decode(body.decode("utf-8")) if body else {}
    # ValueError covers UnicodeDecodeError and JSONDecodeError, NaN and the
    # infinities, and also an integer literal over
    # sys.get_int_max_str_digits(); RecursionError is a
    # deeply nested array or object. All are the peer's doing.
    except (ValueError, RecursionError) as exc:
        raise RemoteProtocolError(
            f"body is not UTF-8 JSON: {exc}", ErrorCode.BAD_REQUEST, fatal=False
        ) from exc
    if not isinstance(obj, dict):
        raise RemoteProtocolError("body is not a JSON object", ErrorCode.BAD_REQUEST, fatal=False)
    return obj
