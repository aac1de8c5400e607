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
import json
import socket
import struct
from collections import deque
from collections.abc import Sequence
from typing import Any

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
    ANSWER = 0x25  # meta {conn, join?, part?, dgram?} + the client-ready reply frame (+ its fds)
    CHAT_REPLY = 0x25
    DELIVER = 0x26  # meta {room} or {conns} + client-ready frames to copy to each
    # worker -> master
    READY = 0x30  # booted; may be sent connections
    LOAD = 0x31  # JSON counters: connections, received, ...
    HEARTBEAT_ACK = 0x32
    STATUS_QUERY = 0x33  # request id = token to answer with
    FORWARD = 0x34  # meta {conn, rid, op, uid, gid, pid, groups, dgram?} + the client's body (+ fds)
    CHAT_REQUEST = 0x34
    GONE = 0x35  # meta {conn}: a connection that used the master's services closed
    CHAT_GONE = 0x35


_META_LEN = struct.Struct("!I")


def pack_meta(meta: dict[str, Any], payload: bytes = b"") -> bytes:
    """A record body: u32 length, a JSON object, then opaque payload bytes."""
    head = json.dumps(meta, separators=(",", ":")).encode()
    return _META_LEN.pack(len(head)) + head + payload


def unpack_meta(body: bytes) -> tuple[dict[str, Any], bytes]:
    (size,) = _META_LEN.unpack_from(body)
    end = _META_LEN.size + size
    meta = json.loads(body[_META_LEN.size : end])
    if not isinstance(meta, dict):
        raise ValueError("channel meta is not a JSON object")
    return meta, body[end:]


class _Posted:
    __slots__ = ("close_fds", "fds", "record")

    def __init__(self, record: bytes, fds: tuple[int, ...], close_fds: bool) -> None:
        self.record = record
        self.fds = fds
        self.close_fds = close_fds


class ChannelClosed(Exception):
    """The other end of the channel is gone (EOF or a reset)."""


class Channel:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buffer: bytearray | None = None  # allocated on the first recv
        self._backlog: deque[_Posted] | None = None  # records the peer had no room for yet
        self.backlog_bytes = 0

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

    def post(
        self,
        op: ChannelOp,
        body: bytes = b"",
        request_id: int = 0,
        fds: Sequence[int] = (),
        close_fds: bool = False,
    ) -> None:
        """Send a record, or queue it if the peer's queue is full; posted
        records keep their order. With ``close_fds`` the fds are ours to give
        away and are closed once sent (or if the peer is gone). Raises
        :class:`ChannelClosed`."""
        record = encode_frame(op, request_id, body, nfds=len(fds))
        pending = _Posted(record, tuple(fds), close_fds)
        if self._backlog:
            self._backlog.append(pending)
            self.backlog_bytes += len(record)
            return
        try:
            self._send_posted(pending)
        except BlockingIOError:
            self._backlog = deque([pending])
            self.backlog_bytes = len(record)

    def _send_posted(self, pending: _Posted) -> None:
        try:
            fdpass.send_with_fds(self.sock, [pending.record], pending.fds)
        except (BrokenPipeError, ConnectionResetError) as exc:
            if pending.close_fds:
                fdpass.close_fds(pending.fds)
            raise ChannelClosed(str(exc)) from exc
        if pending.close_fds:
            fdpass.close_fds(pending.fds)

    @property
    def has_backlog(self) -> bool:
        return bool(self._backlog)

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
            pending = self._backlog.popleft()
            if pending.close_fds:
                fdpass.close_fds(pending.fds)
        self._backlog = None
        self.backlog_bytes = 0

    def recv(self) -> Frame:
        """Receive one record (fds close-on-exec). Raises ``BlockingIOError``
        when nothing is queued and :class:`ChannelClosed` on EOF."""
        if self._buffer is None:
            self._buffer = bytearray(RECORD_MAX)
        try:
            got = fdpass.recv_into_with_fds(self.sock, self._buffer, maxfds=fdpass.MAX_FDS)
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
        self.drop_backlog()
        self.sock.close()
