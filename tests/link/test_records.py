"""The link's records: every record survives its binary form unchanged, and
bytes that are not a record raise LinkError, never anything else (the
decoders are the one place where another process's bytes come in)."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ipcd.link.records import (
    THROTTLE_MAX,
    Answer,
    Deliver,
    Forward,
    Gone,
    LinkError,
    Post,
    Replica,
    Throttle,
    Unreplica,
)

U32 = st.integers(0, 2**32 - 1)
CONN = st.integers(0, 2**63)
NAME = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=64)  # no surrogates
ADDRESS = st.binary(min_size=1, max_size=108)

FORWARDS = st.builds(
    Forward,
    conn=CONN,
    request_id=U32,
    op=st.integers(0, 255),
    uid=U32,
    gid=U32,
    pid=U32,
    body=st.binary(max_size=512),
    groups=st.lists(U32, max_size=40).map(tuple),
    dgram=st.none() | ADDRESS,
)
ANSWERS = st.builds(
    Answer,
    conn=CONN,
    frame=st.binary(max_size=512),
    joined=st.none() | NAME,
    parted=st.none() | NAME,
    handout=st.booleans(),
    dgram=st.none() | ADDRESS,
    replies=st.integers(1, 2**32 - 1),
)
DELIVERIES = st.one_of(
    st.builds(Deliver, frames=st.binary(max_size=512), room=NAME, conns=st.just(())),
    st.builds(
        Deliver, frames=st.binary(max_size=512), room=st.none(), conns=st.lists(CONN, max_size=30).map(tuple)
    ),
)
GONES = st.builds(Gone, conn=CONN)
REPLICAS = st.builds(
    Replica,
    name=NAME,
    owner=U32,
    public=st.booleans(),
    allow_uids=st.lists(U32, max_size=20).map(tuple),
    allow_gids=st.lists(U32, max_size=20).map(tuple),
    body=st.binary(max_size=512),
)
UNREPLICAS = st.builds(Unreplica, token=U32, name=NAME)
THROTTLES = st.builds(Throttle, uid=U32, seconds=st.floats(0, THROTTLE_MAX))
RECORDS = st.one_of(FORWARDS, ANSWERS, DELIVERIES, GONES, REPLICAS, UNREPLICAS, THROTTLES)
DECODERS: list[Callable[[bytes], object]] = [
    Forward.decode,
    Answer.decode,
    Deliver.decode,
    Gone.decode,
    Replica.decode,
    Unreplica.decode,
    Throttle.decode,
]


@given(RECORDS)
def test_every_record_comes_back_unchanged(
    record: Forward | Answer | Deliver | Gone | Replica | Unreplica | Throttle,
) -> None:
    assert type(record).decode(record.encode()) == record


@given(st.one_of(FORWARDS, ANSWERS, DELIVERIES, REPLICAS))
def test_a_cut_record_is_refused_or_keeps_its_fields(record: Forward | Answer | Deliver | Replica) -> None:
    """Cut anywhere in its fixed part, a record is refused; the payload at
    the end is opaque, so a cut there only shortens it."""
    data = record.encode()
    for end in range(len(data)):
        try:
            got = type(record).decode(data[:end])
        except LinkError:
            continue
        payload = {Forward: "body", Answer: "frame", Deliver: "frames", Replica: "body"}[type(record)]
        fixed = {k: v for k, v in vars_of(got).items() if k != payload}
        assert fixed == {k: v for k, v in vars_of(record).items() if k != payload}


def vars_of(record: Forward | Answer | Deliver | Replica) -> dict[str, object]:
    return dict(record._asdict())


@pytest.mark.parametrize("decode", DECODERS, ids=lambda d: d.__qualname__)
@given(data=st.binary(max_size=200))
def test_any_bytes_decode_or_raise_link_error(decode: Callable[[bytes], object], data: bytes) -> None:
    try:
        decode(data)
    except LinkError:
        pass


def test_corpus_of_known_forms() -> None:
    forward = Forward(7, 9, 0x13, 1000, 100, 4242, b'{"room":"dev"}', (4, 27), None)
    assert forward.encode() == (
        bytes.fromhex("0000000000000007 00000009 13 000003e8 00000064 00001092 0002 0000")
        + bytes.fromhex("00000004 0000001b")
        + b'{"room":"dev"}'
    )
    assert Gone(1).encode() == bytes.fromhex("0000000000000001")
    assert Deliver(b"F", room="dev").encode() == b"\x00\x00\x00\x00\x03devF"
    with pytest.raises(LinkError, match="unknown delivery kind"):
        Deliver.decode(b"\x07\x00\x00\x00\x00")
    with pytest.raises(LinkError, match="not UTF-8"):
        Answer.decode(Answer(1, b"", joined="x").encode().replace(b"x", b"\xff"))
    with pytest.raises(LinkError, match="expected 8"):
        Gone.decode(b"\x00")
    assert Replica("e", 1000, True, (7,), (), b"{}").encode() == (
        bytes.fromhex("000003e8 01 0001 0001 0000") + bytes.fromhex("00000007") + b"e{}"
    )
    assert Unreplica(3, "e").encode() == b"\x00\x00\x00\x03e"
    assert Throttle(1000, 0.5).encode() == bytes.fromhex("000003e8 3fe0000000000000")
    assert Throttle(1000, 1e9).encode() == Throttle(1000, THROTTLE_MAX).encode()  # a hold is bounded


@pytest.mark.parametrize("seconds", [float("nan"), float("inf"), -1.0, THROTTLE_MAX * 2])
def test_a_throttle_for_no_sensible_time_is_refused(seconds: float) -> None:
    raw = Throttle(1000, 0).encode()[:4] + struct.pack("!d", seconds)
    with pytest.raises(LinkError, match="THROTTLE for"):
        Throttle.decode(raw)


POSTS = st.lists(
    st.builds(Post, request_id=U32, room=NAME, text_json=st.binary(max_size=64)), min_size=1, max_size=8
)


@given(POSTS)
def test_a_run_of_posts_comes_back_unchanged(posts: list[Post]) -> None:
    assert Post.decode_run(b"".join(p.encode() for p in posts)) == posts


@given(POSTS, st.data())
def test_a_cut_run_of_posts_is_refused_or_keeps_whole_posts(posts: list[Post], data: st.DataObject) -> None:
    body = b"".join(p.encode() for p in posts)
    cut = body[: data.draw(st.integers(0, len(body) - 1))]
    try:
        got = Post.decode_run(cut)
    except LinkError:
        return
    assert got == posts[: len(got)]  # cut where a post ended
