"""The datagram client: one request a datagram, like logger(1) to syslog.

Usage::

    from ipcd.client import DatagramClient   # (re-exported there)

    with DatagramClient() as client:
        client.say("logs", "disk / is 91% full")

Theory of operation: a datagram socket has no ``SO_PEERCRED``, so the
daemon is known by the owner of ``dgram.sock`` (who bound it), checked
before sending; answers come to this socket's own autobound abstract
address, from nowhere else (the kernel lets only the socket a datagram
socket is connected to send to it). A datagram can be lost either way:
a request times out, and a ``SAY`` with a message id may be sent again.
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import time
from pathlib import Path

from ipcd import fdpass
from ipcd.clientbase import DEFAULT_TIMEOUT, RECV_SIZE, ClientBase
from ipcd.clienterrors import ClientError, ConnectionLost, RequestTimeout, ServerError, unreachable
from ipcd.paths import DGRAM_SOCKET
from ipcd.protocol import (
    Frame,
    Op,
    RemoteProtocolError,
    decode_error,
    decode_json,
    decode_record,
    encode_frame,
    encode_json,
)

__all__ = ["DatagramClient"]


class DatagramClient(ClientBase):
    """Requests over dgram.sock; replies come to this socket's own
    (autobound, abstract) address. A datagram socket has no SO_PEERCRED:
    the daemon is known by the owner of the socket file (who bound it),
    checked before sending. Answers can come from nowhere else: the kernel
    lets only the socket a datagram socket is connected to send to it
    (others get EPERM)."""

    def __init__(
        self,
        socket_dir: str | Path | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        *,
        daemon_uid: int | None = None,
    ) -> None:
        self._locate(socket_dir, DGRAM_SOCKET, timeout, daemon_uid)
        try:
            owner = os.lstat(self.path).st_uid
        except OSError as exc:
            raise unreachable(self.path, exc) from None
        if not self.trust.allows(owner):
            raise self.trust.refuse(owner, "bound")
        self._ids = itertools.count(1)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("")  # Linux autobind: a unique abstract address to be answered at
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(self.path))
        except OSError as exc:
            self.sock.close()
            raise unreachable(self.path, exc) from None

    def send(self, op: int, body: bytes = b"") -> int:
        request_id = next(self._ids)
        try:
            self.sock.send(encode_frame(op, request_id, body))
        except OSError as exc:
            if exc.errno == errno.EMSGSIZE:
                raise ClientError(f"{len(body)} bytes is too large for one datagram; send less") from None
            raise unreachable(self.path, exc) from None
        return request_id

    def wait_reply(self, request_id: int) -> Frame:
        """The reply to ``request_id`` (stale replies to earlier, timed-out
        requests are skipped)."""
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            if deadline is not None:
                self.sock.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                got = fdpass.recv_with_fds(self.sock, RECV_SIZE, maxfds=1)
            except TimeoutError:
                raise RequestTimeout(
                    f"no datagram answer from {self.path} within {self.timeout:g}s"
                ) from None
            except OSError as exc:
                raise unreachable(self.path, exc) from None
            fdpass.close_fds(got.fds)
            try:
                frame = decode_record(got.data, (), max_frame_size=1 << 30)
            except RemoteProtocolError as exc:
                raise ConnectionLost(f"the daemon sent an invalid datagram: {exc.message}") from None
            if frame.request_id != request_id:
                continue
            if frame.op == Op.ERROR:
                code, message = decode_error(frame.body)
                raise ServerError(code, message)
            return frame

    def request(self, op: int, body: bytes = b"") -> Frame:
        return self.wait_reply(self.send(op, body))

    def echo(self, data: bytes) -> bytes:
        return self.request(Op.ECHO, data).body

    def ping(self, payload: bytes = b"") -> float:
        start = time.perf_counter()
        self.request(Op.PING, payload)
        return time.perf_counter() - start

    def say(self, room: str, text: str, message_id: str | None = None) -> int:
        """Post to a room as this process's uid (like logger(1) to syslog).
        A datagram can be lost either way: with ``message_id``, sending it
        again after a RequestTimeout does not post it twice."""
        args = (
            {"room": room, "text": text}
            if message_id is None
            else {"id": message_id, "room": room, "text": text}
        )
        reply = self.request(Op.SAY, encode_json(args))
        return int(decode_json(reply.body)["seq"])
