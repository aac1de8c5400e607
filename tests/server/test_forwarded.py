"""The per-uid count of requests waiting in a worker's channel for the
master (ipcd.server.forwarded), alone and driven by a real channel whose
peer does not read."""

from __future__ import annotations

import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st

from ipcd.link.framing import FRAGMENT
from ipcd.link.ops import ChannelOp
from ipcd.link.records import FORWARD_ENVELOPE_MAX
from ipcd.server.channel import Channel
from ipcd.server.forwarded import ForwardLedger, forward_bound, forward_budget, largest_forward
from ipcd.settings import Settings

A, B = 1001, 1002
SETTINGS = Settings(forward_bytes_per_uid=1000, privileged_budget_factor=4)


def _ledger(settings: Settings = SETTINGS) -> ForwardLedger:
    budget = forward_budget(settings)
    budget.privileged = frozenset({0})
    return ForwardLedger(budget)


def test_bytes_are_released_once_the_channel_writes_past_their_end() -> None:
    ledger = _ledger()
    ledger.queued(A, 100, end=100, sealed=100)
    ledger.queued(B, 50, end=150, sealed=150)
    ledger.queued(A, 30, end=180, sealed=180)
    assert ledger.budget.held == {A: 130, B: 50}
    ledger.advance(149)  # B's request is not wholly written: it still waits
    assert ledger.budget.held == {A: 30, B: 50}
    ledger.advance(180)
    assert ledger.budget.held == {}  # a uid that waits for nothing is not listed


def test_requests_of_one_uid_in_one_unsent_batch_share_a_mark() -> None:
    ledger = _ledger()
    ledger.queued(A, 10, end=10, sealed=0)
    ledger.queued(A, 10, end=20, sealed=0)  # same batch: the entry grows
    ledger.queued(B, 10, end=30, sealed=0)
    ledger.queued(A, 10, end=40, sealed=40)  # the batch went: a new entry after B's
    assert len(ledger._marks) == 3
    ledger.advance(30)
    assert ledger.budget.held == {A: 10}


def test_a_uid_at_its_budget_is_held_and_resumes_at_half() -> None:
    ledger = _ledger()
    ledger.queued(A, 300, end=300, sealed=300)
    ledger.queued(A, 300, end=600, sealed=600)
    assert ledger.admits(A)  # under the budget: one more may go, and cross it
    ledger.queued(A, 500, end=1100, sealed=1100)
    assert not ledger.admits(A)
    assert ledger.admits(B)  # another uid is not held
    ledger.advance(300)
    assert ledger.admits(A)
    assert not ledger.resumes(A)  # 800 left: more than half the budget
    ledger.advance(600)
    assert ledger.resumes(A)  # 500 left: half


def test_root_gets_the_privileged_factor() -> None:
    ledger = _ledger()
    ledger.queued(0, 3999, end=3999, sealed=3999)
    assert ledger.admits(0)
    ledger.queued(0, 1, end=4000, sealed=4000)
    assert not ledger.admits(0)
    assert ledger.budget.refusal(0, "advice") == (
        "uid 0 holds 4000 bytes of requests waiting to reach the master, its limit (the daemon's "
        "--forward-bytes-per-uid is 4000 per uid in each worker): advice"
    )


def test_the_bound_is_the_budget_plus_one_forwarded_request() -> None:
    settings = dataclasses.replace(SETTINGS, max_frame_size=4096)
    assert largest_forward(settings) == 4096 + FORWARD_ENVELOPE_MAX
    assert forward_bound(settings) == 1000 + 4096 + FORWARD_ENVELOPE_MAX
    assert forward_bound(settings, privileged=True) == 4000 + 4096 + FORWARD_ENVELOPE_MAX


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([A, B]), st.integers(1, 3000), st.booleans()), max_size=60))
def test_what_is_held_is_what_the_channel_has_not_written(posts: list[tuple[int, int, bool]]) -> None:
    """Against a model of a channel: records formed at each flush, written
    in order; held per uid is exactly its bytes not written."""
    ledger = _ledger()
    queued = sealed = written = 0
    unsent: list[tuple[int, int, int]] = []  # (end, uid, nbytes) of every request
    for uid, nbytes, flush in posts:
        queued += nbytes
        if flush:
            sealed = queued
        ledger.queued(uid, nbytes, queued, sealed)
        unsent.append((queued, uid, nbytes))
        if flush and nbytes % 2:  # the peer took everything formed
            written = sealed
            ledger.advance(written)
        expected: dict[int, int] = {}
        for end, who, size in unsent:
            if end > written:
                expected[who] = expected.get(who, 0) + size
        # A request is released with its batch: never early, and once its
        # whole batch is written.
        assert ledger.budget.held == expected


def _drain(sock: Channel) -> int:
    got = 0
    while True:
        try:
            frame = sock.recv()
        except BlockingIOError:
            return got
        got += len(frame.body)


def test_a_real_channel_says_when_what_it_queued_is_written() -> None:
    """The worker's end with a peer that does not read: what is queued
    while the socket is full waits in the backlog, and ``written`` stays
    behind it until the peer reads and the backlog is flushed."""
    master_end, worker_end = Channel.pair()
    ledger = _ledger(Settings(forward_bytes_per_uid=1 << 20))
    try:
        body = b"x" * 40_000
        uid = A
        while not worker_end.has_backlog:
            worker_end.post(ChannelOp.FORWARD, body)
            ledger.queued(uid, len(body), worker_end.queued, worker_end.sealed)
            uid = B if uid == A else A
            worker_end.flush()
            ledger.advance(worker_end.written)
        for _ in range(10):  # more, in batches larger than a fragment
            worker_end.post(ChannelOp.FORWARD, body)
            ledger.queued(A, len(body), worker_end.queued, worker_end.sealed)
        worker_end.flush()
        ledger.advance(worker_end.written)
        assert worker_end.written < worker_end.queued
        assert ledger.budget.held[A] >= 10 * len(body)
        assert sum(ledger.budget.held.values()) >= worker_end.backlog_bytes - FRAGMENT
        received = 0
        while worker_end.has_backlog:
            received += _drain(master_end)
            worker_end.flush_backlog()
            ledger.advance(worker_end.written)
        assert worker_end.written == worker_end.queued
        assert ledger.budget.held == {}
    finally:
        master_end.close()
        worker_end.close()


def test_a_closed_channel_releases_everything() -> None:
    master_end, worker_end = Channel.pair()
    ledger = _ledger(Settings(forward_bytes_per_uid=1 << 20))
    body = b"y" * 50_000
    while not worker_end.has_backlog:
        worker_end.post(ChannelOp.FORWARD, body)
        ledger.queued(A, len(body), worker_end.queued, worker_end.sealed)
        worker_end.flush()
    worker_end.post(ChannelOp.FORWARD, b"in the batch")
    ledger.queued(B, 12, worker_end.queued, worker_end.sealed)
    master_end.close()
    worker_end.close()
    ledger.advance(worker_end.written)
    assert ledger.budget.held == {}
