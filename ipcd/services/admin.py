"""Admin: STATUS, answered from the master's view of every worker.

The worker that received the request cannot see the other workers, so it
forwards the query over its channel; the master answers with the whole
picture and the worker adds its own pid as ``served_by``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ipcd.protocol import Frame, Op

if TYPE_CHECKING:
    from ipcd.server.connection import Connection
    from ipcd.server.worker import Worker
    from ipcd.services import StreamHandler


def _status(worker: Worker, conn: Connection, frame: Frame) -> None:
    worker.chat.query_status(conn, frame)  # held, like a forwarded request, past the uid's budget


STREAM: dict[int, StreamHandler] = {Op.STATUS: _status}
