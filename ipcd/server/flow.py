"""Flow control between clients, workers and the master: the budgets.

Theory of operation: work that crosses the master comes back as replies,
and a client that does not read them must not make any process dup,
queue or allocate without bound. Each hop waits for the next one instead:

- **connection -> worker.** A connection has at most ``MAX_IN_FLIGHT``
  requests unanswered in the master (ipcd.services.chat). A GET or TAKE
  also reserves ``max_fds`` of the connection's fd budget until its
  answer arrives, and the fds of answers still queued for the client
  count against the same budget: past it the next GET or TAKE is held (the
  connection is not read) until the client has taken fds or answers came
  back. So a client that never reads stops being served after one
  budget's worth of fds, and its worker holds at most that many for it.
- **worker -> master.** The master reads a worker's channel only while
  what it has queued for that worker (the channel's backlog) is under a
  byte and an fd budget. Past either, it stops reading that worker: its
  requests wait in the worker (and its connections' in-flight caps hold
  the clients) until the worker has taken the backlog. Replies to a
  worker's own requests can thus never pile up in the master.
- **what is left.** Deliveries a worker's members get because of other
  workers' requests (room fan-out) are not held back by that worker; a
  worker that falls ``MAX_CHANNEL_BACKLOG`` behind on them is killed (its
  clients see a disconnect, never a silent gap in a room's sequence), and
  so is one that for ``worker_timeout`` neither sends a record nor takes
  one from its channel (taking records counts as alive while unread).

Everything here is pure arithmetic, shared by the processes and the docs'
worst-case figures (``ipcctl status`` shows the budgets under ``limits``).
"""

from __future__ import annotations

import dataclasses

from ipcd.settings import Settings

MAX_CHANNEL_BACKLOG = 64 << 20  # a worker this far behind on fan-out is killed
_JSON_ESCAPE = 6  # worst-case JSON growth of one byte of text ("\u00e9" for é)
_MESSAGE_OVERHEAD = 256  # a history entry's fields besides its text


@dataclasses.dataclass(frozen=True, slots=True)
class ChannelBudget:
    """How much the master queues for one worker before it stops reading
    that worker's requests."""

    max_bytes: int
    max_fds: int

    @classmethod
    def from_settings(cls, settings: Settings) -> ChannelBudget:
        return cls(settings.channel_byte_budget, settings.channel_fd_budget)

    def admits(self, backlog_bytes: int, backlog_fds: int) -> bool:
        """May the master serve another request of a worker whose channel
        holds this much unsent?"""
        return backlog_bytes < self.max_bytes and backlog_fds < self.max_fds


@dataclasses.dataclass(frozen=True, slots=True)
class FdBudget:
    """The fds one connection may have on their way to it in the worker."""

    budget: int
    per_request: int  # what one GET or TAKE may bring: max_fds

    @classmethod
    def from_settings(cls, settings: Settings) -> FdBudget:
        return cls(settings.connection_fd_budget, settings.max_fds)

    def admits(self, queued: int, reserved: int) -> bool:
        """May one more GET or TAKE go to the master, with ``queued`` fds
        waiting to be sent to the client and ``reserved`` GETs and TAKEs
        unanswered?"""
        return queued + (reserved + 1) * self.per_request <= self.budget

    def resumes(self, queued: int, reserved: int) -> bool:
        """May a connection held by :meth:`admits` be read again? Once half
        the budget is free, not at the first free slot: a pipelining client
        then sends GETs on in runs, not one hold and release (two epoll
        changes) per answer. Always true once nothing is queued or reserved
        (the budget holds at least four requests' worth)."""
        return queued + (reserved + 1) * self.per_request <= max(self.budget // 2, self.per_request)


def largest_reply(settings: Settings) -> int:
    """Bytes of the largest single reply the master builds: a HISTORY of a
    full room of messages whose every byte JSON escapes."""
    return settings.history_size * (settings.max_message * _JSON_ESCAPE + _MESSAGE_OVERHEAD)


def master_fd_bound(settings: Settings, workers: int, stored: int, baseline: int) -> int:
    """The master's fds at worst while GETs are served: its own, the stored
    fds, and per worker its channel's fd budget plus one reply's fds (the
    request read while under budget may add up to ``max_fds``)."""
    return baseline + stored + workers * (settings.channel_fd_budget + settings.max_fds)


def worker_fd_bound(settings: Settings, connections: int, baseline: int, stored: int = 0) -> int:
    """A worker's fds at worst: its own, a copy of each stored fd (of the
    entries it answers GETs of, ipcd.handoff.replica), and per connection
    the socket, the fd budget and one frame's fds still in its decoder (a
    PUT's)."""
    return baseline + stored + connections * (1 + settings.connection_fd_budget + settings.max_fds)


def channel_memory_bound(settings: Settings) -> int:
    """Bytes the master queues at worst for one worker because of that
    worker's own requests: the byte budget plus the reply that crossed it."""
    return settings.channel_byte_budget + largest_reply(settings)
