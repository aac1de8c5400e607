"""What the master's services send workers in one loop pass, gathered and joined.

Theory of operation
-------------------
The hub and the store do not send records one at a time: they write into an
:class:`Outbox`, and the master takes its records (:meth:`Outbox.take`) once
per loop pass, or sooner once it holds :data:`FLUSH_BYTES`. Gathering is
what makes fan-out cheap: consecutive messages to one room become *one*
delivery per worker, which the worker copies to each local member with one
write, so a pipelined burst costs per-member work once per pass, not once per
message. Replies to ``SAY`` are joined the same way, per connection.

Each worker has its own ordered lane (workers' channels are independent).
Joining reorders only what the protocol leaves unordered, and keeps every
promise it makes (``docs/protocol.md``, "Sequencing and delivery"):

- Room frames join the lane's *open group* only while nothing else but
  floating replies came between them: a message to another room, a delivery
  to given connections, or any other reply closes the group first. So a
  member of several rooms still sees them in the hub's order.
- A *floating* reply (a ``SAY`` reply, which changes nothing the worker
  indexes) may move ahead of the open group. It is added after its own
  message's frame is, so it still arrives before that message: the reply
  first, as promised; it may also come before other members' earlier
  messages, which nothing promises it won't.
- Everything else (replies that join or leave a room, replies with fds or
  for a datagram, history replays, private messages) is a barrier: it goes
  out in the order it was added, after everything added before it.

An open group is closed once it holds :data:`GROUP_BYTES`, so a delivery
stays a small fraction of a member's output buffer (``--max-outbuf``).
Records are encoded here, once per lane; fds stay with the :class:`Out`
that carries them (the channel owns them once posted).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final, Protocol

from ipcd.link.ops import ChannelOp
from ipcd.link.records import Answer, Deliver, Out

GROUP_BYTES: Final = 60 * 1024  # frames per joined delivery: one channel fragment
FLUSH_BYTES: Final = 1 << 20  # take() sooner than the end of the pass past this much


class _Lane:
    """One worker's records of this pass, in order."""

    __slots__ = ("floating", "frames", "records", "room", "size", "worker")

    def __init__(self, worker: int) -> None:
        self.worker = worker
        self.records: list[Out] = []  # settled, in order
        self.floating: dict[int, list[bytes]] = {}  # conn -> joined SAY reply frames, not yet placed
        self.room: str | None = None  # the open group's room
        self.frames: list[bytes] = []  # ... and its frames
        self.size = 0


class Outbox:
    """Records for workers, gathered over one loop pass (see the module)."""

    __slots__ = ("_lanes", "fds", "size")

    def __init__(self) -> None:
        self._lanes: dict[int, _Lane] = {}
        self.size = 0  # bytes gathered since the last take()
        self.fds = 0  # ... and fds

    def __bool__(self) -> bool:
        return bool(self._lanes)

    def _lane(self, worker: int) -> _Lane:
        lane = self._lanes.get(worker)
        if lane is None:
            lane = self._lanes[worker] = _Lane(worker)
        return lane

    # -- what the services add ---------------------------------------------------

    def to_room(self, room: str, workers: Iterable[int], frame: bytes) -> None:
        """``frame`` for every local member of ``room`` on each of ``workers``."""
        lanes = self._lanes
        for worker in workers:
            lane = lanes.get(worker) or self._lane(worker)
            if lane.room != room or lane.size + len(frame) > GROUP_BYTES:
                self._settle(lane)
                lane.room = room
            lane.frames.append(frame)
            lane.size += len(frame)
            self.size += len(frame)

    def to_room_many(self, room: str, workers: Iterable[int], frames: list[bytes], size: int) -> None:
        """:meth:`to_room` for several frames in order (``size`` bytes together)."""
        lanes = self._lanes
        for worker in workers:
            lane = lanes.get(worker) or self._lane(worker)
            if lane.room == room and lane.size + size <= GROUP_BYTES:
                lane.frames += frames
                lane.size += size
                self.size += size
            else:
                for frame in frames:
                    self.to_room(room, (worker,), frame)

    def to_conns(self, worker: int, conns: tuple[int, ...], frames: bytes) -> None:
        """Frames for given connections of one worker (a barrier)."""
        self.add(Out(worker, ChannelOp.DELIVER, Deliver(frames, conns=conns).encode()))

    def reply(self, worker: int, conn: int, frame: bytes) -> None:
        """A floating reply for a stream connection: one that changes nothing
        the worker indexes (a SAY reply). Consecutive ones to the same
        connection travel as one answer."""
        self.reply_many(worker, conn, [frame], len(frame))

    def reply_many(self, worker: int, conn: int, frames: list[bytes], size: int) -> None:
        """:meth:`reply` for several frames in order (``size`` bytes together)."""
        if not frames:
            return
        lane = self._lanes.get(worker) or self._lane(worker)
        joined = lane.floating.get(conn)
        if joined is None:
            lane.floating[conn] = frames
        else:
            joined += frames
        self.size += size

    def answer(self, worker: int, answer: Answer, fds: tuple[int, ...] = ()) -> None:
        """Any other reply (a barrier); ``fds`` go with it."""
        self.add(Out(worker, ChannelOp.ANSWER, answer.encode(), fds))

    def add(self, out: Out) -> None:
        """An encoded record (a barrier)."""
        lane = self._lane(out.worker)
        self._settle(lane)
        lane.records.append(out)
        self.size += len(out.body)
        self.fds += len(out.fds)

    # -- what the master takes ---------------------------------------------------

    def take(self) -> list[Out]:
        """Every record gathered, lane by lane, each lane in order; the
        outbox is empty afterwards."""
        taken: list[Out] = []
        for lane in self._lanes.values():
            self._settle(lane)
            taken += lane.records
        self._lanes.clear()
        self.size = self.fds = 0
        return taken

    def _settle(self, lane: _Lane) -> None:
        """Place the floating replies, then the open group, as records."""
        if lane.floating:
            for conn, frames in lane.floating.items():
                body = frames[0] if len(frames) == 1 else b"".join(frames)
                lane.records.append(
                    Out(lane.worker, ChannelOp.ANSWER, Answer(conn, body, replies=len(frames)).encode())
                )
            lane.floating = {}
        if lane.room is not None:
            frames = lane.frames
            body = frames[0] if len(frames) == 1 else b"".join(frames)
            lane.records.append(Out(lane.worker, ChannelOp.DELIVER, Deliver(body, room=lane.room).encode()))
            lane.room, lane.frames, lane.size = None, [], 0


class Deliveries(Protocol):
    """Where a service puts deliveries: the outbox itself, or :class:`Staged`."""

    def to_room(self, room: str, workers: Iterable[int], frame: bytes) -> None: ...

    def to_conns(self, worker: int, conns: tuple[int, ...], frames: bytes) -> None: ...


class Staged:
    """Deliveries held back until a reply is in the outbox: a request's
    reply goes before the notices and replays it causes."""

    __slots__ = ("_order",)

    def __init__(self) -> None:
        # (room, its workers, frame), or (None, (worker, *conns), frames)
        self._order: list[tuple[str | None, tuple[int, ...], bytes]] = []

    def to_room(self, room: str, workers: Iterable[int], frame: bytes) -> None:
        self._order.append((room, tuple(workers), frame))  # the members of now, not of later

    def to_conns(self, worker: int, conns: tuple[int, ...], frames: bytes) -> None:
        self._order.append((None, (worker, *conns), frames))

    def into(self, out: Outbox) -> None:
        for room, who, data in self._order:
            if room is not None:
                out.to_room(room, who, data)
            else:
                out.to_conns(who[0], who[1:], data)
        self._order.clear()
