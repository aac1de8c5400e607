"""The hub's per-uid budgets, in-process: rooms a uid created that still
exist, and memberships its connections hold. One uid reaches its budget and
is refused with a clear error (or first loses its own idle rooms), while
another uid can still create and join rooms; every way a room or a
membership ends gives the share back."""

from __future__ import annotations

import os

import pytest

from ipcd.chat.hub import Limits
from ipcd.chat.keptbytes import cost
from ipcd.protocol import ErrorCode, Op
from ipcd.protocol.chat import DEFAULT_ROOM
from tests.chat.test_hub import W1, W2, Conn, HubError, Sim

ATTACKER, OTHER = 72001, 72002  # unnamed, unprivileged uids (see test_hub's UNNAMED)
assert os.geteuid() not in (ATTACKER, OTHER)


def refusal(conn: Conn, op: int, **args: object) -> str:
    with pytest.raises(HubError) as refused:
        conn.call(op, **args)
    assert refused.value.code == ErrorCode.LIMIT_EXCEEDED, refused.value.message
    return refused.value.message


def room_names(sim: Sim) -> set[str]:
    return set(sim.hub.rooms)


def test_one_uid_cannot_take_every_room_of_the_daemon() -> None:
    """The issue's attack, scaled down: many connections of one uid joining
    new rooms filled the daemon's table and locked everyone else out."""
    sim = Sim(Limits(max_rooms=40, rooms_per_uid=10, rooms_per_connection=4, joins_per_uid=100))
    attackers = [sim.connect(W1 if i % 2 else W2, uid=ATTACKER) for i in range(10)]
    names = [(conn, f"a-{conn.conn}-{j}") for conn in attackers for j in range(4)]
    for conn, name in names[:10]:
        conn.join(name)
    for conn, name in names[10:]:
        assert refusal(conn, Op.JOIN, room=name) == (
            f"uid {ATTACKER} holds 10 rooms, its limit (the daemon's --rooms-per-uid is 10 per uid): "
            f"{name!r} was not created; part rooms you no longer need"
        )
    other = sim.connect(W2, uid=OTHER)
    for j in range(4):
        other.join(f"b-{j}")  # the other uid creates rooms as before
    assert sim.hub.holdings() == {ATTACKER: {"rooms": 10, "joins": 10}, OTHER: {"rooms": 4, "joins": 4}}
    attackers[-1].join("b-0")  # joining an existing room creates nothing
    assert sim.hub.holdings()[ATTACKER] == {"rooms": 10, "joins": 11}


def test_posting_to_new_names_at_the_budget_forgets_the_uids_own_idle_rooms_first() -> None:
    sim = Sim(Limits(rooms_per_uid=3))
    attacker, other = sim.connect(W1, uid=ATTACKER), sim.connect(W2, uid=OTHER)
    other.say("others-idle", "kept")  # an idle room of another uid, with history
    attacker.join("held")
    attacker.say("idle-1", "x")
    attacker.say("idle-2", "x")
    attacker.say("idle-3", "x")  # forgets idle-1, its own least recently used idle room
    assert room_names(sim) == {DEFAULT_ROOM, "others-idle", "held", "idle-2", "idle-3"}
    attacker.join("idle-2")
    attacker.join("idle-3")
    message = refusal(attacker, Op.SAY, room="idle-4", text="x")  # all its rooms in use
    assert "--rooms-per-uid is 3 per uid" in message
    assert "others-idle" in room_names(sim)  # another uid's idle room was never a victim
    assert attacker.say("held", "existing rooms stay usable") == 1


def test_a_room_gives_its_creators_share_back_when_it_is_forgotten() -> None:
    sim = Sim(Limits(rooms_per_uid=1))
    attacker = sim.connect(W1, uid=ATTACKER)
    attacker.join("brief")
    attacker.call(Op.PART, room="brief")  # no member, no history: the room goes
    assert "brief" not in room_names(sim)
    attacker.join("next")
    other = sim.connect(W2, uid=OTHER)
    other.join("next")
    sim.close(attacker)
    assert sim.hub.holdings() == {ATTACKER: {"rooms": 1}, OTHER: {"joins": 1}}  # the room lives on
    other.call(Op.PART, room="next")
    assert sim.hub.holdings() == {}


def test_memberships_are_counted_across_all_of_a_uids_connections() -> None:
    sim = Sim(Limits(joins_per_uid=5, rooms_per_connection=4))
    first, second = sim.connect(W1, uid=ATTACKER), sim.connect(W2, uid=ATTACKER)
    other = sim.connect(W2, uid=OTHER)
    for j in range(4):
        first.join(f"r{j}")
    second.join("r0")
    message = refusal(second, Op.JOIN, room="r1")
    assert message == (
        f"uid {ATTACKER} holds 5 room memberships, its limit (the daemon's --joins-per-uid is 5 per uid): "
        "part rooms on your other connections, or close some"
    )
    refusal(second, Op.JOIN, room="fresh")
    assert "fresh" not in room_names(sim)  # a refused join leaves no room behind
    second.join("r0")  # rejoining a room it is in costs nothing
    other.join("r1")  # another uid is not affected
    first.call(Op.PART, room="r3")
    second.join("r1")
    sim.close(first)  # r2 loses its last member (and has no history): forgotten
    assert sim.hub.holdings() == {ATTACKER: {"rooms": 2, "joins": 2}, OTHER: {"joins": 1}}
    sim.kill(W2)  # second and other quit: r0 and r1 are forgotten too
    assert sim.hub.holdings() == {}


def test_root_and_the_daemons_uid_get_the_privileged_factor() -> None:
    sim = Sim(Limits(rooms_per_uid=2, joins_per_uid=3, privileged_factor=2, rooms_per_connection=10))
    for uid in sorted({0, os.geteuid()}):
        conn = sim.connect(W1, uid=uid)
        for j in range(4):
            conn.join(f"p{uid}-{j}")
        assert "--rooms-per-uid is 4 per uid" in refusal(conn, Op.JOIN, room=f"p{uid}-x")
        sim.close(conn)


def test_a_reload_changes_the_budgets_and_keeps_what_is_held() -> None:
    sim = Sim(Limits(rooms_per_uid=2))
    conn = sim.connect(W1, uid=ATTACKER)
    conn.join("a")
    conn.join("b")
    refusal(conn, Op.JOIN, room="c")
    sim.hub.limits = Limits(rooms_per_uid=3)
    conn.join("c")
    sim.hub.limits = Limits(rooms_per_uid=1)
    assert sim.hub.holdings() == {ATTACKER: {"rooms": 3, "joins": 3}}
    refusal(conn, Op.JOIN, room="d")


def test_the_room_forgotten_is_the_one_posted_to_least_recently() -> None:
    sim = Sim(Limits(rooms_per_uid=3))
    poster = sim.connect(W1, uid=ATTACKER)
    for name in ("first", "second", "third"):
        poster.say(name, "x")
    poster.say("first", "again")  # now 'second' is the least recently used
    poster.say("fourth", "x")
    assert room_names(sim) == {DEFAULT_ROOM, "first", "third", "fourth"}
    poster.join("third")
    poster.call(Op.PART, room="third")  # idle again, used before 'first' was posted to
    poster.say("fifth", "x")
    assert room_names(sim) == {DEFAULT_ROOM, "first", "fourth", "fifth"}


def test_joining_and_parting_over_and_over_keeps_the_eviction_order_bounded() -> None:
    sim = Sim(Limits(rooms_per_uid=4))
    conn = sim.connect(W1, uid=ATTACKER)
    for name in ("a", "b", "c", "d"):
        conn.say(name, "history")  # kept when its last member parts
    for _ in range(50):
        for name in ("a", "b", "c"):
            conn.join(name)
            conn.call(Op.PART, room=name)
    assert len(sim.hub.idle._heaps[ATTACKER]) <= 2 * 4  # rebuilt, not grown without bound
    conn.say("e", "x")  # 'a' was posted to first: joins and parts are no use of a room
    assert room_names(sim) == {DEFAULT_ROOM, "b", "c", "d", "e"}
    for name in ("b", "c", "d", "e"):
        conn.join(name)
    assert "--rooms-per-uid is 4 per uid" in refusal(conn, Op.SAY, room="f", text="x")
    sim.close(conn)
    kept = sum(cost(entry) for room in sim.hub.rooms.values() for entry in room.history)
    assert sim.hub.holdings() == {ATTACKER: {"rooms": 4, "history_bytes": kept}}  # their history keeps them
