"""Each uid's bytes of room history: a budget that keeps history a suffix.

Theory of operation
-------------------
A room keeps its last ``--history-size`` messages, so without a budget per
uid one user posting large messages to many rooms makes the master hold
``rooms x history x largest message`` (31.5 GiB at the defaults). Here each
kept message is charged, by its size, to the uid that posted it (the
kernel's uid, carried in the kept entry), and released when it leaves the
history (pushed out by newer ones, trimmed, or its room forgotten). The
charge is the frame's bytes plus :data:`ENTRY_COST` for its Python objects.

When a poster goes over ``--history-bytes-per-uid`` the master trims, in
the rooms where the poster's messages are kept, the oldest messages up to
and including the poster's oldest one there, until the poster is back under
its budget. A room's history therefore stays a contiguous suffix of its
sequence (HISTORY and a JOIN's replay never show a gap), and no user gains
a new power: messages older than the poster's own in that room are ones the
poster could push out anyway by posting there. The rooms are taken in the
order the poster first had messages kept in them, so its oldest rooms go
first; the newest message is never trimmed (the budget is at least one
message), so a poster keeps at most its budget plus one message.

Everything is bookkeeping on the caller's rooms; nothing is encoded here.
A message costs a counter update per run of posts (the hub charges a run's
messages to one room at once) and the entries it pushes out.
"""

from __future__ import annotations

from collections import deque
from typing import Generic, Protocol, TypeVar

from ipcd.budgets import UidBudget

Kept = tuple[int, bytes, int]  # a kept message: its seq, its MESSAGE frame, its poster's uid
# What a kept entry costs besides its frame's bytes (its tuple, the bytes
# object's header, the seq, the deque's slot: ~140 bytes measured), charged
# too, so that a budget of tiny messages bounds memory as well as a big one.
ENTRY_COST = 160


def cost(entry: Kept) -> int:
    return len(entry[1]) + ENTRY_COST


class _Room(Protocol):
    history: deque[Kept]


R = TypeVar("R", bound=_Room)


class KeptBytes(Generic[R]):
    """Bytes of history per poster uid, and the rooms holding them."""

    def __init__(self, budget: UidBudget) -> None:
        self.budget = budget  # held: uid -> bytes of its kept messages
        self._where: dict[int, dict[R, int]] = {}  # uid -> room -> how many of its messages there
        self.total = 0  # bytes charged for all uids together: the daemon-wide --history-bytes

    def kept(self, room: R, uid: int, count: int, size: int, history: int) -> None:
        """``count`` messages of ``uid`` (frames of ``size`` bytes) were appended to
        ``room``: charge them, push out what is past ``history`` messages,
        and trim the poster's oldest rooms while it is over budget."""
        held = self.budget.held
        charged = size + count * ENTRY_COST
        where = self._where.get(uid)
        if where is None:
            where = self._where[uid] = {}
        mine = where.get(room, 0) + count
        kept = room.history
        excess = len(kept) - history
        if excess > 0:
            # What the new messages push out: most often the poster's own
            # older ones, released here without a call each (this runs for
            # nearly every post to a full room). The poster's newest stay, so
            # its counts here never reach 0.
            popleft = kept.popleft
            for _ in range(excess):
                entry = popleft()
                if entry[2] == uid:
                    charged -= len(entry[1]) + ENTRY_COST
                    mine -= 1
                else:
                    self._release(room, entry)
        held[uid] += charged
        self.total += charged
        where[room] = mine
        if not self.budget.admits(uid, 0):
            self._trim_poster(uid, room)

    def forgotten(self, room: R) -> None:
        """``room`` and its history are gone."""
        for entry in room.history:
            self._release(room, entry)
        room.history.clear()

    def trim_to(self, rooms: list[R], target: int) -> None:
        """Trim the oldest messages of ``rooms``, in that order, until all
        history together is down to ``target`` bytes; each room keeps its
        newest message (its seq's witness), and stays a gap-free suffix."""
        for room in rooms:
            kept = room.history
            while self.total > target and len(kept) > 1:
                self._release(room, kept.popleft())
            if self.total <= target:
                return

    def holdings(self) -> dict[int, int]:
        return dict(self.budget.held)

    def clear(self) -> None:
        self.budget.clear()
        self._where.clear()
        self.total = 0

    def _trim_poster(self, uid: int, newest: R) -> None:
        where = self._where[uid]
        while not self.budget.admits(uid, 0):
            room = next(iter(where))
            kept = room.history
            if room is newest and where[room] == 1:
                # its one message in the room it posts to is the newest: kept
                if len(where) == 1:
                    return
                where[room] = where.pop(room)  # to the back: trim the others first
                continue
            while True:
                entry = kept.popleft()
                self._release(room, entry)
                if entry[2] == uid:
                    break

    def _release(self, room: R, entry: Kept) -> None:
        uid = entry[2]
        size = len(entry[1]) + ENTRY_COST
        self.budget.release(uid, size)
        self.total -= size
        where = self._where.get(uid)
        if where is None:
            return
        left = where.get(room, 0) - 1
        if left > 0:
            where[room] = left
        else:
            where.pop(room, None)
            if not where:
                del self._where[uid]
