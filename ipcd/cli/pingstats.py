"""Round-trip statistics for ``ipcctl ping``, printed the way ping(8) does."""

from __future__ import annotations

import math
from typing import Any


class PingStats:
    # A plain class, not a dataclass: every ipcctl command imports this
    # module, and importing dataclasses costs more than ping itself.
    def __init__(self) -> None:
        self.sent = 0
        self.rtts: list[float] = []  # seconds

    @property
    def received(self) -> int:
        return len(self.rtts)

    @property
    def loss(self) -> float:
        return 0.0 if not self.sent else 100.0 * (self.sent - self.received) / self.sent

    def percentile(self, pct: float) -> float:
        """Nearest-rank percentile of the round trips, in seconds."""
        if not self.rtts:
            return 0.0
        ordered = sorted(self.rtts)
        rank = max(math.ceil(pct / 100 * len(ordered)), 1)
        return ordered[rank - 1]

    def summary(self) -> dict[str, Any]:
        rtts = self.rtts
        n = len(rtts)
        mean = sum(rtts) / n if n else 0.0
        mdev = math.sqrt(sum((r - mean) ** 2 for r in rtts) / n) if n else 0.0
        ms = 1000.0
        return {
            "sent": self.sent,
            "received": n,
            "loss_percent": round(self.loss, 3),
            "min_ms": round(min(rtts) * ms, 4) if n else None,
            "avg_ms": round(mean * ms, 4) if n else None,
            "max_ms": round(max(rtts) * ms, 4) if n else None,
            "p50_ms": round(self.percentile(50) * ms, 4) if n else None,
            "p99_ms": round(self.percentile(99) * ms, 4) if n else None,
            "mdev_ms": round(mdev * ms, 4) if n else None,
        }

    def lines(self, target: str, elapsed: float) -> list[str]:
        s = self.summary()
        out = [
            f"--- {target} ping statistics ---",
            f"{s['sent']} requests transmitted, {s['received']} received, "
            f"{s['loss_percent']:g}% loss, time {elapsed * 1000:.0f}ms",
        ]
        if s["received"]:
            out.append(
                "rtt min/avg/max/p99/mdev = "
                + "/".join(f"{s[key]:.3f}" for key in ("min_ms", "avg_ms", "max_ms", "p99_ms", "mdev_ms"))
                + " ms"
            )
        return out
