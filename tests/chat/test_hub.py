"""The chat hub's rules, in-process: requests in, records out, no sockets.

A small model of the workers' side (:class:`Sim`) routes what the hub
returns exactly as ``ipcd.services.chat.ChatRouter`` does: a JOIN reply adds
the connection to its worker's room index, a PART reply removes it, a room
delivery goes to every indexed member of that worker, a ``conns`` delivery
to the listed connections. So each test can read what every connection
would receive, in order, and also inspect the raw records.
"""

from __future__ import annotations

import itertools
import json
import pwd
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipcd.chat.hub import Hub, Limits, Out, Outbox, Sender
from ipcd.chat.pages import newest_that_fit
from ipcd.link.ops import ChannelOp
from ipcd.link.records import Answer, Deliver, Post
from ipcd.protocol import (
    NEED_DATA,
    ErrorCode,
    Frame,
    FrameDecoder,
    Op,
    RemoteProtocolError,
    decode_error,
    decode_json,
    encode_error,
    encode_json,
    reply_op,
)
from ipcd.protocol.chat import DEFAULT_ROOM, NAME_MAX, prepare_say

W1, W2 = 1001, 1002  # worker pids
ROOT = pwd.getpwuid(0).pw_name
UNNAMED = (70000, 70099), (71000, 71999), (72000, 72009), (73000, 73000), (75000, 75000)  # uids used here


def test_the_uids_used_here_have_no_user_name() -> None:
    """Nicks default to the user name, else ``uid<N>``: these tests rely on the latter."""
    for low, high in UNNAMED:
        for uid in range(low, high + 1):
            with pytest.raises(KeyError):
                pwd.getpwuid(uid)


EVENTS = {Op.MESSAGE: "message", Op.PRIVATE: "private", Op.NOTICE: "notice"}
CHAT_OPS = (Op.NICK, Op.JOIN, Op.PART, Op.SAY, Op.MSG, Op.ROOMS, Op.WHO, Op.TOPIC, Op.HISTORY)


def frames_of(data: bytes) -> list[Frame]:
    decoder = FrameDecoder(max_frame_size=1 << 30)
    decoder.receive_data(data)
    frames = []
    while (frame := decoder.next_event()) is not NEED_DATA:
        frames.append(frame)
    assert decoder.idle, "a record ended mid-frame"
    return frames


class HubError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Conn:
    """One stream connection as the hub sees it: (worker, conn id, uid)."""

    def __init__(self, sim: Sim, worker: int, conn: int, uid: int) -> None:
        self.sim = sim
        self.worker = worker
        self.conn = conn
        self.uid = uid
        self.log: list[Frame] = []  # everything routed to it, replies included, in order
        self._read = 0

    @property
    def member(self) -> tuple[int, int]:
        return (self.worker, self.conn)

    def request(self, op: int, body: bytes) -> Frame:
        rid = next(self.sim.ids)
        sender = Sender(
            worker=self.worker,
            conn=self.conn,
            request_id=rid,
            uid=self.uid,
            gid=self.uid,
            pid=4000 + self.conn,
        )
        refused = self.sim.worker_check(op, rid, body)
        if refused is not None:
            return refused
        self.sim.hub.handle(sender, op, self.sim.as_forwarded(op, rid, body), self.sim.out)
        self.sim.route(self.sim.out.take())
        replies = [f for f in self.log if f.request_id == rid]
        assert len(replies) == 1, f"expected one reply to request {rid}, got {replies}"
        return replies[0]

    def call(self, op: int, **args: Any) -> dict[str, Any]:
        frame = self.request(op, encode_json(args))
        if frame.op == Op.ERROR:
            raise HubError(*decode_error(frame.body))
        assert frame.op == reply_op(op)
        return decode_json(frame.body)

    def error(self, op: int, **args: Any) -> int:
        with pytest.raises(HubError) as caught:
            self.call(op, **args)
        return caught.value.code

    def join(self, room: str, history: int | None = None) -> dict[str, Any]:
        return self.call(Op.JOIN, room=room, **({} if history is None else {"history": history}))

    def say(self, room: str, text: str) -> int:
        return int(self.call(Op.SAY, room=room, text=text)["seq"])

    def events(self) -> list[tuple[str, dict[str, Any]]]:
        """Deliveries (not replies) since the last call."""
        new = self.log[self._read :]
        self._read = len(self.log)
        return [(EVENTS[Op(f.op)], decode_json(f.body)) for f in new if f.request_id == 0]

    def messages(self, room: str | None = None) -> list[dict[str, Any]]:
        return [d for kind, d in self.events() if kind == "message" and room in (None, d["room"])]


class Sim:
    """The hub plus a model of each worker's routing."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.hub = Hub(limits)
        self.ids = itertools.count(1)
        self.conns: dict[tuple[int, int], Conn] = {}
        self._conn_ids = itertools.count(1)
        self.index: dict[int, dict[str, set[int]]] = {}  # worker -> room -> local conn ids
        self.datagrams: dict[bytes, list[Frame]] = {}  # sender address -> replies
        self.dead: set[int] = set()
        self.records: list[Out] = []  # every record the hub returned, in order
        self.out = Outbox()

    def worker_check(self, op: int, rid: int, body: bytes) -> Frame | None:
        """The error a worker answers itself: a SAY body it refuses."""
        if op != Op.SAY:
            return None
        try:
            prepare_say(body, self.hub.limits.max_text)
        except RemoteProtocolError as exc:
            return Frame(Op.ERROR, rid, encode_error(exc.code, exc.message))
        return None

    def as_forwarded(self, op: int, rid: int, body: bytes) -> bytes:
        """What a worker forwards: a SAY as the checked Post, the rest as is."""
        if op != Op.SAY:
            return body
        say = prepare_say(body, self.hub.limits.max_text)
        return Post(rid, say.room, say.text_json, say.message_id).encode()

    def connect(self, worker: int, uid: int = 70000) -> Conn:
        conn = Conn(self, worker, next(self._conn_ids), uid)
        self.conns[conn.member] = conn
        return conn

    def route(self, outs: list[Out]) -> None:
        self.records += outs
        for out in outs:
            assert out.worker not in self.dead, f"record for dead worker {out.worker}: {out}"
            rooms = self.index.setdefault(out.worker, {})
            if out.op == ChannelOp.ANSWER:
                answer = Answer.decode(out.body)
                frames = frames_of(answer.frame)
                assert len(frames) == answer.replies
                if answer.dgram:
                    self.datagrams.setdefault(answer.dgram, []).extend(frames)
                    continue
                conn = self.conns.get((out.worker, answer.conn))
                if conn is None:
                    continue  # closed meanwhile
                if answer.joined is not None:
                    rooms.setdefault(answer.joined, set()).add(conn.conn)
                if answer.parted is not None:
                    rooms.get(answer.parted, set()).discard(conn.conn)
                conn.log += frames
            elif out.op == ChannelOp.THROTTLE:
                continue  # a worker's business (tests/chat/test_postrate.py)
            else:
                assert out.op == ChannelOp.DELIVER
                delivery = Deliver.decode(out.body)
                frames = frames_of(delivery.frames)
                targets = rooms.get(delivery.room, set()) if delivery.room is not None else delivery.conns
                for conn_id in sorted(targets):
                    if (out.worker, conn_id) in self.conns:
                        self.conns[(out.worker, conn_id)].log += frames

    def close(self, conn: Conn) -> None:
        del self.conns[conn.member]
        for members in self.index.get(conn.worker, {}).values():
            members.discard(conn.conn)
        self.hub.connection_gone(conn.member, self.out)
        self.route(self.out.take())

    def kill(self, worker: int) -> None:
        self.dead.add(worker)
        self.index.pop(worker, None)
        for member in [m for m in self.conns if m[0] == worker]:
            del self.conns[member]
        self.hub.worker_gone(worker, self.out)
        self.route(self.out.take())

    def datagram(self, op: int, body: bytes, uid: int = 70000, address: bytes = b"\0abc") -> Frame:
        rid = next(self.ids)
        sender = Sender(worker=W1, conn=0, request_id=rid, uid=uid, gid=uid, pid=77, dgram=address)
        refused = self.worker_check(op, rid, body)
        if refused is not None:
            return refused
        self.hub.handle(sender, op, self.as_forwarded(op, rid, body), self.out)
        self.route(self.out.take())
        replies = [f for f in self.datagrams.get(address, []) if f.request_id == rid]
        assert len(replies) == 1
        return replies[0]


def _op_id(value: object) -> str | None:
    return value.name if isinstance(value, Op) else None


def error_code(frame: Frame) -> int:
    assert frame.op == Op.ERROR, f"expected an error, got op 0x{frame.op:02x}: {frame.body!r}"
    return decode_error(frame.body)[0]


@pytest.fixture
def sim() -> Sim:
    return Sim()


# -- sequencing and fan-out ------------------------------------------------------


def test_each_room_numbers_its_messages_from_one_without_gaps(sim: Sim) -> None:
    alice, bob = sim.connect(W1), sim.connect(W2)
    alice.join("red")
    bob.join("red")
    bob.join("blue")
    seqs: dict[str, list[int]] = {"red": [], "blue": []}
    for i in range(10):
        room = "red" if i % 3 else "blue"
        seqs[room].append((alice if i % 2 else bob).say(room, f"m{i}"))
    assert seqs["red"] == list(range(1, 7))
    assert seqs["blue"] == list(range(1, 5))
    alice_got = alice.messages()
    bob_got = bob.messages()
    assert [(m["room"], m["seq"]) for m in alice_got] == [("red", s) for s in range(1, 7)]
    assert [m["seq"] for m in bob_got if m["room"] == "red"] == list(range(1, 7))
    assert [m["seq"] for m in bob_got if m["room"] == "blue"] == list(range(1, 5))
    rooms = alice.call(Op.ROOMS)["rooms"]
    assert {r["room"]: r["seq"] for r in rooms} == {DEFAULT_ROOM: 0, "red": 6, "blue": 4}


def test_a_message_is_one_record_per_worker_and_reaches_each_member_once(sim: Sim) -> None:
    on_w1 = [sim.connect(W1, uid=71000 + i) for i in range(3)]
    on_w2 = [sim.connect(W2, uid=72000 + i) for i in range(2)]
    outsider = sim.connect(W2, uid=73000)
    for conn in on_w1 + on_w2:
        conn.join("room")
    sim.records.clear()
    seq = outsider.say("room", "hello")  # posting needs no membership
    deliveries = [r for r in sim.records if r.op == ChannelOp.DELIVER]
    assert sorted(r.worker for r in deliveries) == [W1, W2]
    assert deliveries[0].body == deliveries[1].body  # encoded once
    for conn in on_w1 + on_w2:
        got = conn.messages()
        assert [(m["seq"], m["text"], m["uid"], m["from"]) for m in got] == [
            (seq, "hello", 73000, "uid73000")
        ]
    assert outsider.messages() == []


def test_identity_is_the_kernels_not_the_bodys(sim: Sim) -> None:
    mallory, victim = sim.connect(W1, uid=71234), sim.connect(W2, uid=0)
    victim.join("ops")
    mallory.call(Op.SAY, room="ops", text="reboot now", uid=0, **{"from": ROOT})
    [message] = victim.messages()
    assert message["uid"] == 71234
    assert message["from"] == "uid71234"


def test_control_characters_are_stripped_but_newlines_and_tabs_kept(sim: Sim) -> None:
    poster, reader = sim.connect(W1), sim.connect(W1)
    reader.join("tty")
    poster.say("tty", "a\x1b[2Jb\x07c\td\ne")
    assert reader.messages()[0]["text"] == "a[2Jbc\td\ne"


# -- history -----------------------------------------------------------------------


def test_history_is_bounded_and_late_joiners_replay_the_last_k(sim: Sim) -> None:
    sim = Sim(Limits(history=5))
    poster = sim.connect(W1)
    for i in range(1, 13):
        assert poster.say("log", f"line {i}") == i
    late = sim.connect(W2)
    reply = late.join("log", history=3)
    assert reply["history"] == 3
    assert reply["seq"] == 12
    assert [m["seq"] for m in late.messages()] == [10, 11, 12]
    later = sim.connect(W2)
    assert later.join("log", history=1000)["history"] == 5  # capped by the bound
    assert [m["text"] for m in later.messages()] == [f"line {i}" for i in range(8, 13)]
    assert sim.connect(W1).join("log")["history"] == 0
    assert [m["seq"] for m in poster.call(Op.HISTORY, room="log", count=2)["messages"]] == [11, 12]
    assert len(poster.call(Op.HISTORY, room="log")["messages"]) == 5
    # The replay continues straight into live messages, in order.
    poster.say("log", "live")
    assert [m["seq"] for m in late.messages()] == [13]


def test_a_long_replay_is_split_into_records_but_stays_in_order(sim: Sim) -> None:
    sim = Sim(Limits(history=100, max_text=16 * 1024))
    poster = sim.connect(W1)
    for i in range(40):
        poster.say("big", f"{i:04d}" + "x" * 15_000)
    sim.records.clear()
    late = sim.connect(W2)
    late.join("big", history=40)
    replay = [r for r in sim.records if r.op == ChannelOp.DELIVER]
    assert len(replay) > 1
    assert all(Deliver.decode(r.body).conns == (late.conn,) for r in replay)
    assert [m["seq"] for m in late.messages()] == list(range(1, 41))


# A message of 1000 "ü" is a frame of about 2.1 KB (UTF-8 text, not escapes): two fit this budget.
PAGED = Limits(history=10, reply_budget=5000)


def _full_room(sim: Sim, n: int = 10) -> Conn:
    poster = sim.connect(W1)
    for i in range(1, n + 1):
        poster.say("big", f"{i:02d}" + "ü" * 998)
    return poster


def test_a_history_reply_holds_the_newest_that_fit_and_pages_back_to_the_oldest() -> None:
    sim = Sim(PAGED)
    reader = _full_room(sim)
    pages, before, count = [], None, 10
    while True:
        args = {"room": "big", "count": count, **({} if before is None else {"before": before})}
        frame = reader.request(Op.HISTORY, encode_json(args))
        assert len(frame.body) <= PAGED.reply_budget  # one reply always fits
        reply = decode_json(frame.body)
        pages.append([m["seq"] for m in reply["messages"]])
        if not reply["more"]:
            assert "before" not in reply
            break
        before, count = reply["before"], count - len(reply["messages"])
        assert before == reply["messages"][0]["seq"]
    assert pages == [[9, 10], [7, 8], [5, 6], [3, 4], [1, 2]]
    assert all(m["text"].endswith("ü" * 998) for m in reader.call(Op.HISTORY, room="big")["messages"])


def test_history_counts_back_from_before_and_says_more_only_when_the_budget_cut_it() -> None:
    sim = Sim(PAGED)
    reader = _full_room(sim)

    def page(**args: Any) -> tuple[list[int], bool]:
        reply = reader.call(Op.HISTORY, room="big", **args)
        return [m["seq"] for m in reply["messages"]], reply["more"]

    assert page(count=1) == ([10], False)
    assert page(count=2, before=5) == ([3, 4], False)
    assert page(count=5, before=3) == ([1, 2], False)  # fewer than asked: the history has no more
    assert page(count=3, before=5) == ([3, 4], True)
    assert page(count=3, before=1) == ([], False)
    assert page(count=3, before=0) == ([], False)
    assert page(count=3, before=1000) == ([9, 10], True)
    assert page(count=0) == ([], False)


def test_a_message_larger_than_the_budget_still_comes_one_per_page() -> None:
    sim = Sim(Limits(history=10, reply_budget=100))
    reader = _full_room(sim, 3)
    reply = reader.call(Op.HISTORY, room="big", count=3)
    assert ([m["seq"] for m in reply["messages"]], reply["more"], reply["before"]) == ([3], True, 3)
    reply = reader.call(Op.HISTORY, room="big", count=2, before=3)
    assert ([m["seq"] for m in reply["messages"]], reply["more"], reply["before"]) == ([2], True, 2)


def test_a_join_replays_what_fits_the_budget_and_says_where_history_goes_on() -> None:
    sim = Sim(PAGED)
    _full_room(sim)
    sim.records.clear()
    late = sim.connect(W2)
    reply = late.join("big", history=10)
    assert (reply["seq"], reply["history"], reply["more"], reply["before"]) == (10, 2, True, 9)
    replay = [r for r in sim.records if r.op == ChannelOp.DELIVER]
    assert sum(len(Deliver.decode(r.body).frames) for r in replay) <= PAGED.reply_budget
    assert [m["seq"] for m in late.messages()] == [9, 10]
    # The rest, with HISTORY from where the replay began: together, the 10 asked for.
    rest = late.call(Op.HISTORY, room="big", count=10 - reply["history"], before=reply["before"])
    assert [m["seq"] for m in rest["messages"]] == [7, 8]
    small = sim.connect(W2).join("big", history=2)
    assert (small["history"], small["more"], "before" in small) == (2, False, False)


@pytest.mark.parametrize(
    ("sizes", "budget", "fit"),
    [
        ([], 10, 0),
        ([5], 1, 1),  # never less than one
        ([3, 3, 3], 6, 2),
        ([3, 3, 3], 5, 1),
        ([3, 3, 3], 100, 3),
        ([10, 1, 1], 2, 2),  # the newest are the last
        ([1, 1, 10], 2, 1),
    ],
)
def test_newest_that_fit(sizes: list[int], budget: int, fit: int) -> None:
    assert newest_that_fit(sizes, budget) == fit


@given(sizes=st.lists(st.integers(1, 50), max_size=20), budget=st.integers(1, 200))
def test_newest_that_fit_is_the_longest_tail_within_the_budget(sizes: list[int], budget: int) -> None:
    fit = newest_that_fit(sizes, budget)
    assert fit == len(sizes) or sum(sizes[len(sizes) - fit - 1 :]) > budget  # one more would not fit
    assert fit == min(len(sizes), 1) or sum(sizes[len(sizes) - fit :]) <= budget


def test_join_reply_follows_join_notices_and_precedes_history(sim: Sim) -> None:
    here_w1, here_w2 = sim.connect(W1), sim.connect(W2)
    here_w1.join("hall")
    here_w2.join("hall")
    here_w1.say("hall", "one")
    here_w1.say("hall", "two")
    sim.records.clear()
    joiner = sim.connect(W1, uid=75000)
    joiner.join("hall", history=2)
    kinds = []
    for record in sim.records:
        decoded = Answer.decode(record.body) if record.op == ChannelOp.ANSWER else Deliver.decode(record.body)
        ops = [
            Op(f.op).name for f in frames_of(decoded.frame if isinstance(decoded, Answer) else decoded.frames)
        ]
        kinds.append((record.worker, record.op.name if record.op != ChannelOp.ANSWER else "REPLY", ops))
    # Each worker's channel is ordered on its own; across workers there is no order.
    assert [k for k in kinds if k[0] == W1] == [
        (W1, "DELIVER", ["NOTICE"]),
        (W1, "REPLY", ["JOIN_REPLY"]),
        (W1, "DELIVER", ["MESSAGE", "MESSAGE"]),
    ]
    assert [k for k in kinds if k[0] == W2] == [(W2, "DELIVER", ["NOTICE"])]
    # The joiner's own view: its reply, then the history; never its own join notice.
    assert [Op(f.op).name for f in joiner.log] == ["JOIN_REPLY", "MESSAGE", "MESSAGE"]
    for member in (here_w1, here_w2):
        notices = [d for kind, d in member.events() if kind == "notice"]
        assert [(n["event"], n["nick"], n["uid"]) for n in notices][-1] == ("join", "uid75000", 75000)


# -- notices -----------------------------------------------------------------------


def test_notices_carry_the_current_seq_and_never_take_one(sim: Sim) -> None:
    a, b, c = sim.connect(W1, uid=70001), sim.connect(W2, uid=70002), sim.connect(W2, uid=70003)
    a.join("r")
    b.join("r")
    assert a.say("r", "x") == 1
    c.join("r")  # join
    c.call(Op.NICK, nick="charlie")  # nick
    c.call(Op.TOPIC, room="r", topic="t")  # topic
    c.call(Op.PART, room="r")  # part
    c.join("r")
    sim.close(c)  # quit
    assert b.say("r", "y") == 2
    events = a.events()
    notices = [d for kind, d in events if kind == "notice"]
    assert [n["event"] for n in notices] == ["join", "join", "nick", "topic", "part", "join", "quit"]
    assert [n["seq"] for n in notices] == [0, 1, 1, 1, 1, 1, 1]  # the room's seq when each happened
    assert [d["seq"] for kind, d in events if kind == "message"] == [1, 2]
    nick_notice = notices[2]
    assert (nick_notice["nick"], nick_notice["old"]) == ("charlie", "uid70003")


# -- nicks -------------------------------------------------------------------------


def test_default_nicks_are_user_names_made_unique(sim: Sim) -> None:
    first, second, third = (sim.connect(W1 if i % 2 else W2, uid=0) for i in range(3))
    assert first.join("x")["nick"] == ROOT
    assert second.join("x")["nick"] == f"{ROOT}-2"
    assert third.call(Op.NICK, nick="ops")["nick"] == "ops"
    fourth = sim.connect(W1, uid=0)
    assert fourth.join("x")["nick"] == f"{ROOT}-3"
    sim.close(first)
    assert sim.connect(W2, uid=0).join("x")["nick"] == ROOT  # freed on close
    unknown = sim.connect(W1, uid=424242)
    assert unknown.join("x")["nick"] == "uid424242"


def test_a_nick_is_held_by_one_connection_at_a_time(sim: Sim) -> None:
    holder, other = sim.connect(W1, uid=70001), sim.connect(W2, uid=70002)
    assert holder.call(Op.NICK, nick="alice")["nick"] == "alice"
    assert holder.call(Op.NICK, nick="alice")["nick"] == "alice"  # keeping one's own nick is fine
    assert other.error(Op.NICK, nick="alice") == ErrorCode.EXISTS
    holder.call(Op.NICK, nick="alice2")
    assert other.call(Op.NICK, nick="alice")["nick"] == "alice"  # released by the rename
    assert other.error(Op.NICK, nick="alice2") == ErrorCode.EXISTS
    sim.close(holder)
    assert other.call(Op.NICK, nick="alice2")["nick"] == "alice2"


@pytest.mark.parametrize("nick", ["", "9lives", "two words", "x" * 33, "é", 7, None])
def test_bad_nicks_are_bad_requests(sim: Sim, nick: Any) -> None:
    assert sim.connect(W1).error(Op.NICK, nick=nick) == ErrorCode.BAD_REQUEST


# -- private messages --------------------------------------------------------------


def test_private_messages_reach_only_their_target(sim: Sim) -> None:
    alice, bob, carol = sim.connect(W1, uid=70001), sim.connect(W2, uid=70002), sim.connect(W2, uid=70003)
    for conn, nick in ((alice, "alice"), (bob, "bob"), (carol, "carol")):
        conn.call(Op.NICK, nick=nick)
        conn.join("shared")
    sim.records.clear()
    reply = alice.call(Op.MSG, to="bob", text="psst")
    assert reply["to"] == "bob"
    assert [r.worker for r in sim.records if r.op == ChannelOp.DELIVER] == [W2]
    [(kind, data)] = [e for e in bob.events() if e[0] != "notice"]
    assert kind == "private"
    assert (data["from"], data["uid"], data["to"], data["text"], data["seq"]) == (
        "alice",
        70001,
        "bob",
        "psst",
        reply["seq"],
    )
    assert [e for e in carol.events() if e[0] != "notice"] == []
    assert [e for e in alice.events() if e[0] != "notice"] == []
    assert alice.error(Op.MSG, to="nobody", text="hi") == ErrorCode.NOT_FOUND
    assert alice.error(Op.MSG, to="bob", text="x" * (16 * 1024 + 1)) == ErrorCode.LIMIT_EXCEEDED


# -- leaving ------------------------------------------------------------------------


def test_part_tells_the_others_and_a_stranger_cannot_part(sim: Sim) -> None:
    stay, leave = sim.connect(W1, uid=70001), sim.connect(W2, uid=70002)
    stay.join("r")
    leave.join("r")
    assert sim.connect(W1).error(Op.PART, room="r") == ErrorCode.NOT_FOUND
    leave.call(Op.PART, room="r")
    assert leave.error(Op.PART, room="r") == ErrorCode.NOT_FOUND
    stay.say("r", "after")
    assert leave.messages() == []
    assert [(d["event"], d["nick"]) for k, d in stay.events() if k == "notice"][-1] == ("part", "uid70002")
    stay.call(Op.PART, room="r")
    assert "r" in {r["room"] for r in stay.call(Op.ROOMS)["rooms"]}  # kept: it has history
    quiet = sim.connect(W1)
    quiet.join("empty")
    quiet.call(Op.PART, room="empty")
    assert "empty" not in {r["room"] for r in quiet.call(Op.ROOMS)["rooms"]}


def test_worker_gone_removes_its_members_and_notifies_the_rest(sim: Sim) -> None:
    survivors = [sim.connect(W1, uid=70010 + i) for i in range(2)]
    doomed = [sim.connect(W2, uid=70020 + i) for i in range(3)]
    for conn in survivors + doomed:
        conn.join("a")
    doomed[0].join("b")
    survivors[0].join("b")
    assert doomed[1].say("a", "before") == 1
    for conn in survivors:
        conn.events()
    sim.kill(W2)  # Sim.route asserts that nothing is sent to W2 any more
    for conn in survivors:
        quits = [(d["room"], d["nick"]) for k, d in conn.events() if k == "notice" and d["event"] == "quit"]
        expected = [("a", "uid70020"), ("a", "uid70021"), ("a", "uid70022")]
        if conn is survivors[0]:
            expected.insert(1, ("b", "uid70020"))
        assert sorted(quits) == sorted(expected)
    who = survivors[0].call(Op.WHO, room="a")["members"]
    assert [m["nick"] for m in who] == ["uid70010", "uid70011"]
    assert {m["nick"] for m in survivors[0].call(Op.WHO)["members"]} == {"uid70010", "uid70011"}
    assert survivors[1].say("a", "after") == 2  # the sequence carries on
    assert [m["seq"] for m in survivors[0].messages("a")] == [2]
    assert sim.hub.stats()["chatters"] == 2
    sim.hub.worker_gone(W2, sim.out)
    assert sim.out.take() == []  # idempotent


def test_connection_gone_sends_quit_once_per_room(sim: Sim) -> None:
    watcher, leaver = sim.connect(W1), sim.connect(W1, uid=70009)
    for room in ("x", "y"):
        watcher.join(room)
        leaver.join(room)
    sim.close(leaver)
    notices = [(d["room"], d["event"]) for k, d in watcher.events() if k == "notice"]
    assert notices[-2:] == [("x", "quit"), ("y", "quit")]
    sim.hub.connection_gone(leaver.member, sim.out)
    assert sim.out.take() == []


# -- limits and bad input -----------------------------------------------------------


def test_the_daemon_wide_room_limit(sim: Sim) -> None:
    sim = Sim(Limits(max_rooms=3))  # the lobby always exists
    conn = sim.connect(W1)
    conn.join("one")
    conn.join("two")
    # Every room has a member: nothing can be evicted, so new rooms are refused.
    assert conn.error(Op.JOIN, room="three") == ErrorCode.LIMIT_EXCEEDED
    assert conn.error(Op.SAY, room="three", text="x") == ErrorCode.LIMIT_EXCEEDED
    assert conn.say("two", "existing rooms stay usable") == 1


def test_at_the_room_limit_the_least_recently_used_empty_room_is_evicted(sim: Sim) -> None:
    """Posting to fresh names must not lock everyone out of creating rooms."""
    sim = Sim(Limits(max_rooms=3))
    conn = sim.connect(W1)
    conn.say("old", "first")
    conn.say("newer", "second")
    conn.join("three")  # evicts 'old', the least recently used room nobody is in
    names = {r["room"] for r in conn.call(Op.ROOMS)["rooms"]}
    assert names == {DEFAULT_ROOM, "newer", "three"}
    assert conn.say("newer", "kept its sequence") == 2


def test_rooms_per_connection_limit_leaves_no_room_behind(sim: Sim) -> None:
    sim = Sim(Limits(rooms_per_connection=2))
    conn = sim.connect(W1)
    conn.join("a")
    conn.join("b")
    conn.join("a")  # rejoining is not a new room
    for name in ("c", "d", "e"):
        assert conn.error(Op.JOIN, room=name) == ErrorCode.LIMIT_EXCEEDED
    assert {r["room"] for r in conn.call(Op.ROOMS)["rooms"]} == {DEFAULT_ROOM, "a", "b"}
    conn.call(Op.PART, room="a")
    conn.join("c")
    assert sim.connect(W2).join("d")["room"] == "d"  # the limit is per connection


def test_message_size_is_counted_in_utf8_bytes(sim: Sim) -> None:
    sim = Sim(Limits(max_text=8))
    conn = sim.connect(W1)
    assert conn.say("r", "12345678") == 1
    assert conn.say("r", "éééé") == 2  # 8 bytes
    assert conn.error(Op.SAY, room="r", text="123456789") == ErrorCode.LIMIT_EXCEEDED
    assert conn.error(Op.SAY, room="r", text="éééé.") == ErrorCode.LIMIT_EXCEEDED
    assert conn.say("r", "ok") == 3  # a refused message took no seq


BAD_ROOMS = ["", "-dash", ".dot", "has space", "slash/", "x" * (NAME_MAX + 1), "ü", 3, ["r"], None]


@pytest.mark.parametrize(
    ("op", "room"),
    [
        (op, room)
        for op in (Op.JOIN, Op.SAY, Op.PART, Op.WHO, Op.TOPIC, Op.HISTORY)
        for room in BAD_ROOMS
        if not (op == Op.WHO and room is None)  # WHO without a room lists everyone
    ],
    ids=_op_id,
)
def test_bad_room_names_are_bad_requests(sim: Sim, op: Op, room: Any) -> None:
    conn = sim.connect(W1)
    assert conn.error(op, room=room, text="t", topic="t") == ErrorCode.BAD_REQUEST


def test_longest_room_name_is_fine(sim: Sim) -> None:
    name = "R" + "_.-9" * ((NAME_MAX - 1) // 4) + "x" * ((NAME_MAX - 1) % 4)
    assert len(name) == NAME_MAX
    assert sim.connect(W1).join(name)["room"] == name


@pytest.mark.parametrize(
    ("op", "body"),
    [
        (Op.SAY, b"not json"),
        (Op.SAY, b"[1, 2]"),
        (Op.SAY, b'{"room": "r", "text": 5}'),
        (Op.SAY, b'{"room": "r"}'),
        (Op.JOIN, b'{"room": "r", "history": -1}'),
        (Op.JOIN, b'{"room": "r", "history": true}'),
        (Op.HISTORY, b'{"room": "lobby", "count": "all"}'),
        (Op.HISTORY, b'{"room": "lobby", "before": -1}'),
        (Op.HISTORY, b'{"room": "lobby", "before": "9"}'),
        (Op.HISTORY, b'{"room": "lobby", "before": true}'),
        (Op.TOPIC, b'{"room": "lobby", "topic": 5}'),
        (Op.MSG, b'{"to": "x"}'),
        # A lone surrogate has no UTF-8 form: refused, never raised inside the master.
        (Op.SAY, b'{"room": "r", "text": "\\ud800"}'),
        (Op.MSG, b'{"to": "x", "text": "a\\udfffb"}'),
    ],
    ids=_op_id,
)
def test_malformed_bodies_are_bad_requests(sim: Sim, op: Op, body: bytes) -> None:
    conn = sim.connect(W1)
    conn.join(DEFAULT_ROOM)
    conn.call(Op.NICK, nick="x")
    assert error_code(conn.request(op, body)) == ErrorCode.BAD_REQUEST


def test_a_topic_with_a_lone_surrogate_is_refused(sim: Sim) -> None:
    conn = sim.connect(W1)
    conn.join("r")
    assert error_code(conn.request(Op.TOPIC, b'{"room": "r", "topic": "\\udc80"}')) == ErrorCode.BAD_REQUEST
    assert conn.call(Op.TOPIC, room="r")["topic"] == ""


def test_unknown_room_and_unknown_op(sim: Sim) -> None:
    conn = sim.connect(W1)
    for op in (Op.WHO, Op.TOPIC, Op.HISTORY):
        assert conn.error(op, room="nowhere") == ErrorCode.NOT_FOUND
    assert error_code(conn.request(Op.ECHO, b"{}")) == ErrorCode.UNKNOWN_OP


def test_topic_needs_membership_and_is_shown_to_joiners(sim: Sim) -> None:
    member, stranger = sim.connect(W1), sim.connect(W2)
    member.join("r")
    assert stranger.error(Op.TOPIC, room="r", topic="mine") == ErrorCode.PERMISSION_DENIED
    assert member.call(Op.TOPIC, room="r", topic="line\none")["topic"] == "line one"
    assert stranger.join("r")["topic"] == "line one"
    assert stranger.error(Op.TOPIC, room="r", topic="x" * 257) == ErrorCode.BAD_REQUEST


# -- datagrams ----------------------------------------------------------------------


def test_a_datagram_say_is_posted_as_its_senders_uid_and_answered_at_its_address(sim: Sim) -> None:
    reader = sim.connect(W2)
    reader.join("alerts")
    reply = sim.datagram(Op.SAY, encode_json({"room": "alerts", "text": "disk full"}), uid=0)
    assert reply.op == Op.SAY_REPLY
    assert decode_json(reply.body)["seq"] == 1
    [message] = reader.messages()
    assert (message["from"], message["uid"], message["text"]) == (ROOT, 0, "disk full")
    assert sim.hub.stats()["chatters"] == 1  # a datagram leaves no session behind


@pytest.mark.parametrize("op", [op for op in CHAT_OPS if op != Op.SAY], ids=_op_id)
def test_datagram_senders_can_only_say(sim: Sim, op: Op) -> None:
    member = sim.connect(W1)
    member.join("r")
    member.call(Op.NICK, nick="m")
    body = encode_json({"room": "r", "nick": "d", "to": "m", "text": "t", "topic": "t"})
    assert error_code(sim.datagram(op, body)) == ErrorCode.BAD_REQUEST
    assert [e for e in member.events() if e[0] != "notice"] == []
    assert sim.hub.stats()["chatters"] == 1


# -- properties ----------------------------------------------------------------------


def assert_in_order_while_a_member(log: list[Frame]) -> None:
    """Room messages arrive only between a JOIN reply and a PART reply, and
    within such a span their seqs follow each other (replay, then live)."""
    last: dict[str, int | None] = {}  # room -> last seq seen in the current span
    for frame in log:
        if frame.op == Op.ERROR:
            continue
        if frame.op in (Op.JOIN_REPLY, Op.PART_REPLY):
            room = decode_json(frame.body)["room"]
            if frame.op == Op.PART_REPLY:
                last.pop(room)
            elif room not in last:
                last[room] = None
        elif frame.op == Op.MESSAGE:
            message = decode_json(frame.body)
            assert message["room"] in last, f"a message of a room not joined: {message}"
            previous = last[message["room"]]
            assert previous is None or message["seq"] == previous + 1
            last[message["room"]] = message["seq"]


_value = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 300),
    st.sampled_from(["r", "s", DEFAULT_ROOM, "uid70001", "uid70002", "n", "", "\ud800", "é" * 9, "x" * 70]),
    st.text(max_size=6),
)
_body = st.dictionaries(
    st.sampled_from(["room", "text", "nick", "to", "history", "count", "before", "topic"]), _value
)


@settings(max_examples=150, deadline=None)
@given(
    steps=st.lists(
        st.tuples(st.sampled_from([W1, W2]), st.integers(0, 3), st.sampled_from([*CHAT_OPS, Op.ECHO]), _body),
        max_size=25,
    ),
    kill=st.sampled_from([None, W1, W2]),
)
def test_any_request_sequence_is_answered_and_keeps_the_rules(
    steps: list[tuple[int, int, Op, dict[str, Any]]], kill: int | None
) -> None:
    """Whatever clients send: every request gets exactly one answer, nothing
    raises, and every member sees its rooms' messages once, in order."""
    sim = Sim(Limits(history=3, max_text=8, rooms_per_connection=2, max_rooms=4, reply_budget=250))
    conns = {(w, i): sim.connect(w, uid=70001 + i) for w in (W1, W2) for i in range(4)}
    for worker, index, op, args in steps:
        body = json.dumps(args).encode()
        if index == 0:
            sim.datagram(op, body)
        else:
            conns[(worker, index)].request(op, body)
    if kill is not None:
        sim.kill(kill)
    for conn in sim.conns.values():
        assert_in_order_while_a_member(conn.log)
    hub = sim.hub
    assert set(hub.nicks.values()) == set(hub.sessions.values())
    for room in hub.rooms.values():
        assert all(room.name in s.rooms for s in room.members.values())
        assert sum(room.workers.values()) == len(room.members)


def test_a_run_of_says_in_one_record_is_sequenced_in_order_and_each_answered(sim: Sim) -> None:
    """A worker forwards a connection's pipelined SAYs as one record: each is
    a message of its own, in order, with its own reply, and a refused one
    (a room the daemon cannot create) costs only itself."""
    member = sim.connect(W2)
    member.join("run")
    poster = sim.connect(W1, uid=70001)
    posts = [Post(100 + i, "run", json.dumps(f"m{i}").encode()) for i in range(5)]
    posts.insert(2, Post(99, "fresh", b'"to a room the daemon has no room left for"'))
    sim.hub.limits = Limits(max_rooms=len(sim.hub.rooms))  # no new room: the odd one is refused
    sender = Sender(worker=W1, conn=poster.conn, request_id=0, uid=70001, gid=70001, pid=1)
    sim.hub.handle(sender, Op.SAY, b"".join(p.encode() for p in posts), sim.out)
    sim.route(sim.out.take())
    replies = {f.request_id: f for f in poster.log}
    assert sorted(replies) == [99, 100, 101, 102, 103, 104]
    assert replies[99].op == Op.ERROR
    assert decode_error(replies[99].body)[0] == ErrorCode.LIMIT_EXCEEDED
    assert [decode_json(replies[100 + i].body)["seq"] for i in range(5)] == [1, 2, 3, 4, 5]
    assert [(m["seq"], m["text"]) for m in member.messages("run")] == [(i + 1, f"m{i}") for i in range(5)]
