"""Logging set-up for the daemon: one line per event on stderr."""

from __future__ import annotations

import logging
import sys


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s ipcd[%(process)d]: %(message)s"))
    root = logging.getLogger("ipcd")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
