"""Batch scanning of plain frames: the echo hot path, still sans-IO.

Theory of operation: pipelining clients send runs of identical-looking
frames (ECHO, no fds, no flags). Decoding each into a Frame, dispatching it
and encoding a reply costs a few microseconds of Python per frame; here a
run is validated with one 8-byte prefix comparison and one length read per
frame, and answered as a single copy of the run with each op byte patched
in the same pass
(the reply op is the request op with the reply bit set, the rest of the
frame is identical). Anything that is not exactly such a frame stops the
scan; the caller hands the rest to the general :class:`FrameDecoder`, which
produces the same replies and errors a frame at a time. The property tests
check that both paths agree byte for byte.
"""

from __future__ import annotations

import struct
from typing import Final

from ipcd.protocol.frames import HEADER_SIZE, MAGIC, VERSION
from ipcd.protocol.ops import REPLY_BIT, Op

_LENGTH: Final = struct.Struct("!I")
_OP_OFFSET: Final = 3
_LENGTH_OFFSET: Final = 12


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
    reply = bytearray(buf[:end])
    startswith = buf.startswith
    unpack_length = _LENGTH.unpack_from
    max_body = max_frame_size - HEADER_SIZE
    reply_op = prefix[_OP_OFFSET] | REPLY_BIT
    pos = 0
    count = 0
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
