"""The per-uid budget of requests waiting to reach the master.

Theory of operation
-------------------
A worker forwards chat and hand-off requests to the master over its
channel (ipcd.server.channel). While the master does not read that worker
(ipcd.server.flow: it stops past its ChannelBudget, or it is just busy),
every request forwarded meanwhile waits in the channel's output: a limit
per connection (``MAX_IN_FLIGHT`` frames) lets one uid with many
connections make the worker hold connections x 256 x ``--max-frame-size``.

So each worker counts, per uid, the bytes of its forwarded requests that
the channel has not written yet (``--forward-bytes-per-uid``). The channel
numbers the bytes it is given (``queued``, an offset that only grows) and
tells how far its writes have got (``written``): each request is charged
when it is posted, with the offset at its end, and released once
``written`` passes that offset. The marks wait in a FIFO in channel order,
so releasing is popping from its head: O(1) amortized. Requests of one uid
posted into the same unsent batch share one mark (the channel writes a
batch as a whole anyway), so a run of one user's requests costs one entry.

A request of a uid at or past its budget is not forwarded: its connection
is *held* (ipcd.services.chat), not read, until the channel's writes bring
the uid down to half its budget; then the uid's held connections are
released in turn while it is under budget. One request may cross the
budget (it was admitted below it), so a uid holds at most its budget plus
one forwarded request (:func:`forward_bound`). Other uids are not held.
"""

from __future__ import annotations

from collections import deque

from ipcd.budgets import UidBudget
from ipcd.link.records import FORWARD_ENVELOPE_MAX
from ipcd.settings import Settings

FORWARD_ADVICE = "retry once the daemon has caught up"


def forward_budget(settings: Settings) -> UidBudget:
    return UidBudget(
        "bytes of requests waiting to reach the master",
        settings.forward_bytes_per_uid,
        "--forward-bytes-per-uid",
        settings.privileged_budget_factor,
        scope="per uid in each worker",
    )


def largest_forward(settings: Settings) -> int:
    """Bytes of the largest request a worker forwards: a client's frame
    body and the envelope (credentials, supplementary groups, an address)."""
    return settings.max_frame_size + FORWARD_ENVELOPE_MAX


def forward_bound(settings: Settings, privileged: bool = False) -> int:
    """Bytes of one uid's requests a worker may hold for the master at
    worst: its budget plus the one request admitted below it that crossed it."""
    factor = settings.privileged_budget_factor if privileged else 1
    return settings.forward_bytes_per_uid * factor + largest_forward(settings)


class ForwardLedger:
    """Bytes per uid the channel has been given and has not written yet."""

    __slots__ = ("_marks", "budget", "written")

    def __init__(self, budget: UidBudget) -> None:
        self.budget = budget
        self._marks: deque[list[int]] = deque()  # [end offset, uid, bytes], in channel order
        self.written = 0  # the channel's written offset as last seen

    def admits(self, uid: int) -> bool:
        """May ``uid`` forward another request? (It may then cross the budget.)"""
        return self.budget.held.get(uid, 0) < self.budget.limit_for(uid)

    def resumes(self, uid: int) -> bool:
        """May ``uid``'s held connections be read again? At half the budget,
        so a flood goes on in runs, not one hold and release per write."""
        return self.budget.held.get(uid, 0) <= self.budget.limit_for(uid) // 2

    def charge(self, uid: int, nbytes: int) -> None:
        """Count bytes that are about to be posted (a run of posts being
        built); :meth:`mark` says where they end once posted."""
        self.budget.charge(uid, nbytes)

    def mark(self, uid: int, nbytes: int, end: int, sealed: int) -> None:
        """``nbytes`` charged to ``uid`` end at channel offset ``end``;
        ``sealed``: the channel's offset up to which records are formed
        (a mark past it is in the batch being built, and may be shared)."""
        marks = self._marks
        if marks:
            last = marks[-1]
            if last[1] == uid and last[0] > sealed:
                last[0] = end
                last[2] += nbytes
                return
        marks.append([end, uid, nbytes])

    def queued(self, uid: int, nbytes: int, end: int, sealed: int) -> None:
        """``uid`` posted ``nbytes`` ending at ``end``: charge and mark them."""
        self.budget.charge(uid, nbytes)
        self.mark(uid, nbytes, end, sealed)

    def advance(self, written: int) -> None:
        """The channel has written everything up to offset ``written``."""
        if written == self.written:
            return
        self.written = written
        marks = self._marks
        release = self.budget.release
        while marks and marks[0][0] <= written:
            _end, uid, nbytes = marks.popleft()
            release(uid, nbytes)

    def clear(self) -> None:
        self._marks.clear()
        self.budget.clear()
