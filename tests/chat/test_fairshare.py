"""The per-uid fair share, fed times by hand (ipcd.chat.fairshare is sans-IO)."""

from __future__ import annotations

from ipcd.chat.fairshare import FairShares, TokenBucket


def test_a_bucket_gives_its_burst_then_refills_at_its_rate() -> None:
    bucket = TokenBucket(rate=4, burst=8, now=100.0)  # binary fractions: exact sums
    assert [bucket.take(100.0) for _ in range(9)] == [True] * 8 + [False]
    assert bucket.delay(100.0) == 0.25
    assert not bucket.take(100.125)
    assert bucket.take(100.25)
    assert not bucket.take(100.25)
    assert bucket.available(200.0) == 8  # never more than the burst
    assert bucket.full(200.0)


def test_a_clock_read_out_of_order_counts_as_no_time() -> None:
    bucket = TokenBucket(rate=4, burst=1, now=100.0)
    assert bucket.take(100.0)
    assert bucket.delay(99.0) == 0.25  # an older "now" does not drain the bucket
    assert bucket.take(100.25)


def test_one_uid_has_one_share_and_others_their_own() -> None:
    shares: FairShares[str] = FairShares(rate=1, burst=2)
    first, again = shares.get(1000, 0.0), shares.get(1000, 0.0)
    assert first is again
    assert [first.take(0.0), again.take(0.0), first.take(0.0)] == [True, True, False]
    assert shares.get(1001, 0.0).take(0.0)  # another uid is not touched


def test_a_post_queues_behind_holders_of_the_same_uid() -> None:
    shares: FairShares[str] = FairShares(rate=1, burst=2)
    share = shares.get(0, 0.0)
    share.waiting.append("held connection")
    assert not share.take(0.0)  # a token is there, but someone waits for it first
    assert share.bucket.take(0.0)  # the wake-up hands it to the holder


def test_only_full_idle_shares_are_pruned() -> None:
    shares: FairShares[str] = FairShares(rate=1, burst=2, prune_above=3)
    for uid in (1, 2, 3):
        shares.get(uid, 0.0)
    shares.get(1, 0.0).take(0.0)  # not full: dropping it would forgive a token
    shares.get(2, 0.0).waiting.append("held")  # someone waits: must stay
    shares.get(4, 0.0)  # the fourth uid prunes uid 3 only
    assert len(shares) == 3
    assert shares.get(1, 0.0).bucket.available(0.0) == 1
    assert list(shares.get(2, 0.0).waiting) == ["held"]
    shares.prune(10.0)  # uid 1 refilled by now; uid 4 was full all along
    assert len(shares) == 1
