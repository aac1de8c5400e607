"""The chat hub: rooms, members, sequence numbers and history.

Theory of operation
-------------------
The hub lives in the master, which outlives every worker, so a worker crash
loses only that worker's connections: the hub drops their memberships
(telling the rooms) and everyone else carries on with the same sequence.
It does no I/O: it is fed a worker's forwarded request and writes the
records to send into an :class:`~ipcd.link.outbox.Outbox`, which keeps every
rule testable in-process (and lets a pass's messages to one room travel as
one delivery per worker).

A room message is sequenced (``seq`` per room, from 1, no gaps), encoded
*once* as a client-ready MESSAGE frame, kept in the room's bounded history,
and routed once per worker that has members in the room; the worker copies
the same bytes to each of its local members. The channel between master
and a worker is ordered, so every member connected when a message is sent
receives it once, in sequence order. Notices (join, part, quit, topic,
nick) do not take sequence numbers, so a gap in ``seq`` always means a lost
message, never a notice.

History is paged so that one reply always fits the connection's output
buffer, whatever the history size and message limit: a HISTORY reply, and
a JOIN's replay, hold the newest of the messages asked for that fit the
reply budget (a quarter of ``--max-outbuf``, never less than one message)
and say so when the budget left older ones out (``more``, and the ``before``
to ask HISTORY with next). A reader that reads therefore never meets the
slow-consumer bound through its own requests.

Identity comes from the kernel (SO_PEERCRED / SCM_CREDENTIALS, forwarded by
the worker): a message carries its sender's uid whatever nick they chose.

Rooms are shared by all users, so each uid has budgets
(:class:`~ipcd.budgets.UidBudget`): the rooms it created that still exist
(``rooms_per_uid``, a fraction of ``max_rooms``: no uid can fill the daemon's
table) and the memberships its connections hold (``joins_per_uid``), both
charged where a room is created or joined; a SAY pays for those only when
it creates a room. A uid at its room budget first forgets its own least
recently used room without members; only if all its rooms are in use is it
refused. The bytes of history its messages keep (``history_bytes_per_uid``)
are charged to the poster once per run of posts to a room
(:mod:`ipcd.chat.keptbytes`, which trims a poster over budget so that each
room's history stays a gap-free suffix).

Posts (SAY, MSG) are also counted per uid here, daemon-wide
(:class:`~ipcd.chat.postrate.PostRates`): each worker caps a uid at
``rate_limit`` on its own, the hub tells a worker to hold a uid whose posts
over all workers went past it. A post that reaches the hub is never
refused for its rate.

A SAY may carry a client-chosen message ``id``: the hub remembers each uid's
recent ids with what they were posted as (:mod:`ipcd.chat.recentids`), and
answers a SAY whose id it remembers with the original reply marked
``duplicate`` instead of posting it again, so a client may resend what it
is not sure was posted. The id goes into the MESSAGE too, which is how
the window is rebuilt from kept messages after a restart
(:meth:`Hub.rebuild_recent_ids`).

What must survive a restart is noted in :attr:`Hub.changes` when the master
keeps a journal (:mod:`ipcd.chat.journal`): a room created, a run of
messages (one entry per run, encoded by the master once per loop pass),
a topic set, a room forgotten. Trimming is not noted: a journal replayed
through :meth:`Hub.restore` is trimmed by the same limits again, and the
master compacts it from :meth:`Hub.export`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any, Final

from ipcd.budgets import UidBudget
from ipcd.chat import hubsave, operations
from ipcd.chat.fairshare import BURST_FACTOR
from ipcd.chat.idlerooms import IdleRooms
from ipcd.chat.journal import Forget, MessageRun, RoomImage, RoomState, Topic
from ipcd.chat.keptbytes import KeptBytes
from ipcd.chat.model import ChatError, Limits, Member, Room, Session, user_name, user_name_json
from ipcd.chat.postrate import PostRates
from ipcd.chat.recentids import Posted, RecentIds
from ipcd.link.ops import ChannelOp
from ipcd.link.outbox import Deliveries, Outbox, Staged
from ipcd.link.records import Answer, Out, Post, Sender, Throttle
from ipcd.protocol import (
    ErrorCode,
    Op,
    RemoteProtocolError,
    encode_error,
    encode_frame,
    encode_json,
    reply_op,
)
from ipcd.protocol.chat import DEFAULT_ROOM, parse_body
from ipcd.protocol.frames import HEADER, MAGIC, VERSION

__all__ = ["ChatError", "Hub", "Limits", "Out", "Outbox", "Sender"]

_CHUNK = 128 * 1024  # replayed history per channel record, well under RECORD_MAX

# A MESSAGE body and a SAY reply, made of parts encoded once (keys sorted, as
# encode_json writes them): sender, room, seq, text, ts, uid.
_MESSAGE: Final = b'{"from":%b,"room":%b,"seq":%d,"text":%b,"ts":%b,"uid":%d}'
_SAY_REPLY: Final = b'{"room":%b,"seq":%d,"ts":%b}'
# The same with the client's message id (checked by the worker: JSON as is),
# and the reply to a SAY whose id was posted already.
_MESSAGE_WITH_ID: Final = b'{"from":%b,"id":"%b","room":%b,"seq":%d,"text":%b,"ts":%b,"uid":%d}'
_DUPLICATE_REPLY: Final = b'{"duplicate":true,"room":%b,"seq":%d,"ts":%b}'
_TS_STEP: Final = 0.001  # ts is read for every message, formatted once a millisecond


_PACK_HEAD: Final = HEADER.pack  # (MAGIC, VERSION, op, flags, nfds, 0, request id, body length)


class Hub:
    def __init__(self, limits: Limits | None = None) -> None:
        self.created = UidBudget("rooms", 0, "--rooms-per-uid")  # rooms that exist, per creator uid
        self.joined = UidBudget("room memberships", 0, "--joins-per-uid")  # per member uid
        self.idle = IdleRooms()  # which of its rooms a uid at its budget forgets first
        self.kept: KeptBytes[Room] = KeptBytes(UidBudget("bytes of history", 0, "--history-bytes-per-uid"))
        self.posts = PostRates(Limits.rate_limit, Limits.rate_limit * BURST_FACTOR)  # per poster uid
        self.clock = time.monotonic  # the posts' rate clock (a test sets its own)
        self.recent_ids = RecentIds()
        self.limits = limits or Limits()
        self.rooms: dict[str, Room] = {}
        # What changed since the master last took it, for its journal; None: no journal kept.
        self.changes: list[MessageRun | RoomState | Topic | Forget] | None = None
        self._trim_at = 0  # kept bytes past which trim_history runs (set with the limits)
        self.messages = 0  # room and private messages sent; also the rooms' eviction clock
        self.room_for(DEFAULT_ROOM, create=True)
        self.sessions: dict[Member, Session] = {}
        self.nicks: dict[str, Session] = {}
        self.private_seq = 0
        self._ts = (0.0, b"0.0")  # the last ts and its JSON (see _say)

    @property
    def limits(self) -> Limits:
        return self._limits

    @limits.setter
    def limits(self, limits: Limits) -> None:
        """New limits (a reload): the budgets follow; what is held stays held."""
        self._limits = limits
        self._trim_at = limits.history_bytes
        budgets = (
            (self.created, limits.rooms_per_uid),
            (self.joined, limits.joins_per_uid),
            (self.kept.budget, limits.history_bytes_per_uid),
        )
        for budget, limit in budgets:
            budget.limit = limit
            budget.privileged_factor = limits.privileged_factor
        self.posts.configure(limits.rate_limit, limits.rate_limit * BURST_FACTOR)
        self.recent_ids.per_uid = limits.message_ids_per_uid
        self.recent_ids.seconds = limits.message_id_window

    # -- entry points ------------------------------------------------------

    def handle(self, sender: Sender, op: int, body: bytes, out: Outbox) -> None:
        """One forwarded request: its reply, then any deliveries, into ``out``."""
        if op == Op.SAY:
            self._say(sender, body, out)
            return
        if op == Op.MSG:
            self._charge(sender, 1, out)
        later = Staged()  # what the request causes goes after its reply
        try:
            args = parse_body(body)
            handler = operations.HANDLERS.get(op)
            if handler is None:
                raise ChatError(ErrorCode.UNKNOWN_OP, f"operation 0x{op:02x} is not a chat operation")
            if not sender.conn:
                raise ChatError(ErrorCode.BAD_REQUEST, "datagrams can only post to rooms (SAY)")
            meta, result = handler(self, sender, args, out, later)
            reply = result if isinstance(result, bytes) else encode_json(result)
            frame = encode_frame(reply_op(op), sender.request_id, reply)
        except (ChatError, RemoteProtocolError) as exc:
            meta = {}
            frame = encode_frame(Op.ERROR, sender.request_id, encode_error(exc.code, exc.message))
        answer = Answer(sender.conn, frame, meta.get("join"), meta.get("part"), dgram=sender.dgram)
        out.answer(sender.worker, answer)
        later.into(out)

    def connection_gone(self, member: Member, out: Deliveries) -> None:
        session = self.sessions.pop(member, None)
        if session is None:
            return
        del self.nicks[session.nick]
        for name in sorted(session.rooms):
            self.leave(self.rooms[name], session, "quit", out)

    def worker_gone(self, worker: int, out: Deliveries) -> None:
        """Its connections quit, with notices to everyone else (none to the
        dead worker itself: it has no channel any more)."""
        self.posts.worker_gone(worker)
        for room in self.rooms.values():
            room.workers.pop(worker, None)
        for member in [m for m in self.sessions if m[0] == worker]:
            self.connection_gone(member, out)

    def stats(self) -> dict[str, int]:
        return {"rooms": len(self.rooms), "chatters": len(self.sessions), "messages": self.messages}

    def holdings(self) -> dict[int, dict[str, int]]:
        """Per uid, what it holds here: rooms it created, memberships, bytes
        of history, and posts beyond its rate share not paid back yet."""
        held: dict[int, dict[str, int]] = {}
        for uid, count in self.created.held.items():
            held.setdefault(uid, {})["rooms"] = count
        for uid, count in self.joined.held.items():
            held.setdefault(uid, {})["joins"] = count
        for uid, count in self.kept.budget.held.items():
            held.setdefault(uid, {})["history_bytes"] = count
        for uid, debt in self.posts.debts(self.clock()).items():
            held.setdefault(uid, {})["rate_debt"] = debt
        for uid, count in self.recent_ids.holdings().items():
            held.setdefault(uid, {})["message_ids"] = count
        return held

    # -- persistence (ipcd.chat.hubsave) -------------------------------------

    def rebuild_recent_ids(self) -> int:
        """Remember the message ids of the kept messages again: how many."""
        return hubsave.rebuild_recent_ids(self)

    def export(self) -> Iterator[RoomImage]:
        """The rooms a restart must bring back."""
        return hubsave.export(self)

    def restore(self, images: Iterable[RoomImage]) -> int:
        """Rooms from a journal, at start; how many messages came back."""
        return hubsave.restore(self, images)

    def trim_history(self) -> None:
        """All history over ``history_bytes``: the rooms posted to least
        recently lose their oldest messages first, down to seven eighths of
        the limit (so the scan for them is paid once per eighth, not once per
        message). Each room keeps at least its newest message."""
        limit = self.limits.history_bytes
        self._trim_at = limit
        if self.kept.total <= limit:
            return
        rooms = sorted((r for r in self.rooms.values() if len(r.history) > 1), key=lambda r: r.last_used)
        self.kept.trim_to(rooms, limit - limit // 8)
        if self.kept.total > limit:
            # Rooms' newest messages alone are over the limit: scan again only
            # after another eighth of it, not at every post.
            self._trim_at = self.kept.total + limit // 8

    # -- sessions ----------------------------------------------------------

    def session_of(self, sender: Sender) -> Session:
        """The sender's session, created with its user name (made unique)."""
        member = (sender.worker, sender.conn)
        session = self.sessions.get(member)
        if session is None:
            if not sender.conn:
                raise ChatError(ErrorCode.BAD_REQUEST, "datagrams can only post to rooms (SAY)")
            base = user_name(sender.uid)
            nick, n = base, 1
            while nick in self.nicks:
                n += 1
                nick = f"{base}-{n}"
            session = Session(member, nick, sender.uid, sender.pid)
            self.sessions[member] = session
            self.nicks[nick] = session
        return session

    def room_for(self, name: str, create: bool, uid: int | None = None) -> Room:
        """The room, created if ``create`` (charged to ``uid``, None only for the lobby)."""
        room = self.rooms.get(name)
        if room is None:
            if not create:
                raise ChatError(ErrorCode.NOT_FOUND, f"no room named {name!r}; join it to create it")
            if uid is not None and not self.created.admits(uid):
                victim = self.idle.least_recently_used(uid, self.rooms)
                if victim is not None:
                    self._forget(victim)
                if not self.created.admits(uid):
                    raise ChatError(
                        ErrorCode.LIMIT_EXCEEDED,
                        self.created.refusal(uid, f"{name!r} was not created; part rooms you no longer need"),
                    )
            if len(self.rooms) >= self.limits.max_rooms:
                self._evict_idle_room()
            if len(self.rooms) >= self.limits.max_rooms:
                raise ChatError(
                    ErrorCode.LIMIT_EXCEEDED, f"the daemon holds {len(self.rooms)} rooms: its limit"
                )
            room = self.rooms[name] = Room(name, last_used=self.messages, creator=uid)
            if self.changes is not None:
                self.changes.append(RoomState(name, creator=uid))
            if uid is not None:
                self.created.charge(uid)
                self.idle.may_be_idle(room, self.rooms, self.created.limit_for(uid))  # a SAY's is
        return room

    def _forget(self, room: Room) -> None:
        del self.rooms[room.name]
        if self.changes is not None:
            self.changes.append(Forget(room.name))
        self.kept.forgotten(room)
        if room.creator is not None:
            self.created.release(room.creator)
            if not self.created.held[room.creator]:
                self.idle.forget(room.creator)

    def _evict_idle_room(self) -> None:
        """At the room limit, forget the least recently used room nobody is
        in (with its history), so posting to new names cannot lock everyone
        out of creating rooms."""
        idle = [r for r in self.rooms.values() if not r.members and r.name != DEFAULT_ROOM]
        if idle:
            self._forget(min(idle, key=lambda r: r.last_used))

    # -- fan-out -----------------------------------------------------------

    @staticmethod
    def deliver_to(worker: int, conn: int, frames: list[bytes], out: Deliveries) -> None:
        """Frames for one connection, in records of at most ``_CHUNK`` bytes."""
        batch: list[bytes] = []
        size = 0
        for frame in frames:
            if batch and size + len(frame) > _CHUNK:
                out.to_conns(worker, (conn,), b"".join(batch))
                batch, size = [], 0
            batch.append(frame)
            size += len(frame)
        if batch:
            out.to_conns(worker, (conn,), b"".join(batch))

    def notice(self, room: Room, event: str, session: Session, out: Deliveries, **extra: Any) -> None:
        notice = {
            "room": room.name,
            "event": event,
            "nick": session.nick,
            "uid": session.uid,
            "seq": room.seq,
            "ts": time.time(),
            **extra,
        }
        out.to_room(room.name, room.workers, encode_frame(Op.NOTICE, 0, encode_json(notice)))

    def leave(self, room: Room, session: Session, event: str, out: Deliveries) -> None:
        member = session.member
        if room.members.pop(member, None) is None:
            return
        session.rooms.discard(room.name)
        self.joined.release(session.uid)
        room.workers[member[0]] -= 1
        if room.workers[member[0]] <= 0:
            del room.workers[member[0]]
        self.notice(room, event, session, out)
        if not room.members and room.name != DEFAULT_ROOM:
            if not room.history:
                self._forget(room)
            elif room.creator is not None:
                self.idle.may_be_idle(room, self.rooms, self.created.limit_for(room.creator))

    # -- the SAY path (the other operations: ipcd.chat.operations) -----------

    def _say(self, sender: Sender, body: bytes, out: Outbox) -> None:
        """The hot path: a run of SAYs of one connection (a :class:`Post`
        each), checked by the worker, so a message is made of bytes already
        encoded: no JSON here, no staging. A run's messages to one room go to
        the outbox together, and its replies (which float) after them."""
        worker, conn, uid = sender.worker, sender.conn, sender.uid
        session = self.sessions.get((worker, conn)) if conn else None
        rooms = self.rooms
        replies: list[bytes] = []
        replies_size = 0
        room: Room | None = None
        frames: list[bytes] = []  # for ``room``, not yet in the outbox
        frames_size = 0
        posts = Post.decode_run(body)
        for request_id, name, text_json, message_id in posts:
            now = time.time()
            if message_id:
                duplicate = self._posted_already(uid, message_id, request_id, now)
                if duplicate is not None:
                    replies.append(duplicate)
                    replies_size += len(duplicate)
                    continue
            if room is None or name != room.name:
                if frames:
                    self._kept(room, uid, frames, frames_size, out)  # type: ignore[arg-type]
                    frames, frames_size = [], 0
                try:
                    room = rooms.get(name) or self.room_for(name, create=True, uid=uid)
                except ChatError as exc:
                    room = None
                    error = encode_frame(Op.ERROR, request_id, encode_error(exc.code, exc.message))
                    replies.append(error)
                    replies_size += len(error)
                    continue
            ts, ts_json = self._ts
            if now - ts >= _TS_STEP or now < ts:  # formatting a float is a good part of the cost
                ts, ts_json = self._ts = (now, repr(now).encode())
            seq = room.seq = room.seq + 1
            sender_json = session.nick_json if session is not None else user_name_json(uid, now)
            if message_id:
                message = _MESSAGE_WITH_ID % (
                    sender_json,
                    message_id,
                    room.name_json,
                    seq,
                    text_json,
                    ts_json,
                    uid,
                )
                self.recent_ids.remember(uid, message_id, Posted(room.name_json, seq, ts_json, now))
            else:
                message = _MESSAGE % (sender_json, room.name_json, seq, text_json, ts_json, uid)
            frame = _PACK_HEAD(MAGIC, VERSION, Op.MESSAGE, 0, 0, 0, 0, len(message)) + message
            room.history.append((seq, frame, uid))
            room.last_used = self.messages = self.messages + 1
            frames.append(frame)
            frames_size += len(frame)
            reply = _SAY_REPLY % (room.name_json, seq, ts_json)
            reply = _PACK_HEAD(MAGIC, VERSION, Op.SAY_REPLY, 0, 0, 0, request_id, len(reply)) + reply
            replies.append(reply)
            replies_size += len(reply)
        if frames and room is not None:
            self._kept(room, uid, frames, frames_size, out)
        if conn:
            out.reply_many(worker, conn, replies, replies_size)
        else:
            for reply in replies:
                out.answer(worker, Answer(0, reply, dgram=sender.dgram))
        self._charge(sender, len(posts), out)

    def _charge(self, sender: Sender, count: int, out: Outbox) -> None:
        """Posts of the sender's uid, on its daemon-wide rate: its worker is
        told to hold the uid if it went past (now and then, not per post)."""
        hold = self.posts.charge(sender.uid, sender.worker, count, self.clock())
        if hold:
            out.add(Out(sender.worker, ChannelOp.THROTTLE, Throttle(sender.uid, hold).encode()))

    def _posted_already(self, uid: int, message_id: bytes, request_id: int, now: float) -> bytes | None:
        """The reply to a SAY whose id ``uid`` posted within the window
        (the original outcome, marked duplicate), or None: post it."""
        posted = self.recent_ids.get(uid, message_id, now)
        if posted is None:
            return None
        reply = _DUPLICATE_REPLY % (posted.room_json, posted.seq, posted.ts_json)
        return _PACK_HEAD(MAGIC, VERSION, Op.SAY_REPLY, 0, 0, 0, request_id, len(reply)) + reply

    def _kept(self, room: Room, uid: int, frames: list[bytes], size: int, out: Outbox) -> None:
        """A run's messages to one room, now in its history: charged to the
        poster (trimming its oldest if it is past its history budget), and
        to the outbox."""
        self.kept.kept(room, uid, len(frames), size, self.limits.history)
        if self.kept.total > self._trim_at:
            self.trim_history()
        if self.changes is not None:
            self.changes.append(MessageRun(room.name.encode(), room.seq - len(frames) + 1, uid, frames))
        out.to_room_many(room.name, room.workers, frames, size)
