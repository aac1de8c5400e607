"""How link messages become SEQPACKET records and back, without I/O.

Theory of operation: a record on a worker's channel is one frame of the
public codec with an internal op. A SEQPACKET record must fit the socket's
send buffer (about 208 KiB by default), so a message whose body is larger
than :data:`FRAGMENT` is cut into fragments of that size: every fragment but
the last carries the flag :data:`MORE`, and the message's fds ride on the
first (the kernel ties fds to the record they were sent with). Messages
posted in one loop pass travel together as one ``BATCH`` message whose body
is their encoded frames back to back; the batch's fds are theirs in the same
order, and each frame's header says how many are its own (so pipelined GETs
cost one record each way, not one per answer). The receiving side feeds
each record to a :class:`Reassembler`, which hands out whole messages;
:func:`unbatch` splits a batch and hands each message its fds. Nothing here touches a socket or closes an
fd: fds that must be dropped are handed back to the caller, which owns them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Final

from ipcd.protocol import HEADER_SIZE, ErrorCode, Frame, RemoteProtocolError, decode_record, encode_frame

FRAGMENT: Final = 60 * 1024  # body bytes per record
RECORD_MAX: Final = 128 * 1024  # the receiver's buffer: one record, header included
MORE: Final = 0x01  # another fragment of the same message follows
MESSAGE_MAX: Final = 256 << 20  # a reassembled message larger than this is refused


def fragment(op: int, request_id: int, body: bytes, nfds: int = 0) -> list[bytes]:
    """The records of one message, in order; the first declares ``nfds``
    (send the fds with it), the others none."""
    if not body and not request_id:
        return [bare_record(op, nfds)]
    if len(body) <= FRAGMENT:  # nearly every message: one record
        return [encode_frame(op, request_id, body, nfds=nfds)]
    pieces = [body[i : i + FRAGMENT] for i in range(0, len(body), FRAGMENT)]
    last = len(pieces) - 1
    return [
        encode_frame(op, request_id, piece, nfds=nfds if index == 0 else 0, flags=MORE if index < last else 0)
        for index, piece in enumerate(pieces)
    ]


@functools.cache
def bare_record(op: int, nfds: int = 0) -> bytes:
    """The record of a message with no body and no request id (a passed
    connection, a heartbeat): always the same bytes, so encoded once."""
    return encode_frame(op, 0, b"", nfds=nfds)


def unbatch(body: bytes, fds: tuple[int, ...] = ()) -> list[Frame]:
    """The messages of a BATCH body, in order, each with as many of ``fds``
    (the batch's, in order) as its header declares. Raises
    RemoteProtocolError whose ``fds`` are all of ``fds``, for the caller to
    close: nothing is handed out of a batch that does not add up."""
    frames = []
    pos = used = 0
    try:
        while pos < len(body):
            if len(body) - pos < HEADER_SIZE:
                raise RemoteProtocolError(
                    "truncated frame in a channel batch", ErrorCode.MALFORMED, fatal=False
                )
            nfds = body[pos + 5]
            length = int.from_bytes(body[pos + 12 : pos + 16], "big")
            end = pos + HEADER_SIZE + length
            if end > len(body):
                raise RemoteProtocolError(
                    "truncated frame in a channel batch", ErrorCode.MALFORMED, fatal=False
                )
            own = fds[used : used + nfds] if nfds else ()
            used += nfds
            frames.append(decode_record(body[pos:end], own, max_frame_size=MESSAGE_MAX))
            pos = end
        if used != len(fds):
            raise RemoteProtocolError(
                f"a channel batch came with {len(fds)} fds, its messages declare {used}",
                ErrorCode.FD_MISMATCH,
                fatal=False,
            )
    except RemoteProtocolError as exc:
        exc.fds = fds
        raise
    return frames


class Reassembler:
    """Joins the fragments of messages, one record at a time."""

    __slots__ = ("_chunks", "_first", "_size")

    def __init__(self) -> None:
        self._first: Frame | None = None  # the first fragment of the message being joined
        self._chunks: list[bytes] = []
        self._size = 0

    def feed(self, record: Frame) -> tuple[Frame | None, tuple[int, ...]]:
        """(the whole message, if this record completes one; fds the caller
        must close: any that rode on a later fragment, where none belong).
        Raises RemoteProtocolError for a message over MESSAGE_MAX; its
        ``fds`` are the message's, for the caller to close."""
        first = self._first
        if first is None:
            if not record.flags & MORE:
                return record, ()
            self._first, self._chunks, self._size = record, [record.body], len(record.body)
            return None, ()
        self._chunks.append(record.body)
        self._size += len(record.body)
        if self._size > MESSAGE_MAX:
            self._first, self._chunks, self._size = None, [], 0
            raise RemoteProtocolError(
                "channel message too large", ErrorCode.TOO_LARGE, fatal=False, fds=first.fds + record.fds
            )
        if record.flags & MORE:
            return None, record.fds
        message = Frame(first.op, first.request_id, b"".join(self._chunks), first.fds)
        self._first, self._chunks, self._size = None, [], 0
        return message, record.fds

    def take_pending_fds(self) -> tuple[int, ...]:
        """The fds of a message cut short (the channel closed): the caller's
        to close."""
        first, self._first, self._chunks, self._size = self._first, None, [], 0
        return first.fds if first is not None else ()


def batch_body(frames: Sequence[bytes]) -> bytes:
    """A BATCH body: the encoded messages back to back."""
    return b"".join(frames)
