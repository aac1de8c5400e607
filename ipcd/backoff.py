"""How a client waits for the daemon to come back after a lost connection.

Theory of operation: a reload, a killed worker or a restart makes the
daemon unreachable for a moment or for a while; a client that reconnects
(``ipcd.subscription``, ``ipcd.publisher``) tries at once-ish, then less and
less often: 0.05 s, doubling up to 2 s between attempts, so a short outage
costs little latency and a long one little CPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

FIRST: Final = 0.05  # seconds before the second attempt
LONGEST: Final = 2.0  # seconds between attempts, at most


def delays() -> Iterator[float]:
    """The waits between attempts: FIRST, doubling up to LONGEST, for ever."""
    delay = FIRST
    while True:
        yield delay
        delay = min(delay * 2, LONGEST)
