"""Echo and keep-alive: the body comes back unchanged.

ECHO and PING differ only in intent: ECHO is a service (health checks,
latency, throughput), PING is the keep-alive either side may send and that
``ipcctl ping`` measures. Neither accepts fds; the ones that came are
closed and the request is refused, so a confused client learns at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ipcd.fdpass import Credentials
from ipcd.protocol import Frame, Op, encode_header

if TYPE_CHECKING:
    from ipcd.server.connection import Connection
    from ipcd.server.worker import Worker
    from ipcd.services import DatagramHandler, StreamHandler


def _reflect(reply: Op) -> StreamHandler:
    def handler(worker: Worker, conn: Connection, frame: Frame) -> None:
        conn.send_frame(encode_header(reply, frame.request_id, len(frame.body)) + frame.body)

    return handler


def _ignore_pong(worker: Worker, conn: Connection, frame: Frame) -> None:
    """A PONG answers a PING we sent; nothing to do but not an error."""


def _ignore_datagram_pong(frame: Frame, creds: Credentials | None) -> bytes | None:
    return None  # as on the stream: an answer to a PING, never itself answered


def _reflect_datagram(reply: Op) -> DatagramHandler:
    def handler(frame: Frame, creds: Credentials | None) -> bytes | None:
        return encode_header(reply, frame.request_id, len(frame.body)) + frame.body

    return handler


STREAM: dict[int, StreamHandler] = {
    Op.ECHO: _reflect(Op.ECHO_REPLY),
    Op.PING: _reflect(Op.PONG),
    Op.PONG: _ignore_pong,
}
DATAGRAM: dict[int, DatagramHandler] = {
    Op.ECHO: _reflect_datagram(Op.ECHO_REPLY),
    Op.PING: _reflect_datagram(Op.PONG),
    Op.PONG: _ignore_datagram_pong,
}
