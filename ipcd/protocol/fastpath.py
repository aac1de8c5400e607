"""Batch scanning of plain frames: the echo hot path, still sans-IO.

Theory of operation: pipelining clients send runs of identical-looking
frames (ECHO, no fds, no flags). Decoding each into a Frame, dispatching it
and encoding a reply costs a few microseconds of Python per frame; here a
run is answered as a single copy of it with each op byte patched (the reply
op is the request op with the reply bit set, the rest of the frame is
identical). A run of equal frames (same prefix, same length: what a
pipelining client sends) is matched by one compiled pattern, so the regex
engine steps through it in C; other frames are validated one at a time with
one 8-byte prefix comparison and one length read. Anything that
is not exactly such a frame stops the scan; the caller hands the rest to
the general :class:`FrameDecoder`, which produces the same replies and
errors a frame at a time. The property tests check that both paths agree
byte for byte.
"""

from __future__ import annotations

import functools
import re
import struct
from typing import Final

from ipcd.protocol.frames import HEADER_SIZE, MAGIC, VERSION
from ipcd.protocol.ops import REPLY_BIT, Op

_LENGTH: Final = struct.Struct("!I")
_OP_OFFSET: Final = 3
_LENGTH_OFFSET: Final = 12
_MIN_RUN: Final = 4  # frames a buffer must have room for to try the pattern


def plain_prefix(op: int) -> bytes:
    """The first 8 header bytes of a frame of ``op`` with no flags and no fds."""
    return MAGIC + bytes((VERSION, op, 0, 0, 0, 0))


ECHO_PREFIX: Final = plain_prefix(Op.ECHO)


def reflect_plain_run(
    buf: bytes | bytearray, end: int, prefix: bytes, max_frame_size: int
) -> tuple[bytearray, int]:
    """Replies to the complete frames at the start of ``buf[:end]`` that
    begin with ``prefix`` and fit ``max_frame_size``: a copy of them with the
    reply bit set on each op byte, and how many frames that is. The scan
    stops at the first frame that does not qualify or is incomplete, so
    ``len(reply)`` is also the number of bytes consumed."""
    reply = buf[:end] if isinstance(buf, bytearray) else bytearray(buf[:end])
    max_body = max_frame_size - HEADER_SIZE
    reply_op = prefix[_OP_OFFSET] | REPLY_BIT
    pos, count = _equal_run(buf, end, prefix, max_body)
    if count:
        reply[_OP_OFFSET : pos : pos // count] = bytes((reply_op,)) * count
    startswith = buf.startswith
    unpack_length = _LENGTH.unpack_from
    while pos + HEADER_SIZE <= end:
        if not startswith(prefix, pos):
            break
        (length,) = unpack_length(buf, pos + _LENGTH_OFFSET)
        nxt = pos + HEADER_SIZE + length
        if length > max_body or nxt > end:
            break
        reply[pos + _OP_OFFSET] = reply_op
        pos = nxt
        count += 1
    if pos < end:
        del reply[pos:]
    return reply, count


def _equal_run(buf: bytes | bytearray, end: int, prefix: bytes, max_body: int) -> tuple[int, int]:
    """(bytes, frames) of the leading run of whole frames that carry
    ``prefix`` and the first frame's length; (0, 0) unless the first two
    do and ``buf[:end]`` has room for a few (fewer go as fast one by one)."""
    if end < _MIN_RUN * HEADER_SIZE or not buf.startswith(prefix):
        return 0, 0
    (length,) = _LENGTH.unpack_from(buf, _LENGTH_OFFSET)
    size = HEADER_SIZE + length
    if length > max_body or _MIN_RUN * size > end or not buf.startswith(prefix, size):
        return 0, 0
    if _LENGTH.unpack_from(buf, size + _LENGTH_OFFSET)[0] != length:
        return 0, 0
    match = _equal_frames(prefix, length).match(buf, 0, end)
    if match is None:  # cannot happen: the first two frames qualify
        return 0, 0
    stop = match.end()
    return stop, stop // size


@functools.lru_cache(maxsize=64)
def _equal_frames(prefix: bytes, length: int) -> re.Pattern[bytes]:
    """A pattern for a run of frames that begin with ``prefix`` and carry
    ``length`` body bytes: the regex engine steps through the run in C.
    Built only once two such frames arrived together, and at most 64 kept:
    a client cycling through lengths costs a compile per read, no memory."""
    header = re.escape(prefix) + b".{4}" + re.escape(_LENGTH.pack(length))
    return re.compile(b"(?:" + header + b".{%d})+" % length, re.DOTALL)
