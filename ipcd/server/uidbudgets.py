"""The per-uid budgets of the connection path: connections, partial frames.

Theory of operation
-------------------
**Connections per uid** are counted by the master, the one process that
sees every connection: at accept it reads the peer's uid (one
``SO_PEERCRED`` getsockopt; the raw credentials ride to the worker in the
CONN record, so the worker never asks again) and, past the uid's budget,
writes a ``LIMIT_EXCEEDED`` frame saying so and closes the connection
instead of passing it on. The kernel's backlog keeps the other users'
connections coming. Each connection passed is charged to its uid and to
the worker that took it; the worker reports the closes per uid in its
LOAD record (coalesced like the connection count, so a close is counted
at most ``_LOAD_COALESCE`` late: never too few). A worker that dies takes
its connections with it, and its charges go with it. So the count is
exact, and costs the accept path one getsockopt and two dict updates.

The budget keeps one uid to a fraction of what the daemon can hold: unless
``--connections-per-uid`` says otherwise it is 4096, but at most an eighth
of the connections the workers' fd limit allows (:func:`connection_limit`),
so that root and the daemon's uid, with ``--privileged-budget-factor`` (4)
times the budget, hold at most half.

**Bytes of partly received frames** are counted by each worker, per uid,
for the connections it serves: a connection charges what its frame
decoder buffers after each read (and after a held frame is taken back),
and gives it all back when it closes. A read that takes the uid past its
budget cuts that connection off with ``LIMIT_EXCEEDED`` and a logged
reason: its decoder, the one that grew, is freed; the uid's other
connections and every other uid's are untouched. The budget is per worker:
one uid holds at most ``workers x (budget + one read)`` in the daemon.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

from ipcd.budgets import UidBudget
from ipcd.settings import READ_BUFFER_SIZE, Settings

DEFAULT_CONNECTIONS = 4096
WORKER_FD_RESERVE = 64  # a worker's own fds (loop, channel, datagram socket, ...) with room to spare
LOG_INTERVAL = 10.0  # seconds between two log lines about one uid's refused connections
PRIVILEGED_SHARE = 2  # root at its factor may hold at most 1/this of the daemon's connections

CONNECTIONS_ADVICE = "close some of your connections, or retry later"
PARTIAL_ADVICE = "this connection is cut off; send each frame whole, on fewer connections at once"


def connection_capacity(workers: int, nofile: int) -> int:
    """Idle connections the workers can hold: one fd each."""
    return workers * max(nofile - WORKER_FD_RESERVE, 1)


def connection_limit(settings: Settings, nofile: int) -> int:
    """The per-uid connection budget in force: the setting if given, else
    DEFAULT_CONNECTIONS capped so that a privileged uid
    (``privileged_budget_factor`` times it) holds at most half of what the
    workers' fd limit ``nofile`` lets them hold."""
    if settings.connections_per_uid:
        return settings.connections_per_uid
    capacity = connection_capacity(settings.workers, nofile)
    cap = capacity // (PRIVILEGED_SHARE * settings.privileged_budget_factor)
    return max(1, min(DEFAULT_CONNECTIONS, cap))


def partial_budget(settings: Settings) -> UidBudget:
    return UidBudget(
        "bytes of partly received frames",
        settings.partial_bytes_per_uid,
        "--partial-bytes-per-uid",
        settings.privileged_budget_factor,
        scope="per uid in each worker",
    )


def partial_bound(settings: Settings, privileged: bool = False) -> int:
    """Bytes one uid's partial frames may take in one worker at worst: its
    budget plus the read that crossed it."""
    factor = settings.privileged_budget_factor if privileged else 1
    return settings.partial_bytes_per_uid * factor + READ_BUFFER_SIZE


class ConnectionLedger:
    """The master's count of open connections, per uid and per worker."""

    def __init__(self, limit: int, privileged_factor: int) -> None:
        self.budget = UidBudget("connections", limit, "--connections-per-uid", privileged_factor)
        self._by_worker: dict[int, Counter[int]] = {}
        self._partial: dict[int, dict[int, int]] = {}  # worker pid -> its last report, uid -> bytes
        self._forwarding: dict[int, dict[int, int]] = {}  # the same for requests waiting to reach us
        self._logged: dict[int, float] = {}  # uid -> when its refusals were last logged
        self.refused = 0

    def admit(self, uid: int) -> str | None:
        """None if ``uid`` may have one more connection, else why not."""
        if self.budget.admits(uid):
            return None
        self.refused += 1
        return self.budget.refusal(uid, CONNECTIONS_ADVICE)

    def should_log(self, uid: int, now: float) -> bool:
        """Log a uid's refusals once per LOG_INTERVAL, not once each: an
        attacker's connect loop would flood the journal."""
        if now - self._logged.get(uid, -LOG_INTERVAL) < LOG_INTERVAL:
            return False
        if len(self._logged) > 1024:
            self._logged.clear()
        self._logged[uid] = now
        return True

    def passed(self, worker: int, uid: int) -> None:
        self.budget.held[uid] += 1  # charge(), inline: this runs on every accept
        held = self._by_worker.get(worker)
        if held is None:
            held = self._by_worker[worker] = Counter()
        held[uid] += 1

    def closed(self, worker: int, closes: Mapping[int, int]) -> None:
        """``worker`` reported ``closes[uid]`` of its connections closed."""
        held = self._by_worker.get(worker)
        if held is None:
            return
        for uid, count in closes.items():
            taken = min(count, held[uid])
            if taken <= 0:
                held.pop(uid, None)
                continue
            if taken == held[uid]:
                del held[uid]
            else:
                held[uid] -= taken
            self.budget.release(uid, taken)

    def partial_reported(self, worker: int, partial: Mapping[int, int]) -> None:
        _keep_report(self._partial, worker, partial)

    def forwarding_reported(self, worker: int, forwarding: Mapping[int, int]) -> None:
        """``worker``'s bytes per uid of requests waiting in its channel
        (ipcd.server.forwarded), as of its last LOAD record."""
        _keep_report(self._forwarding, worker, forwarding)

    def worker_gone(self, worker: int) -> None:
        """Its connections died with it."""
        self._partial.pop(worker, None)
        self._forwarding.pop(worker, None)
        held = self._by_worker.pop(worker, None)
        if held:
            for uid, count in held.items():
                self.budget.release(uid, count)

    def holdings(self) -> dict[int, dict[str, int]]:
        """For STATUS: each uid's connections, partial-frame bytes and bytes
        of requests waiting in the workers to reach the master."""
        held: dict[int, dict[str, int]] = {
            uid: {"connections": count} for uid, count in self.budget.held.items()
        }
        for key, reports in (("partial_bytes", self._partial), ("forward_bytes", self._forwarding)):
            for report in reports.values():
                for uid, count in report.items():
                    entry = held.setdefault(uid, {})
                    entry[key] = entry.get(key, 0) + count
        return held


def _keep_report(reports: dict[int, dict[int, int]], worker: int, report: Mapping[int, int]) -> None:
    if report:
        reports[worker] = dict(report)
    else:
        reports.pop(worker, None)
