"""fd hand-off in a worker: forward PUT/GET/TAKE/LS/RM to the store.

The store lives in the master (a worker crash must not lose an entry), so
the worker forwards: a PUT's fds go up with the request (the worker
closes its copies once the kernel has them), a GET's or TAKE's come down
with the answer and ride on the first byte of the client's reply frame.
A GET of an entry this worker holds a copy of is answered here instead,
when nothing of the connection's is still in the master (see
ipcd.handoff.replica); anything else about it, a refusal included, is the
master's to answer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ipcd.handoff.store import duplicates
from ipcd.protocol import Frame, Op, encode_frame

if TYPE_CHECKING:
    from ipcd.server.connection import Connection
    from ipcd.server.worker import Worker
    from ipcd.services import StreamHandler

HANDOFF_OPS = (Op.PUT, Op.GET, Op.TAKE, Op.LS, Op.RM)


def _forward(worker: Worker, conn: Connection, frame: Frame) -> None:
    if frame.op == Op.GET and _get_here(worker, conn, frame):
        return
    # Every store op is judged by uid, gid and supplementary groups (--allow-gid).
    worker.chat.forward(conn, frame, with_groups=True)


def _get_here(worker: Worker, conn: Connection, frame: Frame) -> bool:
    """Answer a GET from this worker's copy; False: the master must."""
    state = conn.chat
    if state is not None and state.in_flight:
        return False  # its earlier requests first, in order
    if not worker.chat.fd_budget.admits(conn.out_fds, 0):
        return False  # the forward path holds it for the budget
    found = worker.replica.lookup(frame.body)
    if found is None:
        return False
    record, stored = found
    try:
        creds = conn.creds
        allowed = worker.replica.allows(record, creds.uid, creds.gid, lambda: conn.groups)
    except OSError:
        return False  # the peer is gone: the forward path finds out
    if not allowed:
        return False  # refused: the master says so, in its words
    copies = duplicates(stored)
    if copies is None:
        return False  # out of fds here: the master may fare better
    conn.send_frame(encode_frame(Op.GET_REPLY, frame.request_id, record.body, nfds=len(copies)), copies)
    return True


STREAM: dict[int, StreamHandler] = dict.fromkeys(HANDOFF_OPS, _forward)
