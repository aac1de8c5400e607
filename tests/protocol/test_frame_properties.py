"""Property-based tests of the frame decoder (hypothesis): any input gives
frames or RemoteProtocolError only, every fd comes back exactly once, and
the split of the input never changes the result."""

from __future__ import annotations

from itertools import pairwise

from hypothesis import given, settings
from hypothesis import strategies as st

from ipcd.protocol import (
    DEFAULT_MAX_FRAME_SIZE,
    HEADER_SIZE,
    Frame,
    FrameDecoder,
    RemoteProtocolError,
    decode_record,
)
from tests.protocol.corpus import (
    Outcome,
)
from tests.protocol.feeding import (
    Read,
    as_err,
    drain,
    draw_cuts,
    encode,
    kernel_reads,
    run,
    split_at,
    split_every,
)

# -- properties -------------------------------------------------------------------

frames_st = st.builds(
    Frame,
    op=st.integers(0, 255),
    request_id=st.integers(0, 0xFFFFFFFF),
    body=st.binary(max_size=64),
    fds=st.integers(0, 4).map(lambda n: tuple(range(n))),
    flags=st.integers(0, 255),
)


@st.composite
def mangled_streams(draw: st.DrawFn) -> bytes:
    """Valid frames with a few bytes changed, then cut anywhere."""
    data = bytearray(b"".join(encode(f) for f in draw(st.lists(frames_st, min_size=1, max_size=4))))
    for _ in range(draw(st.integers(0, 3))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(0, len(data)))])


any_bytes = st.one_of(
    st.binary(max_size=200),
    st.binary(max_size=200).map(lambda b: b"IP\x01" + b),
    mangled_streams(),
)
limits = st.sampled_from([HEADER_SIZE, 40, DEFAULT_MAX_FRAME_SIZE])


@settings(max_examples=300, deadline=None)
@given(stream=any_bytes, limit=limits, data=st.data())
def test_any_bytes_with_any_fds_give_frames_or_remote_errors_and_every_fd_back(
    stream: bytes, limit: int, data: st.DataObject
) -> None:
    given_fds: list[int] = []
    decoder = FrameDecoder(limit)
    out: list[Outcome] = []
    for piece in split_at(stream, draw_cuts(data, len(stream))):
        fds = tuple(range(len(given_fds), len(given_fds) + data.draw(st.integers(0, 3))))
        given_fds += fds
        decoder.receive_data(piece, fds, not fds and data.draw(st.booleans()))
        events, fatal = drain(decoder)  # fails on anything but Frame, NEED_DATA, RemoteProtocolError
        out += events
        if fatal:
            break
    # Every fd comes back exactly once: in a frame, in an error, or as pending.
    handed = [fd for event in out for fd in event.fds] + decoder.take_pending_fds()
    assert sorted(handed) == given_fds


@settings(max_examples=300, deadline=None)
@given(stream=any_bytes, limit=limits, data=st.data())
def test_any_bytes_in_any_split_decode_as_when_fed_whole(
    stream: bytes, limit: int, data: st.DataObject
) -> None:
    whole = run([Read(stream)], limit)
    assert run([Read(p) for p in split_at(stream, draw_cuts(data, len(stream)))], limit) == whole
    assert run([Read(p) for p in split_every(stream, 1)], limit) == whole


@settings(max_examples=300, deadline=None)
@given(frames=st.lists(frames_st, max_size=8), data=st.data())
def test_valid_frames_in_any_split_decode_to_themselves(frames: list[Frame], data: st.DataObject) -> None:
    numbered: list[Frame] = []  # each frame's fds get numbers of their own
    starts: list[int] = []
    pos = 0
    for frame in frames:
        first = len([fd for f in numbered for fd in f.fds])
        numbered.append(frame._replace(fds=tuple(range(first, first + len(frame.fds)))))
        if frame.fds:
            starts.append(pos)
        pos += HEADER_SIZE + len(frame.body)
    # Cut anywhere, but as Linux does: never two fd-carrying frame starts in one read.
    cuts = draw_cuts(data, pos)
    for a, b in pairwise(starts):
        if not any(a < cut <= b for cut in cuts):
            cuts.add(data.draw(st.integers(a + 1, b)))
    assert run(kernel_reads(numbered, cuts)) == numbered
    for frame in numbered:
        assert decode_record(encode(frame), frame.fds) == frame


@settings(max_examples=300, deadline=None)
@given(record=any_bytes, nfds=st.integers(0, 4), limit=limits)
def test_decode_record_gives_a_frame_or_a_remote_error(record: bytes, nfds: int, limit: int) -> None:
    fds = tuple(range(10, 10 + nfds))
    try:
        outcome: Outcome = decode_record(record, fds, limit)
    except RemoteProtocolError as exc:
        outcome = as_err(exc)
    assert outcome.fds == fds  # in the frame, or in the error for the caller to close
    if isinstance(outcome, Frame):
        assert encode(outcome) == record
