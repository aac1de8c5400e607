"""Frames: the header layout, the stream decoder fed whole, byte by byte and in
any split, fd attribution, ``decode_record``, and hypothesis properties.

Fds here are fake numbers: the decoder is sans-IO and only hands them back.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipcd.protocol import (
    DEFAULT_MAX_FRAME_SIZE,
    HEADER_SIZE,
    MAX_FDS_PER_FRAME,
    NEED_DATA,
    ErrorCode,
    Frame,
    FrameDecoder,
    LocalProtocolError,
    Op,
    RemoteProtocolError,
    decode_record,
    encode_frame,
    encode_header,
)
from ipcd.protocol.frames import ABSOLUTE_MAX_FRAME_SIZE
from tests.protocol.corpus import (
    ECHO,
    PING,
    RECORD_CASES,
    STREAM_CASES,
    TWO_FDS,
    Err,
    Outcome,
    RecordCase,
    StreamCase,
    raw_header,
)
from tests.protocol.feeding import (
    Read,
    as_err,
    case_reads,
    draw_cuts,
    kernel_reads,
    run,
    split_at,
    split_every,
)

# -- encoding ----------------------------------------------------------------


def test_header_layout_is_exactly_as_documented() -> None:
    header = encode_header(op=0x02, request_id=0x01020304, length=0x0A0B0C0D, nfds=3, flags=0x40)
    assert HEADER_SIZE == 16
    assert header == b"IP" + b"\x01" + b"\x02" + b"\x40" + b"\x03" + b"\x00\x00" + b"\x01\x02\x03\x04" + (
        b"\x0a\x0b\x0c\x0d"
    )


def test_header_fields_at_their_offsets_big_endian() -> None:
    frame = encode_frame(Op.STATUS_REPLY, 0xDEADBEEF, b"body!", nfds=253, flags=0xFF)
    assert frame[0:2] == b"IP"
    assert frame[2] == 1
    assert frame[3] == Op.STATUS_REPLY
    assert frame[4] == 0xFF
    assert frame[5] == 253
    assert int.from_bytes(frame[6:8], "big") == 0
    assert int.from_bytes(frame[8:12], "big") == 0xDEADBEEF
    assert int.from_bytes(frame[12:16], "big") == 5
    assert frame[16:] == b"body!"


@pytest.mark.parametrize("op", [*Op, 0, 0x40, 0x7F, 0xFE])
@pytest.mark.parametrize("request_id", [0, 1, 0x7FFFFFFF, 0xFFFFFFFF])
def test_round_trip_ops_and_request_ids(op: int, request_id: int) -> None:
    data = encode_frame(op, request_id, b"payload")
    assert run([Read(data)]) == [Frame(op, request_id, b"payload")]
    assert decode_record(data) == Frame(op, request_id, b"payload")


@pytest.mark.parametrize("body", [b"", b"\x00", b"IP\x01", bytes(range(256)), b"x" * 70_000])
@pytest.mark.parametrize("nfds", [0, 1, MAX_FDS_PER_FRAME])
def test_round_trip_bodies_and_fds(body: bytes, nfds: int) -> None:
    fds = tuple(range(3, 3 + nfds))
    data = encode_frame(Op.ECHO, 77, body, nfds=nfds, flags=1)
    assert len(data) == HEADER_SIZE + len(body)
    assert run([Read(data, fds)]) == [Frame(Op.ECHO, 77, body, fds, 1)]
    assert decode_record(data, fds) == Frame(Op.ECHO, 77, body, fds, 1)


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        ({"op": -1}, ErrorCode.UNKNOWN_OP),
        ({"op": 256}, ErrorCode.UNKNOWN_OP),
        ({"request_id": -1}, ErrorCode.BAD_REQUEST),
        ({"request_id": 1 << 32}, ErrorCode.BAD_REQUEST),
        ({"nfds": -1}, ErrorCode.FDS_TRUNCATED),
        ({"nfds": 254}, ErrorCode.FDS_TRUNCATED),
        ({"flags": 256}, ErrorCode.MALFORMED),
        ({"length": 1 << 32}, ErrorCode.TOO_LARGE),
        ({"length": -1}, ErrorCode.TOO_LARGE),
    ],
)
def test_encoding_out_of_range_is_a_local_error(kwargs: dict[str, int], code: ErrorCode) -> None:
    args = {"op": Op.ECHO, "request_id": 1, "length": 0} | kwargs
    with pytest.raises(LocalProtocolError) as info:
        encode_header(**args)
    assert info.value.code == code


def test_encode_frame_checks_its_fields_too() -> None:
    with pytest.raises(LocalProtocolError):
        encode_frame(256, 1)
    with pytest.raises(LocalProtocolError):
        encode_frame(Op.ECHO, 1 << 32)
    with pytest.raises(LocalProtocolError):
        encode_frame(Op.ECHO, 1, b"x", nfds=MAX_FDS_PER_FRAME + 1)
    with pytest.raises(LocalProtocolError):
        encode_frame(Op.ECHO, 1, b"x", flags=0x100)


@pytest.mark.parametrize("size", [HEADER_SIZE - 1, 0, -1, ABSOLUTE_MAX_FRAME_SIZE + 1])
def test_decoder_refuses_a_max_frame_size_out_of_range(size: int) -> None:
    with pytest.raises(LocalProtocolError):
        FrameDecoder(size)


def test_smallest_max_frame_size_takes_only_empty_bodies() -> None:
    assert run([Read(PING)], max_frame_size=HEADER_SIZE) == [Frame(Op.PING, 1)]
    assert run([Read(ECHO)], max_frame_size=HEADER_SIZE) == [Err(ErrorCode.TOO_LARGE, True, 2)]


# -- the corpus, whole and in pieces ------------------------------------------------


@pytest.mark.parametrize("case", STREAM_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("size", [0, 1, 3, 17], ids=["whole", "byte-by-byte", "by-3", "by-17"])
def test_stream_corpus(case: StreamCase, size: int) -> None:
    def split(data: bytes) -> list[bytes]:
        return split_every(data, size) if size else [data] if data else []

    assert run(case_reads(case, split), case.max_frame_size) == list(case.expected)


@pytest.mark.parametrize("case", STREAM_CASES, ids=lambda c: c.name)
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_stream_corpus_any_split(case: StreamCase, data: st.DataObject) -> None:
    def split(chunk: bytes) -> list[bytes]:
        return split_at(chunk, draw_cuts(data, len(chunk)))

    assert run(case_reads(case, split), case.max_frame_size) == list(case.expected)


@pytest.mark.parametrize("case", RECORD_CASES, ids=lambda c: c.name)
def test_record_corpus(case: RecordCase) -> None:
    try:
        got: Outcome = decode_record(case.data, case.fds, case.max_frame_size)
    except RemoteProtocolError as exc:
        got = as_err(exc)
    assert got == case.expected


# -- the decoder, step by step -----------------------------------------------


def test_bad_magic_is_fatal_on_the_first_byte() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(b"G")
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_event()
    assert (info.value.code, info.value.fatal) == (ErrorCode.MALFORMED, True)


def test_bad_magic_is_fatal_on_the_second_byte() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(b"I")
    assert decoder.next_event() is NEED_DATA
    decoder.receive_data(b"p")
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_event()
    assert (info.value.code, info.value.fatal) == (ErrorCode.MALFORMED, True)


def test_decoder_refuses_data_after_a_fatal_error() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(b"XX")
    with pytest.raises(RemoteProtocolError):
        decoder.next_event()
    with pytest.raises(LocalProtocolError):
        decoder.receive_data(PING)


@pytest.mark.parametrize(("limit", "length"), [(1024, 1024 - 15), (DEFAULT_MAX_FRAME_SIZE, 0xFFFFFFFF)])
def test_too_large_is_raised_on_the_header_before_any_body_byte(limit: int, length: int) -> None:
    header = raw_header(Op.ECHO, 31, length)
    decoder = FrameDecoder(limit)
    for byte in header[:-1]:
        decoder.receive_data(bytes([byte]))
        assert decoder.next_event() is NEED_DATA
    decoder.receive_data(header[-1:])
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_event()
    assert (info.value.code, info.value.fatal, info.value.request_id) == (ErrorCode.TOO_LARGE, True, 31)
    assert decoder.buffered == HEADER_SIZE


def test_frame_cut_off_waits_for_the_rest() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(ECHO[:10])
    assert decoder.next_event() is NEED_DATA
    assert decoder.buffered == 10
    decoder.receive_data(ECHO[10:19])
    assert decoder.next_event() is NEED_DATA
    assert decoder.buffered == 19
    decoder.receive_data(ECHO[19:])
    assert decoder.next_event() == Frame(Op.ECHO, 2, b"hello")
    assert decoder.buffered == 0
    assert decoder.next_event() is NEED_DATA


def test_pipelined_frames_in_one_buffer_come_out_in_order() -> None:
    frames = [Frame(i % 256, i, bytes([i % 256]) * (i % 5)) for i in range(200)]
    decoder = FrameDecoder()
    decoder.receive_data(b"".join(encode_frame(f.op, f.request_id, f.body) for f in frames) + PING[:3])
    assert [decoder.next_event() for _ in frames] == frames
    assert decoder.next_event() is NEED_DATA
    assert decoder.buffered == 3


def test_long_stream_keeps_fds_with_their_frames_across_buffer_compaction() -> None:
    # Reads of ~70 KB cutting frames in the middle: the buffer is compacted
    # while the fd batch of a half-read frame is pending.
    frames = [
        Frame(Op.ECHO, i, b"%08d" % i, (1000 + i, 2000 + i) if i % 3000 == 1500 else ())
        for i in range(12_000)
    ]
    length = sum(HEADER_SIZE + len(f.body) for f in frames)
    assert run(kernel_reads(frames, range(69_997, length, 69_997))) == frames


def test_fds_of_a_half_read_frame_survive_buffer_compaction() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(PING * 5000)
    decoder.receive_data(TWO_FDS[:10], (7, 8))
    assert [decoder.next_event() for _ in range(5000)] == [Frame(Op.PING, 1)] * 5000
    assert decoder.next_event() is NEED_DATA
    decoder.receive_data(TWO_FDS[10:])
    assert decoder.next_event() == Frame(Op.ECHO, 9, b"two fds", (7, 8))


def test_decoder_copies_what_it_is_fed() -> None:
    # The server reads into one reusable buffer and feeds memoryviews of it.
    buffer = bytearray(ECHO)
    decoder = FrameDecoder()
    decoder.receive_data(memoryview(buffer)[:10])
    buffer[:] = bytes(len(buffer))
    decoder.receive_data(ECHO[10:])
    assert decoder.next_event() == Frame(Op.ECHO, 2, b"hello")


# -- fd attribution -----------------------------------------------------------


def test_frame_gets_the_fds_that_came_with_its_first_byte() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(TWO_FDS, (7, 8))
    assert decoder.next_event() == Frame(Op.ECHO, 9, b"two fds", (7, 8))
    assert decoder.next_event() is NEED_DATA
    assert decoder.take_pending_fds() == []


def test_frame_declaring_fds_that_never_came_is_skipped_and_the_stream_goes_on() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(TWO_FDS + ECHO)
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_event()
    assert info.value.code == ErrorCode.FD_MISMATCH
    assert not info.value.fatal
    assert info.value.request_id == 9
    assert info.value.fds == ()
    assert decoder.next_event() == Frame(Op.ECHO, 2, b"hello")
    assert decoder.next_event() is NEED_DATA


def test_fds_sent_with_a_frame_declaring_none_are_handed_back() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(ECHO, (7,))
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_event()  # the ECHO is refused: it is the only frame those fds can belong to
    assert (info.value.code, info.value.fatal, info.value.request_id, info.value.fds) == (
        ErrorCode.FD_MISMATCH,
        False,
        2,
        (7,),
    )
    assert decoder.next_event() is NEED_DATA
    assert decoder.take_pending_fds() == []


def test_more_fds_than_declared_are_all_handed_back() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(TWO_FDS, (7, 8, 9))
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_event()
    assert (info.value.code, info.value.fatal) == (ErrorCode.FD_MISMATCH, False)
    assert (info.value.request_id, info.value.fds) == (9, (7, 8, 9))
    assert decoder.next_event() is NEED_DATA
    assert decoder.take_pending_fds() == []


def test_bytes_glued_before_an_fd_frame_do_not_take_its_fds() -> None:
    # One recvmsg returns an earlier fd-less write together with the fd write.
    decoder = FrameDecoder()
    decoder.receive_data(ECHO[:7])
    assert decoder.next_event() is NEED_DATA
    decoder.receive_data(ECHO[7:] + PING + TWO_FDS, (7, 8))
    assert decoder.next_event() == Frame(Op.ECHO, 2, b"hello")
    assert decoder.next_event() == Frame(Op.PING, 1)
    assert decoder.next_event() == Frame(Op.ECHO, 9, b"two fds", (7, 8))
    assert decoder.next_event() is NEED_DATA


def test_fds_arriving_in_the_middle_of_their_frame_are_a_mismatch() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(TWO_FDS[:4])
    assert decoder.next_event() is NEED_DATA
    decoder.receive_data(TWO_FDS[4:], (7, 8))
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_event()
    assert (info.value.code, info.value.fatal, info.value.request_id) == (ErrorCode.FD_MISMATCH, False, 9)
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_event()
    assert (info.value.code, info.value.fatal, info.value.fds) == (ErrorCode.FD_MISMATCH, False, (7, 8))
    assert decoder.next_event() is NEED_DATA


def test_take_pending_fds_returns_fds_not_handed_out_yet_once() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(PING, (5,))
    decoder.receive_data(TWO_FDS[:20], (7, 8))
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_event()
    assert info.value.fds == (5,)
    assert decoder.next_event() is NEED_DATA
    assert decoder.take_pending_fds() == [7, 8]
    assert decoder.take_pending_fds() == []


def test_take_pending_fds_after_a_fatal_error() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(raw_header(version=9, nfds=2), (7, 8))
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_event()
    assert info.value.fatal
    assert decoder.take_pending_fds() == [7, 8]


def test_frame_with_fds_claimed_then_pending_is_empty() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(TWO_FDS[:1], (7, 8))
    for byte in TWO_FDS[1:]:
        assert decoder.next_event() is NEED_DATA
        decoder.receive_data(bytes([byte]))
    assert decoder.next_event() == Frame(Op.ECHO, 9, b"two fds", (7, 8))
    assert decoder.take_pending_fds() == []
