"""The STATUS document, built by the master from what it knows of each worker."""

from __future__ import annotations

import os
import time
from typing import Any

from ipcd import __version__
from ipcd.chat.fairshare import BURST_FACTOR
from ipcd.chat.hub import Limits
from ipcd.server.flow import MAX_CHANNEL_BACKLOG
from ipcd.server.pool import WorkerHandle, WorkerPool
from ipcd.services.chat import MAX_IN_FLIGHT
from ipcd.settings import READ_BUFFER_SIZE, Settings

_PAGE = os.sysconf("SC_PAGE_SIZE")
MAX_ROOMS = Limits.max_rooms
# What STATUS shows each uid holding.
HOLDINGS = (
    "connections",
    "partial_bytes",
    "forward_bytes",
    "rooms",
    "joins",
    "history_bytes",
    "rate_debt",
    "message_ids",
    "waiters",
    "stored_fds",
)


def uid_holdings(*parts: dict[int, dict[str, int]]) -> list[dict[str, Any]]:
    """Who holds what against the per-uid budgets: one object per uid that
    holds anything, every count present (0 if none), uids in order."""
    merged: dict[int, dict[str, int]] = {}
    for part in parts:
        for uid, held in part.items():
            merged.setdefault(uid, {}).update(held)
    return [{"uid": uid, **{k: merged[uid].get(k, 0) for k in HOLDINGS}} for uid in sorted(merged)]


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def _worker_entry(handle: WorkerHandle, now: float) -> dict[str, Any]:
    return {
        "pid": handle.pid,
        "state": handle.state.value,
        "generation": handle.generation,
        "connections": handle.connections,
        "rss": rss_bytes(handle.pid),
        "received": handle.passed,  # the master counts what it passed: exact, unlike the reports
        "frames": handle.load.get("frames", 0),
        "datagrams": handle.load.get("datagrams", 0),
        "protocol_errors": handle.load.get("protocol_errors", 0),
        "cut_off": handle.load.get("cut_off", 0),
        "held": handle.load.get("held", 0),
        "uptime": round(now - handle.started, 3),
    }


def limits(settings: Settings) -> dict[str, Any]:
    """Every limit a client can run into, so that it need not guess them."""
    return {
        "max_frame_size": settings.max_frame_size,
        "max_fds": settings.max_fds,
        "max_outbuf": settings.max_outbuf,
        "pause_reading_at": settings.pause_threshold,
        "max_datagram": READ_BUFFER_SIZE,
        "max_message": settings.max_message,
        "history_size": settings.history_size,
        "rooms_per_connection": settings.rooms_per_connection,
        "rate_limit": settings.rate_limit,
        "rate_burst": settings.rate_limit * BURST_FACTOR,
        "max_in_flight": MAX_IN_FLIGHT,
        "connection_fd_budget": settings.connection_fd_budget,
        "channel_fd_budget": settings.channel_fd_budget,
        "channel_byte_budget": settings.channel_byte_budget,
        "max_channel_backlog": MAX_CHANNEL_BACKLOG,
        "fd_quota": settings.fd_quota,
        "waiters_per_uid": settings.waiters_per_uid,
        "rooms_per_uid": settings.rooms_per_uid,
        "max_rooms": MAX_ROOMS,
        "joins_per_uid": settings.joins_per_uid,
        "history_bytes_per_uid": settings.history_bytes_per_uid,
        "message_ids_per_uid": settings.message_ids_per_uid,
        "message_id_window": settings.message_id_window,
        "connections_per_uid": settings.connections_per_uid,  # the master puts the one in force
        "partial_bytes_per_uid": settings.partial_bytes_per_uid,
        "forward_bytes_per_uid": settings.forward_bytes_per_uid,
        "privileged_budget_factor": settings.privileged_budget_factor,
        "privileged_uids": sorted({0, os.geteuid()}),
        "send_timeout": settings.send_timeout,
        "idle_timeout": settings.idle_timeout,
    }


def build_status(settings: Settings, pool: WorkerPool, started: float, started_wall: float) -> dict[str, Any]:
    now = time.monotonic()
    workers = [_worker_entry(h, now) for h in sorted(pool.workers.values(), key=lambda h: h.started)]
    return {
        "version": __version__,
        "pid": os.getpid(),
        "uptime": round(now - started, 3),
        "started": started_wall,
        "socket_dir": str(settings.socket_dir),
        "sockets": {"stream": str(settings.stream_path), "dgram": str(settings.dgram_path)},
        "rss": rss_bytes(os.getpid()),
        "generation": pool.generation,
        "respawns": pool.respawns,
        "workers": workers,
        "limits": limits(settings),
        "totals": {
            "workers": len(workers),
            "connections": sum(w["connections"] for w in workers),
            "rss": sum(w["rss"] for w in workers) + rss_bytes(os.getpid()),
            "received": sum(w["received"] for w in workers),
            "frames": sum(w["frames"] for w in workers),
            "datagrams": sum(w["datagrams"] for w in workers),
        },
    }
