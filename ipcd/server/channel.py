"""The master<->worker channel: one SOCK_SEQPACKET socketpair per worker.

Theory of operation: SEQPACKET keeps record boundaries and ties the fds of
a ``sendmsg`` to its record, so each record is exactly one frame of the
public codec (decoded with :func:`decode_record`) with internal op codes.
The channel is also each side's life-line: the master sees EOF when a worker
dies (before SIGCHLD is even reaped), and a worker sees EOF when the master
dies and exits instead of serving orphaned. Heartbeats over it let the master
spot a worker that is alive but stuck.
"""

from __future__ import annotations

import logging
import socket
from collections import deque
from collections.abc import Callable, Sequence

from ipcd import fdpass
from ipcd.link.framing import FRAGMENT, RECORD_MAX, Reassembler, batch_body, fragment, unbatch
from ipcd.link.ops import ChannelOp
from ipcd.protocol import HEADER_SIZE, ErrorCode, Frame, RemoteProtocolError, decode_record, encode_frame

# How messages become records (fragments, batches) is ipcd.link.framing.

log = logging.getLogger("ipcd")
_CMSG_SPACE = fdpass.cmsg_space_for(fdpass.MAX_FDS)
MASTER_BATCH_FDS = 16  # fds one batch from the master may carry (see Channel.batch_fds)


class _Posted:
    """A record waiting to be sent, with the fds it owns; ``mark``: the
    channel's ``queued`` offset written once it is (0: the record is not
    the last of its message)."""

    __slots__ = ("fds", "mark", "record")

    def __init__(self, record: bytes, fds: tuple[int, ...], mark: int = 0) -> None:
        self.record = record
        self.fds = fds
        self.mark = mark


class ChannelClosed(Exception):
    """The other end of the channel is gone (EOF or a reset)."""


class Channel:
    def __init__(self, sock: socket.socket, batch_fds: int = 0) -> None:
        self.sock = sock
        # fds that may wait in one batch (0: a message with fds goes at once).
        # The master's end batches answers with fds: they cost one record per
        # loop pass, like any others. The cap is below every channel fd budget
        # (ipcd.server.flow), and while a backlog exists nothing waits here,
        # so the budget still sees every fd the master holds for the worker.
        self.batch_fds = min(batch_fds, fdpass.MAX_FDS)
        self._buffer: bytearray | None = None  # allocated on the first recv
        self._backlog: deque[_Posted] | None = None  # records the peer had no room for yet
        self.backlog_bytes = 0
        self._reassembler = Reassembler()  # fragments of a message being received
        self._batch: list[bytes] = []  # posted, not yet flushed
        self._batch_bytes = 0
        self._batch_fd_list: list[int] = []  # the batched messages' fds, in order (owned)
        self._inbox: deque[Frame] = deque()  # unpacked from a received BATCH
        # Offsets in the stream of posted messages, for who must know when
        # theirs is written (ipcd.server.forwarded): bytes posted so far, up
        # to where records were formed, and up to where they were written.
        self.queued = 0
        self.sealed = 0
        self.written = 0

    @classmethod
    def pair(cls) -> tuple[Channel, Channel]:
        master_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        master_end.setblocking(False)
        worker_end.setblocking(False)
        return cls(master_end, batch_fds=MASTER_BATCH_FDS), cls(worker_end)

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, op: ChannelOp, body: bytes = b"", fds: Sequence[int] = (), request_id: int = 0) -> None:
        """Send one message now, behind everything posted before it.

        There is one ordered path: the batch posted so far goes first, then
        this message (fragmented if large), and if the peer's queue is full
        it waits in the backlog like any other record. Nothing overtakes a
        queued record or lands between the fragments of one. ``fds`` become
        the channel's, as with :meth:`post`. Raises :class:`ChannelClosed`."""
        self.flush()
        self.queued += HEADER_SIZE + len(body)
        self._send_message(op, body, request_id, fds)

    def post(self, op: ChannelOp, body: bytes = b"", request_id: int = 0, fds: Sequence[int] = ()) -> None:
        """Queue a message; :meth:`flush` sends what was queued, in order.

        Messages posted in one loop iteration travel as one BATCH record, so
        a burst of chat traffic or of pipelined GETs costs one send per
        worker, not one per message. A message with fds joins the batch on a
        channel made with ``batch_fds`` (up to that many fds, and not while
        a backlog waits); otherwise it flushes the batch and goes at once.
        Posted fds become the channel's: they are closed once sent, or when
        the peer is gone, so a record waiting in the backlog never refers to
        an fd number its poster might close and reuse. Raises
        :class:`ChannelClosed`."""
        batched = self._batch_fd_list
        if fds and (self._backlog or len(batched) + len(fds) > self.batch_fds or len(body) > FRAGMENT):
            self.send(op, body, fds, request_id)
            return
        record = encode_frame(op, request_id, body, nfds=len(fds))
        self._batch.append(record)
        self._batch_bytes += len(record)
        self.queued += len(record)
        if fds:
            batched.extend(fds)
        if self._batch_bytes >= FRAGMENT or len(batched) >= self.batch_fds > 0:
            self.flush()

    @property
    def has_pending(self) -> bool:
        return bool(self._batch) or bool(self._backlog)

    def flush(self) -> None:
        """Send the batched messages as one record (fragmented if large).
        A batch of one small message goes as that message's own record (it
        is one already): no BATCH wrapped around it, none to unpack."""
        batch = self._batch
        if not batch:
            return
        alone = len(batch) == 1 and self._batch_bytes <= FRAGMENT
        body = batch[0] if alone else batch_body(batch)
        fds = tuple(self._batch_fd_list)
        batch.clear()
        self._batch_fd_list.clear()
        self._batch_bytes = 0
        if alone:
            self.sealed = self.queued
            self._post_record(_Posted(body, fds, self.queued))
        else:
            self._send_message(ChannelOp.BATCH, body, 0, fds)

    def _send_message(self, op: ChannelOp, body: bytes, request_id: int, fds: Sequence[int]) -> None:
        """Post the records of one message; the last is marked with the
        ``queued`` offset it completes (everything posted so far)."""
        records = fragment(op, request_id, body, len(fds))
        last = len(records) - 1
        self.sealed = mark = self.queued
        for index, record in enumerate(records):
            self._post_record(_Posted(record, tuple(fds) if index == 0 else (), mark if index == last else 0))

    def _post_record(self, pending: _Posted) -> None:
        if self._backlog:
            self._backlog.append(pending)
            self.backlog_bytes += len(pending.record)
            return
        try:
            self._send_posted(pending)
        except BlockingIOError:
            self._backlog = deque([pending])
            self.backlog_bytes = len(pending.record)

    def _send_posted(self, pending: _Posted) -> None:
        try:
            fdpass.send_with_fds(self.sock, [pending.record], pending.fds)
        except BlockingIOError:
            raise
        except (BrokenPipeError, ConnectionResetError) as exc:
            fdpass.close_fds(pending.fds)
            raise ChannelClosed(str(exc)) from exc
        except OSError as exc:
            # Cannot happen with fragments and owned fds; if it does, lose this
            # record (its requester times out), never the process.
            log.error("dropping a channel record: %s", exc.strerror)
        fdpass.close_fds(pending.fds)  # the kernel holds its own references now
        if pending.mark:
            self.written = pending.mark

    @property
    def has_backlog(self) -> bool:
        return bool(self._backlog)

    @property
    def backlog_fds(self) -> int:
        """fds the queued records hold (flow control's fd budget)."""
        return sum(len(pending.fds) for pending in self._backlog) if self._backlog else 0

    @property
    def has_inbox(self) -> bool:
        """Messages already received (unpacked from a batch) that
        :meth:`recv` hands out before it reads the socket again."""
        return bool(self._inbox)

    def flush_backlog(self) -> None:
        """Send queued records while the peer takes them."""
        backlog = self._backlog
        while backlog:
            try:
                self._send_posted(backlog[0])
            except BlockingIOError:
                return
            except ChannelClosed:
                self.drop_backlog()
                raise
            self.backlog_bytes -= len(backlog.popleft().record)
        self._backlog = None

    def drop_backlog(self) -> None:
        """The peer is gone: close the fds queued records owned."""
        while self._backlog:
            fdpass.close_fds(self._backlog.popleft().fds)
        self._backlog = None
        self.backlog_bytes = 0
        self.written = self.sealed  # gone: nothing formed waits any more

    def drain(
        self,
        on_record: Callable[[Frame], None],
        on_closed: Callable[[], None],
        on_bad: Callable[[str], None],
        budget: int = 64,
    ) -> None:
        """Hand every received message to ``on_record``: up to ``budget``
        socket reads per wake-up (fairness), but always every message already
        unpacked from a batch (epoll would not wake us for those)."""
        while budget > 0 or self._inbox:
            budget -= 1
            try:
                record = self.recv()
            except BlockingIOError:
                return
            except (ChannelClosed, OSError):
                on_closed()
                return
            except RemoteProtocolError as exc:
                on_bad(exc.message)
                continue
            on_record(record)

    def recv(self) -> Frame:
        """Receive one whole message (fragments reassembled, batches unpacked;
        fds close-on-exec). Raises ``BlockingIOError`` when no whole message is
        queued yet and :class:`ChannelClosed` on EOF."""
        if self._inbox:
            return self._inbox.popleft()
        frame = self._recv_message()
        if frame.op != ChannelOp.BATCH:
            return frame
        try:
            self._inbox.extend(unbatch(frame.body, frame.fds))
        except RemoteProtocolError as exc:
            fdpass.close_fds(exc.fds)
            raise
        return self._inbox.popleft() if self._inbox else self.recv()

    def _recv_message(self) -> Frame:
        while True:
            record = self._recv_record()
            try:
                message, stray = self._reassembler.feed(record)
            except RemoteProtocolError as exc:
                fdpass.close_fds(exc.fds)
                raise
            fdpass.close_fds(stray)  # fds ride on the first fragment only
            if message is not None:
                return message

    def _recv_record(self) -> Frame:
        if self._buffer is None:
            self._buffer = bytearray(RECORD_MAX)
        try:
            got = fdpass.recv_into_with_fds(self.sock, self._buffer, fdpass.MAX_FDS, _CMSG_SPACE)
        except ConnectionResetError as exc:
            raise ChannelClosed(str(exc)) from exc
        if not got.nbytes and not got.fds:
            raise ChannelClosed("end of file")
        try:
            if got.data_truncated:
                raise RemoteProtocolError(
                    "channel record larger than its buffer", ErrorCode.TOO_LARGE, fatal=True, fds=got.fds
                )
            # A view, not a copy: decode_record copies the body out once.
            return decode_record(memoryview(self._buffer)[: got.nbytes], got.fds, max_frame_size=RECORD_MAX)
        except RemoteProtocolError as exc:
            fdpass.close_fds(exc.fds)
            raise

    def close(self) -> None:
        fdpass.close_fds(self._batch_fd_list)  # posted, never flushed
        self._batch.clear()
        self._batch_fd_list.clear()
        self.drop_backlog()
        self.sealed = self.written = self.queued  # the batch is dropped too
        fdpass.close_fds(self._reassembler.take_pending_fds())
        self.sock.close()
