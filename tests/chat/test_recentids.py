"""The window of recent message ids, alone: per uid, bounded by count and
by age, rebuilt from restored entries, and as small as its docs say."""

from __future__ import annotations

import tracemalloc

from hypothesis import given, settings
from hypothesis import strategies as st

from ipcd.chat.recentids import ENTRY_COST, Posted, RecentIds

T0 = 1_800_000_000.0


def posted(seq: int, at: float = T0, room: bytes = b'"r"') -> Posted:
    return Posted(room, seq, repr(at).encode(), at)


def test_an_id_is_found_with_what_it_was_posted_as() -> None:
    ids = RecentIds()
    assert ids.get(1000, b"a", T0) is None
    ids.remember(1000, b"a", posted(7))
    assert ids.get(1000, b"a", T0 + 1) == posted(7)
    assert ids.get(1000, b"b", T0 + 1) is None


def test_ids_are_per_uid() -> None:
    ids = RecentIds()
    ids.remember(1000, b"a", posted(1))
    assert ids.get(1001, b"a", T0) is None
    ids.remember(1001, b"a", posted(2))
    assert ids.get(1000, b"a", T0) == posted(1)
    assert ids.get(1001, b"a", T0) == posted(2)


def test_each_uid_keeps_its_last_n_ids_and_no_more() -> None:
    ids = RecentIds(per_uid=3)
    for n in range(10):
        ids.remember(1000, b"m%d" % n, posted(n + 1))
    ids.remember(1001, b"m0", posted(1))
    assert ids.held(1000) == 3
    assert [ids.get(1000, b"m%d" % n, T0) is not None for n in range(10)] == [False] * 7 + [True] * 3
    assert ids.get(1001, b"m0", T0) is not None  # another uid's window is its own


def test_an_id_older_than_the_window_no_longer_matches_and_is_dropped() -> None:
    ids = RecentIds(seconds=600)
    ids.remember(1000, b"old", posted(1, T0))
    ids.remember(1000, b"new", posted(2, T0 + 300))
    assert ids.get(1000, b"old", T0 + 600) is not None  # exactly at the edge: still in
    assert ids.get(1000, b"old", T0 + 600.5) is None
    assert ids.held(1000) == 1
    assert ids.get(1000, b"new", T0 + 900) is not None
    assert ids.get(1000, b"new", T0 + 901) is None
    assert ids.holdings() == {}  # a uid with nothing left is not kept at all


def test_a_clock_that_steps_back_keeps_entries_rather_than_dropping_them() -> None:
    ids = RecentIds(seconds=600)
    ids.remember(1000, b"a", posted(1, T0))
    assert ids.get(1000, b"a", T0 - 3600) == posted(1, T0)


def test_restore_rebuilds_the_window_oldest_first_and_applies_its_bounds() -> None:
    ids = RecentIds(per_uid=2, seconds=600)
    entries = [(1000, b"c", posted(3, T0 + 2)), (1000, b"a", posted(1, T0)), (1000, b"b", posted(2, T0 + 1))]
    ids.restore(entries)
    assert ids.get(1000, b"a", T0 + 3) is None  # the oldest, past the count bound
    assert ids.get(1000, b"b", T0 + 3) == posted(2, T0 + 1)
    assert ids.get(1000, b"c", T0 + 3) == posted(3, T0 + 2)
    assert ids.get(1000, b"c", T0 + 603) is None  # restored entries age from when they were posted


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 20), st.floats(0, 100)), max_size=80))
def test_the_window_is_exactly_the_last_n_ids_of_the_last_seconds(
    posts: list[tuple[int, int, float]],
) -> None:
    """Against a model: a list of everything posted, filtered on demand."""
    per_uid, seconds = 5, 30.0
    ids = RecentIds(per_uid, seconds)
    history: list[tuple[int, bytes, float]] = []
    now = T0
    for seq, (uid, n, step) in enumerate(posts, 1):
        now += step
        message_id = b"%d" % n
        if ids.get(uid, message_id, now) is None:
            ids.remember(uid, message_id, posted(seq, now))
            history.append((uid, message_id, now))
        for check_uid in range(4):
            mine = [(m, at) for u, m, at in history if u == check_uid]
            alive = {m for m, at in mine[-per_uid:] if at >= now - seconds}
            for check in range(21):
                assert (ids.get(check_uid, b"%d" % check, now) is not None) == (b"%d" % check in alive)
            assert ids.held(check_uid) <= per_uid


def test_an_entry_costs_at_most_entry_cost_bytes() -> None:
    """The figure docs/security.md bounds a uid's window with."""
    count = 4096
    ts = repr(T0).encode()
    room = b'"some-room"'
    ids = RecentIds(per_uid=count)
    message_ids = [(b"%064d" % n) for n in range(count)]  # the longest ids, made before measuring
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n, message_id in enumerate(message_ids):
            ids.remember(1000, message_id, Posted(room, 10_000_000 + n, ts, T0 + n * 1e-6))
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    per_entry = used / count
    assert per_entry + len(message_ids[0]) + 33 <= ENTRY_COST, per_entry  # the id itself is the client's
