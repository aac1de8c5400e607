"""Each uid's fair share of chat posts: token buckets, sans-IO.

Theory of operation: a worker keeps one :class:`Share` per peer uid, so
every connection (and every datagram) of one user draws on the same bucket:
a hundred connections get no more than one. A bucket holds up to ``burst``
tokens and refills at ``rate`` a second; a post takes one. What "no token"
means is the caller's business: a stream connection is *held* (queued in
``Share.waiting`` and not read until tokens are back: backpressure, nothing
lost), a datagram, which cannot be held, is refused.

A worker counts only what it sees, so a uid whose connections are spread
over N workers could post N shares; the master counts the uid's posts
daemon-wide (:mod:`ipcd.chat.postrate`) and, when the uid is in debt there,
tells the worker to hold it: :meth:`TokenBucket.withhold` makes the
worker's bucket give no token for that long, and the usual hold (and
datagram refusal) does the rest.

Held holders wait in FIFO order, and a post of a uid that has holders
waiting joins the back of that queue even if a token happens to be there,
so one connection cannot overtake another of the same user.

A bucket that has refilled to its burst cannot be told from a new one, so
dropping such a share forgives nothing: that keeps the table as small as
the set of uids that posted recently, without an arbitrary reset.
Time is the caller's (seconds, monotonic); a clock read out of order (an
older ``now`` than the last) counts as no time passing.
"""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")

PRUNE_ABOVE = 1024  # shares kept before full, idle ones are dropped
BURST_FACTOR = 2.0  # a full share is this many seconds of posts


class TokenBucket:
    __slots__ = ("burst", "last", "rate", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.last = now

    def _refill(self, now: float) -> float:
        elapsed = now - self.last
        if elapsed > 0:
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
            self.last = now
        return self.tokens

    def available(self, now: float) -> float:
        return self._refill(now)

    def take(self, now: float) -> bool:
        """Spend one token if there is one."""
        if self._refill(now) < 1:
            return False
        self.tokens -= 1
        return True

    def spend(self, count: int, now: float) -> float:
        """Spend ``count`` tokens whether or not they are there (the
        bucket goes into debt: negative); the tokens left."""
        tokens = self.tokens
        elapsed = now - self.last
        if elapsed > 0:  # _refill inlined: the master spends once per run of posts
            tokens = min(self.burst, tokens + elapsed * self.rate)
            self.last = now
        self.tokens = tokens = tokens - count
        return tokens

    def withhold(self, seconds: float, now: float) -> None:
        """Give no token for ``seconds`` from ``now`` (or longer, if the
        bucket was already further down)."""
        self.tokens = min(self._refill(now), 1 - seconds * self.rate)

    def delay(self, now: float) -> float:
        """Seconds until :meth:`take` can succeed (0: now)."""
        missing = 1 - self._refill(now)
        return missing / self.rate if missing > 0 else 0.0

    def full(self, now: float) -> bool:
        return self._refill(now) >= self.burst


class Share(Generic[T]):
    """One uid's bucket, and the holders waiting for it, oldest first."""

    __slots__ = ("bucket", "scheduled", "uid", "waiting")

    def __init__(self, uid: int, bucket: TokenBucket) -> None:
        self.uid = uid
        self.bucket = bucket
        self.waiting: deque[T] = deque()
        self.scheduled = False  # the caller has a wake-up pending for the waiters

    def take(self, now: float) -> bool:
        """A token for a new post, unless holders are queued ahead of it."""
        return not self.waiting and self.bucket.take(now)

    def idle(self, now: float) -> bool:
        return not self.waiting and not self.scheduled and self.bucket.full(now)


class FairShares(Generic[T]):
    """The shares of every uid that posted recently."""

    def __init__(self, rate: float, burst: float, prune_above: int = PRUNE_ABOVE) -> None:
        self.rate = rate
        self.burst = max(burst, 1.0)
        self.prune_above = prune_above
        self._shares: dict[int, Share[T]] = {}

    def __len__(self) -> int:
        return len(self._shares)

    def get(self, uid: int, now: float) -> Share[T]:
        share = self._shares.get(uid)
        if share is None:
            if len(self._shares) >= self.prune_above:
                self.prune(now)
            share = self._shares[uid] = Share(uid, TokenBucket(self.rate, self.burst, now))
        return share

    def prune(self, now: float) -> None:
        """Drop the shares that are back to a full bucket with no one waiting."""
        for uid in [uid for uid, share in self._shares.items() if share.idle(now)]:
            del self._shares[uid]
