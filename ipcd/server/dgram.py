"""The datagram socket, read by every worker.

Theory of operation: one datagram is one frame. The socket was bound by the
master before forking, so every worker holds it; whichever worker's epoll
wakes first reads the datagram, the others get EAGAIN. The kernel attaches
the sender's pid/uid/gid (``SO_PASSCRED``) to each datagram, which is how a
datagram's sender is known. Replies go to the sender's own address, so a
client must bind one (autobind is fine); a full receive queue at the client
drops the reply, as datagrams do, and the drop is counted.
"""

from __future__ import annotations

import logging
import socket
from typing import TYPE_CHECKING

from ipcd import fdpass
from ipcd.protocol import (
    ErrorCode,
    Op,
    RemoteProtocolError,
    decode_record,
    encode_error,
    encode_frame,
    op_name,
)
from ipcd.protocol.frames import HEADER, HEADER_SIZE
from ipcd.services import datagram_handlers

if TYPE_CHECKING:
    from ipcd.server.worker import Worker

log = logging.getLogger("ipcd.worker")

_BATCH = 32  # datagrams read per readiness event before yielding to others


def _request_id(data: memoryview, nbytes: int) -> int:
    """The request id in a datagram's header, to address an error about it."""
    return int(HEADER.unpack_from(data)[6]) if nbytes >= HEADER_SIZE else 0


class DatagramEndpoint:
    def __init__(self, worker: Worker, sock: socket.socket) -> None:
        self.worker = worker
        self.sock = sock
        self.handlers = datagram_handlers()
        self.dropped_replies = 0

    def on_readable(self, mask: int) -> None:
        worker = self.worker
        for _ in range(_BATCH):
            try:
                got = fdpass.recv_into_with_fds(self.sock, worker.read_buffer, worker.settings.max_fds)
            except BlockingIOError:
                return
            except OSError as exc:
                log.warning("datagram socket read failed: %s", exc.strerror)
                return
            worker.stats.datagrams += 1
            if got.data_truncated:
                fdpass.close_fds(got.fds)
                self._reply_error(got.address, 0, ErrorCode.TOO_LARGE, "datagram larger than the read buffer")
                continue
            if got.truncated:  # over --max-fds: the kernel dropped some, fdpass closed the rest
                self._reply_error(
                    got.address,
                    _request_id(worker.read_view, got.nbytes),
                    ErrorCode.FDS_TRUNCATED,
                    f"datagram carried more than {worker.settings.max_fds} fds; they were all closed",
                )
                continue
            try:
                frame = decode_record(
                    bytes(worker.read_view[: got.nbytes]), got.fds, worker.settings.max_frame_size
                )
            except RemoteProtocolError as exc:
                fdpass.close_fds(exc.fds)
                self._reply_error(got.address, exc.request_id, exc.code, exc.message)
                continue
            if frame.fds:
                fdpass.close_fds(frame.fds)
                self._reply_error(
                    got.address, frame.request_id, ErrorCode.FDS_NOT_EXPECTED, "datagrams cannot carry fds"
                )
                continue
            if frame.op == Op.SAY:  # posted as the sender's uid; the hub answers
                worker.chat.forward_datagram(frame, got.creds, got.address)
                continue
            handler = self.handlers.get(frame.op)
            if handler is None:
                self._reply_error(
                    got.address,
                    frame.request_id,
                    ErrorCode.UNKNOWN_OP,
                    f"operation {op_name(frame.op)} is not served over datagrams",
                )
                continue
            reply = handler(frame, got.creds)
            if reply is not None:
                self.send(got.address, reply)

    def _reply_error(
        self, address: str | bytes | None, request_id: int, code: ErrorCode, message: str
    ) -> None:
        self.send(address, encode_frame(Op.ERROR, request_id, encode_error(code, message)))

    def send(self, address: str | bytes | None, data: bytes) -> None:
        if not address:
            self.dropped_replies += 1  # an unbound sender has no address to answer
            return
        try:
            self.sock.sendto(data, address)
        except (BlockingIOError, ConnectionRefusedError, FileNotFoundError, PermissionError):
            self.dropped_replies += 1
        except OSError as exc:
            log.info("datagram reply to %r failed: %s", address, exc.strerror)
            self.dropped_replies += 1
