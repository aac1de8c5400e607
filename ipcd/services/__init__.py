"""Services: what the daemon does with a decoded frame.

A stream handler gets the worker, the connection and the frame, and answers
through ``conn.send_frame``; it owns the frame's fds (it must keep or close
them). A datagram handler gets the frame and the sender's credentials and
returns the encoded reply, if any.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ipcd.fdpass import Credentials
from ipcd.protocol import Frame

if TYPE_CHECKING:
    from ipcd.server.connection import Connection
    from ipcd.server.worker import Worker

StreamHandler = Callable[["Worker", "Connection", Frame], None]
DatagramHandler = Callable[[Frame, Credentials | None], bytes | None]


def stream_handlers() -> dict[int, StreamHandler]:
    from ipcd.services import admin, chat, echo, handoff  # noqa: PLC0415 - they import the server's types

    return {**echo.STREAM, **admin.STREAM, **chat.STREAM, **handoff.STREAM}


def datagram_handlers() -> dict[int, DatagramHandler]:
    from ipcd.services import echo  # noqa: PLC0415

    return dict(echo.DATAGRAM)
