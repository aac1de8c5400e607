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
  requests wait in the worker until the worker has taken the backlog.
  Replies to a worker's own requests can thus never pile up in the
  master. What waits in the worker is bounded per uid: past
  ``--forward-bytes-per-uid`` of its requests not yet written to the
  master, a uid's connections are held (ipcd.server.forwarded), and the
  connections' in-flight caps hold each client too.
- **what is left.** Deliveries a worker's members get because of other
  workers' requests (room fan-out) are not held back by that worker; a
  worker that falls ``MAX_CHANNEL_BACKLOG`` behind on them is killed (its
  clients see a disconnect, never a silent gap in a room's sequence), and
  so is one that for ``worker_timeout`` neither sends a record nor takes
  one from its channel (taking records counts as alive while unread).

Everything here is pure arithmetic, shared by the processes and the docs'
worst-case figures (``ipcctl status`` shows the budgets under ``limits``).
:func:`master_memory_bound` and :func:`worker_memory_bound` add up, as
named terms, every table and queue whose size the settings bound, for the
whole daemon and per uid (docs/security.md shows them at the defaults;
tests/server/test_memory_bound_live.py pushes them and reads the RSS).
"""

from __future__ import annotations

import dataclasses

from ipcd.chat.hub import Limits
from ipcd.chat.keptbytes import ENTRY_COST
from ipcd.chat.recentids import ENTRY_COST as MESSAGE_ID_COST
from ipcd.handoff.bodies import ACCESS_LIST_MAX, FD_NAME_MAX, NAME_MAX
from ipcd.link.framing import FRAGMENT
from ipcd.protocol.chat import NAME_MAX as ROOM_NAME_MAX
from ipcd.protocol.chat import NICK_MAX, TOPIC_MAX
from ipcd.server import uidbudgets
from ipcd.server.forwarded import largest_forward
from ipcd.settings import READ_BUFFER_SIZE, Settings

MAX_CHANNEL_BACKLOG = 64 << 20  # a worker this far behind on fan-out is killed
# Worst-case JSON growth of one byte of chat text: 2 (\" \\ \n \t). Controls
# are stripped at the door (ipcd.protocol.chat.sanitize_text) and the rest
# is kept as UTF-8 (encode_basestring, not ASCII), so no \uXXXX form is made.
_JSON_ESCAPE = 2
_MESSAGE_OVERHEAD = 256  # a history entry's fields besides its text
MAX_ROOMS = Limits.max_rooms


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
    full room of messages whose every byte JSON escapes (``"`` as ``\\"``)."""
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


# What one item of a per-uid table costs in Python objects, rounded up from
# what tests/handoff/test_uid_budgets_live.py measured (a parked waiter about
# 850 bytes, a room with one membership about 910): a bound, not a guess.
_WAITER_COST = 2048
_ROOM_COST = 2048  # a room without history: its record, name, member table
_MEMBERSHIP_COST = 512
_SESSION_COST = 1024  # a chat session: one per connection that chats
_CONNECTION_COST = 4096  # a worker's connection objects (idle: 552 bytes measured)
_ENTRY_OVERHEAD = 2048  # a stored entry's record, besides its strings
_LISTING_OVERHEAD = 64  # JSON punctuation and keys per listed item
_ID_COST = 32  # one uid or gid in an access list


@dataclasses.dataclass(frozen=True, slots=True)
class MemoryBound:
    """A process's worst case above its baseline, as named terms in bytes:
    ``fixed`` for the daemon whatever the users, ``per_uid`` for each uid
    with something in it (root and the daemon's uid: ``privileged_per_uid``,
    the budgets times ``--privileged-budget-factor``)."""

    fixed: dict[str, int]
    per_uid: dict[str, int]
    privileged_per_uid: dict[str, int]

    def total(self, uids: int, privileged: int = 0) -> int:
        """Bytes at worst with ``uids`` ordinary and ``privileged`` privileged uids."""
        return (
            sum(self.fixed.values())
            + uids * sum(self.per_uid.values())
            + privileged * sum(self.privileged_per_uid.values())
        )


def _history_entry(settings: Settings) -> int:
    """Bytes of one kept message: its MESSAGE frame, every text byte escaped."""
    return settings.max_message * _JSON_ESCAPE + _MESSAGE_OVERHEAD


def history_page(settings: Settings) -> int:
    """Bytes of the largest HISTORY reply or JOIN replay: paged at the
    reply budget, at least one message (and never more than the room)."""
    return min(largest_reply(settings), settings.reply_budget + _history_entry(settings))


def listing_page(settings: Settings) -> int:
    """Bytes of the largest ROOMS, WHO or LS reply: paged at the reply
    budget, at least one entry (a room with its topic at its worst, 4 bytes
    a character in UTF-8; a session in 64 rooms; a stored entry at its
    largest)."""
    room = ROOM_NAME_MAX + TOPIC_MAX * 4 + _LISTING_OVERHEAD
    session = NICK_MAX + _LISTING_OVERHEAD + settings.rooms_per_connection * (ROOM_NAME_MAX + 4)
    entry = entry_bytes(settings) + _LISTING_OVERHEAD
    return settings.reply_budget + max(room, session, entry)


def entry_bytes(settings: Settings) -> int:
    """One stored entry at worst: its name, an fd name per fd, full access lists."""
    return _ENTRY_OVERHEAD + NAME_MAX + settings.max_fds * FD_NAME_MAX + 2 * ACCESS_LIST_MAX * _ID_COST


def _request_message(settings: Settings) -> int:
    """The largest message a worker sends the master: a batch closes at one
    fragment, plus the client's frame that went past it, plus its envelope."""
    return FRAGMENT + settings.max_frame_size + _LISTING_OVERHEAD


def master_memory_bound(
    settings: Settings, workers: int, nofile: int = 1 << 20, rooms: int = MAX_ROOMS
) -> MemoryBound:
    """The master's worst case above its baseline (``nofile``: the workers'
    fd limit, which sets the default connection budget; ``rooms``: how many
    rooms can exist, the daemon's limit, or the sum of the room budgets of
    the uids that create rooms if that is less).

    Daemon-wide: per worker, what its channel queues (the kill line, plus
    the message that crossed it, the largest the master builds) and the one
    message being reassembled from it; the hub's rooms. Per uid: its parked
    waiters, its stored entries, its chat sessions and memberships, the
    history it posted (kept
    messages are charged to their poster: ipcd.chat.keptbytes) and the
    message ids of its recent posts (ipcd.chat.recentids; the same for
    every uid). History is
    also never more than ``rooms x --history-size`` messages in all."""
    largest = max(history_page(settings), listing_page(settings))
    fixed = {
        "channel backlog per worker (64 MiB kill line + one message)": workers
        * (max(MAX_CHANNEL_BACKLOG, settings.channel_byte_budget) + largest),
        "message from each worker being reassembled": workers * _request_message(settings),
        "rooms (daemon-wide; their history is charged to its posters)": min(rooms, MAX_ROOMS) * _ROOM_COST,
    }

    def uid_terms(factor: int) -> dict[str, int]:
        connections = uidbudgets.connection_limit(settings, nofile) * factor
        joins = settings.joins_per_uid * factor
        return {
            "parked waiters": settings.waiters_per_uid * factor * _WAITER_COST,
            "stored entries": settings.fd_quota * entry_bytes(settings),
            "chat sessions": connections * _SESSION_COST,
            "room memberships": joins * _MEMBERSHIP_COST,
            "history it posted (--history-bytes-per-uid, plus its newest message)": (
                settings.history_bytes_per_uid * factor + _history_entry(settings) + ENTRY_COST
            ),
            "message ids of its recent posts (--message-ids-per-uid)": (
                settings.message_ids_per_uid * MESSAGE_ID_COST
            ),
        }

    return MemoryBound(fixed, uid_terms(1), uid_terms(settings.privileged_budget_factor))


def worker_memory_bound(settings: Settings, connections: int) -> MemoryBound:
    """A worker's worst case above its baseline with ``connections`` open.

    Daemon-wide: per connection its output (cut off past ``--max-outbuf``)
    and its objects; the one message from the master being reassembled (the
    largest the master builds plus the batch it closed: far below the
    channel's ``MESSAGE_MAX``, which is a check, not what a worker can be
    made to hold). Per uid: its frames received and not served, partly
    received or held (``--partial-bytes-per-uid`` plus the read that passed
    it, never more than a frame held and one being received per
    connection); its requests waiting to reach the master when the master
    does not read this worker (``--forward-bytes-per-uid`` plus the request
    that crossed it, never more than ``MAX_IN_FLIGHT`` per connection); and
    its GET replicas (its stored entries)."""
    from ipcd.services.chat import MAX_IN_FLIGHT  # noqa: PLC0415 (that module imports this one)

    largest = max(history_page(settings), listing_page(settings))
    fixed = {
        "output per connection (--max-outbuf)": connections * settings.max_outbuf,
        "connection objects": connections * _CONNECTION_COST,
        "message from the master being reassembled": largest + FRAGMENT,
    }
    in_flight = connections * MAX_IN_FLIGHT * largest_forward(settings)

    def uid_terms(factor: int) -> dict[str, int]:
        partial = settings.partial_bytes_per_uid * factor + READ_BUFFER_SIZE
        forward = settings.forward_bytes_per_uid * factor + largest_forward(settings)
        return {
            "frames received, not served (partial or held)": min(
                partial, connections * 2 * settings.max_frame_size
            ),
            "requests waiting for the master": min(forward, in_flight),
            "GET replicas of its entries": settings.fd_quota * entry_bytes(settings),
        }

    return MemoryBound(fixed, uid_terms(1), uid_terms(settings.privileged_budget_factor))
