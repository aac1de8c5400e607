"""The store's GET replies carry duplicates, and a channel owns the fds
posted to it (regression: a reply queued behind a busy worker held the
entry's raw fd numbers, which a removal and a new PUT could reuse for
another entry's file)."""

from __future__ import annotations

import json
import os

from ipcd.handoff.store import Store
from ipcd.link.ops import ChannelOp
from ipcd.link.records import Sender
from ipcd.protocol import Op, encode_frame
from ipcd.server.channel import Channel


def _sender(conn: int) -> Sender:
    return Sender(worker=1, conn=conn, request_id=conn, uid=0, gid=0, pid=1)


def test_get_reply_owns_duplicates_and_take_gives_the_originals() -> None:
    store = Store()
    reader, writer = os.pipe()
    try:
        stored = os.dup(writer)
        store.handle(_sender(1), Op.PUT, json.dumps({"name": "p"}).encode(), (stored,))
        (got,) = store.handle(_sender(2), Op.GET, json.dumps({"name": "p"}).encode(), ())
        assert stored not in got.fds  # copies: the channel closes what it is given
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


def test_a_channel_closes_posted_fds_once_sent_even_from_its_backlog() -> None:
    master_end, worker_end = Channel.pair()
    reader, writer = os.pipe()
    try:
        while True:  # fill the peer's queue, so the next message waits in the backlog
            try:
                master_end.sock.send(encode_frame(ChannelOp.HEARTBEAT, 0, b"x" * 4096))
            except BlockingIOError:
                break
        given = os.dup(writer)
        master_end.post(ChannelOp.ANSWER, b"with an fd", fds=(given,))
        master_end.flush()  # the end of the loop pass: the batch goes (here: to the backlog)
        assert master_end.has_backlog
        while master_end.has_backlog:  # the peer reads, room appears, the backlog goes out
            worker_end.recv()
            master_end.flush_backlog()
        # Sent: the channel closed its copy (checked before receiving, which
        # could reuse the number in this same process).
        try:
            os.fstat(given)
        except OSError:
            pass
        else:
            raise AssertionError("the channel kept the posted fd open after sending it")
        got = worker_end.recv()
        while got.op != ChannelOp.ANSWER:
            got = worker_end.recv()
        assert got.body == b"with an fd"
        os.write(got.fds[0], b"!")
        assert os.read(reader, 1) == b"!"
        os.close(got.fds[0])
    finally:
        master_end.close()
        worker_end.close()
        os.close(reader)
        os.close(writer)
