"""A WSGI app that answers with its version: the server of examples/gunicorn_swap.sh.

    APP_VERSION=v2 gunicorn --chdir examples version_app:app

Every GET answers ``200`` with the body ``VERSION pid=PID`` (``APP_VERSION``
from the environment, the worker's pid), so a client can tell which version
served it. ``GET /?delay=SECS`` (at most 30) sends the headers at once and
the body SECS later: a request still in flight when its version is told to
stop, to watch it drain.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qs

VERSION = os.environ.get("APP_VERSION", "v0")


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
    try:
        delay = float(parse_qs(environ.get("QUERY_STRING", "")).get("delay", ["0"])[0])
    except ValueError:
        delay = -1.0
    if not 0 <= delay <= 30:
        start_response("400 Bad Request", [("Content-Type", "text/plain")])
        yield b"delay must be a number of seconds from 0 to 30\n"
        return
    body = f"{VERSION} pid={os.getpid()}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    if delay:
        yield b""  # the server sends the headers with the first chunk, even an empty one
        time.sleep(delay)
    yield body
