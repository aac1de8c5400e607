"""Resuming a room after a seq (JOIN and HISTORY with ``after``), in-process.

A subscriber that was away asks for what came after the last seq it saw: it
gets every kept message after it, oldest first, then the live ones, with no
gap and no duplicate at the seam; what it asked for that is no longer kept
is named exactly (``gone``), never skipped silently."""

from __future__ import annotations

from collections import deque

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ipcd.chat import pages
from ipcd.chat.hub import Limits
from ipcd.protocol import ErrorCode, Op
from tests.chat.test_hub import PAGED, W1, W2, HubError, Sim, _full_room


def seqs(messages: list[dict[str, object]]) -> list[object]:
    return [m["seq"] for m in messages]


def test_join_after_a_seq_replays_what_came_after_it_then_the_live_ones() -> None:
    sim = Sim(Limits(history=50))
    poster = sim.connect(W1)
    for i in range(1, 8):
        poster.say("logs", f"line {i}")
    back = sim.connect(W2)
    reply = back.call(Op.JOIN, room="logs", after=4)
    assert (reply["seq"], reply["history"], reply["more"]) == (7, 3, False)
    assert "gone" not in reply
    poster.say("logs", "line 8")
    assert seqs(back.messages("logs")) == [5, 6, 7, 8]  # the seam: no gap, no duplicate


def test_what_is_no_longer_kept_is_named_exactly() -> None:
    sim = Sim(Limits(history=5))
    poster = sim.connect(W1)
    for i in range(1, 13):
        poster.say("logs", f"line {i}")  # 8..12 kept
    back = sim.connect(W2)
    reply = back.call(Op.JOIN, room="logs", after=3)
    assert reply["gone"] == [4, 7]
    assert seqs(back.messages("logs")) == [8, 9, 10, 11, 12]
    history = back.call(Op.HISTORY, room="logs", after=1)
    assert (history["gone"], seqs(history["messages"])) == ([2, 7], [8, 9, 10, 11, 12])
    assert "gone" not in back.call(Op.HISTORY, room="logs", after=7)  # 8 is the oldest kept: no gap


def test_after_the_last_seq_or_beyond_it_replays_nothing_and_misses_nothing() -> None:
    sim = Sim()
    poster = sim.connect(W1)
    poster.say("logs", "one")
    for after in (1, 9):  # beyond: the room was numbered again (the reply's seq says so)
        reply = sim.connect(W2).call(Op.JOIN, room="logs", after=after)
        assert (reply["seq"], reply["history"], reply["more"], "gone" in reply) == (1, 0, False, False)


def test_a_resume_pages_towards_the_newest_and_the_pages_join_up() -> None:
    sim = Sim(PAGED)
    _full_room(sim)  # 10 messages of ~2 KB, reply budget 5000
    back = sim.connect(W2)
    reply = back.call(Op.JOIN, room="big", after=0)
    assert (reply["history"], reply["more"], reply["after"]) == (2, True, 2)
    got = seqs(back.messages("big"))
    after = reply["after"]
    while True:
        page = back.call(Op.HISTORY, room="big", after=after)
        got += seqs(page["messages"])
        if not page["more"]:
            assert "after" not in page
            break
        after = page["after"]
    assert got == list(range(1, 11))


def test_history_after_honours_its_count() -> None:
    sim = Sim()
    poster = sim.connect(W1)
    for i in range(10):
        poster.say("logs", str(i))
    page = poster.call(Op.HISTORY, room="logs", after=2, count=3)
    assert (seqs(page["messages"]), page["more"], page["after"]) == ([3, 4, 5], True, 5)


@pytest.mark.parametrize(
    ("op", "args", "words"),
    [
        (Op.JOIN, {"room": "r", "after": 1, "history": 3}, "not both"),
        (Op.HISTORY, {"room": "r", "after": 1, "before": 3}, "not both"),
        (Op.JOIN, {"room": "r", "after": -1}, "after"),
        (Op.HISTORY, {"room": "r", "after": "3"}, "after"),
        (Op.HISTORY, {"room": "r", "after": 1.5}, "after"),
    ],
)
def test_bad_cursors_are_refused(op: int, args: dict[str, object], words: str) -> None:
    sim = Sim()
    conn = sim.connect(W1)
    conn.say("r", "x")
    with pytest.raises(HubError, match=words) as refused:
        conn.call(op, **args)
    assert refused.value.code == ErrorCode.BAD_REQUEST


@given(
    first=st.integers(1, 50),
    kept=st.integers(0, 20),
    seq=st.integers(0, 90),
    count=st.integers(0, 30),
    sizes=st.lists(st.integers(1, 40), min_size=20, max_size=20),
    budget=st.integers(1, 200),
)
def test_a_page_after_a_seq_is_what_follows_it_and_the_gap_before_it(
    first: int, kept: int, seq: int, count: int, sizes: list[int], budget: int
) -> None:
    history = deque((first + i, b"x" * sizes[i], 1000) for i in range(kept))
    last = first + kept - 1
    page = pages.after(history, last, seq, count, budget)
    got = [k[0] for k in page.kept]
    start = max(seq + 1, first)
    assert got == list(range(start, start + len(got)))  # consecutive, from the first after seq
    expected_any = count > 0 and start <= last
    assert bool(got) == expected_any
    if got:
        total = sum(len(k[1]) for k in page.kept)
        assert len(got) == 1 or total <= budget
        assert page.more == (got[-1] < last)
    else:
        assert not page.more
    if seq + 1 < first and seq < last:
        assert page.gone == (seq + 1, first - 1)
    else:
        assert page.gone is None
