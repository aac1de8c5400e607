"""Which of a uid's rooms to forget when it is at its room budget.

Theory of operation: a uid at ``rooms_per_uid`` that creates another room
first forgets its own least recently used room without members. Scanning
its rooms for that on every creation would let one uid spend the master's
time on every SAY to a fresh name, and keeping them ordered would cost
every message (each SAY moves its room's ``last_used``). So the order is
kept lazily: a heap per creator of (``last_used`` when pushed, name), pushed
when a room may have become idle (created, or its last member left). The
heap's top is checked when a victim is needed: gone or joined meanwhile, it
is dropped (it is pushed again when it next becomes idle); posted to
meanwhile, it goes back in with its new ``last_used``. Each message costs
nothing here, and each stale entry is looked at once. A heap grown past
twice its uid's budget (rooms joined and parted over and over) is rebuilt
from the rooms themselves.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from typing import Protocol, TypeVar


class _Room(Protocol):
    name: str
    last_used: int
    creator: int | None

    @property
    def idle(self) -> bool: ...


R = TypeVar("R", bound=_Room)


class IdleRooms:
    __slots__ = ("_heaps",)

    def __init__(self) -> None:
        self._heaps: dict[int, list[tuple[int, str]]] = {}

    def may_be_idle(self, room: _Room, rooms: Mapping[str, _Room], bound: int) -> None:
        """``room`` (created by a uid) may have no members now."""
        uid = room.creator
        if uid is None:
            return
        heap = self._heaps.setdefault(uid, [])
        if len(heap) >= 2 * bound:
            heap[:] = [(r.last_used, r.name) for r in rooms.values() if r.creator == uid and r.idle]
            heapq.heapify(heap)
        heapq.heappush(heap, (room.last_used, room.name))

    def least_recently_used(self, uid: int, rooms: Mapping[str, R]) -> R | None:
        """The room of ``uid`` without members used least recently (taken
        off the heap: the caller forgets it), or None if it has none."""
        heap = self._heaps.get(uid)
        while heap:
            last_used, name = heap[0]
            room = rooms.get(name)
            if room is None or room.creator != uid or not room.idle:
                heapq.heappop(heap)
            elif room.last_used != last_used:
                heapq.heapreplace(heap, (room.last_used, name))
            else:
                heapq.heappop(heap)
                return room
        return None

    def forget(self, uid: int) -> None:
        """``uid`` holds no rooms any more."""
        self._heaps.pop(uid, None)
