"""What the master's services (chat hub, fd store) are fed and return.

A :class:`Sender` is a forwarded request's origin, with the identity the
kernel gave the worker; an :class:`Out` is one record for one worker. Both
services stay free of I/O: the master's link sends the records.
"""

from __future__ import annotations

import dataclasses

from ipcd.protocol import ErrorCode
from ipcd.server.channel import ChannelOp

# ANSWER meta key: this answers a GET or TAKE, so the worker frees the fd
# reservation its connection made for it (ipcd.server.flow).
HANDOUT = "handout"


@dataclasses.dataclass(frozen=True)
class Sender:
    """Who sent a request, as the kernel reported it to the worker."""

    worker: int
    conn: int  # 0 for a datagram
    request_id: int
    uid: int
    gid: int
    pid: int
    dgram: str | None = None  # hex of the datagram sender's address
    groups: tuple[int, ...] = ()  # supplementary groups (SO_PEERGROUPS)


@dataclasses.dataclass(frozen=True)
class Out:
    worker: int
    op: ChannelOp
    body: bytes
    fds: tuple[int, ...] = ()  # given to the channel, which closes them once sent


class ServiceError(Exception):
    """A request a service refuses: the code and message its client gets."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
