"""The outbox joins a pass's records without breaking any promise of order.

Each test plays what the hub and the store add into an :class:`Outbox` and
routes what it gives back through a model of a worker (the same rules as
``ipcd.services.chat.ChatRouter``: a reply that joins a room indexes the
connection, a room delivery goes to the indexed members). The property test
compares every connection's view with the view of the same records sent one
at a time, unjoined, as the master did before the outbox.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from ipcd.link.ops import ChannelOp
from ipcd.link.outbox import GROUP_BYTES, Outbox, Staged
from ipcd.link.records import Answer, Deliver, Out
from ipcd.protocol import NEED_DATA, Frame, FrameDecoder, Op, encode_frame

W1, W2 = 11, 12


def frames_of(data: bytes) -> list[Frame]:
    decoder = FrameDecoder(max_frame_size=1 << 30)
    decoder.receive_data(data)
    frames = []
    while (frame := decoder.next_event()) is not NEED_DATA:
        frames.append(frame)
    assert decoder.idle
    return frames


def message(n: int, size: int = 0) -> bytes:
    return encode_frame(Op.MESSAGE, 0, f"m{n}".encode().ljust(size, b"."))


def say_reply(n: int) -> bytes:
    return encode_frame(Op.SAY_REPLY, n, b"{}")


class Worker:
    """What one worker makes of its records: each connection's frames, in order."""

    def __init__(self) -> None:
        self.rooms: dict[str, set[int]] = {}
        self.logs: dict[int, list[Frame]] = {}

    def take(self, outs: Iterable[Out]) -> None:
        for out in outs:
            if out.op == ChannelOp.ANSWER:
                answer = Answer.decode(out.body)
                frames = frames_of(answer.frame)
                assert len(frames) == answer.replies
                if answer.joined is not None:
                    self.rooms.setdefault(answer.joined, set()).add(answer.conn)
                self.logs.setdefault(answer.conn, []).extend(frames)
            else:
                delivery = Deliver.decode(out.body)
                frames = frames_of(delivery.frames)
                targets = (
                    self.rooms.get(delivery.room, set()) if delivery.room is not None else delivery.conns
                )
                for conn in sorted(targets):
                    self.logs.setdefault(conn, []).extend(frames)


def by_worker(outs: list[Out], worker: int) -> list[Out]:
    return [o for o in outs if o.worker == worker]


def test_a_burst_to_one_room_is_one_delivery_per_worker_after_its_replies() -> None:
    out = Outbox()
    out.answer(W1, Answer(1, encode_frame(Op.JOIN_REPLY, 1, b"{}"), joined="r"))
    for n in range(1, 51):
        out.to_room("r", (W1, W2), message(n))
        out.reply(W1, 7, say_reply(n))  # the publisher, on W1
    outs = out.take()
    assert not out
    assert out.size == 0
    w1 = by_worker(outs, W1)
    assert [o.op for o in w1] == [ChannelOp.ANSWER, ChannelOp.ANSWER, ChannelOp.DELIVER]
    joined = Answer.decode(w1[1].body)
    assert (joined.conn, joined.replies) == (7, 50)
    assert [f.request_id for f in frames_of(joined.frame)] == list(range(1, 51))
    (w2,) = by_worker(outs, W2)
    delivery = Deliver.decode(w2.body)
    assert delivery.room == "r"
    assert [f.body for f in frames_of(delivery.frames)] == [f"m{n}".encode() for n in range(1, 51)]
    assert Deliver.decode(w1[2].body) == delivery


def test_another_room_or_a_barrier_closes_the_group() -> None:
    out = Outbox()
    out.to_room("a", (W1,), message(1))
    out.to_room("b", (W1,), message(2))
    out.to_room("a", (W1,), message(3))
    out.to_conns(W1, (5,), message(4))
    out.to_room("a", (W1,), message(5))
    got = []
    for record in out.take():
        delivery = Deliver.decode(record.body)
        got.append((delivery.room, delivery.conns, [f.body for f in frames_of(delivery.frames)]))
    assert got == [
        ("a", (), [b"m1"]),
        ("b", (), [b"m2"]),
        ("a", (), [b"m3"]),
        (None, (5,), [b"m4"]),
        ("a", (), [b"m5"]),
    ]


def test_a_group_stays_within_one_fragment() -> None:
    out = Outbox()
    for n in range(40):
        out.to_room("r", (W1,), message(n, size=4096))
    records = out.take()
    assert len(records) > 1
    assert all(len(Deliver.decode(r.body).frames) <= GROUP_BYTES for r in records)
    bodies = [f.body[:3] for r in records for f in frames_of(Deliver.decode(r.body).frames)]
    assert bodies == [f"m{n}".encode().ljust(3, b".")[:3] for n in range(40)]


def test_staged_deliveries_follow_the_reply_with_the_members_of_when_they_were_made() -> None:
    out, later = Outbox(), Staged()
    workers = {W1: 1}
    later.to_room("r", workers, message(1))
    del workers[W1]  # the hub's room changed after the notice was made
    later.to_conns(W2, (3, 4), message(2))
    out.answer(W1, Answer(9, say_reply(9)))
    later.into(out)
    outs = out.take()
    assert [o.op for o in by_worker(outs, W1)] == [ChannelOp.ANSWER, ChannelOp.DELIVER]
    assert Deliver.decode(by_worker(outs, W2)[0].body).conns == (3, 4)


# -- the property --------------------------------------------------------------------

ROOMS = ("a", "b")
CONNS = (1, 2, 3)
step = st.one_of(
    st.tuples(st.just("room"), st.sampled_from(ROOMS), st.sets(st.sampled_from((W1, W2)), min_size=1)),
    st.tuples(st.just("reply"), st.sampled_from((W1, W2)), st.sampled_from(CONNS)),
    st.tuples(st.just("join"), st.sampled_from((W1, W2)), st.sampled_from(CONNS), st.sampled_from(ROOMS)),
    st.tuples(st.just("private"), st.sampled_from((W1, W2)), st.sampled_from(CONNS)),
    st.tuples(st.just("take")),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(step, max_size=60))
def test_every_connection_sees_what_unjoined_records_show_with_replies_no_later(
    steps: list[tuple[Any, ...]],
) -> None:
    out = Outbox()
    joined = {W1: Worker(), W2: Worker()}
    alone = {W1: Worker(), W2: Worker()}  # the reference: each record on its own, at once
    floating: set[bytes] = set()
    for n, (kind, *args) in enumerate(steps, start=1):
        if kind == "room":
            room, workers = args
            frame = message(n)
            out.to_room(room, sorted(workers), frame)
            for w in sorted(workers):
                alone[w].take([Out(w, ChannelOp.DELIVER, Deliver(frame, room=room).encode())])
        elif kind == "reply":
            worker, conn = args
            frame = say_reply(n)
            floating.add(frame)
            out.reply(worker, conn, frame)
            alone[worker].take([Out(worker, ChannelOp.ANSWER, Answer(conn, frame).encode())])
        elif kind == "join":
            worker, conn, room = args
            answer = Answer(conn, encode_frame(Op.JOIN_REPLY, n, b"{}"), joined=room)
            out.answer(worker, answer)
            alone[worker].take([Out(worker, ChannelOp.ANSWER, answer.encode())])
        elif kind == "private":
            worker, conn = args
            frame = encode_frame(Op.PRIVATE, 0, f"p{n}".encode())
            out.to_conns(worker, (conn,), frame)
            alone[worker].take([Out(worker, ChannelOp.DELIVER, Deliver(frame, conns=(conn,)).encode())])
        else:
            outs = out.take()
            for w in (W1, W2):
                joined[w].take(by_worker(outs, w))
    outs = out.take()
    for w in (W1, W2):
        joined[w].take(by_worker(outs, w))
        for conn in CONNS:
            got = [bytes(encode_frame(f.op, f.request_id, f.body)) for f in joined[w].logs.get(conn, [])]
            want = [bytes(encode_frame(f.op, f.request_id, f.body)) for f in alone[w].logs.get(conn, [])]
            assert sorted(got) == sorted(want)  # nothing lost, nothing twice
            assert [f for f in got if f not in floating] == [f for f in want if f not in floating]
            assert [f for f in got if f in floating] == [f for f in want if f in floating]
            for frame in (f for f in got if f in floating):  # a SAY reply only ever moves earlier

                def before(log: list[bytes], frame: bytes = frame) -> int:
                    return sum(1 for f in log[: log.index(frame)] if f not in floating)

                assert before(got) <= before(want)


@given(
    st.lists(st.integers(1, 30_000), max_size=12),
    st.sets(st.sampled_from((W1, W2)), min_size=1),
    st.booleans(),
)
def test_many_frames_at_once_are_what_one_at_a_time_gives(
    sizes: list[int], workers: set[int], open_group: bool
) -> None:
    """to_room_many and reply_many (the hub's path for a run of SAYs) make
    the records that a call per frame makes, 60 KiB groups included."""
    frames = [message(n, size) for n, size in enumerate(sizes)]
    replies = [say_reply(n) for n in range(len(sizes))]
    one, many = Outbox(), Outbox()
    for out in (one, many):
        if open_group:
            out.to_room("r", sorted(workers), message(99, 20_000))
    for frame in frames:
        one.to_room("r", sorted(workers), frame)
    for reply in replies:
        one.reply(W1, 3, reply)
    many.to_room_many("r", sorted(workers), frames, sum(map(len, frames)))
    many.reply_many(W1, 3, list(replies), sum(map(len, replies)))
    assert one.size == many.size
    assert one.take() == many.take()
