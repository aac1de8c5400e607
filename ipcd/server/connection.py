"""One client stream connection inside a worker.

Theory of operation
-------------------
An idle connection costs this object, its socket object and a selector
entry: the decoder is created on the first byte and its buffer is emptied
whenever it is fully consumed, the outbound queue exists only while output
is pending, and reads go into the worker's one shared buffer.

Reads: one ``recvmsg_into`` per readiness event (level-triggered epoll
brings us back; a busy client cannot starve the others), every whole frame
is dispatched, then all replies go out in one ``sendmsg`` (writev).

Reads pause (the selector stops watching for input, so the client's writes
back up in the kernel's socket buffer) while any of these holds: output is
backed up (below), a service *held* a frame it cannot take yet (the chat
flood limits: the frame and everything after it wait in order, the rest
still undecoded in the decoder's buffer, until the service releases it), or
the connection is closing. One method derives the selector interest from
that state, so the reasons cannot undo each other.

Writes are bounded. Replies to a client's own requests pause its reads when
its queue passes a quarter of ``max_outbuf`` (backpressure, as TCP does); a
frame the daemon pushes that would take the queue past ``max_outbuf`` cuts
the client off. Either way, a client whose pending output makes no progress
for ``send_timeout`` is cut off with a reason, logged and (best effort) sent
as an ERROR frame. An fd queued for sending belongs to the connection: it is
closed once the kernel has it, or when the connection dies. Queued fds are
counted (``out_fds``): the chat router holds a connection's next GET or TAKE
while they and its unanswered ones would pass its fd budget, and is told
when fds have gone out (ipcd.server.flow).
"""

from __future__ import annotations

import logging
import selectors
import socket
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from ipcd import fdpass
from ipcd.log import peer_fields
from ipcd.protocol import (
    HEADER_SIZE,
    NEED_DATA,
    ErrorCode,
    Frame,
    FrameDecoder,
    Op,
    RemoteProtocolError,
    encode_error,
    encode_frame,
)
from ipcd.protocol.fastpath import ECHO_PREFIX, reflect_plain_run
from ipcd.server.uidbudgets import PARTIAL_ADVICE

if TYPE_CHECKING:
    from ipcd.server.worker import Worker
    from ipcd.services.chat import ChatState

log = logging.getLogger("ipcd.worker")

_READ = selectors.EVENT_READ
_WRITE = selectors.EVENT_WRITE
_MAX_IOV = 64  # buffers per sendmsg; well under IOV_MAX

Retry = Callable[["Connection", Frame], None]  # how a service takes back a frame it held


class _Pending:
    """One queued frame; ``data`` shrinks as it is sent."""

    __slots__ = ("data", "fds")

    def __init__(self, data: bytes | bytearray | memoryview, fds: tuple[int, ...]) -> None:
        self.data = data
        self.fds = fds


class Connection:
    __slots__ = (
        "_creds",
        "_events",
        "_groups",
        "_head_started",
        "_held",
        "_out",
        "chat",
        "closed",
        "closing",
        "counted_uid",
        "decoder",
        "id",
        "last_progress",
        "last_read",
        "out_bytes",
        "out_fds",
        "partial",
        "sock",
        "worker",
    )

    def __init__(self, worker: Worker, sock: socket.socket, conn_id: int) -> None:
        self.worker = worker
        self.sock = sock
        self.id = conn_id
        self.decoder: FrameDecoder | None = None
        self._out: deque[_Pending] | None = None
        self._head_started = False  # the first queued frame is partly sent
        self.out_bytes = 0
        self.out_fds = 0  # fds in the outbound queue, not yet taken by the kernel
        self._creds: fdpass.Credentials | None = None
        self.counted_uid: int | None = None  # the uid the master charged this connection to
        self.partial = 0  # decoder bytes charged to the uid's partial-frame budget (uidbudgets)
        self._groups: tuple[int, ...] | None = None
        self.chat: ChatState | None = None  # created on the first chat operation
        self._events = _READ
        self._held: tuple[Frame, Retry] | None = None  # a frame a service could not take yet
        self.closed = False
        self.closing = False  # no more reads; close once the queue is empty
        self.last_read = worker.now
        self.last_progress = worker.now

    # -- identity ----------------------------------------------------------

    @property
    def creds(self) -> fdpass.Credentials:
        """The peer's pid/uid/gid from SO_PEERCRED, fetched on first use."""
        if self._creds is None:
            self._creds = fdpass.peer_credentials(self.sock)
        return self._creds

    def passed_creds(self, creds: fdpass.Credentials) -> None:
        """The credentials the master read at accept (and charged the uid's
        connection budget with): no getsockopt of our own."""
        self._creds = creds
        self.counted_uid = creds.uid

    @property
    def groups(self) -> tuple[int, ...]:
        """The peer's supplementary groups (SO_PEERGROUPS), fetched on first
        use: like SO_PEERCRED, the kernel records them at connect time, so
        one getsockopt serves every request of the connection."""
        if self._groups is None:
            self._groups = fdpass.peer_groups(self.sock)
        return self._groups

    def log_fields(self, operation: str) -> dict[str, object]:
        """Journal fields for a log line about this client (``extra=``)."""
        try:
            creds = self.creds
        except OSError:
            return {"OPERATION": operation}
        return peer_fields(creds.uid, creds.pid, operation)

    def describe(self) -> str:
        try:
            creds = self.creds
        except OSError:
            return f"connection {self.id}"
        return f"connection {self.id} (pid {creds.pid}, uid {creds.uid})"

    # -- events ------------------------------------------------------------

    def on_event(self, mask: int) -> None:
        if mask & _WRITE:
            self.flush()
        if mask & _READ and not self.closed:
            self._read()

    def _read(self) -> None:
        worker = self.worker
        try:
            nbytes, fds, truncated = fdpass.recv_stream_into(
                self.sock, worker.read_buffers, worker.settings.max_fds, worker.cmsg_space
            )
        except BlockingIOError:
            return
        except OSError as exc:
            self.close(f"read failed: {exc.strerror}")
            return
        if not nbytes and not fds:
            self._on_eof()
            return
        self.last_read = worker.loop.now
        start = 0
        decoder = self.decoder
        if not fds and not truncated and (decoder is None or decoder.idle):
            start = self._echo_fast_path(worker.read_buffer, nbytes)
            if start == nbytes:
                if self._out is not None or self.closed:
                    self._after_read()
                # else all answered and sent at once: the interest stands as it was
                return
        if decoder is None:
            decoder = self.decoder = FrameDecoder(worker.settings.max_frame_size)
        decoder.receive_data(worker.read_view[start:nbytes], fds, truncated)
        self._dispatch_decoded(decoder)
        unserved = decoder.buffered + self._held_bytes()
        if unserved != self.partial and not self.closed:
            self._charge_partial(unserved, check=True)

    def _held_bytes(self) -> int:
        """A held frame is received and not served, like the decoder's bytes:
        it counts against the same budget (one per connection otherwise
        escapes every bound: a uid's many connections, each holding one)."""
        held = self._held
        return 0 if held is None else HEADER_SIZE + len(held[0].body)

    def _charge_partial(self, buffered: int, check: bool = False) -> None:
        """Charge what the decoder buffers to the uid (see uidbudgets); a
        read that takes the uid past its budget cuts this connection off."""
        budget = self.worker.partial
        uid = self.creds.uid
        if buffered > self.partial:
            budget.charge(uid, buffered - self.partial)
        else:
            budget.release(uid, self.partial - buffered)
        self.partial = buffered
        if check and budget.held[uid] > budget.limit_for(uid):
            self.cut_off(ErrorCode.OVER_BUDGET, budget.refusal(uid, PARTIAL_ADVICE))

    def _dispatch_decoded(self, decoder: FrameDecoder) -> None:
        """Dispatch the whole frames buffered in ``decoder`` until none is
        left or a service holds one."""
        dispatch = self.worker.dispatch
        while self._held is None:
            try:
                event = decoder.next_event()
            except RemoteProtocolError as exc:
                fdpass.close_fds(exc.fds)
                self.worker.stats.protocol_errors += 1
                self.send_error(exc.request_id, exc.code, exc.message)
                if exc.fatal:
                    log.info(
                        "%s: protocol error, closing: %s",
                        self.describe(),
                        exc.message,
                        extra=self.log_fields("protocol-error"),
                    )
                    self.close_after_flush()
                    return
                continue
            if event is NEED_DATA:
                break
            dispatch(self, event)
            if self.closed or self.closing:
                return
        self._after_read()

    def _echo_fast_path(self, buf: bytearray, nbytes: int) -> int:
        """Answer a leading run of plain ECHO frames in one copy (see
        ipcd.protocol.fastpath); return how many bytes it consumed."""
        worker = self.worker
        reply, count = reflect_plain_run(buf, nbytes, ECHO_PREFIX, worker.max_frame_size)
        if not count:
            return 0
        worker.stats.frames += count
        self.send_now(reply)
        return nbytes if self.closed else len(reply)

    def _after_read(self) -> None:
        if self._out:
            self.flush()  # which updates the selector interest
        else:
            self._update_events()

    # -- holding -----------------------------------------------------------

    @property
    def held(self) -> bool:
        return self._held is not None

    def hold(self, frame: Frame, retry: Retry) -> None:
        """A service cannot take ``frame`` yet: keep it, dispatch nothing
        after it and stop reading until :meth:`release`, which hands it back
        through ``retry``. The connection owns the frame's fds meanwhile."""
        assert self._held is None, "a connection holds one frame at a time"
        self._held = (frame, retry)
        self.worker.stats.held += 1
        self._update_events()

    def release(self) -> None:
        """Give the held frame back to its service, then go on with the
        frames already received, then read again."""
        held, self._held = self._held, None
        if held is None or self.closed:
            return
        frame, retry = held
        if self.closing:
            fdpass.close_fds(frame.fds)  # closing for another reason: nothing more is served
            return
        retry(self, frame)
        if self.closed or self.closing:
            return
        if self.decoder is not None:
            self._dispatch_decoded(self.decoder)
            if self.decoder is not None:
                unserved = self.decoder.buffered + self._held_bytes()
                if unserved != self.partial:
                    self._charge_partial(unserved)
        else:
            self._after_read()

    def _on_eof(self) -> None:
        if self.decoder is not None and self.decoder.buffered:
            log.info("%s: peer closed mid-frame (%d bytes pending)", self.describe(), self.decoder.buffered)
        self.close_after_flush()

    # -- output ------------------------------------------------------------

    @property
    def has_output(self) -> bool:
        return self._out is not None and not self.closed

    def send_frame(self, data: bytes | bytearray, fds: tuple[int, ...] = ()) -> None:
        """Queue one encoded frame (and take ownership of ``fds``)."""
        if self.closed:
            fdpass.close_fds(fds)
            return
        out = self._out
        if out is None:
            out = self._out = deque()
            self.worker.to_flush.add(self)  # written at the end of this loop iteration
        out.append(_Pending(data, fds))
        self.out_bytes += len(data)
        self.out_fds += len(fds)
        if self.out_bytes > self.worker.settings.max_outbuf:
            # The bound is on what the daemon holds once the kernel took what it
            # can: a pass that brings more than the bound for a reader that
            # reads (joined deliveries) must not cut it off.
            self.flush()
            if self.closed or self.out_bytes <= self.worker.settings.max_outbuf:
                return
            self.cut_off(
                ErrorCode.SLOW_CONSUMER,
                f"outbound buffer passed {self.worker.settings.max_outbuf} bytes: the client is not reading",
            )

    def send_now(self, data: bytes | bytearray) -> None:
        """Frames written at once when nothing is queued (an echo run, a
        room delivery: the same bytes for every member), so they cost one
        send, not a queue entry and a flush at the end of the pass; what the
        socket does not take is queued as :meth:`send_frame` would."""
        if self._out is not None or self.closed:
            self.send_frame(data)
            return
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self.close(f"write failed: {exc.strerror}")
            return
        if sent:
            self.last_progress = self.worker.now
        if sent < len(data):
            self._head_started = sent > 0  # the queue starts mid-frame: a cut-off keeps it whole
            self.send_frame(bytes(data[sent:]) if sent else data)

    def send_error(self, request_id: int, code: ErrorCode, message: str) -> None:
        self.send_frame(encode_frame(Op.ERROR, request_id, encode_error(code, message)))

    def flush(self) -> None:
        """Write as much of the queue as the socket takes."""
        out = self._out
        sock = self.sock
        fds_before = self.out_fds
        while out:
            head = out[0]
            fds = head.fds
            buffers = [head.data]
            for index in range(1, min(len(out), _MAX_IOV)):
                entry = out[index]
                if entry.fds:
                    break  # fds must ride on the first byte of their own sendmsg
                buffers.append(entry.data)
            try:
                if fds:
                    sent = fdpass.send_with_fds(sock, buffers, fds)
                else:
                    sent = sock.sendmsg(buffers)
            except BlockingIOError:
                break
            except OSError as exc:
                self.close(f"write failed: {exc.strerror}")
                return
            if fds:
                fdpass.close_fds(fds)  # the kernel holds its own references now
                head.fds = ()
                self.out_fds -= len(fds)
            self.out_bytes -= sent
            self.last_progress = self.worker.now
            offered = sum(len(buffer) for buffer in buffers)
            remaining = sent
            while remaining:
                entry = out[0]
                size = len(entry.data)
                if remaining >= size:
                    out.popleft()
                    remaining -= size
                    self._head_started = False
                else:
                    entry.data = memoryview(entry.data)[remaining:]
                    self._head_started = True
                    remaining = 0
            if sent < offered:
                break  # the socket took less than offered: it is full
        self._after_flush(fds_before > self.out_fds)

    def _after_flush(self, fds_sent: bool = False) -> None:
        if self.closed:
            return
        if not self._out:
            self._out = None
            self.worker.stalled.discard(self)
            if self.closing:
                self.close(None)
                return
        else:
            self.worker.stalled.add(self)
        self._update_events()
        if fds_sent and self._held is not None:
            self.worker.chat.fds_sent(self)  # a GET held for the fd budget may go now

    def _update_events(self) -> None:
        """Write interest while output is pending; read interest unless
        output is backed up, a frame is held or the connection is closing."""
        if self.closed:
            return
        paused = self.closing or self._held is not None or self.out_bytes > self.worker.pause_threshold
        self._set_events((0 if paused else _READ) | (_WRITE if self._out else 0))

    def _set_events(self, events: int) -> None:
        if events != self._events:
            self._events = events
            self.worker.loop.set_events(self.sock, events, self.on_event)

    # -- closing -----------------------------------------------------------

    def close_after_flush(self) -> None:
        """Stop reading; close as soon as the queued output is sent."""
        self.closing = True
        if self._out:
            self.flush()
        else:
            self.close(None)

    def cut_off(self, code: ErrorCode, reason: str) -> None:
        """Drop what is queued, tell the client why (best effort), close."""
        log.warning("%s: cut off: %s", self.describe(), reason, extra=self.log_fields("cut-off"))
        self.worker.stats.cut_off += 1
        out = self._out
        if out:
            keep = 1 if self._head_started else 0
            while len(out) > keep:
                fdpass.close_fds(out.pop().fds)
            self.out_bytes = sum(len(entry.data) for entry in out)
            self.out_fds = sum(len(entry.fds) for entry in out)
        if not self._head_started:
            # Bypass send_frame: its limit check is what brought us here.
            frame = encode_frame(Op.ERROR, 0, encode_error(code, reason))
            if out is None:
                out = self._out = deque()
            out.append(_Pending(frame, ()))
            self.out_bytes += len(frame)
        self.closing = True
        self.flush()
        self.close(reason)

    def close(self, reason: str | None) -> None:
        if self.closed:
            return
        self.closed = True
        self.closing = True
        worker = self.worker
        worker.loop.remove(self.sock)
        if self._out:
            for entry in self._out:
                fdpass.close_fds(entry.fds)
            self._out = None
        self.out_fds = 0
        if self._held is not None:
            fdpass.close_fds(self._held[0].fds)
            self._held = None
        if self.decoder is not None:
            fdpass.close_fds(self.decoder.take_pending_fds())
            self.decoder = None
        if self.partial:
            worker.partial.release(self.creds.uid, self.partial)
            self.partial = 0
        self.sock.close()
        worker.stalled.discard(self)
        worker.connection_closed(self, reason)
