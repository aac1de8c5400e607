"""Named valid and invalid inputs of the frame decoders, as data.

Each stream case is bytes, a number of fds, and what the decoder must make of
them: the frames and errors it returns, in order. The fds are fake numbers
(``FD_BASE``, ``FD_BASE + 1``, ...): the decoder never touches them, it only
hands them back. They arrive with ``data[fds_from:fds_to]`` in one
``receive_data`` call, as one ``recvmsg`` would bring them (``fds_truncated``:
that recvmsg saw ``MSG_CTRUNC`` and brought none); the bytes around that
chunk may be fed in any split, which must not change the outcome.

A record case is one datagram (``decode_record``): bytes, fds, one outcome.
"""

from __future__ import annotations

from dataclasses import dataclass

from ipcd.protocol import DEFAULT_MAX_FRAME_SIZE, ErrorCode, Frame, Op, encode_error, encode_frame
from ipcd.protocol.frames import HEADER, MAGIC, VERSION

FD_BASE = 100


def fake_fds(n: int) -> tuple[int, ...]:
    return tuple(range(FD_BASE, FD_BASE + n))


@dataclass(frozen=True)
class Err:
    """An expected :class:`RemoteProtocolError`."""

    code: ErrorCode
    fatal: bool
    request_id: int = 0
    fds: tuple[int, ...] = ()


Outcome = Frame | Err


@dataclass(frozen=True)
class StreamCase:
    name: str
    data: bytes
    expected: tuple[Outcome, ...]
    nfds: int = 0
    fds_from: int = 0
    fds_to: int | None = None  # None: the end of data
    fds_truncated: bool = False
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE

    @property
    def fds(self) -> tuple[int, ...]:
        return fake_fds(self.nfds)

    @property
    def has_fd_chunk(self) -> bool:
        return bool(self.nfds or self.fds_truncated)

    def chunks(self) -> tuple[bytes, bytes, bytes]:
        """The bytes before the fd chunk, the fd chunk, the bytes after it."""
        end = len(self.data) if self.fds_to is None else self.fds_to
        return self.data[: self.fds_from], self.data[self.fds_from : end], self.data[end:]


@dataclass(frozen=True)
class RecordCase:
    name: str
    data: bytes
    expected: Outcome
    nfds: int = 0
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE

    @property
    def fds(self) -> tuple[int, ...]:
        return fake_fds(self.nfds)


def raw_header(
    op: int = Op.ECHO,
    request_id: int = 1,
    length: int = 0,
    *,
    nfds: int = 0,
    flags: int = 0,
    magic: bytes = MAGIC,
    version: int = VERSION,
    reserved: int = 0,
) -> bytes:
    """A header with any field values, including those ``encode_header`` refuses."""
    return HEADER.pack(magic, version, op, flags, nfds, reserved, request_id, length)


PING = encode_frame(Op.PING, 1)
ECHO = encode_frame(Op.ECHO, 2, b"hello")
STATUS = encode_frame(Op.STATUS, 3, b'{"verbose":true}')
TWO_FDS = encode_frame(Op.ECHO, 9, b"two fds", nfds=2)
ONE_FD = encode_frame(Op.ECHO, 8, b"x", nfds=1)

SMALL_LIMIT = 64  # max_frame_size of the size-limit cases: a 48-byte body fits

STREAM_CASES: tuple[StreamCase, ...] = (
    # -- valid -------------------------------------------------------------
    StreamCase("empty", b"", ()),
    StreamCase("ping-no-body", PING, (Frame(Op.PING, 1),)),
    StreamCase("echo-with-body", ECHO, (Frame(Op.ECHO, 2, b"hello"),)),
    StreamCase(
        "max-request-id",
        encode_frame(Op.ECHO_REPLY, 0xFFFFFFFF, b"r"),
        (Frame(Op.ECHO_REPLY, 0xFFFFFFFF, b"r"),),
    ),
    StreamCase("unknown-op-zero", encode_frame(0, 0), (Frame(0, 0),)),
    StreamCase("daemon-notice-op", encode_frame(0x40, 0, b"n"), (Frame(0x40, 0, b"n"),)),
    StreamCase(
        "error-frame",
        encode_frame(Op.ERROR, 4, encode_error(ErrorCode.NOT_FOUND, "no such thing")),
        (Frame(Op.ERROR, 4, encode_error(ErrorCode.NOT_FOUND, "no such thing")),),
    ),
    StreamCase(
        "flags-kept",
        encode_frame(Op.ECHO, 5, b"f", flags=0xA5),
        (Frame(Op.ECHO, 5, b"f", flags=0xA5),),
    ),
    StreamCase(
        "body-that-looks-like-a-header",
        encode_frame(Op.ECHO, 6, PING + b"IP\x01"),
        (Frame(Op.ECHO, 6, PING + b"IP\x01"),),
    ),
    StreamCase(
        "binary-body",
        encode_frame(Op.ECHO, 7, bytes(range(256))),
        (Frame(Op.ECHO, 7, bytes(range(256))),),
    ),
    StreamCase(
        "pipelined-three",
        PING + ECHO + STATUS,
        (Frame(Op.PING, 1), Frame(Op.ECHO, 2, b"hello"), Frame(Op.STATUS, 3, b'{"verbose":true}')),
    ),
    StreamCase(
        "frame-exactly-at-the-limit",
        encode_frame(Op.ECHO, 1, b"b" * (SMALL_LIMIT - 16)),
        (Frame(Op.ECHO, 1, b"b" * (SMALL_LIMIT - 16)),),
        max_frame_size=SMALL_LIMIT,
    ),
    StreamCase("cut-in-the-magic", PING[:1], ()),
    StreamCase("cut-in-the-header", ECHO[:10], ()),
    StreamCase("header-without-body", ECHO[:16], ()),
    StreamCase("cut-in-the-body", ECHO[:18], ()),
    StreamCase("frame-then-half-a-frame", PING + ECHO[:20], (Frame(Op.PING, 1),)),
    # -- fds ---------------------------------------------------------------
    StreamCase("one-fd", ONE_FD, (Frame(Op.ECHO, 8, b"x", fake_fds(1)),), nfds=1),
    StreamCase("two-fds", TWO_FDS, (Frame(Op.ECHO, 9, b"two fds", fake_fds(2)),), nfds=2),
    StreamCase(
        "the-kernel-limit-of-fds",
        encode_frame(Op.ECHO, 10, nfds=253),
        (Frame(Op.ECHO, 10, b"", fake_fds(253)),),
        nfds=253,
    ),
    StreamCase(
        "fds-on-the-header-alone",  # the rest of the frame came in later reads
        TWO_FDS,
        (Frame(Op.ECHO, 9, b"two fds", fake_fds(2)),),
        nfds=2,
        fds_to=1,
    ),
    StreamCase(
        "kernel-glues-earlier-frames-to-the-fd-chunk",
        PING + ECHO + TWO_FDS,
        (Frame(Op.PING, 1), Frame(Op.ECHO, 2, b"hello"), Frame(Op.ECHO, 9, b"two fds", fake_fds(2))),
        nfds=2,
    ),
    StreamCase(
        "kernel-glues-the-tail-of-an-earlier-frame",
        ECHO + TWO_FDS,
        (Frame(Op.ECHO, 2, b"hello"), Frame(Op.ECHO, 9, b"two fds", fake_fds(2))),
        nfds=2,
        fds_from=7,
    ),
    StreamCase(
        "fd-frame-sent-together-with-fd-less-frames",
        TWO_FDS + PING + ECHO,
        (Frame(Op.ECHO, 9, b"two fds", fake_fds(2)), Frame(Op.PING, 1), Frame(Op.ECHO, 2, b"hello")),
        nfds=2,
    ),
    StreamCase(
        "fd-frame-between-fd-less-frames",
        PING + TWO_FDS + ECHO,
        (Frame(Op.PING, 1), Frame(Op.ECHO, 9, b"two fds", fake_fds(2)), Frame(Op.ECHO, 2, b"hello")),
        nfds=2,
        fds_from=len(PING),
        fds_to=len(PING) + len(TWO_FDS),
    ),
    # -- fd mismatches: not fatal, the stream stays in sync ------------------
    StreamCase(
        "declares-2-fds-none-attached",
        TWO_FDS + PING,
        (Err(ErrorCode.FD_MISMATCH, False, 9), Frame(Op.PING, 1)),
    ),
    StreamCase(
        "declares-none-fds-attached",
        ECHO + PING,
        (Err(ErrorCode.FD_MISMATCH, False, 2, fake_fds(2)), Frame(Op.PING, 1)),
        nfds=2,
        fds_to=len(ECHO),
    ),
    StreamCase(
        "declares-none-fds-attached-at-the-end",
        ECHO,
        (Err(ErrorCode.FD_MISMATCH, False, 2, fake_fds(1)),),
        nfds=1,
    ),
    StreamCase(
        "declares-2-fds-3-attached",
        TWO_FDS + PING,
        (Err(ErrorCode.FD_MISMATCH, False, 9, fake_fds(3)), Frame(Op.PING, 1)),
        nfds=3,
        fds_to=len(TWO_FDS),
    ),
    StreamCase(
        "declares-2-fds-1-attached",
        TWO_FDS,
        (Err(ErrorCode.FD_MISMATCH, False, 9, fake_fds(1)),),
        nfds=1,
    ),
    StreamCase(
        "fds-arrive-in-the-middle-of-their-frame",
        TWO_FDS + PING,
        (
            Err(ErrorCode.FD_MISMATCH, False, 9),
            Err(ErrorCode.FD_MISMATCH, False, 0, fake_fds(2)),
            Frame(Op.PING, 1),
        ),
        nfds=2,
        fds_from=5,
        fds_to=len(TWO_FDS),
    ),
    StreamCase(
        "fds-arrive-with-the-next-fd-less-frame",
        TWO_FDS + PING,
        (
            Err(ErrorCode.FD_MISMATCH, False, 9),
            Err(ErrorCode.FD_MISMATCH, False, 1, fake_fds(2)),  # the PING can be their only owner
        ),
        nfds=2,
        fds_from=len(TWO_FDS),
    ),
    StreamCase(
        "fds-with-no-bytes",
        PING,
        (Frame(Op.PING, 1), Err(ErrorCode.FD_MISMATCH, False, 0, fake_fds(1))),
        nfds=1,
        fds_from=len(PING),
    ),
    # -- MSG_CTRUNC: the transport closed what came; not fatal either ----------
    StreamCase(
        "fds-truncated-for-a-frame-declaring-fds",
        TWO_FDS + PING,
        (Err(ErrorCode.FDS_TRUNCATED, False, 9), Frame(Op.PING, 1)),
        fds_truncated=True,
        fds_to=len(TWO_FDS),
    ),
    StreamCase(
        "fds-truncated-glued-after-an-fd-less-frame",
        PING + TWO_FDS,
        (Frame(Op.PING, 1), Err(ErrorCode.FDS_TRUNCATED, False, 9)),
        fds_truncated=True,
    ),
    StreamCase(
        "fds-truncated-for-a-frame-declaring-none",
        ECHO + PING,
        (Err(ErrorCode.FDS_TRUNCATED, False, 2), Frame(Op.PING, 1)),
        fds_truncated=True,
        fds_to=len(ECHO),
    ),
    StreamCase(
        "fds-truncated-in-the-middle-of-their-frame",
        TWO_FDS,
        (Err(ErrorCode.FD_MISMATCH, False, 9), Err(ErrorCode.FDS_TRUNCATED, False)),
        fds_truncated=True,
        fds_from=3,
    ),
    # -- fatal: the stream is out of sync ----------------------------------
    StreamCase("bad-magic-first-byte", b"X", (Err(ErrorCode.MALFORMED, True),)),
    StreamCase("bad-magic-second-byte", b"IX", (Err(ErrorCode.MALFORMED, True),)),
    StreamCase("lowercase-magic", b"ip" + PING[2:], (Err(ErrorCode.MALFORMED, True),)),
    StreamCase("http-request", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", (Err(ErrorCode.MALFORMED, True),)),
    StreamCase("zeros", bytes(32), (Err(ErrorCode.MALFORMED, True),)),
    StreamCase(
        "garbage-after-a-good-frame",
        PING + b"\x00garbage",
        (Frame(Op.PING, 1), Err(ErrorCode.MALFORMED, True)),
    ),
    StreamCase(
        "no-frame-after-a-fatal-error", raw_header(version=2) + PING, (Err(ErrorCode.BAD_VERSION, True),)
    ),
    StreamCase("version-0", raw_header(version=0), (Err(ErrorCode.BAD_VERSION, True),)),
    StreamCase("version-2", raw_header(version=2, length=3) + b"abc", (Err(ErrorCode.BAD_VERSION, True),)),
    StreamCase("version-255", raw_header(version=255), (Err(ErrorCode.BAD_VERSION, True),)),
    StreamCase("reserved-low-bit", raw_header(reserved=1), (Err(ErrorCode.MALFORMED, True),)),
    StreamCase("reserved-high-bit", raw_header(reserved=0x8000), (Err(ErrorCode.MALFORMED, True),)),
    StreamCase("declares-254-fds", raw_header(nfds=254), (Err(ErrorCode.MALFORMED, True),)),
    StreamCase(
        "one-byte-over-the-limit",
        raw_header(request_id=12, length=SMALL_LIMIT - 15) + b"b" * (SMALL_LIMIT - 15),
        (Err(ErrorCode.TOO_LARGE, True, 12),),
        max_frame_size=SMALL_LIMIT,
    ),
    StreamCase(
        "largest-length-header-only",
        raw_header(request_id=13, length=0xFFFFFFFF),
        (Err(ErrorCode.TOO_LARGE, True, 13),),
    ),
    StreamCase(
        "too-large-after-a-good-frame",
        PING + raw_header(request_id=14, length=1 << 30),
        (Frame(Op.PING, 1), Err(ErrorCode.TOO_LARGE, True, 14)),
    ),
)

RECORD_CASES: tuple[RecordCase, ...] = (
    RecordCase("ping", PING, Frame(Op.PING, 1)),
    RecordCase("echo", ECHO, Frame(Op.ECHO, 2, b"hello")),
    RecordCase("flags", encode_frame(Op.ECHO, 3, b"z", flags=1), Frame(Op.ECHO, 3, b"z", flags=1)),
    RecordCase("two-fds", TWO_FDS, Frame(Op.ECHO, 9, b"two fds", fake_fds(2)), nfds=2),
    RecordCase(
        "at-the-limit",
        encode_frame(Op.ECHO, 1, b"b" * (SMALL_LIMIT - 16)),
        Frame(Op.ECHO, 1, b"b" * (SMALL_LIMIT - 16)),
        max_frame_size=SMALL_LIMIT,
    ),
    RecordCase("empty-record", b"", Err(ErrorCode.MALFORMED, True)),
    RecordCase("empty-record-with-fds", b"", Err(ErrorCode.MALFORMED, True, 0, fake_fds(2)), nfds=2),
    RecordCase("short-record", PING[:15], Err(ErrorCode.MALFORMED, True, 0, fake_fds(1)), nfds=1),
    RecordCase("body-cut-short", ECHO[:-1], Err(ErrorCode.MALFORMED, True, 2, fake_fds(1)), nfds=1),
    RecordCase("trailing-bytes", ECHO + b"!", Err(ErrorCode.MALFORMED, True, 2, fake_fds(1)), nfds=1),
    RecordCase("two-frames-in-one-record", PING + ECHO, Err(ErrorCode.MALFORMED, True, 1)),
    RecordCase("declares-2-fds-none-attached", TWO_FDS, Err(ErrorCode.FD_MISMATCH, False, 9)),
    RecordCase("declares-none-fds-attached", ECHO, Err(ErrorCode.FD_MISMATCH, False, 2, fake_fds(3)), nfds=3),
    RecordCase(
        "declares-2-fds-3-attached", TWO_FDS, Err(ErrorCode.FD_MISMATCH, False, 9, fake_fds(3)), nfds=3
    ),
    RecordCase("bad-magic", b"XX" + PING[2:], Err(ErrorCode.MALFORMED, True, 0, fake_fds(1)), nfds=1),
    RecordCase(
        "bad-version", raw_header(version=7), Err(ErrorCode.BAD_VERSION, True, 0, fake_fds(1)), nfds=1
    ),
    RecordCase("reserved", raw_header(reserved=2), Err(ErrorCode.MALFORMED, True, 0, fake_fds(1)), nfds=1),
    RecordCase("declares-254-fds", raw_header(nfds=254), Err(ErrorCode.MALFORMED, True)),
    RecordCase(
        "over-the-limit",
        raw_header(request_id=5, length=SMALL_LIMIT - 15) + b"b" * (SMALL_LIMIT - 15),
        Err(ErrorCode.TOO_LARGE, True, 5, fake_fds(1)),
        nfds=1,
        max_frame_size=SMALL_LIMIT,
    ),
)
