"""The store's per-uid budget of parked waiters, in-process: a uid that
parks GETs/TAKEs with ``wait`` for names nobody put is refused past its
budget with a clear error, other uids are not, and every way a waiter
leaves (served, timed out, connection or worker gone) gives its share back
and leaves no per-name state behind."""

from __future__ import annotations

import os
import time

import pytest

from ipcd import fdpass
from ipcd.handoff.replica import ReplicatedStore
from ipcd.handoff.store import Store, StoreLimits
from ipcd.link.ops import ChannelOp
from ipcd.link.records import Answer, Out, Sender
from ipcd.protocol import ErrorCode, Op, decode_error, decode_record, encode_json, reply_op

ATTACKER, OTHER = 71001, 71002  # unprivileged uids (neither root nor the test's own)
assert os.geteuid() not in (ATTACKER, OTHER)


def sender(uid: int, conn: int = 1, worker: int = 1, request_id: int = 1) -> Sender:
    return Sender(worker=worker, conn=conn, request_id=request_id, uid=uid, gid=uid, pid=1)


def wait_for(store: Store, who: Sender, name: str, op: int = Op.GET, wait: float = 60) -> list[Out]:
    return store.handle(who, op, encode_json({"name": name, "wait": wait}), ())


def answers(outs: list[Out]) -> list[tuple[int, int, bytes]]:
    """(request id, op, body) of each answer; fds closed (a replica's too)."""
    result = []
    for out in outs:
        if out.op != ChannelOp.ANSWER:
            fdpass.close_fds(out.fds)
            continue
        frame = decode_record(Answer.decode(out.body).frame, out.fds)
        fdpass.close_fds(out.fds)
        result.append((frame.request_id, frame.op, frame.body))
    return result


def refusal(outs: list[Out]) -> tuple[ErrorCode, str]:
    ((_, op, body),) = answers(outs)
    assert op == Op.ERROR
    code, message = decode_error(body)
    return ErrorCode(code), message


def put(store: Store, uid: int, name: str) -> list[Out]:
    read, write = os.pipe()
    os.close(write)
    return store.handle(sender(uid, conn=99), Op.PUT, encode_json({"name": name, "public": True}), (read,))


@pytest.fixture(params=[Store, ReplicatedStore], ids=["Store", "ReplicatedStore"])
def store(request: pytest.FixtureRequest) -> Store:
    made: Store = request.param(StoreLimits(waiters_per_uid=3, privileged_factor=2))
    return made


def park(store: Store, uid: int, count: int, conn: int = 1, prefix: str = "n") -> None:
    for i in range(count):
        assert wait_for(store, sender(uid, conn=conn, request_id=i + 1), f"{prefix}{uid}-{conn}-{i}") == []


def test_a_uid_past_its_budget_is_refused_and_told_what_to_do(store: Store) -> None:
    park(store, ATTACKER, 3)
    code, message = refusal(wait_for(store, sender(ATTACKER, conn=2), "one-more"))
    assert code == ErrorCode.LIMIT_EXCEEDED
    assert message == (
        f"uid {ATTACKER} holds 3 parked waiters, its limit (the daemon's --waiters-per-uid is 3 per uid): "
        "'one-more' is not stored yet; wait for fewer names at once, or retry later"
    )
    assert code == refusal(wait_for(store, sender(ATTACKER, conn=3), "x", op=Op.TAKE))[0]  # TAKE too
    park(store, OTHER, 3)  # another uid still has its whole budget
    assert store.holdings() == {ATTACKER: {"waiters": 3}, OTHER: {"waiters": 3}}
    assert store.stats()["waiters"] == 6
    assert len(store.waiters) == 6  # the refused ones parked nothing


def test_a_get_without_wait_and_a_get_of_a_stored_name_cost_nothing(store: Store) -> None:
    park(store, ATTACKER, 3)
    put(store, OTHER, "there")
    ((_, op, _),) = answers(wait_for(store, sender(ATTACKER, conn=5), "there"))
    assert op == reply_op(Op.GET)  # served at once: at its budget a uid still gets what exists
    code, _ = refusal(store.handle(sender(ATTACKER, conn=5), Op.GET, encode_json({"name": "absent"}), ()))
    assert code == ErrorCode.NOT_FOUND


def test_served_waiters_give_their_share_back(store: Store) -> None:
    for i in range(3):
        assert wait_for(store, sender(ATTACKER, request_id=i + 1), "wanted") == []
    served = answers(put(store, OTHER, "wanted"))
    assert sorted(op for _, op, _ in served) == sorted([reply_op(Op.PUT)] + [reply_op(Op.GET)] * 3)
    assert store.holdings() == {OTHER: {"stored_fds": 1}}
    assert store.waiters == {}
    park(store, ATTACKER, 3)  # the whole budget again


def test_a_taken_entry_leaves_the_rest_waiting_and_charged(store: Store) -> None:
    assert wait_for(store, sender(ATTACKER, request_id=1), "once", op=Op.TAKE) == []
    assert wait_for(store, sender(ATTACKER, request_id=2), "once", op=Op.TAKE) == []
    answers(put(store, OTHER, "once"))
    assert store.holdings() == {ATTACKER: {"waiters": 1}}
    assert len(store.waiters["once"]) == 1


def test_timed_out_waiters_give_their_share_back(store: Store) -> None:
    park(store, ATTACKER, 3)
    timed_out = answers(store.tick(time.monotonic() + 3600))
    assert [op for _, op, _ in timed_out] == [Op.ERROR] * 3
    assert {ErrorCode(decode_error(body)[0]) for _, _, body in timed_out} == {ErrorCode.TIMED_OUT}
    assert store.holdings() == {}
    assert store.waiters == {}
    park(store, ATTACKER, 3)


def test_a_connection_or_worker_gone_gives_its_waiters_share_back(store: Store) -> None:
    park(store, ATTACKER, 2, conn=1)
    park(store, ATTACKER, 1, conn=2)
    store.connection_gone((1, 1))
    assert store.holdings() == {ATTACKER: {"waiters": 1}}
    assert list(store.waiters) == [f"n{ATTACKER}-2-0"]  # no queue left for the names of the gone
    park(store, OTHER, 1, conn=7)
    store.worker_gone(1)
    assert store.holdings() == {}
    assert store.waiters == {}


def test_root_and_the_daemons_uid_get_the_privileged_factor(store: Store) -> None:
    for uid in {0, os.geteuid()}:
        park(store, uid, 6)  # 2 x 3
        assert refusal(wait_for(store, sender(uid, conn=9), "over"))[0] == ErrorCode.LIMIT_EXCEEDED


def test_a_reload_changes_the_budget_and_keeps_what_is_parked(store: Store) -> None:
    park(store, ATTACKER, 3)
    store.limits = StoreLimits(waiters_per_uid=5)
    park(store, ATTACKER, 2, conn=2)
    assert refusal(wait_for(store, sender(ATTACKER, conn=3), "over"))[0] == ErrorCode.LIMIT_EXCEEDED
    store.limits = StoreLimits(waiters_per_uid=1)
    assert store.holdings() == {ATTACKER: {"waiters": 5}}  # over the new budget: kept, none added
    assert refusal(wait_for(store, sender(ATTACKER, conn=4), "over"))[0] == ErrorCode.LIMIT_EXCEEDED


def test_the_default_budget_at_scale_bounds_one_uid() -> None:
    """The issue's flood (300,000 waits from one uid), cut to what the
    default budget lets through: 1024 parked, the rest refused at once."""
    store = ReplicatedStore()
    assert store.limits.waiters_per_uid == 1024
    refused = 0
    for i in range(3000):
        outs = wait_for(store, sender(ATTACKER, request_id=i + 1), f"flood-{i}")
        if outs:
            assert refusal(outs)[0] == ErrorCode.LIMIT_EXCEEDED
            refused += 1
    assert (store.stats()["waiters"], refused) == (1024, 3000 - 1024)
    park(store, OTHER, 1)
    store.connection_gone((1, 1))
    assert store.holdings() == {}
    assert store.waiters == {}


def test_each_waiter_times_out_at_its_own_deadline(store: Store) -> None:
    """The tick skips its scan until the earliest deadline: none is late for it."""
    now = time.monotonic()
    assert wait_for(store, sender(ATTACKER, request_id=1), "late", wait=60) == []
    assert store.tick(now + 2) == []  # nothing due yet
    assert wait_for(store, sender(ATTACKER, request_id=2), "soon", wait=1) == []  # due before the first
    ((request_id, op, _),) = answers(store.tick(now + 2))
    assert (request_id, op) == (2, Op.ERROR)
    assert store.tick(now + 3) == []
    ((request_id, op, _),) = answers(store.tick(now + 61))
    assert (request_id, op) == (1, Op.ERROR)
    assert store.holdings() == {}


def test_a_connection_without_waiters_leaves_the_others_parked(store: Store) -> None:
    park(store, ATTACKER, 2, conn=1)
    store.connection_gone((1, 5))
    store.connection_gone((2, 1))  # same connection id on another worker
    assert store.holdings() == {ATTACKER: {"waiters": 2}}
    assert len(store.waiters) == 2
