"""SAYs with a message id, through the worker's check and the hub, in-process:
a resent post is answered, not posted again; ids are per uid; a post
without an id is what it always was; the window comes back from kept
messages (a restart)."""

from __future__ import annotations

from typing import Any

import pytest

from ipcd.chat.hub import Hub, Limits, Sender
from ipcd.link.records import LinkError, Post
from ipcd.protocol import ErrorCode, Op, decode_json, encode_json
from ipcd.protocol.chat import prepare_say
from tests.chat.test_hub import W1, W2, Conn, HubError, Sim, error_code


@pytest.fixture
def sim() -> Sim:
    return Sim()


def sender_of(conn: Conn) -> Sender:
    """The sender of a run of posts forwarded for ``conn`` (its request id is unused)."""
    return Sender(conn.worker, conn.conn, 0, conn.uid, conn.uid, 4000 + conn.conn)


def say(conn: Any, room: str, text: str, message_id: str | None = None) -> dict[str, Any]:
    args = (
        {"room": room, "text": text} if message_id is None else {"room": room, "text": text, "id": message_id}
    )
    reply: dict[str, Any] = conn.call(Op.SAY, **args)
    return reply


def test_the_same_id_twice_is_one_message_and_the_second_reply_says_duplicate(sim: Sim) -> None:
    poster, reader = sim.connect(W1), sim.connect(W2, uid=70001)
    reader.join("r")
    first = say(poster, "r", "once", "run1:1")
    second = say(poster, "r", "once", "run1:1")
    assert "duplicate" not in first
    assert second == {**first, "duplicate": True}
    messages = reader.messages("r")
    assert [(m["seq"], m["text"], m["id"]) for m in messages] == [(1, "once", "run1:1")]
    assert sim.hub.rooms["r"].seq == 1
    assert [m["seq"] for m in reader.call(Op.HISTORY, room="r")["messages"]] == [1]


def test_a_duplicate_is_answered_with_the_original_even_if_its_text_or_room_differ(sim: Sim) -> None:
    """The id names the message: the client promised a resend is the same one."""
    poster = sim.connect(W1)
    first = say(poster, "r", "a", "x")
    assert say(poster, "other", "b", "x") == {**first, "duplicate": True}
    assert "other" not in sim.hub.rooms


def test_ids_are_per_uid_not_global(sim: Sim) -> None:
    alice, bob = sim.connect(W1, uid=70000), sim.connect(W2, uid=70001)
    assert say(alice, "r", "from alice", "1")["seq"] == 1
    reply = say(bob, "r", "from bob", "1")
    assert reply["seq"] == 2
    assert "duplicate" not in reply


def test_the_same_uid_on_another_connection_and_worker_is_still_a_duplicate(sim: Sim) -> None:
    """A resend comes on a new connection, usually through another worker."""
    old = sim.connect(W1)
    first = say(old, "r", "t", "k")
    sim.kill(W1)
    new = sim.connect(W2)
    assert say(new, "r", "t", "k") == {**first, "duplicate": True}


def test_a_run_with_a_resent_prefix_posts_only_the_new_posts_in_order(sim: Sim) -> None:
    """What a reconnecting Poster sends: its unacknowledged posts again, in
    one run, of which the daemon had posted the first few."""
    poster, reader = sim.connect(W1), sim.connect(W2, uid=70001)
    reader.join("r")
    for n in (1, 2, 3):
        say(poster, "r", f"line {n}", f"p:{n}")
    rids = [900 + n for n in range(1, 7)]
    run = b"".join(
        Post(
            rid, "r", prepare_say(encode_json({"room": "r", "text": f"line {n}"}), 100).text_json, b"p:%d" % n
        ).encode()
        for rid, n in zip(rids, range(1, 7), strict=True)
    )
    sim.hub.handle(sender_of(poster), Op.SAY, run, sim.out)
    sim.route(sim.out.take())
    replies = {f.request_id: f for f in poster.log if f.request_id in rids}
    bodies = [decode_json(replies[rid].body) for rid in rids]
    assert [b["seq"] for b in bodies] == [1, 2, 3, 4, 5, 6]
    assert [b.get("duplicate", False) for b in bodies] == [True] * 3 + [False] * 3
    assert [m["text"] for m in reader.messages("r")] == [f"line {n}" for n in range(1, 7)]


def test_an_id_repeated_within_one_run_is_posted_once(sim: Sim) -> None:
    poster = sim.connect(W1)
    text = prepare_say(b'{"room":"r","text":"t"}', 100).text_json
    run = Post(1, "r", text, b"same").encode() + Post(2, "r", text, b"same").encode()
    sim.hub.handle(sender_of(poster), Op.SAY, run, sim.out)
    sim.route(sim.out.take())
    assert sim.hub.rooms["r"].seq == 1


def test_posts_without_an_id_are_never_duplicates_and_carry_no_id(sim: Sim) -> None:
    poster, reader = sim.connect(W1), sim.connect(W2, uid=70001)
    reader.join("r")
    assert [say(poster, "r", "same")["seq"] for _ in range(3)] == [1, 2, 3]
    assert all("id" not in m for m in reader.messages("r"))
    assert sim.hub.recent_ids.holdings() == {}


def test_a_refused_post_is_not_remembered_so_its_resend_is_tried_again() -> None:
    sim = Sim(Limits(rooms_per_uid=1))
    poster = sim.connect(W1)
    poster.join("mine")  # in use: not forgotten to make room for another
    say(poster, "mine", "t")
    with pytest.raises(HubError) as refused:
        poster.call(Op.SAY, room="second", text="t", id="q")  # creating a second room: over budget
    assert refused.value.code == ErrorCode.LIMIT_EXCEEDED
    assert sim.hub.recent_ids.held(70000) == 0
    assert say(poster, "mine", "t", "q")["seq"] == 2  # the same id, now posted


def test_datagram_posts_with_an_id_are_deduplicated_too(sim: Sim) -> None:
    body = encode_json({"room": "r", "text": "d", "id": "dg-1"})
    first, second = sim.datagram(Op.SAY, body), sim.datagram(Op.SAY, body)
    assert first.op == second.op == Op.SAY_REPLY
    assert sim.hub.rooms["r"].seq == 1


def test_a_bad_id_is_refused_by_the_worker_check(sim: Sim) -> None:
    poster = sim.connect(W1)
    for bad in ("", "x" * 65, "has space", 'quote"', "back\\slash", "é", 7):
        frame = poster.request(Op.SAY, encode_json({"room": "r", "text": "t", "id": bad}))
        assert error_code(frame) == ErrorCode.BAD_REQUEST, bad
    assert say(poster, "r", "t", "x" * 64)["seq"] == 1
    assert say(poster, "r", "t", "!#$%&'()*+,-./09:;<=>?@AZ[]^_`az{|}~")["seq"] == 2


def test_the_window_is_bounded_per_uid_by_the_setting() -> None:
    sim = Sim(Limits(message_ids_per_uid=4))
    poster = sim.connect(W1)
    for n in range(10):
        say(poster, "r", "t", f"i{n}")
    assert sim.hub.recent_ids.held(70000) == 4
    assert sim.hub.holdings()[70000]["message_ids"] == 4
    assert "duplicate" not in say(poster, "r", "t", "i0")  # forgotten: posted again
    assert say(poster, "r", "t", "i9").get("duplicate") is True


def test_the_window_comes_back_from_kept_messages_after_a_restart(sim: Sim) -> None:
    """What the persistence of history calls after restoring the rooms."""
    poster = sim.connect(W1)
    first = say(poster, "r", "kept", "restart-1")
    say(poster, "r", 'text with ","id":" in it', None)
    say(poster, "s", "other room", "restart-2")
    restarted = Hub()
    for name, room in sim.hub.rooms.items():  # as a restore from the saved state would
        copy = restarted.room_for(name, create=True, uid=room.creator)
        copy.seq = room.seq
        copy.history.extend(room.history)
    assert restarted.rebuild_recent_ids() == 2
    fresh = Sim()
    fresh.hub = restarted
    again = fresh.connect(W2)
    assert say(again, "r", "kept", "restart-1") == {**first, "duplicate": True}
    assert say(again, "s", "other room", "restart-2")["duplicate"] is True
    assert "duplicate" not in say(again, "r", "new", "restart-3")


def test_a_post_with_an_id_round_trips_through_the_link_and_a_torn_one_is_refused() -> None:
    posts = [Post(1, "r", b'"a"'), Post(2, "room", b'"bb"', b"id-1"), Post(3, "r", b'"c"')]
    run = b"".join(p.encode() for p in posts)
    assert Post.decode_run(run) == posts
    assert len(posts[0].encode()) == 10 + 1 + 3  # no id: the same bytes as before ids
    for cut in range(1, len(run)):
        if cut in (14, 14 + len(posts[1].encode())):
            continue  # a whole number of posts
        with pytest.raises(LinkError):
            Post.decode_run(run[:cut])
