"""Chat in a worker: forward requests to the hub, fan deliveries out locally.

Theory of operation: the worker owns no chat state that matters. It checks
what it can alone (the per-connection rate limit), attaches the sender's
kernel credentials, and forwards the request to the hub in the master. What
comes back is either a client-ready reply for one connection, or a delivery:
one record per message for this whole worker, which it copies to each of its
local members of the room. The local room index is rebuilt from the hub's
answers (a JOIN reply adds the connection, a PART reply removes it), so after
a worker crash nothing needs restoring. A connection that had a chat session
tells the hub when it closes.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ipcd import fdpass
from ipcd.fdpass import Credentials
from ipcd.protocol import ErrorCode, Frame, Op, encode_error, encode_frame
from ipcd.server.channel import ChannelClosed, ChannelOp, pack_meta, unpack_meta

if TYPE_CHECKING:
    from ipcd.server.connection import Connection
    from ipcd.server.worker import Worker
    from ipcd.services import StreamHandler

log = logging.getLogger("ipcd.worker")

CHAT_OPS = (Op.NICK, Op.JOIN, Op.PART, Op.SAY, Op.MSG, Op.ROOMS, Op.WHO, Op.TOPIC, Op.HISTORY)
RATED_OPS = (Op.SAY, Op.MSG)


class ChatState:
    """Per-connection chat state, created on the connection's first chat op."""

    __slots__ = ("last", "rooms", "tokens")

    def __init__(self, burst: float, now: float) -> None:
        self.rooms: set[str] = set()
        self.tokens = burst
        self.last = now


class ChatRouter:
    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.rooms: dict[str, set[Connection]] = {}
        self.awaiting: Counter[int] = Counter()  # connection id -> requests the master has not answered
        self._dgram_buckets: dict[int, ChatState] = {}  # datagram posts are rate-limited per uid

    # -- requests ----------------------------------------------------------

    def forward(self, conn: Connection, frame: Frame, with_groups: bool = False) -> None:
        """Forward a request to the master's services (chat hub, fd store)
        with the peer's kernel credentials and the frame's fds (only a PUT
        has any: the worker's dispatch refused the others')."""
        worker = self.worker
        state = conn.chat
        if state is None:
            state = conn.chat = ChatState(self._burst, worker.now)
        if frame.op in RATED_OPS and not self._take_token(state):
            conn.send_error(
                frame.request_id,
                ErrorCode.RATE_LIMITED,
                f"more than {worker.settings.rate_limit:g} messages/s; slow down and retry",
            )
            return
        try:
            creds = conn.creds
        except OSError:
            fdpass.close_fds(frame.fds)
            return  # the peer is already gone
        meta = {"conn": conn.id, "rid": frame.request_id, "op": frame.op, **_creds(creds)}
        if with_groups:
            meta["groups"] = list(fdpass.peer_groups(conn.sock))
        if self._post(ChannelOp.FORWARD, pack_meta(meta, frame.body), conn, frame.request_id, frame.fds):
            self.awaiting[conn.id] += 1

    def forward_datagram(self, frame: Frame, creds: Credentials | None, address: str | bytes | None) -> None:
        """A datagram SAY: posted as its sender's uid, answered at its address."""
        if creds is None:
            return  # SO_PASSCRED is set on the socket: the kernel always attaches them
        addr = os.fsencode(address).hex() if address else None
        bucket = self._dgram_buckets.get(creds.uid)
        if bucket is None:
            if len(self._dgram_buckets) > 10_000:
                self._dgram_buckets.clear()  # bounded memory; a clear only forgives a little
            bucket = self._dgram_buckets[creds.uid] = ChatState(self._burst, self.worker.now)
        if not self._take_token(bucket):
            if address:
                limit = self.worker.settings.rate_limit
                error = encode_frame(
                    Op.ERROR,
                    frame.request_id,
                    encode_error(ErrorCode.RATE_LIMITED, f"more than {limit:g} posts/s from uid {creds.uid}"),
                )
                self.worker.reply_datagram(os.fsencode(address), error)
            return
        meta = {"conn": 0, "rid": frame.request_id, "op": frame.op, "dgram": addr, **_creds(creds)}
        self._post(ChannelOp.FORWARD, pack_meta(meta, frame.body), None, frame.request_id)

    def _post(
        self, op: ChannelOp, body: bytes, conn: Connection | None, request_id: int, fds: tuple[int, ...] = ()
    ) -> bool:
        try:
            self.worker.channel.post(op, body, fds=fds)  # ours are closed once sent
        except ChannelClosed:
            if conn is not None:
                conn.send_error(request_id, ErrorCode.UNAVAILABLE, "this worker is being replaced; retry")
            return False
        return True

    @property
    def _burst(self) -> float:
        return max(self.worker.settings.rate_limit * 2, 1.0)

    def _take_token(self, state: ChatState) -> bool:
        now = self.worker.now
        rate = self.worker.settings.rate_limit
        state.tokens = min(self._burst, state.tokens + (now - state.last) * rate)
        state.last = now
        if state.tokens < 1:
            return False
        state.tokens -= 1
        return True

    # -- answers from the hub ----------------------------------------------

    def on_reply(self, body: bytes, fds: tuple[int, ...] = ()) -> None:
        meta, frame = unpack_meta(body)
        if meta.get("dgram"):
            fdpass.close_fds(fds)
            self.worker.reply_datagram(bytes.fromhex(meta["dgram"]), frame)
            return
        conn = self.worker.connections.get(meta.get("conn", 0))
        if conn is None:
            fdpass.close_fds(fds)
            return  # it closed meanwhile; the master hears GONE
        if self.awaiting[conn.id] > 1:
            self.awaiting[conn.id] -= 1
        else:
            self.awaiting.pop(conn.id, None)
        if "join" in meta:
            self._index(conn, meta["join"], True)
        if "part" in meta:
            self._index(conn, meta["part"], False)
        conn.send_frame(frame, fds)  # the connection closes the fds once they are sent

    def on_deliver(self, body: bytes) -> None:
        meta, frames = unpack_meta(body)
        targets: Iterable[Connection]
        if "room" in meta:
            targets = self.rooms.get(meta["room"], ())
        else:
            connections = self.worker.connections
            targets = [c for c in (connections.get(i) for i in meta.get("conns", ())) if c is not None]
        for conn in list(targets):
            conn.send_frame(frames)  # the same bytes object for every member

    def _index(self, conn: Connection, room: str, joined: bool) -> None:
        state = conn.chat
        if state is None:
            return
        members = self.rooms.setdefault(room, set())
        if joined:
            members.add(conn)
            state.rooms.add(room)
        else:
            members.discard(conn)
            state.rooms.discard(room)
            if not members:
                del self.rooms[room]

    def connection_closed(self, conn: Connection) -> None:
        state = conn.chat
        if state is None:
            return
        self.awaiting.pop(conn.id, None)
        for room in state.rooms:
            members = self.rooms.get(room)
            if members is not None:
                members.discard(conn)
                if not members:
                    del self.rooms[room]
        try:
            self.worker.channel.post(ChannelOp.GONE, pack_meta({"conn": conn.id}))
        except ChannelClosed:
            pass


def _creds(creds: Credentials) -> dict[str, Any]:
    return {"uid": creds.uid, "gid": creds.gid, "pid": creds.pid}


def _forward(worker: Worker, conn: Connection, frame: Frame) -> None:
    worker.chat.forward(conn, frame)


STREAM: dict[int, StreamHandler] = dict.fromkeys(CHAT_OPS, _forward)
