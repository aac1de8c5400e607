"""Each uid's chat posts counted daemon-wide, in the master: debt and throttles.

Theory of operation: a worker keeps one fair share per uid
(:mod:`ipcd.chat.fairshare`), which caps what that worker forwards for the
uid at ``rate`` a second after a burst, but it cannot see the uid's
connections on the other workers: spread over N workers, a uid would post
N shares. The hub sees every post, so it keeps the truth: one bucket per
posting uid, with the same rate and burst. A post that reaches the master
is never refused or lost (its worker accepted it, its client waits for the
reply): it takes its token anyway and the bucket goes into *debt*. A uid in
debt is slowed where its posts come from: the worker that sent the run is
told (a THROTTLE record, :class:`~ipcd.link.records.Throttle`) to give the
uid no token for ``debt / rate`` seconds, the time the master's bucket
takes to be out of debt. The worker then holds the uid's stream
connections (backpressure, nothing lost) and refuses its datagrams, as it
does when its own share runs out.

A flood must not cost a record per post: a worker is told about a uid at
most once per :data:`THROTTLE_INTERVAL`, and a run of posts takes its
tokens at once, so the hot path costs one lookup and one subtraction per
run.

The bound. Over any span of ``t`` seconds the uid's posts stay under
``burst + rate * t + debt``, and the debt stays under what the workers can
forward before they are told: each worker's own bucket lets its burst
through once (``(N - 1) * burst`` beyond the master's), and a worker told
to hold may post ``rate * THROTTLE_INTERVAL`` after the hold ends before it
is told again. So the debt is at most ``(N - 1) * burst + N * rate *
THROTTLE_INTERVAL``, plus the posts in flight on the channels (a channel's
latency of them). Every debt is paid by a hold, never forgiven, so the
uid's daemon-wide rate converges to ``rate``. Time is the caller's
(seconds, monotonic).
"""

from __future__ import annotations

from typing import Final

from ipcd.chat.fairshare import PRUNE_ABOVE, TokenBucket

THROTTLE_INTERVAL: Final = 0.05  # a worker is told about one uid at most this often


class _UidPosts:
    __slots__ = ("bucket", "told")

    def __init__(self, bucket: TokenBucket) -> None:
        self.bucket = bucket
        self.told: dict[int, float] = {}  # worker -> when it was last told to hold this uid


class PostRates:
    """The master's bucket of every uid that posted recently."""

    def __init__(
        self,
        rate: float,
        burst: float,
        interval: float = THROTTLE_INTERVAL,
        prune_above: int = PRUNE_ABOVE,
    ) -> None:
        self.rate = rate
        self.burst = max(burst, 1.0)
        self.interval = interval
        self.prune_above = prune_above
        self._uids: dict[int, _UidPosts] = {}

    def __len__(self) -> int:
        return len(self._uids)

    def configure(self, rate: float, burst: float) -> None:
        """New settings (a reload): buckets keep their tokens, and debts."""
        self.rate = rate
        self.burst = max(burst, 1.0)
        for posts in self._uids.values():
            posts.bucket.rate = self.rate
            posts.bucket.burst = self.burst

    def charge(self, uid: int, worker: int, count: int, now: float) -> float:
        """``count`` posts of ``uid`` that came from ``worker``: taken from
        its bucket, debt or not. The seconds ``worker`` must now hold the
        uid for, or 0 if it need not be told (no debt, or told recently)."""
        posts = self._uids.get(uid)
        if posts is None:
            if len(self._uids) >= self.prune_above:
                self.prune(now)
            posts = self._uids[uid] = _UidPosts(TokenBucket(self.rate, self.burst, now))
        tokens = posts.bucket.spend(count, now)
        if tokens >= 0:
            return 0.0
        told = posts.told.get(worker)
        if told is not None and 0 <= now - told < self.interval:
            return 0.0
        posts.told[worker] = now
        return -tokens / self.rate

    def debt(self, uid: int, now: float) -> float:
        """The posts ``uid`` made beyond its share (0 if none)."""
        posts = self._uids.get(uid)
        return max(0.0, -posts.bucket.available(now)) if posts is not None else 0.0

    def debts(self, now: float) -> dict[int, int]:
        """Every uid in debt, with its posts beyond its share (rounded up)."""
        debts: dict[int, int] = {}
        for uid, posts in self._uids.items():
            tokens = posts.bucket.available(now)
            if tokens < 0:
                debts[uid] = int(-tokens) + 1
        return debts

    def worker_gone(self, worker: int) -> None:
        """Forget when ``worker`` was told: its pid will not post again."""
        for posts in self._uids.values():
            posts.told.pop(worker, None)

    def prune(self, now: float) -> None:
        """Drop the uids whose bucket is full again: that forgives nothing."""
        for uid in [uid for uid, posts in self._uids.items() if posts.bucket.full(now)]:
            del self._uids[uid]
