"""The history journal's codec: round trip, torn tails, corruption, folding."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from ipcd.chat.journal import (
    RECORD_MAX,
    Forget,
    Header,
    Message,
    MessageRun,
    Record,
    RoomImage,
    RoomState,
    Topic,
    decode,
    encode,
    encode_run,
    fold,
    snapshot,
)

rooms = st.text(min_size=1, max_size=12)
body_records: st.SearchStrategy[Record] = st.one_of(
    st.builds(
        Message,
        rooms,
        st.integers(1, 2**63),
        st.integers(0, 2**32 - 1),
        st.binary(max_size=64),
    ),
    st.builds(
        RoomState, rooms, st.integers(0, 2**63), st.none() | st.integers(0, 2**32 - 1), st.text(max_size=20)
    ),
    st.builds(Topic, rooms, st.text(max_size=20)),
    st.builds(Forget, rooms),
)
journals = st.lists(body_records, max_size=12).map(lambda rs: [Header(7), *rs])


def _bytes(records: list[Record]) -> bytes:
    return b"".join(encode(r) for r in records)


@given(journals)
def test_round_trip(records: list[Record]) -> None:
    data = _bytes(records)
    decoded = decode(data)
    assert decoded.records == records
    assert (decoded.good, decoded.dropped, decoded.reason) == (len(data), 0, "")


@given(journals, st.data())
def test_any_prefix_decodes_to_a_prefix_of_the_records(records: list[Record], data: st.DataObject) -> None:
    whole = _bytes(records)
    cut = data.draw(st.integers(0, len(whole)))
    decoded = decode(whole[:cut])
    assert decoded.records == records[: len(decoded.records)]
    assert decoded.good + decoded.dropped == cut
    # only the torn record is lost: every record that ends within the cut is kept
    ends = [len(_bytes(records[: i + 1])) for i in range(len(records))]
    assert len(decoded.records) == sum(1 for end in ends if end <= cut)


@settings(max_examples=300)
@given(journals, st.data())
def test_any_byte_flip_is_detected(records: list[Record], data: st.DataObject) -> None:
    whole = bytearray(_bytes(records))
    at = data.draw(st.integers(0, len(whole) - 1))
    whole[at] ^= data.draw(st.integers(1, 255))
    decoded = decode(bytes(whole))
    hit = next(i for i in range(len(records)) if len(_bytes(records[: i + 1])) > at)
    assert decoded.records == records[:hit]  # everything before the flipped record, nothing after
    assert decoded.dropped == len(whole) - len(_bytes(records[:hit]))
    assert decoded.reason


def test_garbage_after_a_journal_is_dropped_and_counted() -> None:
    records: list[Record] = [Header(1), Message("r", 1, 1000, b"frame")]
    data = _bytes(records) + b"\x00\x00\x00\x05garbage"
    decoded = decode(data)
    assert decoded.records == records
    assert decoded.dropped == len(b"\x00\x00\x00\x05garbage")


def test_a_huge_length_is_refused_before_anything_is_read() -> None:
    data = encode(Header(1)) + (RECORD_MAX + 1).to_bytes(4, "big") + b"\x00" * 4
    decoded = decode(data)
    assert decoded.records == [Header(1)]
    assert "claiming" in decoded.reason


def test_a_journal_without_header_yields_nothing() -> None:
    decoded = decode(encode(Forget("r")))
    assert decoded.records == []
    assert decoded.reason == "no header"


@given(rooms, st.integers(1, 1000), st.integers(0, 2**32 - 1), st.lists(st.binary(max_size=40), max_size=5))
def test_a_run_encodes_as_its_messages(room: str, first: int, uid: int, frames: list[bytes]) -> None:
    run = MessageRun(room.encode(), first, uid, frames)
    expected = [Header(1), *(Message(room, first + i, uid, frame) for i, frame in enumerate(frames))]
    assert decode(encode(Header(1)) + encode_run(run)).records == expected


def test_fold_follows_creation_topics_and_forgetting() -> None:
    records: list[Record] = [
        Header(1),
        RoomState("a", creator=1000),
        Message("a", 1, 1000, b"a1"),
        Message("a", 2, 1001, b"a2"),
        RoomState("b", creator=1001),
        Message("b", 1, 1001, b"b1"),
        Topic("a", "news"),
        Forget("b"),
        RoomState("b", creator=1002),  # created again: numbered from 1 again
        Message("b", 1, 1002, b"b1 again"),
        Message("a", 3, 1000, b"a3"),
    ]
    images = fold(records, history=2)
    assert list(images) == ["a", "b"]
    a, b = images["a"], images["b"]
    assert (a.seq, a.topic, a.creator, list(a.history)) == (
        3,
        "news",
        1000,
        [(2, b"a2", 1001), (3, b"a3", 1000)],
    )
    assert (b.seq, b.creator, list(b.history)) == (1, 1002, [(1, b"b1 again", 1002)])
    assert a.last_used > b.last_used


def test_a_snapshot_splits_a_long_history_into_blocks() -> None:
    big = RoomImage("big", seq=300)
    big.history.extend((seq, b"x" * 10_000, 1000 + seq % 3) for seq in range(1, 301))
    pieces = list(snapshot(1, [big]))
    assert len(pieces) > 3
    images = fold(decode(b"".join(pieces)).records, history=1000)
    assert list(images["big"].history) == list(big.history)


def test_a_snapshot_folds_to_the_rooms_it_was_made_of() -> None:
    a = RoomImage("a", seq=9, creator=1000, topic="t")
    a.history.extend([(8, b"m8", 1000), (9, b"m9", 1001)])
    lobby = RoomImage("lobby", seq=4)  # history trimmed away, seq kept
    decoded = decode(b"".join(snapshot(5, [a, lobby])))
    assert decoded.records[0] == Header(5)
    images = fold(decoded.records, history=100)
    assert [(i.name, i.seq, i.creator, i.topic, list(i.history)) for i in images.values()] == [
        ("a", 9, 1000, "t", [(8, b"m8", 1000), (9, b"m9", 1001)]),
        ("lobby", 4, None, "", []),
    ]
