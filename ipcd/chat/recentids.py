"""The message ids each uid posted recently: what makes a resent SAY harmless.

Theory of operation
-------------------
A client that lost its connection after sending a SAY cannot know whether
the hub posted it: the acknowledgement may be what was lost. So a SAY may
carry a client-chosen ``id``, and the hub remembers, per uid, the ids of
the posts it made with their outcome (room, seq, ts). A SAY whose
``(uid, id)`` is remembered is not posted again; its client is told the
original outcome, marked ``duplicate``. Ids are per uid (the kernel's, never
the body's): another user's same id is another message, and no user can
make another's post look like a duplicate.

The window is bounded two ways: the last ``per_uid`` ids of each uid (the
oldest is forgotten first) and ``seconds`` of age (an older entry no longer
matches, and is dropped when its uid is next looked at). The count bound is
the memory bound: an entry is at most :data:`ENTRY_COST` bytes, so a uid
holds at most ``per_uid x ENTRY_COST`` whatever it sends. Ages are taken
from the wall clock the hub stamps messages with, so that entries restored
from kept messages after a restart (:meth:`RecentIds.restore`) age the same
way; a clock that steps back only keeps entries longer.

It lives in the master, so a worker kill loses nothing; a restart keeps
what :meth:`RecentIds.restore` is given (see ``Hub.rebuild_recent_ids``).
Pure bookkeeping, no I/O: fed ``now``, tested alone.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import Final, NamedTuple

DEFAULT_PER_UID: Final = 4096
DEFAULT_SECONDS: Final = 600.0
# What one remembered id costs the master at most, measured with tracemalloc
# (tests/chat/test_recentids.py): its OrderedDict slot and key (an id of up
# to 64 bytes), the entry tuple, its seq and time. The room and ts are shared
# with the room and the message.
ENTRY_COST: Final = 400


class Posted(NamedTuple):
    """What a post with an id became: its room (as JSON), seq and ts (as
    the JSON of the original reply), and when it was posted (wall clock)."""

    room_json: bytes
    seq: int
    ts_json: bytes
    at: float


class RecentIds:
    """Per uid, its last ``per_uid`` message ids of the last ``seconds``."""

    def __init__(self, per_uid: int = DEFAULT_PER_UID, seconds: float = DEFAULT_SECONDS) -> None:
        self.per_uid = per_uid
        self.seconds = seconds
        self._by_uid: dict[int, OrderedDict[bytes, Posted]] = {}

    def __len__(self) -> int:
        return sum(len(ids) for ids in self._by_uid.values())

    def held(self, uid: int) -> int:
        """How many ids of ``uid`` are remembered (expired ones not yet dropped count)."""
        ids = self._by_uid.get(uid)
        return 0 if ids is None else len(ids)

    def holdings(self) -> dict[int, int]:
        return {uid: len(ids) for uid, ids in self._by_uid.items()}

    def get(self, uid: int, message_id: bytes, now: float) -> Posted | None:
        """The post ``uid`` made with ``message_id`` within the window, if any."""
        ids = self._by_uid.get(uid)
        if ids is None:
            return None
        self._expire(uid, ids, now)
        return ids.get(message_id)

    def remember(self, uid: int, message_id: bytes, posted: Posted) -> None:
        """``uid`` posted ``message_id`` as ``posted`` (not remembered yet:
        the hub looked it up first)."""
        ids = self._by_uid.get(uid)
        if ids is None:
            ids = self._by_uid[uid] = OrderedDict()
        ids[message_id] = posted
        ids.move_to_end(message_id)  # a restored id met again is the newest
        while len(ids) > self.per_uid:  # one, unless a reload lowered the bound
            ids.popitem(last=False)
        # Older entries are dropped by the next get(), which the hub makes
        # before every remember(): not twice per post.

    def restore(self, entries: Iterable[tuple[int, bytes, Posted]]) -> None:
        """Remember ``(uid, message id, posted)`` entries, such as those of
        kept messages after a restart: oldest first, as they were posted."""
        for uid, message_id, posted in sorted(entries, key=lambda entry: entry[2].at):
            self.remember(uid, message_id, posted)

    def clear(self) -> None:
        self._by_uid.clear()

    def _expire(self, uid: int, ids: OrderedDict[bytes, Posted], now: float) -> None:
        oldest = now - self.seconds
        while ids:
            first = next(iter(ids.values()))
            if first.at >= oldest:
                return
            ids.popitem(last=False)
        del self._by_uid[uid]
