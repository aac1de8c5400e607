"""Every fd store op's body, fuzzed field by field, in process (the store is
pure: it returns the records to send). For any body: nothing but the
protocol's error comes out, a body with a field out of its documented range
is BAD_REQUEST naming a bad field and leaves the store exactly as it was
(a refused PUT's fds closed), and what is accepted is stored in range.

The oracle below is the protocol's field tables (docs/protocol.md, section
13) written out again, not the store's code."""

from __future__ import annotations

import errno
import fcntl
import math
import os
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipcd import fdpass
from ipcd.handoff.store import Store, StoreLimits
from ipcd.link.records import Answer, Sender
from ipcd.protocol import ErrorCode, Op, decode_error, decode_json, decode_record, reply_op
from tests.protocol.bodies import body_of, encode, holds_raw, is_int, is_seconds

ME = os.getuid()
OTHER = 4242 if ME != 4242 else 4243
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@/-]{0,127}")
FD_NAME_BAD = re.compile("[:\x00-\x1f\x7f-\x9f]")
LIMITS = StoreLimits(quota=8, max_entry_fds=4, max_wait=3600.0)

GOOD_NAMES = st.sampled_from(["mine", "theirs", "absent", "later", "a/b@c", "x" * 128])
NAMES = GOOD_NAMES | GOOD_NAMES | st.sampled_from(["x" * 129, "-bad", "", "a:b", "é"])
GOOD_IDS = st.lists(st.integers(0, 2**32 - 2), max_size=4)
IDS = GOOD_IDS | GOOD_IDS | st.lists(st.integers(0, 3) | st.sampled_from([-1, 2**32 - 1, True]), max_size=70)
GOOD_FD_NAMES = st.lists(st.sampled_from(["a", "b.sock", "x" * 255, "é"]), min_size=1, max_size=4)
FD_NAMES = GOOD_FD_NAMES | st.lists(
    st.sampled_from(["a", "x" * 256, "", "a:b", "a\x00b", "\ud800", "é\x9b"]), max_size=5
)
SECONDS = (
    st.floats(0, 1e9)
    | st.integers(0, 10**9)
    | st.sampled_from([0.001, 3601, 1e9 + 1, -1, -0.5, 10**400, True, "1"])
)

PUT_FIELDS = {
    "name": (NAMES),
    "names": (FD_NAMES),
    "allow_uids": (IDS),
    "allow_gids": (IDS),
    "public": (st.booleans()),
    "replace": (st.booleans()),
    "ttl": (SECONDS),
}
GET_FIELDS = {"name": (NAMES), "wait": (SECONDS)}
RM_FIELDS = {"name": (NAMES)}


def _valid_id_list(value: Any) -> bool:
    return value is None or (
        isinstance(value, list) and len(value) <= 64 and all(is_int(v, 0, 2**32 - 2) for v in value)
    )


def _valid_fd_names(value: Any, nfds: int) -> bool:
    if value is None or value == []:
        return True
    return (
        isinstance(value, list)
        and len(value) == nfds
        and all(
            isinstance(n, str) and 0 < len(n) <= 255 and not FD_NAME_BAD.search(n) and _utf8(n) for n in value
        )
    )


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def bad_fields(op: int, body: dict[str, Any], nfds: int) -> set[str]:
    """The fields of ``body`` the protocol's tables do not allow, for ``op``."""
    name = body.get("name")
    bad = set() if isinstance(name, str) and NAME_RE.fullmatch(name) else {"name"}
    if op == Op.PUT:
        checks = {
            "names": _valid_fd_names(body.get("names"), nfds),
            "allow_uids": _valid_id_list(body.get("allow_uids")),
            "allow_gids": _valid_id_list(body.get("allow_gids")),
            "public": body.get("public") is None or isinstance(body.get("public"), bool),
            "replace": body.get("replace") is None or isinstance(body.get("replace"), bool),
            "ttl": body.get("ttl") is None or is_seconds(body.get("ttl"), positive=True),
        }
        bad |= {field for field, ok in checks.items() if not ok}
    if op in (Op.GET, Op.TAKE) and not (
        body.get("wait") is None or is_seconds(body.get("wait"), positive=False)
    ):
        bad.add("wait")
    return bad


# -- driving the store ---------------------------------------------------------


@pytest.fixture(scope="module")
def pipe() -> Iterator[tuple[int, int]]:
    reader, writer = os.pipe()
    yield reader, writer
    os.close(reader)
    os.close(writer)


def _sender(uid: int = ME) -> Sender:
    return Sender(worker=1, conn=7, request_id=99, uid=uid, gid=uid, pid=1)


def _store(pipe: tuple[int, int]) -> Store:
    """One entry of ours, one of another uid with a TTL, one waiter."""
    store = Store(LIMITS)
    store.handle(_sender(), Op.PUT, b'{"name":"mine","names":["m"]}', (os.dup(pipe[1]),))
    store.handle(_sender(OTHER), Op.PUT, b'{"name":"theirs","ttl":60,"allow_uids":[5]}', (os.dup(pipe[0]),))
    assert store.handle(_sender(OTHER), Op.GET, b'{"name":"later","wait":30}', ()) == []
    assert set(store.entries) == {"mine", "theirs"}
    return store


def snapshot(store: Store) -> Any:
    entries = {
        name: (
            e.owner,
            e.fds,
            e.fd_names,
            e.allow_uids,
            e.allow_gids,
            e.public,
            e.expires,
            e.handout_body,
        )
        for name, e in store.entries.items()
    }
    waiters = {name: [(w.sender, w.op, w.deadline) for w in queue] for name, queue in store.waiters.items()}
    return entries, dict(store.charged), waiters


def _is_open(fd: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
    except OSError as exc:
        if exc.errno != errno.EBADF:
            raise
        return False
    return True


def _run(store: Store, op: int, raw: bytes, fds: tuple[int, ...]) -> tuple[int, bytes] | None:
    outs = store.handle(_sender(), op, raw, fds)  # any exception but a reply fails the test
    if not outs:
        return None  # parked
    for out in outs:
        fdpass.close_fds(out.fds)
    # The reply to this request comes first; a PUT may then serve waiters.
    frame = decode_record(Answer.decode(outs[0].body).frame, outs[0].fds)
    return frame.op, frame.body


def _refusal(result: tuple[int, bytes] | None, raw: bytes) -> tuple[int, str]:
    assert result is not None, f"parked {raw[:200]!r}"
    assert result[0] == Op.ERROR, f"accepted {raw[:200]!r}"
    return decode_error(result[1])


def check_op(store: Store, op: int, body: dict[str, Any], nfds: int, fds: tuple[int, ...]) -> None:
    before = snapshot(store)
    raw = encode(body)
    started = time.monotonic()
    result = _run(store, op, raw, fds)
    invalid: set[str] = set() if op == Op.LS else bad_fields(op, body, nfds)
    if op == Op.PUT and not 0 < nfds <= LIMITS.max_entry_fds:
        invalid.add("fds")  # refused whatever the body says
    if invalid or holds_raw(body):
        code, message = _refusal(result, raw)
        assert code in (ErrorCode.BAD_REQUEST, ErrorCode.LIMIT_EXCEEDED), (code, message)
        if not holds_raw(body) and "fds" not in invalid:
            assert code == ErrorCode.BAD_REQUEST
            assert any(field in message for field in invalid), (message, invalid)
        assert snapshot(store) == before, f"a refused body changed the store: {raw[:200]!r}"
        assert not any(_is_open(fd) for fd in fds), "a refused PUT keeps no fd"
        return
    # Every field in range: whatever the answer, the store holds only values in range.
    if result is not None and result[0] == Op.ERROR:
        code, message = decode_error(result[1])
        assert code in (
            ErrorCode.NOT_FOUND,
            ErrorCode.EXISTS,
            ErrorCode.PERMISSION_DENIED,
            ErrorCode.LIMIT_EXCEEDED,
        )
        assert snapshot(store) == before
        assert not any(_is_open(fd) for fd in fds)
        return
    if result is not None:
        assert result[0] == reply_op(op)
        decode_json(result[1])
    for entry in store.entries.values():
        assert isinstance(entry.public, bool)
        assert all(is_int(i, 0, 2**32 - 2) for i in entry.allow_uids | entry.allow_gids)
        assert all(isinstance(n, str) and 0 < len(n) <= 255 and ":" not in n for n in entry.fd_names)
        assert entry.expires is None or math.isfinite(entry.expires)
    for queue in store.waiters.values():
        for waiter in queue:
            assert math.isfinite(waiter.deadline)
            assert waiter.deadline <= time.monotonic() + LIMITS.max_wait
            assert waiter.deadline >= started or waiter.sender.uid == OTHER


_SETTINGS = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@_SETTINGS
@given(body=body_of(PUT_FIELDS, ("name",)), nfds=st.integers(0, 5))
def test_put_bodies(pipe: tuple[int, int], body: dict[str, Any], nfds: int) -> None:
    store = _store(pipe)
    try:
        check_op(store, Op.PUT, body, nfds, tuple(os.dup(pipe[1]) for _ in range(nfds)))
    finally:
        store.close_all()


@_SETTINGS
@given(body=body_of(GET_FIELDS, ("name",)), op=st.sampled_from([Op.GET, Op.TAKE]))
def test_get_and_take_bodies(pipe: tuple[int, int], body: dict[str, Any], op: int) -> None:
    store = _store(pipe)
    try:
        check_op(store, op, body, 0, ())
    finally:
        store.close_all()


@_SETTINGS
@given(body=body_of(RM_FIELDS, ("name",)), op=st.sampled_from([Op.RM, Op.LS]))
def test_rm_and_ls_bodies(pipe: tuple[int, int], body: dict[str, Any], op: int) -> None:
    store = _store(pipe)
    try:
        check_op(store, op, body, 0, ())
    finally:
        store.close_all()


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b'{"name":"later","wait":NaN}', "NaN"),
        (b'{"name":"later","wait":1e999}', "1e999"),
        (b'{"name":"later","wait":-1}', "wait"),
        (b'{"name":"later","wait":true}', "wait"),
        (b'{"name":"mine","wait":"soon"}', "wait"),  # checked although the name is stored
        (b'{"name":"later","wait":' + str(10**400).encode() + b"}", "wait"),
    ],
)
def test_a_get_with_a_wait_out_of_range_parks_nothing(pipe: tuple[int, int], raw: bytes, field: str) -> None:
    """The bug of issue 10: {"wait": NaN} parked a waiter whose deadline never passes."""
    store = _store(pipe)
    try:
        before = snapshot(store)
        code, message = _refusal(_run(store, Op.GET, raw, ()), raw)
        assert (code, field in message) == (ErrorCode.BAD_REQUEST, True), message
        assert snapshot(store) == before
    finally:
        store.close_all()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("ttl", str(10**400)),
        ("ttl", "Infinity"),
        ("ttl", "0"),
        ("public", '"no"'),
        ("replace", "1"),
        ("allow_uids", "[true]"),
        ("allow_uids", f"[{2**32 - 1}]"),
        ("allow_gids", "[" + ",".join(["1"] * 65) + "]"),
        ("names", '["a\\u0000b"]'),
        ("names", '["' + "x" * 256 + '"]'),
    ],
)
def test_a_put_with_a_field_out_of_range_stores_nothing_and_closes_its_fd(
    pipe: tuple[int, int], field: str, value: str
) -> None:
    store = _store(pipe)
    fd = os.dup(pipe[1])
    try:
        before = snapshot(store)
        raw = b'{"name":"new","%s":%s}' % (field.encode(), value.encode())
        code, message = _refusal(_run(store, Op.PUT, raw, (fd,)), raw)
        assert code == ErrorCode.BAD_REQUEST
        assert field in message or value in message, message
        assert snapshot(store) == before
        assert not _is_open(fd)
    finally:
        store.close_all()


def test_a_long_wait_is_cut_to_the_longest_a_waiter_is_kept(pipe: tuple[int, int]) -> None:
    store = _store(pipe)
    try:
        started = time.monotonic()
        assert _run(store, Op.GET, b'{"name":"soon","wait":1e9}', ()) is None
        (waiter,) = store.waiters["soon"]
        assert started + LIMITS.max_wait <= waiter.deadline <= time.monotonic() + LIMITS.max_wait
    finally:
        store.close_all()
