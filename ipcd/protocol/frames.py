"""Frames: the unit of the ipcd wire protocol, encoded and decoded sans-IO.

Theory of operation
-------------------
Every frame is a 16-byte header and a body of ``length`` bytes::

    0      2        3    4      5     6         8            12         16
    | "IP" | version| op | flags| nfds| reserved | request id | length   | body...
      magic   u8      u8   u8     u8    u16 = 0    u32          u32

all big-endian. The size limit is checked on the header alone, before a
single body byte is buffered, so a peer cannot make us allocate by lying.

File descriptors travel as ``SCM_RIGHTS`` with the *first byte* of their frame
(the sender passes them to the ``sendmsg`` that starts the frame) and the
header says how many. A stream socket does not keep message boundaries, and
Linux may hand us the bytes *before* an fd-carrying write together with it in
one ``recvmsg`` (it stops right after such a write, never before). So each
batch of fds is remembered with the stream range ``[start, end)`` of the bytes
that came with it; the batch belongs to a frame that starts inside that range.
A frame that declares fds takes the batch whose range holds its first byte; a
frame that declares none but starts in a batch's range and runs past its end
is the only one that can own it, and is refused; a batch whose range is passed
without any frame claiming it was sent with a frame that declared none.
These mismatches are errors that keep the stream in sync (``fatal=False``);
the fds involved are handed to the caller to close.

Datagrams and ``SOCK_SEQPACKET`` records carry exactly one frame each and are
decoded by :func:`decode_record`.

Nothing here imports ``socket``: the decoder is fed bytes and fd numbers, and
the caller owns every fd it is given back, in frames and in errors.
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from collections.abc import Sequence
from typing import Final, NamedTuple

from ipcd.protocol.errors import LocalProtocolError, RemoteProtocolError
from ipcd.protocol.ops import ErrorCode, op_name

MAGIC: Final = b"IP"
VERSION: Final = 1
HEADER: Final = struct.Struct("!2sBBBBHII")
HEADER_SIZE: Final = HEADER.size  # 16
MAX_FDS_PER_FRAME: Final = 253  # SCM_MAX_FD: the kernel's limit per sendmsg
MAX_REQUEST_ID: Final = 0xFFFFFFFF
DEFAULT_MAX_FRAME_SIZE: Final = 1 << 20  # header + body
ABSOLUTE_MAX_FRAME_SIZE: Final = HEADER_SIZE + 0xFFFFFFFF

# Compact the receive buffer once this much consumed data sits at its front.
_COMPACT_AT: Final = 64 * 1024


class Frame(NamedTuple):
    """One decoded frame. A NamedTuple rather than a dataclass: frames are
    built on the hot path and tuple construction is several times cheaper."""

    op: int
    request_id: int
    body: bytes = b""
    fds: tuple[int, ...] = ()
    flags: int = 0


class NeedData(enum.Enum):
    """Returned by :meth:`FrameDecoder.next_event` when no whole frame is buffered."""

    NEED_DATA = "NEED_DATA"


NEED_DATA: Final = NeedData.NEED_DATA


def encode_header(op: int, request_id: int, length: int, nfds: int = 0, flags: int = 0) -> bytes:
    """The 16 header bytes of a frame whose body is ``length`` bytes long."""
    if not 0 <= op <= 0xFF:
        raise LocalProtocolError(f"op {op} does not fit in a byte", ErrorCode.UNKNOWN_OP)
    if not 0 <= request_id <= MAX_REQUEST_ID:
        raise LocalProtocolError(f"request id {request_id} out of range", ErrorCode.BAD_REQUEST)
    if not 0 <= length <= 0xFFFFFFFF:
        raise LocalProtocolError(f"body of {length} bytes is too large", ErrorCode.TOO_LARGE)
    if not 0 <= nfds <= MAX_FDS_PER_FRAME:
        raise LocalProtocolError(
            f"{nfds} fds in one frame; at most {MAX_FDS_PER_FRAME}", ErrorCode.FDS_TRUNCATED
        )
    if not 0 <= flags <= 0xFF:
        raise LocalProtocolError(f"flags {flags} do not fit in a byte", ErrorCode.MALFORMED)
    return HEADER.pack(MAGIC, VERSION, op, flags, nfds, 0, request_id, length)


def encode_frame(op: int, request_id: int, body: bytes = b"", nfds: int = 0, flags: int = 0) -> bytes:
    """Header and body as one bytes object. The fds themselves are the
    transport's business: pass them to the sendmsg that sends byte 0."""
    return encode_header(op, request_id, len(body), nfds, flags) + body


class _FdBatch:
    """fds that came with the stream bytes ``[start, end)``. ``truncated``:
    more were attached than the receiver had room for; the kernel dropped
    the rest and the receiver closed these, so ``fds`` is empty."""

    __slots__ = ("end", "fds", "start", "truncated")

    def __init__(self, start: int, end: int, fds: tuple[int, ...], truncated: bool) -> None:
        self.start = start
        self.end = end
        self.fds = fds
        self.truncated = truncated


def _check_header(
    magic: bytes, version: int, nfds: int, reserved: int, length: int, max_frame_size: int, request_id: int
) -> None:
    if magic != MAGIC:
        raise RemoteProtocolError(
            f"not an ipcd frame (magic {magic!r}, expected {MAGIC!r})", ErrorCode.MALFORMED, fatal=True
        )
    if version != VERSION:
        raise RemoteProtocolError(
            f"protocol version {version} not supported (this daemon speaks {VERSION})",
            ErrorCode.BAD_VERSION,
            fatal=True,
        )
    if reserved != 0:
        raise RemoteProtocolError("reserved header field is not zero", ErrorCode.MALFORMED, fatal=True)
    if nfds > MAX_FDS_PER_FRAME:
        raise RemoteProtocolError(
            f"frame declares {nfds} fds; at most {MAX_FDS_PER_FRAME}", ErrorCode.MALFORMED, fatal=True
        )
    if HEADER_SIZE + length > max_frame_size:
        raise RemoteProtocolError(
            f"frame of {HEADER_SIZE + length} bytes exceeds the limit of {max_frame_size}",
            ErrorCode.TOO_LARGE,
            fatal=True,
            request_id=request_id,
        )


class FrameDecoder:
    """Incremental decoder for a byte stream of frames (with fds).

    Feed it with :meth:`receive_data`, then call :meth:`next_event` until it
    returns ``NEED_DATA``. It raises :class:`RemoteProtocolError` for invalid
    input; after a ``fatal`` one the decoder must not be used again.
    """

    __slots__ = ("_batches", "_broken", "_buf", "_offset", "_pos", "max_frame_size")

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        if not HEADER_SIZE <= max_frame_size <= ABSOLUTE_MAX_FRAME_SIZE:
            raise LocalProtocolError(f"max frame size {max_frame_size} out of range", ErrorCode.TOO_LARGE)
        self.max_frame_size = max_frame_size
        self._buf = bytearray()
        self._pos = 0  # index in _buf of the first byte not yet consumed
        self._offset = 0  # stream offset of _buf[0]
        self._batches: deque[_FdBatch] | None = None  # created on the first fd
        self._broken = False

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        return len(self._buf) - self._pos

    @property
    def idle(self) -> bool:
        """Nothing buffered and no fds waiting for their frame."""
        return self._pos == len(self._buf) and not self._batches

    def receive_data(
        self, data: bytes | bytearray | memoryview, fds: Sequence[int] = (), fds_truncated: bool = False
    ) -> None:
        """Append bytes read from the peer, with the fds that came with them.

        ``fds_truncated``: the transport saw fds dropped for lack of room
        (``MSG_CTRUNC``) and closed the rest; the frame they came with is
        then answered with an FDS_TRUNCATED error instead of FD_MISMATCH.
        """
        if self._broken:
            raise LocalProtocolError("decoder used after a fatal error", ErrorCode.MALFORMED)
        if fds or fds_truncated:
            start = self._offset + len(self._buf)
            if self._batches is None:
                self._batches = deque()
            self._batches.append(_FdBatch(start, start + len(data), tuple(fds), fds_truncated))
        self._buf += data

    def take_pending_fds(self) -> list[int]:
        """Every fd received but not yet handed out; the caller must close them.
        Call this when the connection goes away."""
        fds: list[int] = []
        while self._batches:
            fds.extend(self._batches.popleft().fds)
        return fds

    def next_event(self) -> Frame | NeedData:
        buf = self._buf
        pos = self._pos
        frame_start = self._offset + pos
        batches = self._batches
        if batches and batches[0].end <= frame_start:
            orphan = batches.popleft()
            if orphan.truncated:
                raise RemoteProtocolError(
                    "too many fds arrived at once; they were all closed", ErrorCode.FDS_TRUNCATED, fatal=False
                )
            raise RemoteProtocolError(
                f"{len(orphan.fds)} fds arrived with a frame that declared none",
                ErrorCode.FD_MISMATCH,
                fatal=False,
                fds=orphan.fds,
            )
        avail = len(buf) - pos
        if avail < HEADER_SIZE:
            if avail and buf[pos : pos + 2] != MAGIC[:avail]:
                self._fail()
                raise RemoteProtocolError("not an ipcd frame (bad magic)", ErrorCode.MALFORMED, fatal=True)
            self._compact()
            return NEED_DATA
        magic, version, op, flags, nfds, reserved, request_id, length = HEADER.unpack_from(buf, pos)
        try:
            _check_header(magic, version, nfds, reserved, length, self.max_frame_size, request_id)
        except RemoteProtocolError:
            self._fail()
            raise
        end = pos + HEADER_SIZE + length
        if len(buf) < end:
            self._compact()
            return NEED_DATA
        body = bytes(buf[pos + HEADER_SIZE : end])
        self._pos = end
        if end == len(buf):
            self._offset += end
            self._pos = 0
            buf.clear()
        if not nfds:
            if (
                batches
                and batches[0].start <= frame_start < batches[0].end <= frame_start + HEADER_SIZE + length
            ):
                # fds came with this frame's first byte and the frame runs to
                # (or past) the end of their chunk: no later frame can own them.
                batch = batches.popleft()
                raise RemoteProtocolError(
                    f"{op_name(op)} frame declares no fds but "
                    + ("more than this daemon accepts at once" if batch.truncated else str(len(batch.fds)))
                    + " arrived with it; they were closed",
                    ErrorCode.FDS_TRUNCATED if batch.truncated else ErrorCode.FD_MISMATCH,
                    fatal=False,
                    request_id=request_id,
                    fds=batch.fds,
                )
            return Frame(op, request_id, body, (), flags)
        if batches and batches[0].truncated and batches[0].start <= frame_start < batches[0].end:
            batches.popleft()
            raise RemoteProtocolError(
                f"{op_name(op)} frame carries {nfds} fds, more than this daemon accepts at once; "
                "they were all closed",
                ErrorCode.FDS_TRUNCATED,
                fatal=False,
                request_id=request_id,
            )
        if not (batches and batches[0].start <= frame_start < batches[0].end):
            raise RemoteProtocolError(
                f"{op_name(op)} frame declares {nfds} fds but none arrived with its first byte",
                ErrorCode.FD_MISMATCH,
                fatal=False,
                request_id=request_id,
            )
        batch = batches.popleft()
        if len(batch.fds) != nfds:
            raise RemoteProtocolError(
                f"{op_name(op)} frame declares {nfds} fds but {len(batch.fds)} arrived",
                ErrorCode.FD_MISMATCH,
                fatal=False,
                request_id=request_id,
                fds=batch.fds,
            )
        return Frame(op, request_id, body, batch.fds, flags)

    def _compact(self) -> None:
        if self._pos >= _COMPACT_AT or (self._pos and self._pos == len(self._buf)):
            del self._buf[: self._pos]
            self._offset += self._pos
            self._pos = 0

    def _fail(self) -> None:
        self._broken = True


def decode_record(
    data: bytes | memoryview, fds: Sequence[int] = (), max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
) -> Frame:
    """Decode a datagram or SOCK_SEQPACKET record, which holds exactly one frame.

    Raises :class:`RemoteProtocolError`; its ``fds`` are every fd that came
    with the record, which the caller must close.
    """
    got = tuple(fds)
    if len(data) < HEADER_SIZE:
        raise RemoteProtocolError(
            f"record of {len(data)} bytes is shorter than a frame header",
            ErrorCode.MALFORMED,
            fatal=True,
            fds=got,
        )
    magic, version, op, flags, nfds, reserved, request_id, length = HEADER.unpack_from(data)
    try:
        _check_header(magic, version, nfds, reserved, length, max_frame_size, request_id)
    except RemoteProtocolError as exc:
        exc.fds = got
        raise
    if HEADER_SIZE + length != len(data):
        raise RemoteProtocolError(
            f"record holds {len(data)} bytes but its header says {HEADER_SIZE + length}",
            ErrorCode.MALFORMED,
            fatal=True,
            request_id=request_id,
            fds=got,
        )
    if nfds != len(got):
        raise RemoteProtocolError(
            f"{op_name(op)} frame declares {nfds} fds but {len(got)} arrived",
            ErrorCode.FD_MISMATCH,
            fatal=False,
            request_id=request_id,
            fds=got,
        )
    return Frame(op, request_id, bytes(data[HEADER_SIZE:]), got, flags)
