"""Feeding the decoder: whole, byte by byte, in any split, and as the
kernel would glue reads; shared by the frame tests and their properties."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from itertools import pairwise
from typing import NamedTuple

import pytest
from hypothesis import strategies as st

from ipcd.protocol import (
    DEFAULT_MAX_FRAME_SIZE,
    HEADER_SIZE,
    NEED_DATA,
    Frame,
    FrameDecoder,
    LocalProtocolError,
    RemoteProtocolError,
    encode_frame,
)
from tests.protocol.corpus import (
    PING,
    Err,
    Outcome,
    StreamCase,
)


class Read(NamedTuple):
    """What one recvmsg brought, as the transport hands it to the decoder."""

    data: bytes
    fds: Sequence[int] = ()
    truncated: bool = False


def as_err(exc: RemoteProtocolError) -> Err:
    return Err(exc.code, exc.fatal, exc.request_id, exc.fds)


def drain(decoder: FrameDecoder) -> tuple[list[Outcome], bool]:
    """Every event the decoder has ready, and whether it stopped on a fatal error.
    Anything but a Frame, NEED_DATA or a RemoteProtocolError fails the test."""
    out: list[Outcome] = []
    for _ in range(1_000_000):
        try:
            event = decoder.next_event()
        except RemoteProtocolError as exc:
            out.append(as_err(exc))
            if exc.fatal:
                return out, True
            continue
        if event is NEED_DATA:
            return out, False
        assert isinstance(event, Frame), event
        out.append(event)
    pytest.fail("next_event never returned NEED_DATA")


def run(reads: Iterable[Read], max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> list[Outcome]:
    """Feed the reads one ``receive_data`` each, draining after each. After a
    fatal error the decoder must refuse more data."""
    decoder = FrameDecoder(max_frame_size)
    out: list[Outcome] = []
    for read in reads:
        decoder.receive_data(*read)
        events, fatal = drain(decoder)
        out += events
        if fatal:
            with pytest.raises(LocalProtocolError):
                decoder.receive_data(PING)
            break
    return out


def split_every(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def split_at(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    bounds = [0, *sorted(set(cuts)), len(data)]
    return [data[a:b] for a, b in pairwise(bounds) if b > a]


def draw_cuts(data: st.DataObject, length: int) -> set[int]:
    """Where to cut ``length`` bytes, drawn by hypothesis."""
    return data.draw(st.sets(st.integers(1, length - 1), max_size=30)) if length > 1 else set()


def case_reads(case: StreamCase, split: Callable[[bytes], list[bytes]]) -> list[Read]:
    """The case's input as reads: the fd chunk whole, the bytes around it (or
    all of them, in an fd-less case) cut by ``split``."""
    if not case.has_fd_chunk:
        return [Read(p) for p in split(case.data)]
    pre, mid, post = case.chunks()
    return [
        *(Read(p) for p in split(pre)),
        Read(mid, case.fds, case.fds_truncated),
        *(Read(p) for p in split(post)),
    ]


def encode(frame: Frame) -> bytes:
    return encode_frame(frame.op, frame.request_id, frame.body, len(frame.fds), frame.flags)


def kernel_reads(frames: Sequence[Frame], cuts: Iterable[int]) -> list[Read]:
    """The frames' stream cut into reads at ``cuts``, each frame's fds with the
    read that holds its first byte, as Linux delivers them (which needs at most
    one fd-carrying frame start per read)."""
    stream = b"".join(encode(f) for f in frames)
    fds_at: dict[int, tuple[int, ...]] = {}
    pos = 0
    for frame in frames:
        if frame.fds:
            fds_at[pos] = frame.fds
        pos += HEADER_SIZE + len(frame.body)
    reads = []
    for begin, end in pairwise([0, *sorted(set(cuts)), len(stream)]):
        if end == begin:
            continue
        owned = [fds for start, fds in fds_at.items() if begin <= start < end]
        assert len(owned) <= 1, "two fd-carrying frames start in one read"
        reads.append(Read(stream[begin:end], owned[0] if owned else ()))
    return reads
