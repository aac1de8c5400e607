"""The master's side of its services: worker records in, records out.

Theory of operation: the chat hub and the fd store are pure logic; this
module feeds them what workers forward (by op) and delivers what they
return, each record to its worker's channel, in order, with its fds.
Channels are non-blocking: a worker whose queue is full gets records
queued in the master (write interest is watched until they drain). While
that backlog is over the channel's budget (bytes or fds, ipcd.server.flow)
the master reads no more of that worker's requests (:meth:`HubLink.admits`),
so replies to a worker's own requests never pile up here. A worker that
falls ``MAX_CHANNEL_BACKLOG`` behind anyway (deliveries caused by other
workers' requests) is killed, so its clients see a disconnect, never a
silent gap in a room's sequence.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from ipcd import fdpass
from ipcd.chat.hub import Hub
from ipcd.handoff.store import Store
from ipcd.link.outbox import FLUSH_BYTES, Outbox
from ipcd.link.records import HANDOUT_OPS, Answer, Forward, Gone, LinkError, Out, Post
from ipcd.protocol import ErrorCode, Op, encode_error, encode_frame
from ipcd.server.channel import ChannelClosed
from ipcd.server.flow import MAX_CHANNEL_BACKLOG, ChannelBudget
from ipcd.server.loop import EventLoop
from ipcd.server.pool import WorkerHandle, WorkerPool

log = logging.getLogger("ipcd.master")

_INTERNAL = "internal error in the daemon (logged); please report it"
STORE_OPS = frozenset((Op.PUT, Op.GET, Op.TAKE, Op.LS, Op.RM))


class HubLink:
    def __init__(
        self,
        hub: Hub,
        store: Store,
        loop: EventLoop,
        watch: Callable[[WorkerHandle], None],
        budget: ChannelBudget,
    ) -> None:
        self.hub = hub
        self.store = store
        self.loop = loop
        self.budget = budget
        self.pool: WorkerPool | None = None
        self.outbox = Outbox()  # what the services said this pass, routed by flush_all()
        self._watch = watch  # set the channel's interest from admits() and has_backlog
        # Called before any record is routed: the history journal's write, so
        # that no reply leaves before what it acknowledges is in the kernel's hands.
        self.before_route: Callable[[], None] | None = None

    def admits(self, handle: WorkerHandle) -> bool:
        """May the master read another record of this worker? Not while
        what it has queued for the worker is over the channel's budget:
        the worker's requests wait (in the worker) until it took that."""
        channel = handle.channel
        if not channel.has_backlog:
            return True
        return self.budget.admits(channel.backlog_bytes, channel.backlog_fds)

    def request(self, handle: WorkerHandle, body: bytes, fds: tuple[int, ...] = ()) -> None:
        """A forwarded request; ``fds`` came with it and are handed on or closed."""
        try:
            forward = Forward.decode(body)
        except LinkError as exc:
            fdpass.close_fds(fds)
            log.error("malformed request from worker %d: %s", handle.pid, exc)
            return
        sender = forward.sender(handle.pid)
        op, payload = forward.op, forward.body
        try:
            if op in STORE_OPS:
                for out in self.store.handle(sender, op, payload, fds):
                    self.outbox.add(out)
            else:
                fdpass.close_fds(fds)
                self.hub.handle(sender, op, payload, self.outbox)
        except Exception:
            # A bug must cost one request, never the master (and with it every
            # room and stored fd). The request's fds were the service's to close.
            log.exception("internal error serving op 0x%02x for uid %d", op, sender.uid)
            for request_id in self._request_ids(op, payload, sender.request_id):
                frame = encode_frame(Op.ERROR, request_id, encode_error(ErrorCode.INTERNAL, _INTERNAL))
                # handout frees the worker's fd reservation for a GET or TAKE
                self.outbox.answer(handle.pid, Answer.to(sender, frame, handout=op in HANDOUT_OPS))
        if self.outbox.fds or self.outbox.size > FLUSH_BYTES:
            # Sent now, so that admits() sees the channel's backlog (bytes and
            # dup'd fds) before the next request is read.
            self.route(self.outbox.take())

    @staticmethod
    def _request_ids(op: int, payload: bytes, request_id: int) -> list[int]:
        """The requests one forwarded record holds: a SAY's is a run of posts."""
        if op != Op.SAY:
            return [request_id]
        try:
            return [post.request_id for post in Post.decode_run(payload)]
        except LinkError:
            return [request_id]

    def connection_gone(self, handle: WorkerHandle, body: bytes) -> None:
        try:
            conn = Gone.decode(body).conn
        except LinkError as exc:
            log.error("malformed GONE from worker %d: %s", handle.pid, exc)
            return
        self.store.connection_gone((handle.pid, conn))
        self.hub.connection_gone((handle.pid, conn), self.outbox)

    def worker_gone(self, handle: WorkerHandle) -> None:
        self.store.worker_gone(handle.pid)
        self.hub.worker_gone(handle.pid, self.outbox)

    def tick(self, now: float) -> None:
        for out in self.store.tick(now):
            self.outbox.add(out)

    def route(self, outs: list[Out]) -> None:
        assert self.pool is not None
        if self.before_route is not None:
            self.before_route()
        for out in outs:
            handle = self.pool.workers.get(out.worker)
            if handle is None or not handle.channel_open:
                fdpass.close_fds(out.fds)
                continue
            try:
                handle.channel.post(out.op, out.body, fds=out.fds)
            except ChannelClosed:
                self.pool.channel_closed(handle)
                continue
            self._check_backlog(handle)

    def flush_all(self) -> None:
        """Send what this loop iteration gathered: one batch per worker."""
        assert self.pool is not None
        if self.outbox:
            self.route(self.outbox.take())
        for handle in list(self.pool.workers.values()):
            if not handle.channel_open or not handle.channel.has_pending:
                continue
            try:
                handle.channel.flush()
            except ChannelClosed:
                self.pool.channel_closed(handle)
                continue
            self._check_backlog(handle)

    def _check_backlog(self, handle: WorkerHandle) -> None:
        """Watch a backed-up channel for room (and stop reading the worker
        while it is over budget); kill a worker hopelessly behind."""
        assert self.pool is not None
        channel = handle.channel
        if channel.backlog_bytes > MAX_CHANNEL_BACKLOG:
            self.pool.kill(handle, f"fell {channel.backlog_bytes} bytes behind on deliveries")
            self.pool.channel_closed(handle)
        elif channel.has_backlog:
            self._watch(handle)

    def flush(self, handle: WorkerHandle) -> None:
        """The channel is writable: send the backlog. A worker that takes
        records is alive, even while the master is not reading it."""
        assert self.pool is not None
        before = handle.channel.backlog_bytes
        try:
            handle.channel.flush_backlog()
        except ChannelClosed:
            self.pool.channel_closed(handle)
            return
        if handle.channel.backlog_bytes < before:
            handle.last_heartbeat = time.monotonic()  # the clock of the heartbeat check
        self._watch(handle)
