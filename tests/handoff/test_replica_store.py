"""The master's replicating store, without sockets: which copies it sends,
which answers it holds back until workers have closed theirs, and that
every fd it hands out is its own to give (pipes show when copies close)."""

from __future__ import annotations

import json
import os
import resource
import time

from ipcd import fdpass
from ipcd.handoff.replica import ReplicatedStore, WorkerReplica
from ipcd.handoff.store import duplicates
from ipcd.link.ops import ChannelOp
from ipcd.link.records import Answer, Out, Replica, Sender, Unreplica
from ipcd.protocol import Op, decode_record, reply_op
from tests.daemon import Pipes

W1, W2 = 101, 102


def _sender(worker: int, rid: int = 1, uid: int = 1000, conn: int = 1) -> Sender:
    return Sender(worker=worker, conn=conn, request_id=rid, uid=uid, gid=uid, pid=os.getpid())


def _body(name: str = "e", **more: object) -> bytes:
    return json.dumps({"name": name, **more}).encode()


def _kinds(outs: list[Out]) -> list[tuple[int, ChannelOp, int]]:
    """(worker, record op, reply op or 0) of each out."""
    kinds = []
    for out in outs:
        frame = Answer.decode(out.body).frame if out.op == ChannelOp.ANSWER else b""
        reply = decode_record(frame, out.fds).op if frame else 0
        kinds.append((out.worker, out.op, reply))
    return kinds


def _close(outs: list[Out]) -> None:
    for out in outs:
        fdpass.close_fds(out.fds)


def _put(store: ReplicatedStore, pipes: Pipes) -> None:
    fds = tuple(os.dup(fd) for fd in pipes.write_ends)
    assert _kinds(store.handle(_sender(W1), Op.PUT, _body(), fds)) == [
        (W1, ChannelOp.ANSWER, reply_op(Op.PUT))
    ]


def test_a_get_through_the_master_sends_that_worker_one_copy() -> None:
    store = ReplicatedStore()
    with Pipes(2) as pipes:
        _put(store, pipes)
        first = store.handle(_sender(W2), Op.GET, _body(), ())
        assert _kinds(first) == [(W2, ChannelOp.REPLICA, 0), (W2, ChannelOp.ANSWER, reply_op(Op.GET))]
        record = Replica.decode(first[0].body)
        assert (record.name, record.owner, len(first[0].fds)) == ("e", 1000, 2)
        assert record.body == store.entries["e"].handout_body
        again = store.handle(_sender(W2), Op.GET, _body(), ())
        assert _kinds(again) == [(W2, ChannelOp.ANSWER, reply_op(Op.GET))]  # it has one already
        _close(first + again)
        store.close_all()


def test_put_and_take_without_gets_send_no_copies_and_hold_nothing() -> None:
    store = ReplicatedStore()
    with Pipes(1) as pipes:
        _put(store, pipes)
        taken = store.handle(_sender(W1), Op.TAKE, _body(), ())
        assert _kinds(taken) == [(W1, ChannelOp.ANSWER, reply_op(Op.TAKE))]
        _close(taken)
        pipes.drop_write_ends()
        pipes.assert_closed_elsewhere(timeout=1)


def test_an_rm_is_answered_only_once_every_worker_with_a_copy_closed_it() -> None:
    store = ReplicatedStore()
    with Pipes(1) as pipes:
        _put(store, pipes)
        replicas = WorkerReplica(), WorkerReplica()
        for worker, replica in zip((W1, W2), replicas, strict=True):
            outs = store.handle(_sender(worker), Op.GET, _body(), ())
            replica.install(Replica.decode(outs[0].body), outs[0].fds)
            _close(outs[1:])
        removed = store.handle(_sender(W1, rid=9), Op.RM, _body(), ())
        assert sorted(_kinds(removed)) == [(W1, ChannelOp.UNREPLICA, 0), (W2, ChannelOp.UNREPLICA, 0)]
        token = Unreplica.decode(removed[0].body).token
        assert token == Unreplica.decode(removed[1].body).token != 0
        replicas[0].drop("e")
        assert store.unreplicated(W1, token) == []  # W2 still holds its copy
        assert store.unreplicated(W1, token + 1) == []  # an unknown token changes nothing
        replicas[1].drop("e")
        assert _kinds(store.unreplicated(W2, token)) == [(W1, ChannelOp.ANSWER, reply_op(Op.RM))]
        pipes.drop_write_ends()
        pipes.assert_closed_elsewhere(timeout=1)  # store and both workers closed theirs


def test_a_worker_that_is_gone_holds_no_answer_back() -> None:
    store = ReplicatedStore()
    with Pipes(1) as pipes:
        _put(store, pipes)
        got = store.handle(_sender(W2), Op.GET, _body(), ())
        _close(got)  # the worker died with its copy
        taken = store.handle(_sender(W1), Op.TAKE, _body(), ())
        assert _kinds(taken) == [(W2, ChannelOp.UNREPLICA, 0)]
        released = store.forget_worker(W2)
        assert _kinds(released) == [(W1, ChannelOp.ANSWER, reply_op(Op.TAKE))]
        assert len(released[0].fds) == 1  # the stored fd itself, for the taker
        _close(released)
        assert store.replicas == {}


def test_a_replace_waits_for_the_old_copies_and_an_expiry_waits_for_nothing() -> None:
    store = ReplicatedStore()
    with Pipes(2) as pipes:
        old, new = pipes.some(0), pipes.some(1)
        fd = os.dup(pipes.write_ends[0])
        store.handle(_sender(W1), Op.PUT, _body(), (fd,))
        _close(store.handle(_sender(W2), Op.GET, _body(), ()))
        fd = os.dup(pipes.write_ends[1])
        replaced = store.handle(_sender(W1), Op.PUT, _body(replace=True, ttl=0.01), (fd,))
        assert _kinds(replaced) == [(W2, ChannelOp.UNREPLICA, 0)]
        token = Unreplica.decode(replaced[0].body).token
        assert _kinds(store.unreplicated(W2, token)) == [(W1, ChannelOp.ANSWER, reply_op(Op.PUT))]
        _close(store.handle(_sender(W2), Op.GET, _body(), ()))  # a copy of the new entry
        expired = store.tick(time.monotonic() + 1)
        assert _kinds(expired) == [(W2, ChannelOp.UNREPLICA, 0)]
        assert Unreplica.decode(expired[0].body).token == 0  # no answer waits on it
        pipes.drop_write_ends()
        old.assert_closed_elsewhere(timeout=1)
        new.assert_closed_elsewhere(timeout=1)


def test_a_worker_that_may_not_be_sent_copies_gets_none() -> None:
    store = ReplicatedStore()
    store.may_replicate = lambda worker: worker != W2
    with Pipes(1) as pipes:
        _put(store, pipes)
        got = store.handle(_sender(W2), Op.GET, _body(), ())
        assert _kinds(got) == [(W2, ChannelOp.ANSWER, reply_op(Op.GET))]
        _close(got)
        assert _kinds(store.handle(_sender(W1), Op.RM, _body(), ())) == [
            (W1, ChannelOp.ANSWER, reply_op(Op.RM))
        ]


def test_a_worker_replica_finds_well_formed_get_bodies_only() -> None:
    replica = WorkerReplica()
    with Pipes(1) as pipes:
        record = Replica("e", 1000, False, (), (), b"{}")
        replica.install(record, (os.dup(pipes.write_ends[0]),))
        assert replica.lookup(_body()) is not None
        assert replica.lookup(_body(wait=5)) is not None
        wrong_waits = [b'{"name":"e","wait":%s}' % w for w in (b"-1", b"NaN", b"1e999", b'"5"', b"true")]
        for bad in (
            b"",
            b"[]",
            b"{",
            _body("bad name"),
            _body("other"),
            json.dumps({"name": 3}).encode(),
            *wrong_waits,  # the master answers these BAD_REQUEST, so no copy may answer them
        ):
            assert replica.lookup(bad) is None
            assert replica.lookup(bad) is None  # and again, from its cache
        replica.install(record, (os.dup(pipes.write_ends[0]),))  # a newer copy replaces the old
        replica.close_all()
        pipes.drop_write_ends()
        pipes.assert_closed_elsewhere(timeout=1)


def test_a_connections_answers_wait_in_order_behind_its_fenced_one() -> None:
    store = ReplicatedStore()
    with Pipes(1) as pipes:
        _put(store, pipes)
        _close(store.handle(_sender(W2), Op.GET, _body(), ()))  # a copy in W2
        removed = store.handle(_sender(W1, rid=5), Op.RM, _body(), ())
        assert _kinds(removed) == [(W2, ChannelOp.UNREPLICA, 0)]
        assert store.handle(_sender(W1, rid=6), Op.GET, _body(), ()) == []  # behind the RM's answer
        other = store.handle(_sender(W1, rid=7, conn=2), Op.GET, _body(), ())
        assert _kinds(other) == [(W1, ChannelOp.ANSWER, Op.ERROR)]  # another connection: at once
        released = store.unreplicated(W2, Unreplica.decode(removed[0].body).token)
        assert [
            (Answer.decode(o.body).conn, decode_record(Answer.decode(o.body).frame).request_id)
            for o in released
        ] == [
            (1, 5),
            (1, 6),
        ]
        assert store.handle(_sender(W1, rid=8), Op.GET, _body(), ()) != []  # the line is gone


def test_copies_the_kernel_cannot_make_are_none_and_leave_nothing_open() -> None:
    """Out of fds in the middle of the dups for a copy: the ones made are
    closed again and the caller is told None (it lets the master answer)."""
    with Pipes(8) as pipes:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        highest = max(int(name) for name in os.listdir("/proc/self/fd"))
        fillers = []  # every free fd number up to the highest: the dups can only go above it
        while (fd := os.open(os.devnull, os.O_RDONLY)) < highest:
            fillers.append(fd)
        os.close(fd)
        open_fds = len(os.listdir("/proc/self/fd")) - 1  # listdir's own fd is closed again
        resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 1 + 3, hard))  # room for 3 of 8
        try:
            copies = duplicates(tuple(pipes.write_ends))
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        left = len(os.listdir("/proc/self/fd")) - 1
        fdpass.close_fds(fillers)
        assert copies is None
        assert left == open_fds
