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

import enum
import socket
from collections.abc import Sequence

from ipcd import fdpass
from ipcd.protocol import ErrorCode, Frame, RemoteProtocolError, decode_record, encode_frame

# Large enough for any internal record (status documents included).
RECORD_MAX = 256 * 1024


class ChannelOp(enum.IntEnum):
    # master -> worker
    CONN = 0x20  # one accepted stream connection, as the record's fd
    DRAIN = 0x21  # finish current connections, take no new ones, then exit
    STOP = 0x22  # close everything now and exit
    HEARTBEAT = 0x23
    STATUS_RESULT = 0x24  # request id = the worker's token
    # worker -> master
    READY = 0x30  # booted; may be sent connections
    LOAD = 0x31  # JSON counters: connections, received, ...
    HEARTBEAT_ACK = 0x32
    STATUS_QUERY = 0x33  # request id = token to answer with


class ChannelClosed(Exception):
    """The other end of the channel is gone (EOF or a reset)."""


class Channel:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buffer: bytearray | None = None  # allocated on the first recv

    @classmethod
    def pair(cls) -> tuple[Channel, Channel]:
        master_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        master_end.setblocking(False)
        worker_end.setblocking(False)
        return cls(master_end), cls(worker_end)

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, op: ChannelOp, body: bytes = b"", fds: Sequence[int] = (), request_id: int = 0) -> None:
        """Send one record. Raises ``BlockingIOError`` when the peer's queue
        is full and :class:`ChannelClosed` when the peer is gone."""
        record = encode_frame(op, request_id, body, nfds=len(fds))
        try:
            fdpass.send_with_fds(self.sock, [record], fds)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise ChannelClosed(str(exc)) from exc

    def recv(self) -> Frame:
        """Receive one record (fds close-on-exec). Raises ``BlockingIOError``
        when nothing is queued and :class:`ChannelClosed` on EOF."""
        if self._buffer is None:
            self._buffer = bytearray(RECORD_MAX)
        try:
            got = fdpass.recv_into_with_fds(self.sock, self._buffer, maxfds=4)
        except ConnectionResetError as exc:
            raise ChannelClosed(str(exc)) from exc
        if not got.nbytes and not got.fds:
            raise ChannelClosed("end of file")
        try:
            if got.data_truncated:
                raise RemoteProtocolError(
                    "channel record larger than its buffer", ErrorCode.TOO_LARGE, fatal=True, fds=got.fds
                )
            return decode_record(bytes(self._buffer[: got.nbytes]), got.fds, max_frame_size=RECORD_MAX)
        except RemoteProtocolError as exc:
            fdpass.close_fds(exc.fds)
            raise

    def close(self) -> None:
        self.sock.close()
