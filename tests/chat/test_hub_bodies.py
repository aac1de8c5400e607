"""Every chat op's body, fuzzed field by field, through the pure hub and the
worker's SAY check (the Sim of test_hub). For any body: nothing but a
protocol error comes out, a body with a field outside the protocol's tables
(docs/protocol.md, section 12) is refused with BAD_REQUEST naming that
field (LIMIT_EXCEEDED for a text over the limit) and changes nothing in the
hub, not even a session for a connection that had none; and what is
accepted leaves the hub holding only values in range.

The oracle is the protocol's tables written out again, not the hub's code."""

from __future__ import annotations

import re
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from ipcd.chat.hub import Hub
from ipcd.protocol import ErrorCode, Op, decode_error, reply_op
from ipcd.protocol.fields import INT_MAX
from tests.chat.test_hub import W1, W2, Sim
from tests.protocol.bodies import body_of, encode, holds_raw, is_int

ROOM_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
NICK_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}")
MAX_TEXT = 16 * 1024

ROOMS = st.sampled_from(["lobby", "dev", "new", "x" * 64]) | st.sampled_from(["x" * 65, "-bad", "", "a b"])
NICKS = st.sampled_from(["alice", "bob", "carol", "_x", "x" * 32]) | st.sampled_from(["x" * 33, "1bad", ""])
COUNTS = st.integers(0, 200) | st.sampled_from([-1, INT_MAX, INT_MAX + 1, 10**400, True, 1.0])
TEXTS = st.text(max_size=40) | st.sampled_from(["é" * 8192, "x" * MAX_TEXT, "x" * (MAX_TEXT + 1), "\ud800"])
TOPICS = st.text(max_size=40) | st.sampled_from(["t" * 256, "t" * 257, "a\udfffb"])

FIELDS: dict[int, dict[str, st.SearchStrategy[Any]]] = {
    Op.NICK: {"nick": NICKS},
    Op.JOIN: {"room": ROOMS, "history": COUNTS},
    Op.PART: {"room": ROOMS},
    Op.SAY: {"room": ROOMS, "text": TEXTS},
    Op.MSG: {"to": NICKS, "text": TEXTS},
    Op.ROOMS: {},
    Op.WHO: {"room": ROOMS},
    Op.TOPIC: {"room": ROOMS, "topic": TOPICS},
    Op.HISTORY: {"room": ROOMS, "count": COUNTS, "before": COUNTS},
}
REQUIRED: dict[int, tuple[str, ...]] = {
    Op.NICK: ("nick",),
    Op.PART: ("room",),
    Op.SAY: ("text",),
    Op.MSG: ("to", "text"),
}


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def bad_fields(op: int, body: dict[str, Any]) -> dict[str, set[ErrorCode]]:
    """Each field the protocol's tables refuse, with the codes allowed for it."""
    bad: dict[str, set[ErrorCode]] = {}
    request = {ErrorCode.BAD_REQUEST}
    for field in FIELDS[op]:
        value = body.get(field)
        missing = field not in body
        if field == "room":
            ok = (missing and op != Op.PART) or (op == Op.WHO and value is None)
            ok = ok or (isinstance(value, str) and ROOM_RE.fullmatch(value) is not None)
        elif field in ("nick", "to"):
            ok = isinstance(value, str) and NICK_RE.fullmatch(value) is not None
        elif field in ("history", "count", "before"):
            ok = value is None or is_int(value, 0, INT_MAX)
        elif field == "text":
            ok = isinstance(value, str) and _utf8(value) and len(value.encode()) <= MAX_TEXT
            if isinstance(value, str) and _utf8(value) and not ok:
                bad[field] = {ErrorCode.LIMIT_EXCEEDED}
                continue
        else:
            assert field == "topic"
            ok = value is None or (isinstance(value, str) and len(value) <= 256 and _utf8(value))
        if not ok:
            bad[field] = request
    return bad


def snapshot(hub: Hub) -> Any:
    rooms = {
        name: (r.topic, r.seq, sorted(r.members), dict(r.workers), [seq for seq, _, _ in r.history])
        for name, r in hub.rooms.items()
    }
    sessions = {m: (s.nick, s.uid, sorted(s.rooms)) for m, s in hub.sessions.items()}
    return rooms, sessions, sorted(hub.nicks), hub.private_seq, hub.messages


def _world(tester_has_session: bool) -> tuple[Sim, Any]:
    sim = Sim()
    alice = sim.connect(W1)
    alice.call(Op.NICK, nick="alice")
    alice.join("dev")
    for n in range(3):
        alice.say("dev", f"hello {n}")
    sim.connect(W2).call(Op.NICK, nick="bob")
    tester = sim.connect(W2)
    if tester_has_session:
        tester.join("lobby")
    return sim, tester


def check_op(op: int, body: dict[str, Any], tester_has_session: bool, by_datagram: bool = False) -> None:
    sim, tester = _world(tester_has_session)
    before = snapshot(sim.hub)
    raw = encode(body)
    # Any exception but an error reply fails the test.
    frame = sim.datagram(op, raw) if by_datagram else tester.request(op, raw)
    bad = bad_fields(op, body)
    if holds_raw(body) or bad:
        assert frame.op == Op.ERROR, f"accepted {raw[:200]!r}"
        code, message = decode_error(frame.body)
        assert snapshot(sim.hub) == before, f"a refused body changed the hub: {raw[:200]!r}"
        if holds_raw(body):
            assert code == ErrorCode.BAD_REQUEST, message
            return
        assert any(code in codes for codes in bad.values()), (code, message, bad)
        if code == ErrorCode.BAD_REQUEST:
            assert any(field in message for field, codes in bad.items() if code in codes), (message, bad)
        return
    if frame.op == Op.ERROR:  # fields in range, refused for what they name
        code, message = decode_error(frame.body)
        assert code in (ErrorCode.NOT_FOUND, ErrorCode.EXISTS, ErrorCode.PERMISSION_DENIED), (code, message)
        return
    assert frame.op == reply_op(op)
    for name, room in sim.hub.rooms.items():
        assert ROOM_RE.fullmatch(name)
        assert len(room.topic) <= 256
    for session in sim.hub.sessions.values():
        assert NICK_RE.fullmatch(session.nick) or session.nick.startswith("uid")


def _test(op: int) -> Any:
    @settings(max_examples=150, deadline=None)
    @given(body=body_of(FIELDS[op], REQUIRED.get(op, ())), tester_has_session=st.booleans())
    def test(body: dict[str, Any], tester_has_session: bool) -> None:
        check_op(op, body, tester_has_session)

    test.__doc__ = f"{Op(op).name} bodies: refused out of range with nothing changed, else in range."
    return test


@settings(max_examples=150, deadline=None)
@given(body=body_of(FIELDS[Op.SAY], REQUIRED[Op.SAY]))
def test_datagram_say_bodies(body: dict[str, Any]) -> None:
    """SAY over the datagram socket: the same checks, by the worker that reads it."""
    check_op(Op.SAY, body, tester_has_session=False, by_datagram=True)


test_nick_bodies = _test(Op.NICK)
test_join_bodies = _test(Op.JOIN)
test_part_bodies = _test(Op.PART)
test_say_bodies = _test(Op.SAY)
test_msg_bodies = _test(Op.MSG)
test_rooms_bodies = _test(Op.ROOMS)
test_who_bodies = _test(Op.WHO)
test_topic_bodies = _test(Op.TOPIC)
test_history_bodies = _test(Op.HISTORY)
