"""Bytes of room history per poster uid, in-process (the hub and its
KeptBytes ledger). The issue's memory attack on history: one uid posting
large messages to many rooms made the master keep rooms x history x message
bytes. Now a poster keeps at most its budget (plus its newest message), a
room's history stays a contiguous suffix of its sequence, another uid's
messages in rooms the poster never used are untouched, and every way a
message leaves gives its bytes back."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from ipcd.chat.hub import Hub, Limits
from ipcd.chat.keptbytes import cost
from ipcd.protocol import Op
from tests.chat.test_hub import W1, W2, Sim
from tests.chat.test_hub_budgets import ATTACKER, OTHER

BUDGET = 64 * 1024
BIG = "q" * 8000  # about 8 KiB kept per message


def kept_by(hub: Hub, uid: int) -> int:
    """Bytes of ``uid``'s messages in every room's history, counted from the rooms."""
    return sum(cost(entry) for room in hub.rooms.values() for entry in room.history if entry[2] == uid)


def largest_message(hub: Hub) -> int:
    return max((cost(entry) for room in hub.rooms.values() for entry in room.history), default=0)


def assert_suffixes(hub: Hub) -> None:
    """Every room's history is its newest messages, without a gap."""
    for room in hub.rooms.values():
        seqs = [seq for seq, _, _ in room.history]
        assert seqs == list(range(room.seq - len(seqs) + 1, room.seq + 1)), (room.name, seqs)
        assert len(seqs) <= hub.limits.history


def test_one_uid_posting_big_messages_to_many_rooms_keeps_at_most_its_budget() -> None:
    sim = Sim(Limits(history=100, rooms_per_uid=200, history_bytes_per_uid=BUDGET))
    attacker, other = sim.connect(W1, uid=ATTACKER), sim.connect(W2, uid=OTHER)
    for j in range(5):
        other.say("others", f"kept {j}")  # a room the attacker never posts to
    for j in range(100):
        attacker.say(f"a{j % 50}", BIG)  # 800 KB of history without the budget
    hub = sim.hub
    held = hub.holdings()[ATTACKER]["history_bytes"]
    assert held == kept_by(hub, ATTACKER)
    assert BUDGET - largest_message(hub) < held <= BUDGET + largest_message(hub)
    assert_suffixes(hub)
    assert [m["text"] for m in other.call(Op.HISTORY, room="others")["messages"]] == [
        f"kept {j}" for j in range(5)
    ]
    assert hub.holdings()[OTHER]["history_bytes"] == kept_by(hub, OTHER)
    newest = attacker.call(Op.HISTORY, room="a49", count=1)["messages"]
    assert [m["seq"] for m in newest] == [2]  # what it posted last is kept
    assert other.say("others", "still served") == 6


def test_a_poster_over_budget_trims_its_oldest_room_up_to_its_own_oldest_message() -> None:
    sim = Sim(Limits(history=100, history_bytes_per_uid=BUDGET))
    attacker, other = sim.connect(W1, uid=ATTACKER), sim.connect(W2, uid=OTHER)
    other.say("shared", "before anyone")  # seq 1: older than the attacker's first there
    attacker.say("shared", BIG)  # seq 2: the attacker's oldest message
    other.say("shared", "after it")  # seq 3: newer, so it stays
    while sim.hub.holdings()[ATTACKER]["history_bytes"] + len(BIG) <= BUDGET:
        attacker.say("elsewhere", BIG)
    attacker.say("elsewhere", BIG)  # over its budget: its oldest message goes, and only what is older
    assert [m["seq"] for m in other.call(Op.HISTORY, room="shared")["messages"]] == [3]
    assert sim.hub.holdings()[OTHER]["history_bytes"] == kept_by(sim.hub, OTHER)
    assert_suffixes(sim.hub)


def test_the_newest_message_is_kept_even_past_a_tiny_budget() -> None:
    sim = Sim(Limits(history_bytes_per_uid=100))
    poster = sim.connect(W1, uid=ATTACKER)
    for j in range(3):
        poster.say("room", f"{j} {BIG}")
    kept = poster.call(Op.HISTORY, room="room")["messages"]
    assert [m["seq"] for m in kept] == [3]
    poster.say("other", "x")
    assert not sim.hub.rooms["room"].history  # its oldest room was trimmed first
    assert [m["seq"] for m in poster.call(Op.HISTORY, room="other")["messages"]] == [1]


def test_every_way_a_message_leaves_gives_its_bytes_back() -> None:
    sim = Sim(Limits(history=3, rooms_per_uid=2, max_rooms=4, history_bytes_per_uid=BUDGET))
    poster, other = sim.connect(W1, uid=ATTACKER), sim.connect(W2, uid=OTHER)
    for j in range(10):
        poster.say("pushed", f"message {j}")  # pushed out by newer ones: 3 kept
    assert sim.hub.holdings()[ATTACKER]["history_bytes"] == kept_by(sim.hub, ATTACKER)
    other.say("theirs", "x")
    poster.say("second", "x")
    poster.say("third", "x")  # at its room budget: its least recently used idle room is forgotten
    assert "pushed" not in sim.hub.rooms
    assert sim.hub.holdings()[ATTACKER]["history_bytes"] == kept_by(sim.hub, ATTACKER)
    sim.close(poster)
    sim.close(other)
    for name in [n for n in sim.hub.rooms if n != "lobby"]:
        sim.hub._forget(sim.hub.rooms[name])
    assert sim.hub.holdings() == {}
    assert sim.hub.kept._where == {}


def test_a_reload_lowering_the_budget_trims_at_the_next_post() -> None:
    sim = Sim(Limits(history_bytes_per_uid=BUDGET * 4))
    poster = sim.connect(W1, uid=ATTACKER)
    for j in range(20):
        poster.say(f"r{j}", BIG)
    sim.hub.limits = Limits(history_bytes_per_uid=BUDGET)
    poster.say("r0", "next")
    assert sim.hub.holdings()[ATTACKER]["history_bytes"] <= BUDGET + largest_message(sim.hub)
    assert_suffixes(sim.hub)


posts = st.lists(
    st.tuples(st.sampled_from([ATTACKER, OTHER, 72003]), st.sampled_from("abcd"), st.integers(0, 3000)),
    max_size=120,
)


@settings(max_examples=60, deadline=None)
@given(posts)
def test_history_accounting_is_exact_and_bounded(sequence: list[tuple[int, str, int]]) -> None:
    budget = 8 * 1024
    sim = Sim(Limits(history=8, history_bytes_per_uid=budget))
    conns = {uid: sim.connect(W1 if uid % 2 else W2, uid=uid) for uid in (ATTACKER, OTHER, 72003)}
    for uid, room, size in sequence:
        conns[uid].say(room, "x" * size)
        hub = sim.hub
        held = {uid: h.get("history_bytes", 0) for uid, h in hub.holdings().items()}
        for who in conns:
            assert held.get(who, 0) == kept_by(hub, who)
            assert held.get(who, 0) <= budget + largest_message(hub)
        assert_suffixes(hub)
        newest = hub.rooms[room].history[-1]
        assert newest[0] == hub.rooms[room].seq  # the post itself is kept
        assert newest[2] == uid
