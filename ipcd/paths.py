"""Where the daemon's sockets are: the names the daemon, ``ipcctl`` and the
client library share.

Kept apart from :mod:`ipcd.settings` so that a client pays for a few
constants, not for the daemon's settings table and its dataclasses (every
``ipcctl`` call imports this; start-up time is its cost in a script's loop).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

DEFAULT_SOCKET_DIR: Final = Path("/tmp/ipcd")
STREAM_SOCKET: Final = "stream.sock"
DGRAM_SOCKET: Final = "dgram.sock"
LOCK_FILE: Final = ".lock"
SOCKET_DIR_ENV: Final = "IPCD_SOCKET_DIR"
DAEMON_UID_ENV: Final = "IPCD_DAEMON_UID"  # whom a client takes for the daemon besides root


def default_socket_dir() -> Path:
    """``IPCD_SOCKET_DIR`` if set, else /tmp/ipcd (shared with ipcctl)."""
    return Path(os.environ.get(SOCKET_DIR_ENV) or DEFAULT_SOCKET_DIR)
