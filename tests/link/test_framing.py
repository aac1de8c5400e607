"""Fragmentation, reassembly and batches of link messages, without sockets:
whatever the sizes, messages come back whole, in order, with their fds on
the first fragment only, and bad input is refused with the protocol's
remote error, never anything else."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ipcd.link.framing import FRAGMENT, MORE, Reassembler, batch_body, fragment, unbatch
from ipcd.protocol import Frame, RemoteProtocolError, decode_record, encode_frame

SIZES = st.one_of(st.integers(0, 64), st.integers(FRAGMENT - 2, FRAGMENT + 2), st.integers(0, 4 * FRAGMENT))
FAKE_FDS = (1000, 1001)  # numbers only: nothing here opens or closes an fd


def records_of(op: int, request_id: int, body: bytes, fds: tuple[int, ...]) -> list[Frame]:
    """What the receiver's recvmsg would see: each record decoded, the fds
    with the first."""
    encoded = fragment(op, request_id, body, len(fds))
    return [decode_record(r, fds if i == 0 else (), max_frame_size=1 << 20) for i, r in enumerate(encoded)]


@given(st.lists(st.tuples(SIZES, st.booleans()), min_size=1, max_size=8))
def test_messages_come_back_whole_in_order_with_their_fds(messages: list[tuple[int, bool]]) -> None:
    reassembler = Reassembler()
    got = []
    for index, (size, with_fds) in enumerate(messages):
        body = bytes([index % 256]) * size
        fds = FAKE_FDS if with_fds else ()
        for record in records_of(0x26, index, body, fds):
            message, stray = reassembler.feed(record)
            assert stray == ()
            if message is not None:
                got.append(message)
    assert [(m.request_id, m.body, m.fds) for m in got] == [
        (i, bytes([i % 256]) * size, FAKE_FDS if with_fds else ())
        for i, (size, with_fds) in enumerate(messages)
    ]
    assert reassembler.take_pending_fds() == ()


def test_records_fit_the_receive_buffer_and_only_the_last_lacks_more() -> None:
    encoded = fragment(0x25, 7, b"x" * (2 * FRAGMENT + 5), nfds=3)
    assert [len(r) for r in encoded] == [16 + FRAGMENT, 16 + FRAGMENT, 16 + 5]
    frames = [decode_record(r, (), max_frame_size=1 << 20) if i else None for i, r in enumerate(encoded)]
    assert encoded[0][5] == 3  # nfds on the first record only
    assert [f.flags & MORE for f in frames[1:] if f] == [MORE, 0]
    assert fragment(0x23, 0, b"") == [encode_frame(0x23, 0, b"")]


def test_bodiless_records_are_encoded_once_and_stay_exact() -> None:
    """A passed connection (no body, one fd) is the same record every time:
    it is encoded once, and must still declare its fds and carry no id."""
    for op, request_id, nfds in [(0x23, 0, 1), (0x23, 0, 0), (0x24, 5, 1), (0x25, 0, 3)]:
        first = fragment(op, request_id, b"", nfds)
        assert first == fragment(op, request_id, b"", nfds) == [encode_frame(op, request_id, b"", nfds=nfds)]
        frame = decode_record(first[0], tuple(range(nfds)), max_frame_size=1 << 20)
        assert (frame.op, frame.request_id, len(frame.fds), frame.body) == (op, request_id, nfds, b"")


def test_fds_on_a_later_fragment_are_handed_back_to_close() -> None:
    first, second = records_of(0x26, 1, b"y" * (FRAGMENT + 1), ())
    reassembler = Reassembler()
    assert reassembler.feed(first) == (None, ())
    message, stray = reassembler.feed(second._replace(fds=(55,)))
    assert message is not None
    assert (message.body, message.fds, stray) == (b"y" * (FRAGMENT + 1), (), (55,))


def test_a_message_cut_short_gives_its_fds_back() -> None:
    first, _ = records_of(0x25, 1, b"z" * (FRAGMENT + 1), FAKE_FDS)
    reassembler = Reassembler()
    reassembler.feed(first)
    assert reassembler.take_pending_fds() == FAKE_FDS
    assert reassembler.take_pending_fds() == ()


def test_an_oversized_message_is_refused_with_its_fds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("ipcd.link.framing.MESSAGE_MAX", FRAGMENT + 10)
    first, second = records_of(0x25, 1, b"w" * (FRAGMENT + 20), FAKE_FDS)
    reassembler = Reassembler()
    reassembler.feed(first)
    with pytest.raises(RemoteProtocolError) as refused:
        reassembler.feed(second)
    assert refused.value.fds == FAKE_FDS
    assert reassembler.feed(encode_and_decode(0x23, 2, b"next"))[0] == Frame(0x23, 2, b"next")


def encode_and_decode(op: int, request_id: int, body: bytes) -> Frame:
    return decode_record(encode_frame(op, request_id, body), (), max_frame_size=1 << 20)


@given(st.lists(st.binary(max_size=300), max_size=10))
def test_a_batch_splits_into_its_messages(bodies: list[bytes]) -> None:
    encoded = [encode_frame(0x26, i, body) for i, body in enumerate(bodies)]
    assert [(f.request_id, f.body) for f in unbatch(batch_body(encoded))] == list(enumerate(bodies))


@given(st.binary(max_size=200))
def test_any_batch_body_splits_or_raises_the_remote_error(body: bytes) -> None:
    try:
        unbatch(body)
    except RemoteProtocolError:
        pass


def test_a_truncated_batch_is_refused() -> None:
    whole = batch_body([encode_frame(0x26, 1, b"abc"), encode_frame(0x26, 2, b"def")])
    for end in range(1, len(whole)):
        if end == 19:  # exactly the first message: a valid batch of one
            assert len(unbatch(whole[:end])) == 1
            continue
        with pytest.raises(RemoteProtocolError):
            unbatch(whole[:end])


@given(st.lists(st.tuples(st.binary(max_size=100), st.integers(0, 3)), max_size=8))
def test_a_batch_hands_each_message_its_own_fds_in_order(messages: list[tuple[bytes, int]]) -> None:
    fds = tuple(range(1000, 1000 + sum(n for _, n in messages)))
    encoded = [encode_frame(0x25, i, body, nfds=n) for i, (body, n) in enumerate(messages)]
    frames = unbatch(batch_body(encoded), fds)
    assert [f.body for f in frames] == [body for body, _ in messages]
    assert tuple(fd for f in frames for fd in f.fds) == fds
    assert [len(f.fds) for f in frames] == [n for _, n in messages]


@pytest.mark.parametrize("arrived", [0, 1, 3])
def test_a_batch_whose_fds_do_not_add_up_gives_them_all_back(arrived: int) -> None:
    body = batch_body([encode_frame(0x25, 1, b"a", nfds=1), encode_frame(0x25, 2, b"b", nfds=1)])
    fds = (*FAKE_FDS, 1002) if arrived == 3 else FAKE_FDS[:arrived]
    with pytest.raises(RemoteProtocolError) as caught:
        unbatch(body, fds)
    assert caught.value.fds == fds
