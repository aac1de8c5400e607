"""Operation and error codes of the ipcd wire protocol (version 1).

Theory of operation: a reply carries its request's op with the high bit set
(``ECHO`` 0x03 -> 0x83), so a client can match a reply both by request id and
by kind. Ops 0x40-0x7F are reserved for frames the daemon sends on its own
(chat deliveries, notices); they carry request id 0. ``ERROR`` is 0xFF.
Codes are part of the public contract: never renumber, only add.
"""

from __future__ import annotations

import enum

REPLY_BIT = 0x80


class Op(enum.IntEnum):
    """Client-visible operations. See docs/protocol.md."""

    PING = 0x01  # keep-alive; either side may send it, the peer answers PONG
    ECHO = 0x02
    STATUS = 0x03

    # chat: JSON bodies, see docs/protocol.md
    NICK = 0x10
    JOIN = 0x11
    PART = 0x12
    SAY = 0x13  # a message to a room
    MSG = 0x14  # a private message to a nick
    ROOMS = 0x15
    WHO = 0x16
    TOPIC = 0x17
    HISTORY = 0x18

    # fd hand-off: JSON bodies; PUT carries fds, GET/TAKE replies carry them
    PUT = 0x20
    GET = 0x21
    TAKE = 0x22
    LS = 0x23
    RM = 0x24

    PONG = PING | REPLY_BIT
    ECHO_REPLY = ECHO | REPLY_BIT
    STATUS_REPLY = STATUS | REPLY_BIT
    NICK_REPLY = NICK | REPLY_BIT
    JOIN_REPLY = JOIN | REPLY_BIT
    PART_REPLY = PART | REPLY_BIT
    SAY_REPLY = SAY | REPLY_BIT
    MSG_REPLY = MSG | REPLY_BIT
    ROOMS_REPLY = ROOMS | REPLY_BIT
    WHO_REPLY = WHO | REPLY_BIT
    TOPIC_REPLY = TOPIC | REPLY_BIT
    HISTORY_REPLY = HISTORY | REPLY_BIT
    PUT_REPLY = PUT | REPLY_BIT
    GET_REPLY = GET | REPLY_BIT
    TAKE_REPLY = TAKE | REPLY_BIT
    LS_REPLY = LS | REPLY_BIT
    RM_REPLY = RM | REPLY_BIT

    # daemon-initiated (request id 0)
    MESSAGE = 0x40  # a room message delivered to a member
    PRIVATE = 0x41  # a private message delivered to its target
    NOTICE = 0x42  # join, part, quit, topic and nick changes

    ERROR = 0xFF


class ErrorCode(enum.IntEnum):
    """Codes carried in ERROR frames.

    1-19: the frame itself was wrong. 20-39: the request was understood but
    refused. 40-49: the connection is being closed by the daemon. 50: a bug.
    One rule tells a client what ends its connection: codes 1-3 and 40-49,
    whatever the request id.
    """

    MALFORMED = 1  # not an ipcd frame (bad magic, reserved bits set); fatal
    BAD_VERSION = 2  # protocol version not supported; fatal
    TOO_LARGE = 3  # declared body length over the limit; fatal
    FD_MISMATCH = 4  # frame declared n fds, a different number arrived
    FDS_TRUNCATED = 5  # more fds attached than the daemon accepts at once
    UNKNOWN_OP = 6
    BAD_REQUEST = 7  # body does not parse for this op
    FDS_NOT_EXPECTED = 8  # this op takes no fds

    NOT_FOUND = 20
    PERMISSION_DENIED = 21
    EXISTS = 22
    LIMIT_EXCEEDED = 23
    RATE_LIMITED = 24
    TIMED_OUT = 25
    UNAVAILABLE = 26  # the request could not reach the master right now; retry it

    SLOW_CONSUMER = 40  # outbound buffer over its limit: the peer is not reading
    IDLE_TIMEOUT = 41
    SHUTTING_DOWN = 42
    OVERLOADED = 43
    OVER_BUDGET = 44  # the uid's connections, or partial frames, past its budget (ipcd.server.uidbudgets)

    INTERNAL = 50


def reply_op(op: int) -> int:
    """The op of the reply to a request with ``op``."""
    return op | REPLY_BIT


def op_name(op: int) -> str:
    """A readable name for logs and errors, even for unknown codes."""
    try:
        return Op(op).name
    except ValueError:
        return f"0x{op:02x}"
