"""fd hand-off in a worker: forward PUT/GET/TAKE/LS/RM to the store.

The store lives in the master (a worker crash must not lose an entry), so
the worker only forwards: a PUT's fds go up with the request (the worker
closes its copies once the kernel has them), a GET's or TAKE's come down
with the answer and ride on the first byte of the client's reply frame.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ipcd.protocol import Frame, Op

if TYPE_CHECKING:
    from ipcd.server.connection import Connection
    from ipcd.server.worker import Worker
    from ipcd.services import StreamHandler

HANDOFF_OPS = (Op.PUT, Op.GET, Op.TAKE, Op.LS, Op.RM)


def _forward(worker: Worker, conn: Connection, frame: Frame) -> None:
    # Every store op is judged by uid, gid and supplementary groups (--allow-gid).
    worker.chat.forward(conn, frame, with_groups=True)


STREAM: dict[int, StreamHandler] = dict.fromkeys(HANDOFF_OPS, _forward)
