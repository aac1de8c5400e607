"""Per-uid budgets: what one user may make the master hold.

Theory of operation
-------------------
ipcd serves every user of a host from one master, so a limit per
connection or per daemon lets one uid take what all share (open enough
connections, or fill the daemon's table, and the next user is refused).
A :class:`UidBudget` counts one resource per uid, charged from the kernel
credentials of the request that spends it, *before* it is spent, and
released by whoever ends it (served, timed out, parted, forgotten). Past its
limit the request is refused with a message that names the limit, what the
uid holds and what to do; other uids are not touched.

Root and the daemon's own uid get ``privileged_factor`` times each limit
(their helpers may legitimately serve many users), still a bound.
The counts are exact: each is a ``Counter`` entry that leaves the table at
zero, so a uid that holds nothing costs nothing, and ``holdings`` is what
``ipcctl status`` shows per uid.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter


@dataclasses.dataclass
class UidBudget:
    what: str  # "parked waiters": what is counted, for messages
    limit: int  # per uid
    setting: str  # the flag that raises it, for messages
    privileged_factor: int = 1  # root and the daemon's uid get this many times ``limit``
    privileged: frozenset[int] = dataclasses.field(default_factory=lambda: frozenset({0, os.geteuid()}))
    held: Counter[int] = dataclasses.field(default_factory=Counter)
    scope: str = "per uid"  # what one limit covers, for messages ("per uid in each worker")

    def limit_for(self, uid: int) -> int:
        return self.limit * self.privileged_factor if uid in self.privileged else self.limit

    def admits(self, uid: int, count: int = 1) -> bool:
        return self.held[uid] + count <= self.limit_for(uid)

    def refusal(self, uid: int, advice: str) -> str:
        """The one-line reason a request past the budget is refused."""
        return (
            f"uid {uid} holds {self.held[uid]} {self.what}, its limit (the daemon's "
            f"{self.setting} is {self.limit_for(uid)} {self.scope}): {advice}"
        )

    def charge(self, uid: int, count: int = 1) -> None:
        self.held[uid] += count

    def release(self, uid: int, count: int = 1) -> None:
        left = self.held[uid] - count
        if left > 0:
            self.held[uid] = left
        else:
            del self.held[uid]

    def clear(self) -> None:
        self.held.clear()
