"""Pages of a room's history: the newest before a cursor, or all after a seq.

Theory of operation
-------------------
A room keeps its newest messages as a contiguous suffix of its sequence
(``Kept`` entries, oldest first, numbered without gaps: ipcd.chat.keptbytes
trims only from the front). So "what is kept after seq N" is a slice found
by arithmetic, and "what was asked for but is no longer kept" is exactly
the range between N and the oldest kept message: nothing is ever missing
silently.

Both kinds of page hold what fits the reply budget and at least one
message, so a message larger than the budget still pages through:

- :func:`newest_before`, the newest ``count`` messages below a cursor, is
  what a late joiner or ``ipcctl history`` asks for (paged towards the
  *older* end: ``more`` and the next ``before``);
- :func:`after`, every message after a seq, oldest first, is what a
  subscriber that resumes asks for (paged towards the *newer* end: ``more``
  and the next ``after``; ``gone`` the range it asked for that the room no
  longer keeps, if any).
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Sequence
from itertools import islice

from ipcd.chat.keptbytes import Kept


def newest_that_fit(sizes: Sequence[int], budget: int) -> int:
    """How many of the last of ``sizes`` fit in ``budget`` bytes together.
    At least one (if there is one)."""
    total = 0
    for taken, size in enumerate(reversed(sizes)):
        total += size
        if taken and total > budget:
            return taken
    return len(sizes)


def oldest_that_fit(sizes: Sequence[int], budget: int) -> int:
    """How many of the first of ``sizes`` fit in ``budget`` bytes together.
    At least one (if there is one)."""
    total = 0
    for taken, size in enumerate(sizes):
        total += size
        if taken and total > budget:
            return taken
    return len(sizes)


def newest_before(
    history: deque[Kept], count: int, before: int | None, budget: int
) -> tuple[list[Kept], bool]:
    """The last ``count`` messages with a seq below ``before`` (of all, when
    None), oldest first, cut to the newest that fit ``budget``; and whether
    the budget left any of them out."""
    if not count:
        return [], False
    kept = list(history) if before is None else [k for k in history if k[0] < before]
    wanted = kept[-count:]
    fit = newest_that_fit([len(frame) for _, frame, _ in wanted], budget)
    return wanted[len(wanted) - fit :], fit < len(wanted)


@dataclasses.dataclass(frozen=True, slots=True)
class After:
    """The messages kept after a seq, as far as one reply takes them."""

    kept: list[Kept]  # oldest first
    more: bool  # kept messages after the last of ``kept`` remain: ask again after it
    gone: tuple[int, int] | None  # the seqs asked for that are no longer kept (first, last)

    @property
    def next_after(self) -> int | None:
        """The ``after`` to ask with next, when ``more``."""
        return self.kept[-1][0] if self.more and self.kept else None


def after(history: deque[Kept], last_seq: int, seq: int, count: int, budget: int) -> After:
    """Up to ``count`` messages with a seq above ``seq`` of a room whose last
    message is ``last_seq``, oldest first, cut to the oldest that fit
    ``budget``."""
    oldest = history[0][0] if history else last_seq + 1
    gone = (seq + 1, oldest - 1) if seq + 1 < oldest and seq < last_seq else None
    start = max(seq + 1 - oldest, 0)
    if start >= len(history) or not count:
        return After([], False, gone)
    wanted = list(islice(history, start, start + count))
    fit = oldest_that_fit([len(frame) for _, frame, _ in wanted], budget)
    page = wanted[:fit]
    return After(page, page[-1][0] < last_seq, gone)
