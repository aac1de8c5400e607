"""Hostile request bodies for the property tests of every op: arbitrary JSON
values per field, plus what Python's json would read but JSON has not
(NaN, Infinity, 1e999), integers far past any range, deep nesting, long
strings, and the field's own plausible values so that some bodies pass.

A body is built as bytes by :func:`to_json`, so a :class:`Raw` literal goes
on the wire exactly as an attacker would write it.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from hypothesis import strategies as st


@dataclasses.dataclass(frozen=True)
class Raw:
    """Bytes that go into the body as they are (NaN, 1e999, deep nesting)."""

    text: str


NON_FINITE = ("NaN", "Infinity", "-Infinity", "1e999", "-1e999", "2E400")
DEEP = "[" * 5000 + "]" * 5000  # past the decoder's recursion limit
RAW_VALUES = st.sampled_from([Raw(t) for t in (*NON_FINITE, DEEP)])

EDGE_INTEGERS = st.sampled_from(
    [0, 1, -1, 2**31, 2**32 - 2, 2**32 - 1, 2**32, 2**53 + 1, 2**63 - 1, 2**63, -(2**63), 10**400, -(10**400)]
)
EDGE_FLOATS = st.sampled_from([0.0, -0.0, 0.5, 1e-300, 1.0, 2.5, 3600.0, 1e9, 1e9 + 1, 1e300, -1.5])
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | EDGE_INTEGERS
    | st.floats(allow_nan=False, allow_infinity=False)
    | EDGE_FLOATS
    | st.text(max_size=20)
    | st.text(min_size=200, max_size=400)
    | st.sampled_from(["\ud800", "a\x00b", "a:b", "é" * 300, "x" * 70_000])
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda kids: st.lists(kids, max_size=70) | st.dictionaries(st.text(max_size=5), kids, max_size=3),
    max_leaves=80,
)


MISSING = object()  # a field left out of the body
WILD = st.one_of(JSON_VALUES, JSON_VALUES, JSON_VALUES, RAW_VALUES)


@st.composite
def body_of(
    draw: st.DrawFn, fields: dict[str, st.SearchStrategy[Any]], required: tuple[str, ...] = ()
) -> dict[str, Any]:
    """A body whose fields take their plausible values (or are left out,
    ``required`` ones always present), then up to two of them, or an unknown key the daemon ignores, take any
    JSON value at all, or a Raw one: so a body is often valid, often wrong
    in one field only (which must then be the one named), sometimes both."""
    body = {
        name: draw(strategy if name in required else st.one_of(st.just(MISSING), strategy, strategy))
        for name, strategy in fields.items()
    }
    for name in draw(st.lists(st.sampled_from([*fields, "zz_unknown"]), max_size=2, unique=True)):
        body[name] = draw(WILD)
    return {name: value for name, value in body.items() if value is not MISSING}


def to_json(value: Any) -> str:
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{to_json(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(to_json(v) for v in value) + "]"
    return json.dumps(value)


def encode(body: dict[str, Any]) -> bytes:
    return to_json(body).encode("utf-8", "surrogatepass")


def holds_raw(value: Any) -> bool:
    """Whether the body has any value JSON has not (the whole body is refused)."""
    if isinstance(value, Raw):
        return True
    if isinstance(value, dict):
        return any(holds_raw(v) for v in value.values())
    if isinstance(value, list):
        return any(holds_raw(v) for v in value)
    return False


def is_int(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def is_seconds(value: Any, *, positive: bool, high: float = 1e9) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return 0 < value <= high if positive else 0 <= value <= high
