"""Chat in a worker: forward requests to the hub, fan deliveries out locally.

Theory of operation: the worker owns no chat state that matters. It checks
what it can alone (its uid's fair share of posts, how many of the
connection's requests are still unanswered), attaches the sender's kernel
credentials, and forwards the request to the hub in the master. What comes
back is either a client-ready reply for one connection, or a delivery: one
record per message for this whole worker, which it copies to each of its
local members of the room. The local room index is rebuilt from the hub's
answers (a JOIN reply adds the connection, a PART reply removes it), so after
a worker crash nothing needs restoring. A connection that had a chat session
tells the hub when it closes.

Flood protection slows a stream client down and never refuses it: a SAY or
MSG past the uid's share (ipcd.chat.fairshare), or any request past
``MAX_IN_FLIGHT`` unanswered ones, is *held* by its connection, which stops
reading (its socket buffer then fills and the client's writes block) until a
timer finds tokens again or replies come back; then the held frame is
forwarded and the connection goes on with what it had already received. So
nothing is lost or reordered, and one user's pipelined flood can neither
outrun its share nor fill the master's queue ahead of other users. A datagram
cannot be held: past the share it is answered with RATE_LIMITED. The share
here counts what this worker sees; the hub counts the uid over all workers
and sends THROTTLE when it went past (ipcd.chat.postrate): the uid's bucket
then gives no token for that long, and the same hold applies.

The same hold keeps a GET or TAKE within the connection's fd budget
(ipcd.server.flow): each one in flight reserves ``max_fds`` until its
answer (marked ``handout`` by the master) comes back, and the fds of
answers the client has not read yet count too. A client that pipelines
GETs and never reads is held once that budget is used, instead of making
the master dup and this worker queue fds without end; it goes on when the
kernel has taken fds (Connection tells :meth:`ChatRouter.fds_sent`).

And it keeps each uid's requests waiting in the channel for the master
within ``--forward-bytes-per-uid`` (ipcd.server.forwarded): a request of a
uid past it is held, its connection queued per uid, until the channel's
writes bring the uid down again (:meth:`ChatRouter.wake_forwarders`, each
loop pass); a datagram past it is answered with RATE_LIMITED.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING

from ipcd import fdpass
from ipcd.chat.fairshare import BURST_FACTOR, FairShares, Share
from ipcd.fdpass import Credentials
from ipcd.link.ops import ChannelOp
from ipcd.link.records import HANDOUT_OPS, Answer, Deliver, Forward, Gone, Post
from ipcd.protocol import ErrorCode, Frame, Op, RemoteProtocolError, encode_error, encode_frame
from ipcd.protocol.chat import prepare_say
from ipcd.server.channel import ChannelClosed
from ipcd.server.flow import FdBudget
from ipcd.server.forwarded import FORWARD_ADVICE, ForwardLedger, forward_budget

if TYPE_CHECKING:
    from ipcd.server.connection import Connection, Retry
    from ipcd.server.worker import Worker
    from ipcd.services import StreamHandler

log = logging.getLogger("ipcd.worker")

CHAT_OPS = (Op.NICK, Op.JOIN, Op.PART, Op.SAY, Op.MSG, Op.ROOMS, Op.WHO, Op.TOPIC, Op.HISTORY)
RATED_OPS = (Op.SAY, Op.MSG)
MAX_IN_FLIGHT = 256  # a connection's forwarded requests not yet answered, before it is held
RESUME_IN_FLIGHT = MAX_IN_FLIGHT // 2  # ... and read again once this few remain
RUN_MAX = 256  # SAYs in one forwarded run (MAX_IN_FLIGHT bounds it anyway)
RUN_BYTES = 48 * 1024  # ... and their bytes: a run stays within one channel fragment
STATUS_QUERY_COST = 256  # what a STATUS query waiting for the master costs: record, queue entry, waiter
MIN_HOLD = 0.01  # a held uid waits at least this long: tokens come back in batches, not one wake-up each


class ChatState:
    """Per-connection chat state, created on the connection's first forwarded op."""

    __slots__ = ("fd_requests", "fd_wait", "forward_wait", "granted", "in_flight", "rooms", "waiting")

    def __init__(self) -> None:
        self.rooms: set[str] = set()
        self.in_flight = 0  # forwarded, not yet answered
        self.fd_requests = 0  # GETs and TAKEs among them: max_fds reserved for each
        self.fd_wait = False  # held until the fd budget has room for the next GET or TAKE
        self.waiting = False  # held in its uid's queue for a token
        self.granted = False  # the uid's queue gave the held post its token already
        self.forward_wait = False  # held until its uid's requests waiting for the master are fewer


class _Run:
    """Consecutive SAYs of one connection, forwarded as one record."""

    __slots__ = ("conn", "creds", "posts", "size")

    def __init__(self, conn: Connection, creds: Credentials) -> None:
        self.conn = conn
        self.creds = creds
        self.posts: list[bytes] = []
        self.size = 0  # also what is charged to the uid's forward budget until the run is posted


class ChatRouter:
    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.rooms: dict[str, set[Connection]] = {}
        rate = worker.settings.rate_limit
        self.shares: FairShares[Connection] = FairShares(rate, rate * BURST_FACTOR)
        self.fd_budget = FdBudget.from_settings(worker.settings)
        self._run: _Run | None = None  # SAYs of one connection not yet forwarded
        self.forwarded = ForwardLedger(forward_budget(worker.settings))
        self._forward_held: dict[int, deque[Connection]] = {}  # uid -> its connections held for it

    # -- requests ----------------------------------------------------------

    def forward(self, conn: Connection, frame: Frame, with_groups: bool = False) -> None:
        """Forward a request to the master's services (chat hub, fd store)
        with the peer's kernel credentials and the frame's fds (only a PUT
        has any: the worker's dispatch refused the others'), or hold it."""
        state = conn.chat
        if state is None:
            state = conn.chat = ChatState()
        retry = self._retry_grouped if with_groups else self.forward
        if state.in_flight >= MAX_IN_FLIGHT:
            state.fd_wait = False
            conn.hold(frame, retry)
            return  # on_reply releases it
        fd_op = frame.op in HANDOUT_OPS  # answered with up to max_fds fds each
        if fd_op:
            state.fd_wait = not self.fd_budget.admits(conn.out_fds, state.fd_requests)
            if state.fd_wait:
                conn.hold(frame, retry)
                return  # on_reply or fds_sent releases it
        try:
            creds = conn.creds
        except OSError:
            fdpass.close_fds(frame.fds)
            return  # the peer is already gone
        if self._held_for_budget(conn, state, creds.uid, frame, retry):
            return  # wake_forwarders releases it
        post = None
        if frame.op == Op.SAY:
            try:
                post = self._checked_say(frame.request_id, frame.body)
            except RemoteProtocolError as exc:
                conn.send_error(frame.request_id, exc.code, exc.message)
                return
        if frame.op in RATED_OPS:
            if state.granted:
                state.granted = False
            else:
                share = self.shares.get(creds.uid, self.worker.now)
                if not share.take(self.worker.now):
                    state.waiting = True
                    share.waiting.append(conn)
                    conn.hold(frame, self.forward)
                    self._schedule(share)
                    return
        if post is not None:
            self._add_to_run(conn, creds, post)
            state.in_flight += 1
            return
        groups = conn.groups if with_groups else ()
        forward = Forward(
            conn.id, frame.request_id, frame.op, creds.uid, creds.gid, creds.pid, frame.body, groups
        )
        body = forward.encode()
        if self._post(ChannelOp.FORWARD, body, conn, frame.request_id, frame.fds):
            self._charge_posted(creds.uid, len(body))
            state.in_flight += 1
            if fd_op:
                state.fd_requests += 1

    def _charge_posted(self, uid: int, nbytes: int, charged: int = 0) -> None:
        """``uid``'s request of ``nbytes`` (``charged`` of them already) was
        just posted: it waits for the master until the channel writes it."""
        channel = self.worker.channel
        forwarded = self.forwarded
        if nbytes > charged:
            forwarded.charge(uid, nbytes - charged)
        forwarded.mark(uid, nbytes, channel.queued, channel.sealed)
        if channel.written != forwarded.written:
            forwarded.advance(channel.written)  # the post filled a batch, and it went at once

    def _held_for_budget(
        self, conn: Connection, state: ChatState, uid: int, frame: Frame, retry: Retry
    ) -> bool:
        """Hold ``frame`` if ``uid``'s requests waiting for the master are
        past its forward budget (ipcd.server.forwarded)."""
        forwarded = self.forwarded
        forwarded.advance(self.worker.channel.written)
        if forwarded.admits(uid):
            return False
        state.forward_wait = True
        self._forward_held.setdefault(uid, deque()).append(conn)
        conn.hold(frame, retry)
        return True

    def query_status(self, conn: Connection, frame: Frame) -> None:
        """A STATUS request, which the master answers: it waits in the
        channel like a forwarded request and counts against the same budget
        (``STATUS_QUERY_COST`` each), or a connection could pipeline queries
        without end while the master does not read this worker."""
        state = conn.chat
        if state is None:
            state = conn.chat = ChatState()
        try:
            uid = conn.creds.uid
        except OSError:
            return  # the peer is already gone
        if self._held_for_budget(conn, state, uid, frame, self.query_status):
            return
        self.close_run()  # what came before goes first
        if self.worker.query_status(conn, frame.request_id):
            self._charge_posted(uid, STATUS_QUERY_COST)

    def wake_forwarders(self) -> bool:
        """Read again the connections held for their uid's forward budget
        once the channel's writes took the uid down to half of it: in
        turn, while it is under budget (a released one that crosses it is
        held again, behind the others). True if any was released."""
        if not self._forward_held:
            return False
        forwarded = self.forwarded
        forwarded.advance(self.worker.channel.written)
        released = False
        for uid in [uid for uid in self._forward_held if forwarded.resumes(uid)]:
            held = self._forward_held[uid]
            while held and forwarded.admits(uid):
                conn = held.popleft()
                state = conn.chat
                if conn.closed or state is None or not state.forward_wait:
                    continue  # it closed while held
                state.forward_wait = False
                conn.release()
                released = True
            if not held:
                del self._forward_held[uid]
        return released

    def _checked_say(self, request_id: int, body: bytes) -> bytes:
        """A SAY body checked here, where workers share the work, and sent on
        as a :class:`Post` the hub only sequences. Raises RemoteProtocolError."""
        say = prepare_say(body, self.worker.settings.max_message)
        return Post(request_id, say.room, say.text_json, say.message_id).encode()

    def _add_to_run(self, conn: Connection, creds: Credentials, post: bytes) -> None:
        """Consecutive SAYs of one connection travel as one FORWARD (a run
        of posts), closed by anything else this router sends, by a full
        run, or at the end of the worker's loop pass (:meth:`close_run`)."""
        run = self._run
        if run is not None and run.conn is not conn:
            self.close_run()
            run = None
        if run is None:
            run = self._run = _Run(conn, creds)
        run.posts.append(post)
        run.size += len(post)
        self.forwarded.charge(creds.uid, len(post))  # admitted by forward(): it counts from now
        if len(run.posts) >= RUN_MAX or run.size >= RUN_BYTES:
            self.close_run()

    def close_run(self) -> None:
        run, self._run = self._run, None
        if run is None:
            return
        creds = run.creds
        forward = Forward(run.conn.id, 0, Op.SAY, creds.uid, creds.gid, creds.pid, b"".join(run.posts))
        body = forward.encode()
        try:
            self.worker.channel.post(ChannelOp.FORWARD, body)
        except ChannelClosed:
            self.forwarded.budget.release(creds.uid, run.size)
            state = run.conn.chat
            for post in Post.decode_run(forward.body):
                run.conn.send_error(
                    post.request_id, ErrorCode.UNAVAILABLE, "this worker is being replaced; retry"
                )
                if state is not None and state.in_flight:
                    state.in_flight -= 1
            return
        self._charge_posted(creds.uid, len(body), run.size)

    def _retry_grouped(self, conn: Connection, frame: Frame) -> None:
        self.forward(conn, frame, with_groups=True)

    def _schedule(self, share: Share[Connection]) -> None:
        """Wake the share's holders once it has a token again (in a batch)."""
        if share.scheduled:
            return
        share.scheduled = True
        delay = max(share.bucket.delay(time.monotonic()), MIN_HOLD)
        self.worker.loop.call_later(delay, lambda: self._wake(share))

    def _wake(self, share: Share[Connection]) -> None:
        """Release held connections in turn, one token each: a released
        connection goes on with what it had read and, if it runs out of
        tokens again, queues behind the others."""
        share.scheduled = False
        now = time.monotonic()
        waiting = share.waiting
        while waiting:
            conn = waiting[0]
            state = conn.chat
            if conn.closed or state is None:
                waiting.popleft()  # it closed while held: nothing to post
                continue
            if not share.bucket.take(now):
                break
            waiting.popleft()
            state.waiting = False
            state.granted = True
            conn.release()
        if waiting:
            self._schedule(share)

    def throttle(self, uid: int, seconds: float) -> None:
        """The hub says ``uid`` posted past its daemon-wide share: no token
        for it here for ``seconds``. Holders already waiting stay queued: a
        wake-up due sooner finds no token and schedules the next one."""
        now = self.worker.now
        share = self.shares.get(uid, now)
        share.bucket.withhold(seconds, now)

    def forward_datagram(self, frame: Frame, creds: Credentials | None, address: str | bytes | None) -> None:
        """A datagram SAY: posted as its sender's uid, answered at its address."""
        if creds is None:
            return  # SO_PASSCRED is set on the socket: the kernel always attaches them
        addr = os.fsencode(address) if address else None
        try:
            body = self._checked_say(frame.request_id, frame.body)
        except RemoteProtocolError as exc:
            if addr:
                error = encode_frame(Op.ERROR, frame.request_id, encode_error(exc.code, exc.message))
                self.worker.reply_datagram(addr, error)
            return
        forwarded = self.forwarded
        forwarded.advance(self.worker.channel.written)
        if not forwarded.admits(creds.uid):
            if addr:  # a datagram cannot be held: say why it was not posted
                refusal = forwarded.budget.refusal(creds.uid, FORWARD_ADVICE)
                error = encode_frame(
                    Op.ERROR, frame.request_id, encode_error(ErrorCode.RATE_LIMITED, refusal)
                )
                self.worker.reply_datagram(addr, error)
            return
        if not self.shares.get(creds.uid, self.worker.now).take(self.worker.now):
            if addr:
                limit = self.worker.settings.rate_limit
                error = encode_frame(
                    Op.ERROR,
                    frame.request_id,
                    encode_error(ErrorCode.RATE_LIMITED, f"more than {limit:g} posts/s from uid {creds.uid}"),
                )
                self.worker.reply_datagram(addr, error)
            return
        forward = Forward(0, frame.request_id, frame.op, creds.uid, creds.gid, creds.pid, body, dgram=addr)
        encoded = forward.encode()
        if self._post(ChannelOp.FORWARD, encoded, None, frame.request_id):
            self._charge_posted(creds.uid, len(encoded))

    def _post(
        self, op: ChannelOp, body: bytes, conn: Connection | None, request_id: int, fds: tuple[int, ...] = ()
    ) -> bool:
        self.close_run()  # what came before goes first
        try:
            self.worker.channel.post(op, body, fds=fds)  # ours are closed once sent
        except ChannelClosed:
            if conn is not None:
                conn.send_error(request_id, ErrorCode.UNAVAILABLE, "this worker is being replaced; retry")
            return False
        return True

    # -- answers from the hub ----------------------------------------------

    def on_reply(self, body: bytes, fds: tuple[int, ...] = ()) -> None:
        answer = Answer.decode(body)
        frame = answer.frame
        if answer.dgram:
            fdpass.close_fds(fds)
            self.worker.reply_datagram(answer.dgram, frame)
            return
        conn = self.worker.connections.get(answer.conn)
        if conn is None:
            fdpass.close_fds(fds)
            return  # it closed meanwhile; the master hears GONE
        if answer.joined is not None:
            self._index(conn, answer.joined, True)
        if answer.parted is not None:
            self._index(conn, answer.parted, False)
        conn.send_frame(frame, fds)  # the connection closes the fds once they are sent
        state = conn.chat
        if state is not None and state.in_flight:
            state.in_flight = max(0, state.in_flight - answer.replies)  # SAY replies come joined
            if answer.handout and state.fd_requests:
                state.fd_requests -= 1
            if conn.held and not state.waiting and self._may_resume(conn, state):
                conn.release()

    def fds_sent(self, conn: Connection) -> None:
        """The kernel took fds queued for ``conn``: a GET or TAKE held for
        the fd budget may go now."""
        state = conn.chat
        if state is not None and state.fd_wait and not state.waiting and self._may_resume(conn, state):
            conn.release()

    def _may_resume(self, conn: Connection, state: ChatState) -> bool:
        if state.forward_wait:
            return False  # its uid's forward budget releases it (wake_forwarders)
        if state.fd_wait:
            return self.fd_budget.resumes(conn.out_fds, state.fd_requests)
        return state.in_flight <= RESUME_IN_FLIGHT

    def on_deliver(self, body: bytes) -> None:
        delivery = Deliver.decode(body)
        frames = delivery.frames
        targets: Iterable[Connection]
        if delivery.room is not None:
            targets = self.rooms.get(delivery.room, ())
        else:
            connections = self.worker.connections
            targets = [c for c in (connections.get(i) for i in delivery.conns) if c is not None]
        for conn in list(targets):
            conn.send_now(frames)  # the same bytes object for every member

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
        for room in state.rooms:
            members = self.rooms.get(room)
            if members is not None:
                members.discard(conn)
                if not members:
                    del self.rooms[room]
        self.close_run()  # its last SAYs go before it is gone
        try:
            self.worker.channel.post(ChannelOp.GONE, Gone(conn.id).encode())
        except ChannelClosed:
            pass


def _forward(worker: Worker, conn: Connection, frame: Frame) -> None:
    worker.chat.forward(conn, frame)


STREAM: dict[int, StreamHandler] = dict.fromkeys(CHAT_OPS, _forward)
