"""Logging: structured to journald under systemd, one line per event on stderr otherwise.

Under systemd, stderr is connected to the journal (``JOURNAL_STREAM`` names
its device and inode); then records go to journald directly, with fields a
query can select on: ``_PID`` (worker or master) comes free, and callers add
``PEER_UID``, ``PEER_PID`` and ``OPERATION`` through ``extra=``. If journald
is not there (no socket), or we are not under systemd, stderr it is.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, TextIO

JOURNAL_SOCKET = "/run/systemd/journal/socket"
_FORMAT = "%(asctime)s %(levelname)-7s ipcd[%(process)d]: %(message)s"


def _stderr_is_journal() -> bool:
    stream = os.environ.get("JOURNAL_STREAM", "")
    if ":" not in stream:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"


def journal_handler(force: bool = False) -> logging.Handler | None:
    """A journald handler if journald listens and stderr goes to the journal
    (or ``force``, for a detached daemon whose stderr goes nowhere)."""
    if not (force or _stderr_is_journal()) or not os.path.exists(JOURNAL_SOCKET):
        return None
    try:
        from systemd.journal import JournalHandler  # noqa: PLC0415 - only under systemd
    except ImportError:
        return None
    handler: logging.Handler = JournalHandler(SYSLOG_IDENTIFIER="ipcd")
    return handler


def setup_logging(level: str, stream: TextIO | None = None, journal: bool = False) -> str:
    """Configure the "ipcd" logger: to ``stream`` if given, else to the
    journal when appropriate, else stderr. Returns where it logs."""
    handler = None if stream is not None else journal_handler(force=journal)
    where = "journal"
    if handler is None:
        where = "stream" if stream is not None else "stderr"
        handler = logging.StreamHandler(stream or sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT))
    root = logging.getLogger("ipcd")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    return where


def peer_fields(uid: int, pid: int, operation: str) -> dict[str, Any]:
    """``extra=`` for a log call about one client (journal fields)."""
    return {"PEER_UID": uid, "PEER_PID": pid, "OPERATION": operation}
