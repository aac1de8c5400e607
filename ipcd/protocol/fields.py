"""Checked reads of request body fields: every number, string and list a
client sends is taken through one of these before a service looks at it.

Theory of operation: a body is parsed JSON (ipcd.protocol.messages refuses
NaN and the infinities in the text already), so a field can still hold any
JSON value: the wrong type, ``true`` where a number belongs (Python's bool
is an int), ``1.5`` where an integer belongs, an integer of 400 digits, a
list of a million items. Each reader here takes a value and returns it
typed and in range, or raises the non-fatal ``RemoteProtocolError`` with
``BAD_REQUEST`` and a message that names the field and what it may hold.
They change nothing, so a handler that reads all its fields first refuses
a bad body before any of its state moves. A missing field comes as None
and gets the caller's default. Sans-IO: nothing here touches a socket.
"""

from __future__ import annotations

from typing import Any, Final

from ipcd.protocol.errors import RemoteProtocolError
from ipcd.protocol.ops import ErrorCode

# The largest integer a field takes: an int64, what a C client holds.
INT_MAX: Final = 2**63 - 1
# The longest span a seconds field takes (about 31.7 years): far past any
# wait or TTL in use, and small enough that a deadline made of it is exact.
SECONDS_MAX: Final = 1e9
# uid_t and gid_t are 32 bits; (uid_t)-1 means "no id" to the kernel.
ID_MAX: Final = 2**32 - 2


def bad_field(field: str, wants: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"{field} must be {wants}", ErrorCode.BAD_REQUEST, fatal=False)


def integer(value: Any, field: str, default: int, low: int = 0, high: int = INT_MAX) -> int:
    """An integer from ``low`` to ``high``; None is ``default``. Not a bool,
    not a float (not even ``2.0``: the field is documented as an integer)."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise bad_field(field, f"an integer from {low} to {high}")
    return value


def seconds(value: Any, field: str, default: float, *, positive: bool, high: float = SECONDS_MAX) -> float:
    """A number of seconds, more than 0 if ``positive`` (else at least 0),
    at most ``high``; None is ``default``. The range test also refuses NaN
    (every comparison with it is false) and the infinities, and compares an
    integer as an integer, so 10**400 is refused rather than overflowing
    float()."""
    if value is None:
        return default
    in_range = False
    if isinstance(value, int | float) and not isinstance(value, bool):
        in_range = 0 < value <= high if positive else 0 <= value <= high
    if not in_range:
        raise bad_field(field, f"a number of seconds {'over' if positive else 'from'} 0 to {high:.0f}")
    return float(value)


def flag(value: Any, field: str) -> bool:
    """A JSON boolean; None is false. ``"no"`` and ``0`` are refused rather
    than read as Python's truth would read them (``"no"`` is true)."""
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad_field(field, "true or false")
    return value


def id_set(value: Any, field: str, limit: int) -> frozenset[int]:
    """A list of at most ``limit`` uids or gids, each 0 to ID_MAX; None is empty."""
    if value is None:
        return frozenset()
    wants = f"a list of at most {limit} ids, each an integer from 0 to {ID_MAX}"
    if not isinstance(value, list) or len(value) > limit:
        raise bad_field(field, wants)
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int) or not 0 <= item <= ID_MAX:
            raise bad_field(field, wants)
    return frozenset(value)


def is_unicode(text: str) -> bool:
    """False for a string holding a lone surrogate (JSON ``"\\ud800"``):
    it has no UTF-8 form, so encoding it later would raise."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True
