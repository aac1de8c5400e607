"""A uid's post rate, daemon-wide: the master's debt and the THROTTLE it
sends, fed times by hand (ipcd.chat.postrate and the hub are sans-IO).

The last tests put the two halves together in a small model of the
daemon: workers that forward a flooding uid's posts as their own share
allows, a master that charges them and answers THROTTLE, each way with a
channel delay. The uid's posts over all workers must stay under the bound
the module documents, and without the throttles they do not.
"""

from __future__ import annotations

import json
from collections import deque

import pytest

from ipcd.chat.fairshare import BURST_FACTOR, TokenBucket
from ipcd.chat.hub import Hub, Limits
from ipcd.chat.postrate import THROTTLE_INTERVAL, PostRates
from ipcd.link.ops import ChannelOp
from ipcd.link.outbox import Outbox
from ipcd.link.records import Answer, Out, Post, Sender, Throttle
from ipcd.protocol import Op
from tests.chat.test_hub import frames_of

W1, W2 = 1001, 1002  # worker pids
UID, OTHER = 70000, 70001


# -- the buckets ------------------------------------------------------------------


def test_spending_past_the_tokens_goes_into_debt_and_refills_out_of_it() -> None:
    bucket = TokenBucket(rate=4, burst=8, now=0.0)
    assert bucket.spend(10, 0.0) == -2  # nothing refused: the debt is kept
    assert bucket.available(0.25) == -1
    assert bucket.delay(0.25) == 0.5  # a token again once the debt is paid
    assert bucket.available(10.0) == 8


def test_withholding_gives_no_token_for_that_long() -> None:
    bucket = TokenBucket(rate=4, burst=8, now=0.0)
    bucket.withhold(0.5, 0.0)
    assert bucket.delay(0.0) == 0.5
    assert not bucket.take(0.25)
    assert bucket.take(0.5)
    empty = TokenBucket(rate=4, burst=8, now=0.0)
    empty.spend(20, 0.0)  # further down than the hold asks
    empty.withhold(0.5, 0.0)
    assert empty.delay(0.0) == 3.25  # a hold never gives tokens back


# -- the master's count -------------------------------------------------------------


def test_within_its_burst_a_uid_is_never_throttled() -> None:
    rates = PostRates(rate=4, burst=8)
    assert [rates.charge(UID, W1, 4, 0.0), rates.charge(UID, W2, 4, 0.0)] == [0, 0]
    assert rates.debt(UID, 0.0) == 0
    assert rates.charge(UID, W1, 1, 0.25) == 0  # a token came back meanwhile


def test_a_uid_in_debt_is_held_for_the_time_its_debt_takes_to_refill() -> None:
    rates = PostRates(rate=4, burst=8)
    assert rates.charge(UID, W1, 8, 0.0) == 0
    assert rates.charge(UID, W2, 6, 0.0) == 1.5  # 6 over at 4/s
    assert rates.debt(UID, 0.0) == 6
    assert rates.debt(UID, 1.0) == 2
    assert rates.debt(OTHER, 1.0) == 0


def test_a_worker_is_told_once_per_interval_whatever_it_sends() -> None:
    rates = PostRates(rate=4, burst=8, interval=0.5)
    rates.charge(UID, W1, 8, 0.0)
    told = [rates.charge(UID, W1, 1, t / 100) for t in range(50)]  # a post every 10 ms for 0.5 s
    assert [t for t in told if t] == [0.25]  # the first only: 1 over at 4/s
    assert rates.charge(UID, W2, 1, 0.25) > 0  # another worker is told on its own
    assert rates.charge(UID, W1, 1, 0.5) > 0  # and the first again, an interval later


def test_a_gone_worker_is_forgotten_and_the_debt_kept() -> None:
    rates = PostRates(rate=4, burst=8, interval=10.0)
    assert rates.charge(UID, W1, 12, 0.0) == 1.0
    rates.worker_gone(W1)
    assert rates.charge(UID, W1, 0, 0.0) == 1.0  # a new worker with that pid is told at once
    assert rates.debt(UID, 0.0) == 4


def test_a_debtor_is_kept_by_pruning_and_a_paid_up_uid_dropped() -> None:
    rates = PostRates(rate=4, burst=8, prune_above=2)
    rates.charge(UID, W1, 20, 0.0)
    rates.charge(OTHER, W1, 1, 0.0)
    rates.charge(70002, W1, 1, 1.0)  # the third uid prunes OTHER (full again), not the debtor
    assert len(rates) == 2
    assert rates.debt(UID, 1.0) == 8


def test_a_reload_changes_the_rate_and_keeps_the_debt() -> None:
    rates = PostRates(rate=4, burst=8)
    rates.charge(UID, W1, 16, 0.0)
    rates.configure(8, 16)
    assert rates.debt(UID, 0.0) == 8
    assert rates.debt(UID, 0.5) == 4  # paid at the new rate


# -- the hub --------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _hub(rate: float) -> tuple[Hub, Clock, Outbox]:
    hub = Hub(Limits(rate_limit=rate))
    clock = Clock()
    hub.clock = clock
    return hub, clock, Outbox()


def _run(hub: Hub, out: Outbox, worker: int, conn: int, uid: int, count: int, room: str = "r") -> None:
    posts = b"".join(Post(n + 1, room, b'"hi"').encode() for n in range(count))
    hub.handle(Sender(worker, conn, 0, uid, uid, 4000), Op.SAY, posts, out)


def _throttles(outs: list[Out]) -> list[tuple[int, Throttle]]:
    return [(o.worker, Throttle.decode(o.body)) for o in outs if o.op == ChannelOp.THROTTLE]


def _acked(outs: list[Out]) -> int:
    return sum(
        f.op == Op.SAY_REPLY
        for o in outs
        if o.op == ChannelOp.ANSWER
        for f in frames_of(Answer.decode(o.body).frame)
    )


def test_the_hub_serves_every_post_and_tells_the_worker_that_sent_past_the_share() -> None:
    hub, clock, out = _hub(rate=100)  # bursts of 200
    _run(hub, out, W1, 1, UID, 150)
    _run(hub, out, W2, 2, UID, 100)
    outs = out.take()
    assert _acked(outs) == 250  # none refused, though 50 are past the share
    assert hub.rooms["r"].seq == 250
    assert _throttles(outs) == [(W2, Throttle(UID, 0.5))]  # 50 over at 100/s: to the worker that sent them
    clock.now = 0.0625  # 6.25 tokens back
    _run(hub, out, W1, 1, UID, 10)
    assert _throttles(out.take()) == [(W1, Throttle(UID, 0.5375))]  # the other worker, once it sends too


def test_a_flood_costs_one_throttle_per_worker_and_interval() -> None:
    hub, clock, out = _hub(rate=100)
    records = []
    for step in range(100):  # a run of 50 posts every 10 ms on each worker: 1 s at 10,000/s
        clock.now = step / 100
        _run(hub, out, W1, 1, UID, 50)
        _run(hub, out, W2, 2, UID, 50)
        records += out.take()
    told = _throttles(records)
    for worker in (W1, W2):
        assert 1 <= sum(1 for w, _ in told if w == worker) <= 1.0 / THROTTLE_INTERVAL + 1
    assert _acked(records) == 10_000


def test_another_uid_is_not_held_for_the_debt_of_one() -> None:
    hub, _, out = _hub(rate=100)
    _run(hub, out, W1, 1, UID, 1000)
    _run(hub, out, W1, 2, OTHER, 10)
    assert [t.uid for _, t in _throttles(out.take())] == [UID]


def test_private_messages_count_on_the_same_rate() -> None:
    hub, _, out = _hub(rate=1)  # bursts of 2
    target = Sender(W2, 9, 1, OTHER, OTHER, 4000)
    hub.handle(target, Op.NICK, json.dumps({"nick": "target"}).encode(), out)
    sender = Sender(W1, 1, 2, UID, UID, 4000)
    for _ in range(3):
        hub.handle(sender, Op.MSG, json.dumps({"to": "target", "text": "hi"}).encode(), out)
    assert _throttles(out.take()) == [(W1, Throttle(UID, 1.0))]


# -- the model of the daemon ----------------------------------------------------------------

LATENCY = 0.002  # each way on a channel
STEP = 0.001


def flood(workers: int, rate: float, seconds: float, *, throttles: bool = True) -> tuple[int, float]:
    """Every worker forwards as many posts of one uid as its own bucket
    allows, each STEP; the master charges them as they arrive and sends
    THROTTLE. Returns the posts the master accepted and the largest debt."""
    burst = rate * BURST_FACTOR
    shares = [TokenBucket(rate, burst, 0.0) for _ in range(workers)]
    master = PostRates(rate, burst)
    to_master: deque[tuple[float, int, int]] = deque()  # (arrives at, worker, posts)
    to_workers: deque[tuple[float, int, float]] = deque()  # (arrives at, worker, seconds)
    accepted, largest = 0, 0.0
    for tick in range(round(seconds / STEP)):
        now = tick * STEP
        while to_workers and to_workers[0][0] <= now:
            _, worker, hold = to_workers.popleft()
            shares[worker].withhold(hold, now)
        for worker, share in enumerate(shares):
            posts = 0
            while share.take(now):
                posts += 1
            if posts:
                to_master.append((now + LATENCY, worker, posts))
        while to_master and to_master[0][0] <= now:
            _, worker, posts = to_master.popleft()
            accepted += posts
            hold = master.charge(UID, worker, posts, now)
            if hold and throttles:
                to_workers.append((now + LATENCY, worker, hold))
        largest = max(largest, master.debt(UID, now))
    return accepted, largest


@pytest.mark.parametrize("workers", [1, 2, 4])
@pytest.mark.parametrize("rate", [200.0, 5000.0])
def test_a_uid_on_every_worker_posts_its_rate_within_the_documented_bound(workers: int, rate: float) -> None:
    seconds = 10.0
    burst = rate * BURST_FACTOR
    accepted, largest = flood(workers, rate, seconds)
    # ipcd.chat.postrate: (N - 1) bursts, an interval's posts per worker,
    # and what the channels hold (a latency's posts each way).
    in_flight = workers * rate * 2 * LATENCY
    debt_bound = (workers - 1) * burst + workers * rate * THROTTLE_INTERVAL + in_flight
    assert largest <= debt_bound
    assert accepted <= burst + rate * seconds + debt_bound
    assert accepted >= 0.95 * (burst + rate * seconds) - debt_bound  # its share, not less


def test_without_throttles_each_worker_posts_a_full_share() -> None:
    """What the model shows of per-worker shares: the bound above fails."""
    accepted, _ = flood(2, 200.0, 10.0, throttles=False)
    assert accepted >= 2 * (200 * 10.0 + 400) - 10
