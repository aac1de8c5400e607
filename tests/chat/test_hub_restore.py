"""The hub's rooms through a journal and back: what a restart restores."""

from __future__ import annotations

from ipcd.chat.hub import Hub, Limits
from ipcd.chat.journal import Header, decode, encode, encode_changes, fold, snapshot
from ipcd.protocol import Op
from ipcd.protocol.chat import DEFAULT_ROOM
from tests.chat.test_hub import W1, W2, Sim


def _journaled(limits: Limits | None = None) -> Sim:
    sim = Sim(limits)
    sim.hub.changes = []
    return sim


def _state(hub: Hub) -> dict[str, tuple[int, str, int | None, list[tuple[int, bytes, int]]]]:
    return {
        r.name: (r.seq, r.topic, r.creator, list(r.history))
        for r in hub.rooms.values()
        if r.seq or r.name == DEFAULT_ROOM
    }


def _restored(data: bytes, limits: Limits | None = None) -> Hub:
    hub = Hub(limits)
    hub.restore(fold(decode(data).records, hub.limits.history).values())
    return hub


def _busy(sim: Sim) -> None:
    """Rooms created, posted to, re-topicked, forgotten and created again."""
    alice, bob = sim.connect(W1, uid=70001), sim.connect(W2, uid=70002)
    alice.join("a")
    bob.join("b")
    for i in range(5):
        alice.say("a", f"a{i}")
        bob.say("b", f"b{i}")
        bob.say(DEFAULT_ROOM, f"lobby{i}")
    alice.call(Op.TOPIC, room="a", topic="the a room")
    bob.call(Op.PART, room="b")
    sim.hub._forget(sim.hub.rooms["b"])  # as idle-room eviction would
    bob.join("b")
    bob.say("b", "b again")


def test_a_journal_of_changes_restores_every_room_its_seq_topic_and_history() -> None:
    sim = _journaled()
    _busy(sim)
    assert sim.hub.changes is not None
    data = encode(Header(1)) + encode_changes(sim.hub.changes)
    hub = _restored(data)
    assert _state(hub) == _state(sim.hub)
    assert hub.rooms["b"].seq == 1  # forgotten, then numbered from 1 again
    assert hub.rooms["a"].topic == "the a room"
    assert hub.kept.holdings() == sim.hub.kept.holdings()  # the per-uid history bytes, charged again
    assert hub.created.held == sim.hub.created.held


def test_a_snapshot_restores_the_same_as_the_changes_it_replaces() -> None:
    sim = _journaled()
    _busy(sim)
    hub = _restored(b"".join(snapshot(2, sim.hub.export())))
    assert _state(hub) == _state(sim.hub)
    assert hub.kept.holdings() == sim.hub.kept.holdings()


def test_seqs_continue_after_a_restore() -> None:
    sim = _journaled()
    _busy(sim)
    after = Sim()
    after.hub = _restored(b"".join(snapshot(2, sim.hub.export())))
    carol = after.connect(W1, uid=70003)
    assert carol.say("a", "next") == 6
    joined = carol.join("a", history=3)
    assert joined["seq"] == 6
    assert [m["text"] for m in carol.messages("a")] == ["a3", "a4", "next"]


def test_a_restore_applies_the_limits_in_force_now() -> None:
    sim = _journaled()
    _busy(sim)
    data = b"".join(snapshot(2, sim.hub.export()))
    small = _restored(data, Limits(history=2))
    assert [seq for seq, _, _ in small.rooms["a"].history] == [4, 5]
    assert small.rooms["a"].seq == 5
    one_message = len(sim.hub.rooms["a"].history[0][1]) + 160
    tight = _restored(data, Limits(history_bytes_per_uid=2 * one_message))
    assert tight.kept.holdings()[70001] <= 2 * one_message + one_message  # its budget, plus the newest
    assert tight.rooms["a"].seq == 5  # trimmed history, the seq stays
    everything = sum(len(f) + 160 for r in sim.hub.rooms.values() for _, f, _ in r.history)
    capped = _restored(data, Limits(history_bytes=everything // 2))
    assert capped.kept.total <= everything // 2
    assert {n: r.seq for n, r in capped.rooms.items()} == {n: r.seq for n, r in sim.hub.rooms.items()}


def test_a_hub_without_a_journal_notes_nothing() -> None:
    sim = Sim()
    _busy(sim)
    assert sim.hub.changes is None


def test_history_over_the_daemon_wide_bytes_trims_the_least_recently_posted_rooms_first() -> None:
    sim = Sim()
    poster = sim.connect(W1, uid=70001)
    text = "x" * 1000
    for room in ("old", "mid", "new"):
        for _ in range(10):
            poster.say(room, text)
    one = len(sim.hub.rooms["old"].history[0][1]) + 160
    sim.hub.limits = Limits(history_bytes=25 * one)
    poster.say("new", text)  # over the limit now: trimmed to 7/8 of it
    rooms = sim.hub.rooms
    assert sim.hub.kept.total <= 25 * one
    assert len(rooms["old"].history) == 1  # the oldest room first, down to its newest message
    assert [seq for seq, _, _ in rooms["old"].history] == [10]
    assert len(rooms["new"].history) == 11  # the room posted to last untouched
    assert rooms["old"].seq == 10


def test_when_newest_messages_alone_pass_the_limit_the_rooms_are_not_scanned_at_every_post() -> None:
    sim = Sim()
    poster = sim.connect(W1, uid=70001)
    for room in range(200):
        poster.say(f"r{room:03d}", "x")  # one message each: nothing can be trimmed
    one = len(sim.hub.rooms["r000"].history[0][1]) + 160
    sim.hub.limits = Limits(history_bytes=100 * one)  # the newest messages alone are twice that
    poster.say("r000", "x")  # over: r000's older message goes, every room keeps its newest
    assert all(len(r.history) == 1 for r in sim.hub.rooms.values() if r.seq)
    floor = sim.hub.kept.total  # 200 messages (their ts and seq vary a byte or two in length)
    assert abs(floor - 200 * one) < 200 * 3
    scans = 0
    trim = sim.hub.trim_history

    def counted() -> None:
        nonlocal scans
        scans += 1
        trim()

    sim.hub.trim_history = counted  # type: ignore[method-assign]
    for _ in range(12):
        poster.say("r001", "x")  # within an eighth of the limit (12.5 messages) past the floor
    assert scans == 0
    poster.say("r001", "x")
    assert scans == 1  # then one scan, back to the floor
    assert len(sim.hub.rooms["r001"].history) == 1
    assert abs(sim.hub.kept.total - floor) < 10


def test_a_post_resent_across_a_restart_is_answered_duplicate_not_posted_again() -> None:
    """Exactly-once across a restart: the ids of the kept messages come back
    with them, so a client that resends a post whose reply it lost when the
    daemon went down gets the original reply."""
    sim = _journaled()
    poster = sim.connect(W1, uid=70001)
    first = poster.call(Op.SAY, room="logs", text="line 1", id="run-7:1")
    poster.call(Op.SAY, room="logs", text="line 2")  # no id: nothing to remember
    assert sim.hub.changes is not None
    data = encode(Header(1)) + encode_changes(sim.hub.changes)

    after = Sim()
    after.hub = _restored(data)
    again = after.connect(W2, uid=70001).call(Op.SAY, room="logs", text="line 1", id="run-7:1")
    assert again == {**first, "duplicate": True}
    assert after.hub.rooms["logs"].seq == 2  # not posted a second time
    other_uid = after.connect(W2, uid=70002).call(Op.SAY, room="logs", text="line 1", id="run-7:1")
    assert other_uid["seq"] == 3  # another uid's id is another message
