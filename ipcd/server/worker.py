"""A worker process: serves the connections the master passes it.

Theory of operation: a worker never accepts. Its channel to the master
brings each accepted connection as an ``SCM_RIGHTS`` fd (op CONN); the
worker wraps it, registers it with its own epoll loop and serves it until
either side closes. It also reads the shared datagram socket. After each
loop iteration in which its connection count changed it reports its load,
which is how the master picks the least-loaded worker. EOF on the channel
means the master is gone: the worker exits rather than serve orphaned.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import selectors
import signal
import socket
from collections import Counter
from collections.abc import Callable

from ipcd import fdpass
from ipcd.handoff.replica import WorkerReplica
from ipcd.link.ops import ChannelOp
from ipcd.link.records import LinkError, Replica, Throttle, Unreplica
from ipcd.protocol import (
    ErrorCode,
    Frame,
    Op,
    RemoteProtocolError,
    decode_json,
    encode_frame,
    encode_json,
    op_name,
)
from ipcd.server.channel import Channel, ChannelClosed
from ipcd.server.connection import Connection
from ipcd.server.dgram import DatagramEndpoint
from ipcd.server.loop import EventLoop
from ipcd.server.signals import SignalDispatcher
from ipcd.server.uidbudgets import partial_budget
from ipcd.services import StreamHandler, stream_handlers
from ipcd.services.chat import ChatRouter
from ipcd.settings import READ_BUFFER_SIZE, Settings

log = logging.getLogger("ipcd.worker")

_SWEEP_INTERVAL = 1.0
# A reload's notice to the connections of an old worker: the daemon goes on;
# only this connection's worker is going. Code SHUTTING_DOWN, id 0.
RETIRING = "ipcd reloaded and this connection's worker is retiring{}; reconnect to reach the new workers"
_REPORT_INTERVAL = 1.0
# Connection counts change on every open and close; reporting each change
# cost every short connection two LOAD records. The master counts what it
# passed itself, so closes may reach it this much later.
_LOAD_COALESCE = 0.02
FDS_ALLOWED = frozenset((Op.PUT,))  # ops whose frames may carry fds
NEVER_ANSWERED = frozenset((Op.PONG,))


@dataclasses.dataclass
class WorkerStats:
    received: int = 0  # connections received from the master as passed fds
    closed: int = 0
    frames: int = 0
    protocol_errors: int = 0
    cut_off: int = 0
    held: int = 0  # times a connection was held by the chat flood limits (not read until released)
    datagrams: int = 0


StatusCallback = Callable[[dict[str, object]], None]


class Worker:
    def __init__(
        self, settings: Settings, channel: Channel, dgram: socket.socket | None, generation: int
    ) -> None:
        self.settings = settings
        self.channel = channel
        self.dgram = dgram
        self.generation = generation
        self.loop = EventLoop()
        self.connections: dict[int, Connection] = {}
        self.stalled: set[Connection] = set()
        self.to_flush: set[Connection] = set()  # got output this iteration
        self.stats = WorkerStats()
        self.read_buffer = bytearray(READ_BUFFER_SIZE)
        self.read_view = memoryview(self.read_buffer)
        self.read_buffers = [self.read_buffer]  # recvmsg_into's argument, made once
        self.pause_threshold = settings.pause_threshold
        self.max_frame_size = settings.max_frame_size
        self.cmsg_space = fdpass.cmsg_space_for(settings.max_fds)
        self.handlers: dict[int, StreamHandler] = stream_handlers()
        self.draining = False
        self._exit_code: int | None = None
        self._ids = itertools.count(1)
        self._load_dirty = True
        self._load_timer = False
        self._last_report = 0.0
        self._reported: tuple[int, int, dict[int, int], dict[int, int]] = (0, 0, {}, {})
        self.partial = partial_budget(settings)  # bytes of partly received frames per uid (uidbudgets)
        self._closed_uids: Counter[int] = Counter()  # closes not yet reported: the master counts per uid
        self._status_waiters: dict[int, tuple[int, int]] = {}  # token -> (conn id, request id)
        self._dgram_endpoint: DatagramEndpoint | None = None
        self.chat = ChatRouter(self)
        self.replica = WorkerReplica()  # stored entries' copies, to answer GETs from (ipcd.handoff.replica)

    @property
    def now(self) -> float:
        return self.loop.now

    # -- life cycle --------------------------------------------------------

    def run(self) -> int:
        signals = SignalDispatcher(self.loop)
        signals.on(signal.SIGTERM, lambda _sig: self.stop("terminated"))
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the group; the master decides
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        self.loop.add_reader(self.channel, self._on_channel)
        self._channel_events = selectors.EVENT_READ
        if self.dgram is not None:
            self._dgram_endpoint = DatagramEndpoint(self, self.dgram)
            self.loop.add_reader(self.dgram, self._dgram_endpoint.on_readable)
        if self.settings.send_timeout or self.settings.idle_timeout:
            self.loop.call_later(_SWEEP_INTERVAL, self._sweep)
        self.channel.send(ChannelOp.READY)
        log.debug("worker %d ready (generation %d)", os.getpid(), self.generation)
        while self._exit_code is None:
            self.loop.run_once()
            if self.to_flush:
                self._flush_all()
            if self._exit_code is None and self._load_due():
                self._report_load()
            self.chat.close_run()  # the pass's SAYs of one connection, as one record
            if self.channel.has_pending:
                self._flush_channel()
            while self.chat.wake_forwarders():  # the writes made room: what they read goes now
                self.chat.close_run()
                if self.channel.has_pending:
                    self._flush_channel()
        try:
            self.chat.close_run()
            self.channel.flush()  # last words: GONE for the connections closed on the way out
        except (ChannelClosed, OSError):
            pass
        signals.close()
        return self._exit_code

    def _flush_all(self) -> None:
        pending, self.to_flush = self.to_flush, set()
        for conn in pending:
            if conn.has_output:
                conn.flush()

    def stop(self, reason: str) -> None:
        """Close every connection (telling each why) and exit."""
        self._close_all(f"ipcd is stopping ({reason})")

    def _close_all(self, notice: str) -> None:
        for conn in list(self.connections.values()):
            conn.send_error(0, ErrorCode.SHUTTING_DOWN, notice)
            conn.flush()
            conn.close(None)
        self._exit_code = 0

    def drain(self, timeout: float) -> None:
        """Old generation after a reload: no new work; exit when idle.

        Connections in flight are served to the end. Idle chat listeners
        would never end on their own, so they are told at once to
        reconnect (to the new generation) instead of at the drain timeout;
        every other connection is left alone until then."""
        self.draining = True
        if self.dgram is not None:
            self.loop.remove(self.dgram)
        self.loop.call_later(
            timeout, lambda: self._close_all(RETIRING.format(" (drain timeout after reload)"))
        )
        self._retire_idle_listeners()
        if not self.connections:
            self._exit_code = 0

    def _retire_idle_listeners(self) -> None:
        """Send idle room members away (checked again each second of the drain)."""
        for conn in [c for c in self.connections.values() if self._idle_listener(c)]:
            conn.send_error(0, ErrorCode.SHUTTING_DOWN, RETIRING.format(""))
            conn.close_after_flush()
        if self._exit_code is None and self.connections:
            self.loop.call_later(_SWEEP_INTERVAL, self._retire_idle_listeners)

    def _idle_listener(self, conn: Connection) -> bool:
        """In a room, and nothing of its own on the way in either direction:
        no request unanswered or half-read, no byte unread, no output queued."""
        state = conn.chat
        if conn.closing or conn.held or state is None or not state.rooms or conn.has_output:
            return False
        if state.in_flight or any(c == conn.id for c, _ in self._status_waiters.values()):
            return False
        if conn.decoder is not None and not conn.decoder.idle:
            return False
        try:
            conn.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True  # nothing sent to us that we have not read
        except OSError:
            return False  # broken: its own read will find out and close it
        return False  # a request has arrived (or end of file): let it be served first

    # -- channel -----------------------------------------------------------

    def _flush_channel(self) -> None:
        """Records the master had no room for: send them when it does."""
        try:
            self.channel.flush()
            self.channel.flush_backlog()
        except ChannelClosed:
            self.stop("master went away")
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.channel.has_backlog else 0)
        if events != self._channel_events:
            self._channel_events = events
            self.loop.set_events(self.channel, events, self._on_channel)

    def _on_channel(self, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._flush_channel()
        self.channel.drain(self._on_record, self._master_gone, self._bad_record)

    def _master_gone(self) -> None:
        log.warning("worker %d: master went away; exiting", os.getpid())
        self.stop("master went away")

    def _bad_record(self, why: str) -> None:
        log.error("worker %d: bad record from master: %s", os.getpid(), why)

    def _on_record(self, record: Frame) -> None:
        op = record.op
        if op == ChannelOp.CONN:
            if len(record.fds) != 1:
                fdpass.close_fds(record.fds)
                return
            self.adopt(record.fds[0], record.body)
        elif op == ChannelOp.DELIVER:
            self.chat.on_deliver(record.body)
        elif op == ChannelOp.ANSWER:
            self.chat.on_reply(record.body, record.fds)
        elif op == ChannelOp.REPLICA:
            try:
                copy = Replica.decode(record.body)
            except LinkError as exc:
                fdpass.close_fds(record.fds)
                log.error("worker %d: bad REPLICA from master: %s", os.getpid(), exc)
                return
            self.replica.install(copy, record.fds)
        elif op == ChannelOp.UNREPLICA:
            self.replica.drop(Unreplica.decode(record.body).name)
            self._send_to_master(ChannelOp.UNREPLICATED, record.body)  # closed: the master may answer
        elif op == ChannelOp.THROTTLE:
            try:
                throttle = Throttle.decode(record.body)
            except LinkError as exc:
                log.error("worker %d: bad THROTTLE from master: %s", os.getpid(), exc)
                return
            self.chat.throttle(throttle.uid, throttle.seconds)
        elif op == ChannelOp.HEARTBEAT:
            self._send_to_master(ChannelOp.HEARTBEAT_ACK)
        elif op == ChannelOp.STATUS_RESULT:
            self._deliver_status(record.request_id, record.body)
        elif op == ChannelOp.DRAIN:
            self.drain(float(record.body.decode() or self.settings.drain_timeout))
        elif op == ChannelOp.STOP:
            self.stop("stopped by the master")
        else:
            fdpass.close_fds(record.fds)
            log.error("worker %d: unknown channel op %s", os.getpid(), op_name(op))

    def _send_to_master(self, op: ChannelOp, body: bytes = b"", request_id: int = 0) -> bool:
        try:
            self.channel.post(op, body, request_id=request_id)
        except ChannelClosed as exc:
            log.warning("worker %d: cannot reach the master (%s)", os.getpid(), exc)
            return False
        return True

    def _load_due(self) -> bool:
        """A changed connection count goes out within _LOAD_COALESCE (a
        timer wakes the loop for it); other counters once a second."""
        if not self._load_dirty:
            return self._report_due()
        wait = self._last_report + _LOAD_COALESCE - self.loop.now
        if wait <= 0:
            return True
        if not self._load_timer:
            self._load_timer = True
            self.loop.call_later(wait, self._load_timer_fired)
        return False

    def _load_timer_fired(self) -> None:
        # Report from here: timers run before the loop waits, so leaving it
        # to the end of the pass could hold the report until the next event.
        self._load_timer = False
        if self._exit_code is None and self._load_dirty:
            self._report_load()
            if self.channel.has_pending:
                self._flush_channel()

    def _report_due(self) -> bool:
        if self.loop.now - self._last_report < _REPORT_INTERVAL:
            return False
        reported = (self.stats.frames, self.stats.datagrams, self.partial.held, self._forwarding())
        return reported != self._reported

    def _forwarding(self) -> dict[int, int]:
        """Bytes per uid of requests waiting for the master, for LOAD: none
        unless the channel has a backlog (a batch about to go at the end of
        this pass is not waiting, and no report would follow to say so)."""
        if not self.channel.has_backlog:
            return {}
        forwarded = self.chat.forwarded
        forwarded.advance(self.channel.written)
        return dict(forwarded.budget.held)

    def _report_load(self) -> None:
        """Connection counts at once (routing needs them); other counters at
        most once a second (status readers do not need them fresher)."""
        load: dict[str, object] = {"connections": len(self.connections), **dataclasses.asdict(self.stats)}
        if self._closed_uids:
            load["closed_uids"] = {str(uid): n for uid, n in self._closed_uids.items()}
        if self.partial.held or self._reported[2]:
            load["partial"] = {str(uid): n for uid, n in self.partial.held.items()}
        forwarding = self._forwarding()
        if forwarding or self._reported[3]:
            load["forwarding"] = {str(uid): n for uid, n in forwarding.items()}
        if self._send_to_master(ChannelOp.LOAD, encode_json(load)):
            self._load_dirty = False
            self._last_report = self.loop.now
            self._reported = (
                self.stats.frames,
                self.stats.datagrams,
                dict(self.partial.held),
                dict(forwarding),
            )
            self._closed_uids.clear()

    # -- connections -------------------------------------------------------

    def adopt(self, fd: int, creds: bytes = b"") -> None:
        """Serve ``fd``; ``creds``: its peer's raw SO_PEERCRED as the master read it."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, fd)
        sock.setblocking(False)
        conn = Connection(self, sock, next(self._ids))
        if creds:
            conn.passed_creds(fdpass.parse_credentials(creds))
        self.connections[conn.id] = conn
        self.stats.received += 1
        self._load_dirty = True
        self.loop.add_reader(sock, conn.on_event)
        # A client writes its first request right after connect, and the
        # master's accept and pass take longer than that: the request is
        # nearly always queued already. Reading now saves the wake-up epoll
        # would cost for it (an EAGAIN if it is not there yet).
        conn.on_event(selectors.EVENT_READ)

    def connection_closed(self, conn: Connection, reason: str | None) -> None:
        self.connections.pop(conn.id, None)
        self.chat.connection_closed(conn)
        if conn.counted_uid is not None:
            self._closed_uids[conn.counted_uid] += 1
        self.stats.closed += 1
        self._load_dirty = True
        if self.draining and not self.connections:
            self._exit_code = 0

    def dispatch(self, conn: Connection, frame: Frame) -> None:
        self.stats.frames += 1
        handler = self.handlers.get(frame.op)
        if handler is None:
            fdpass.close_fds(frame.fds)
            conn.send_error(frame.request_id, ErrorCode.UNKNOWN_OP, f"unknown operation {op_name(frame.op)}")
            return
        if frame.fds and frame.op not in FDS_ALLOWED:
            # The one place this is decided: only PUT brings fds in. A frame
            # that is never answered (PONG) just has its stray fds closed.
            fdpass.close_fds(frame.fds)
            if frame.op not in NEVER_ANSWERED:
                conn.send_error(
                    frame.request_id,
                    ErrorCode.FDS_NOT_EXPECTED,
                    f"{op_name(frame.op)} takes no fds; the {len(frame.fds)} attached were closed",
                )
            return
        handler(self, conn, frame)

    def _sweep(self) -> None:
        now = self.now
        send_timeout = self.settings.send_timeout
        if send_timeout:
            for conn in [c for c in self.stalled if now - c.last_progress > send_timeout]:
                conn.cut_off(
                    ErrorCode.SLOW_CONSUMER,
                    f"no output could be sent for {send_timeout:g}s: the client is not reading",
                )
        idle_timeout = self.settings.idle_timeout
        if idle_timeout:
            for conn in [c for c in self.connections.values() if now - c.last_read > idle_timeout]:
                if not conn.closing:
                    conn.send_error(0, ErrorCode.IDLE_TIMEOUT, f"idle for {idle_timeout:g}s; closing")
                    conn.close_after_flush()
        self.loop.call_later(_SWEEP_INTERVAL, self._sweep)

    def reply_datagram(self, address: bytes, frame: bytes) -> None:
        if self._dgram_endpoint is not None:
            self._dgram_endpoint.send(address, frame)

    # -- status ------------------------------------------------------------

    def query_status(self, conn: Connection, request_id: int) -> bool:
        """Ask the master for STATUS on behalf of ``conn``; False if it could not be asked."""
        token = next(self._ids)
        self._status_waiters[token] = (conn.id, request_id)
        if not self._send_to_master(ChannelOp.STATUS_QUERY, request_id=token):
            del self._status_waiters[token]
            conn.send_error(request_id, ErrorCode.INTERNAL, "the master did not take the status query")
            return False
        return True

    def _deliver_status(self, token: int, body: bytes) -> None:
        waiter = self._status_waiters.pop(token, None)
        if waiter is None:
            return
        conn = self.connections.get(waiter[0])
        if conn is None:
            return
        try:
            status = decode_json(body)
        except RemoteProtocolError:
            conn.send_error(waiter[1], ErrorCode.INTERNAL, "malformed status from the master")
            return
        status["served_by"] = os.getpid()
        conn.send_frame(encode_frame(Op.STATUS_REPLY, waiter[1], encode_json(status)))
