"""The echo fast path must answer exactly what the general path answers."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from ipcd.protocol import (
    NEED_DATA,
    FrameDecoder,
    Op,
    RemoteProtocolError,
    encode_frame,
    encode_header,
    reply_op,
)
from ipcd.protocol.fastpath import ECHO_PREFIX, _equal_frames, reflect_plain_run

MAX = 4096


def general_replies(data: bytes) -> tuple[bytes, int, int]:
    """Replies the general decoder gives to the leading plain ECHO frames,
    and how many bytes those frames span (the fast path's contract)."""
    decoder = FrameDecoder(MAX)
    decoder.receive_data(data)
    out = bytearray()
    consumed = 0
    count = 0
    while True:
        try:
            frame = decoder.next_event()
        except RemoteProtocolError:
            break
        if frame is NEED_DATA or frame.op != Op.ECHO or frame.flags or frame.fds:
            break
        out += encode_header(reply_op(frame.op), frame.request_id, len(frame.body)) + frame.body
        consumed += 16 + len(frame.body)
        count += 1
    return bytes(out), consumed, count


echo_frames = st.lists(
    st.tuples(st.integers(0, 0xFFFFFFFF), st.binary(max_size=200)).map(
        lambda t: encode_frame(Op.ECHO, t[0], t[1])
    ),
    max_size=20,
)
other_frames = st.sampled_from(
    [
        encode_frame(Op.PING, 1, b"p"),
        encode_frame(Op.ECHO, 2, b"f", flags=1),
        encode_frame(Op.ECHO, 3, b"", nfds=1),
        encode_frame(Op.ECHO, 4, b"x" * MAX),  # over the limit
        b"garbage!" * 3,
    ]
)


@settings(max_examples=300, deadline=None)
@given(echo_frames, st.one_of(st.just(b""), other_frames), st.integers(0, 40))
def test_fast_path_matches_general_path(frames: list[bytes], tail: bytes, cut: int) -> None:
    data = b"".join(frames) + tail
    data = data[: max(len(data) - cut, 0)]  # possibly end mid-frame
    reply, count = reflect_plain_run(data, len(data), ECHO_PREFIX, MAX)
    expected, consumed, frames_answered = general_replies(data)
    assert bytes(reply) == expected
    assert len(reply) == consumed
    assert count == frames_answered


def test_run_stops_at_the_first_frame_that_is_not_plain_echo() -> None:
    data = encode_frame(Op.ECHO, 1, b"a") + encode_frame(Op.PING, 2, b"b") + encode_frame(Op.ECHO, 3)
    reply, count = reflect_plain_run(data, len(data), ECHO_PREFIX, MAX)
    assert count == 1
    assert bytes(reply) == encode_frame(Op.ECHO_REPLY, 1, b"a")


def test_incomplete_frame_is_left_for_the_decoder() -> None:
    data = encode_frame(Op.ECHO, 1, b"abc") + encode_frame(Op.ECHO, 2, b"defg")[:-1]
    reply, count = reflect_plain_run(data, len(data), ECHO_PREFIX, MAX)
    assert (len(reply), count) == (19, 1)


def equal_run(body_size: int, ids: list[int]) -> bytes:
    return b"".join(encode_frame(Op.ECHO, i, bytes([i % 256]) * body_size) for i in ids)


@settings(max_examples=300, deadline=None)
@given(
    st.integers(0, 100),
    st.lists(st.integers(0, 0xFFFFFFFF), min_size=0, max_size=40),
    st.one_of(st.just(b""), other_frames, echo_frames.map(b"".join)),
    st.integers(0, 40),
    st.binary(max_size=40),
)
def test_a_run_of_equal_frames_matches_the_general_path(
    body_size: int, ids: list[int], tail: bytes, cut: int, beyond: bytes
) -> None:
    """Runs of equal frames take the pattern; what follows them (another
    length, another op, a cut) the frame-by-frame scan. Bytes past ``end``
    in the caller's buffer (the worker's read buffer) are never looked at."""
    data = equal_run(body_size, ids) + tail
    data = data[: max(len(data) - cut, 0)]
    buf = bytearray(data + beyond)
    reply, count = reflect_plain_run(buf, len(data), ECHO_PREFIX, MAX)
    expected, consumed, frames_answered = general_replies(data)
    assert (bytes(reply), len(reply), count) == (expected, consumed, frames_answered)


@settings(max_examples=200, deadline=None)
@given(st.integers(4, 30), st.data())
def test_one_bad_byte_in_a_run_of_equal_frames_stops_the_run_there(count: int, data: st.DataObject) -> None:
    frames = [bytearray(encode_frame(Op.ECHO, i, b"x" * 24)) for i in range(count)]
    bad = data.draw(st.integers(0, count - 1), label="frame")
    offset = data.draw(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 12, 13, 14, 15]), label="header byte")
    frames[bad][offset] ^= data.draw(st.integers(1, 255), label="flip")
    stream = b"".join(frames)
    reply, answered = reflect_plain_run(stream, len(stream), ECHO_PREFIX, MAX)
    expected, _, frames_answered = general_replies(stream)
    assert (bytes(reply), answered) == (expected, frames_answered)
    assert answered >= bad  # every frame before the damaged one is answered


def test_frames_over_the_size_limit_are_not_taken_even_in_an_equal_run() -> None:
    data = equal_run(100, list(range(8)))
    reply, count = reflect_plain_run(data, len(data), ECHO_PREFIX, 16 + 99)
    assert (bytes(reply), count) == (b"", 0)


def test_many_frame_lengths_keep_a_bounded_number_of_patterns() -> None:
    for body_size in range(200):
        data = equal_run(body_size, [1, 2, 3, 4])
        assert reflect_plain_run(data, len(data), ECHO_PREFIX, MAX)[1] == 4
    assert _equal_frames.cache_info().currsize <= 64
