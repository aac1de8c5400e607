"""The store's GET replies carry duplicates the record owns (regression: a
reply queued behind a busy worker held the entry's raw fd numbers, which a
removal and a new PUT could reuse for another entry's file)."""

from __future__ import annotations

import json
import os

from ipcd.handoff.store import Store
from ipcd.protocol import Op
from ipcd.server.records import Sender


def _sender(conn: int) -> Sender:
    return Sender(worker=1, conn=conn, request_id=conn, uid=0, gid=0, pid=1)


def test_get_reply_owns_duplicates_and_take_gives_the_originals() -> None:
    store = Store()
    reader, writer = os.pipe()
    try:
        stored = os.dup(writer)
        store.handle(_sender(1), Op.PUT, json.dumps({"name": "p"}).encode(), (stored,))
        (got,) = store.handle(_sender(2), Op.GET, json.dumps({"name": "p"}).encode(), ())
        assert got.close_fds
        assert stored not in got.fds
        os.write(got.fds[0], b"dup works")
        assert os.read(reader, 20) == b"dup works"
        os.close(got.fds[0])
        store.handle(_sender(3), Op.RM, json.dumps({"name": "p"}).encode(), ())
        # the duplicate was independent: removing the entry closed only the store's copy
        try:
            os.fstat(stored)
        except OSError:
            pass
        else:
            raise AssertionError("rm left the stored fd open")
    finally:
        os.close(reader)
        os.close(writer)
