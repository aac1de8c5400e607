"""Chat against a real daemon: real users, real processes, real kills.

Each test checks what a user would: every member of a room gets every
message once, in sequence order, stamped with the sender's real uid; a
worker's death costs only its own connections; a member that stops reading
is cut off with a reason while the others keep up and memory stays flat;
``ipcctl`` shows all of it to scripts. Users other than root act through
forked processes that drop their privileges (see :mod:`tests.chat.users`).
Waits are bounded and tied to a signal (a reply, ``who``, the status
counters, the daemon's log), never a bare sleep.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from typing import Any

import pytest

from ipcd.client import Client, ConnectionLost, DatagramClient, ServerError
from ipcd.protocol import ErrorCode, Op, decode_json, encode_json
from tests.chat.conftest import Spawn, StartDaemon
from tests.chat.users import Actor, ActorError, ChatUser, Event, nicks_in, worker_of
from tests.daemon import IPCCTL, Daemon, ipcctl, rss_kib, wait_for
from tests.server.test_bad_input import FdBaseline

# -- helpers ------------------------------------------------------------------------


def inode(client: Client) -> int:
    return os.fstat(client.fileno()).st_ino


def messages(events: list[Event], room: str) -> list[dict[str, Any]]:
    return [data for kind, data in events if kind == "message" and data["room"] == room]


def post(client: Client, room: str, texts: list[str]) -> list[int]:
    """Pipelined SAYs: all sent before the first reply is read; their seqs."""
    ids = [client.send(Op.SAY, encode_json({"room": room, "text": text})) for text in texts]
    return [int(decode_json(client.wait_reply(request_id).body)["seq"]) for request_id in ids]


def read_until(client: Client, room: str, seq: int, timeout: float = 15.0) -> list[Event]:
    """Deliveries to ``client`` until ``room``'s message ``seq`` arrived."""
    deadline = time.monotonic() + timeout
    got: list[Event] = []
    while True:
        event = client.next_event(timeout=max(deadline - time.monotonic(), 0.001))
        got.append((event.kind, event.data))
        if event.kind == "message" and event.data["room"] == room and event.data["seq"] >= seq:
            return got


def read_to_disconnect(client: Client, room: str) -> tuple[list[int], str]:
    """The seqs of ``room`` still delivered to ``client``, then why it was closed."""
    got: list[int] = []
    while True:
        try:
            event = client.next_event(timeout=10)
        except ConnectionLost as exc:
            return got, str(exc)
        if event.kind == "message" and event.data["room"] == room:
            got.append(event.data["seq"])


def nicks_after_a_kill(daemon: Daemon, room: str) -> list[str] | None:
    """``nicks_in`` while a worker was just killed: until the master has seen
    it die it may still hand it a new connection, which then dies with it
    (a crashed worker loses its own connections); that query is retried."""
    try:
        return nicks_in(daemon, room)
    except ConnectionLost:
        return None


def spread_over_workers(
    daemon: Daemon, actors: list[Actor], rooms: dict[Actor, list[str]]
) -> dict[Actor, int]:
    """Connect each actor, join its rooms, and make sure the connections sit
    on more than one worker (reconnecting one if the balancer put all on one)."""
    placement = {}
    for actor in actors:
        client_end = actor("connect")
        for room in rooms[actor]:
            actor("call", "join", room)
        placement[actor] = worker_of(daemon, client_end)
    for _ in range(5):
        if len(set(placement.values())) > 1:
            break
        last = actors[-1]
        client_end = last("connect")
        for room in rooms[last]:
            last("call", "join", room)
        placement[last] = worker_of(daemon, client_end)
    assert len(set(placement.values())) == 2, f"every connection on one worker: {placement}"
    return placement


# -- 1. real users, two rooms, two workers ------------------------------------------


def test_real_users_in_two_rooms_on_two_workers_get_every_message_once_in_order(
    daemon: Daemon, actors: Spawn, chat_users: list[ChatUser]
) -> None:
    fds = FdBaseline(daemon)
    a, b, c = chat_users
    users = {actors(user): user for user in chat_users}
    for actor, user in users.items():
        assert actor("identity") == (user.uid, user.gid, [])
    rooms = {actor: ["alpha", "beta"] if users[actor] in (a, c) else ["alpha"] for actor in users}
    spread_over_workers(daemon, list(users), rooms)
    by_name = {user.name: user for user in chat_users}

    # Default nicks are the user names; who shows the kernel's uids.
    first = next(iter(users))
    who = first("call", "who", "alpha")
    assert {(m["nick"], m["uid"]) for m in who} == {(u.name, u.uid) for u in chat_users}

    # Private messages: a -> b -> c -> a, and one to nobody.
    order = [a, b, c]
    actor_of = {user: actor for actor, user in users.items()}
    for sender, target in zip(order, order[1:] + order[:1], strict=True):
        actor_of[sender]("call", "msg", target.name, f"psst from {sender.name}")
    with pytest.raises(ActorError) as nobody:
        actor_of[a]("call", "msg", "nobody-here", "hello?")
    assert nobody.value.code == ErrorCode.NOT_FOUND

    # Everyone posts N messages to each of its rooms, all at once.
    n = 20
    posts = {
        actor: [(room, f"{user.name} {room} #{i}") for i in range(n) for room in rooms[actor]]
        for actor, user in users.items()
    }
    for actor in users:
        actor.start("post", posts[actor])
    acked: dict[tuple[str, str], list[int]] = {}  # (poster, room) -> seqs, in posting order
    for actor, user in users.items():
        for seq, (room, _) in zip(actor.result(), posts[actor], strict=True):
            acked.setdefault((user.name, room), []).append(seq)
    totals = {"alpha": 3 * n, "beta": 2 * n}

    for actor in users:
        actor.start("collect", {room: totals[room] for room in rooms[actor]}, 1, 20.0)
    received = {actor: actor.result(30) for actor in users}
    for actor, user in users.items():
        events = received[actor]
        for room in ("alpha", "beta"):
            got = messages(events, room)
            if room not in rooms[actor]:
                assert got == [], f"{user.name} got messages of {room}, which it never joined"
                continue
            assert [m["seq"] for m in got] == list(range(1, totals[room] + 1)), f"{user.name} in {room}"
            for message in got:
                poster = by_name[message["from"]]
                assert message["uid"] == poster.uid
                assert message["text"].startswith(f"{poster.name} {room} #")
                assert isinstance(message["ts"], float)
            # Each poster's acknowledged seqs are the ones its messages carried.
            for poster in chat_users:
                mine = [m["seq"] for m in got if m["from"] == poster.name]
                assert mine == acked.get((poster.name, room), [])
        privates = [data for kind, data in events if kind == "private"]
        sender = order[order.index(user) - 1]
        assert [(p["from"], p["uid"], p["to"], p["text"]) for p in privates] == [
            (sender.name, sender.uid, user.name, f"psst from {sender.name}")
        ]

    # A late joiner (b again, so its nick gets a suffix) replays the last K.
    k = 7
    late = actors(b)
    late("connect")
    reply = late("call", "join", "alpha", k)
    assert (reply["nick"], reply["seq"], reply["history"]) == (f"{b.name}-2", totals["alpha"], k)
    replay = late("collect", {"alpha": totals["alpha"]}, 0, 10.0)
    reference = messages(received[actor_of[a]], "alpha")[-k:]
    assert messages(replay, "alpha") == reference
    actor_of[c]("post", [("alpha", "after the replay")])
    live = messages(late("collect", {"alpha": totals["alpha"] + 1}, 0, 10.0), "alpha")
    assert [(m["seq"], m["uid"], m["text"]) for m in live] == [
        (totals["alpha"] + 1, c.uid, "after the replay")
    ]
    assert sorted(nicks_in(daemon, "alpha")) == sorted([u.name for u in chat_users] + [f"{b.name}-2"])

    for actor in [*users, late]:
        actor.close()
    daemon.settled_status(lambda s: s["chat"]["chatters"] == 0)
    fds.assert_restored()


# -- 2. kill -9 of a worker mid-flow ------------------------------------------------


def test_kill_9_of_a_worker_mid_flow_costs_only_its_members(daemon: Daemon) -> None:
    publisher = daemon.client()
    publisher.nick("publisher")
    survivor = worker_of(daemon, inode(publisher))
    victim = next(pid for pid in daemon.worker_pids() if pid != survivor)
    members: dict[int, list[tuple[str, Client]]] = {survivor: [], victim: []}
    for i in range(16):
        if min(len(v) for v in members.values()) >= 2:
            break
        member = daemon.client()
        member.nick(f"member{i}")
        member.join("news")
        members[worker_of(daemon, inode(member))].append((f"member{i}", member))
    assert min(len(v) for v in members.values()) >= 2, f"members not on both workers: {members}"

    before, during, after = 40, 20, 30
    acked = [publisher.say("news", f"n{i}") for i in range(before)]
    in_flight = [
        publisher.send(Op.SAY, encode_json({"room": "news", "text": f"n{i}"}))
        for i in range(before, before + during)
    ]
    os.kill(victim, signal.SIGKILL)  # while those are being sequenced and fanned out
    acked += [int(decode_json(publisher.wait_reply(rid).body)["seq"]) for rid in in_flight]
    alive = sorted(nick for nick, _ in members[survivor])
    wait_for(
        lambda: nicks_after_a_kill(daemon, "news") == alive, 10, "who to list only the surviving members"
    )
    acked += [publisher.say("news", f"n{i}") for i in range(before + during, before + during + after)]
    total = before + during + after
    assert acked == list(range(1, total + 1))  # the publisher carried on, sequence unbroken

    dead_nicks = {nick for nick, _ in members[victim]}
    for nick, member in members[survivor]:
        events = read_until(member, "news", total)
        assert [m["seq"] for m in messages(events, "news")] == list(range(1, total + 1)), nick
        quits = {d["nick"] for kind, d in events if kind == "notice" and d["event"] == "quit"}
        assert quits == dead_nicks
    for nick, member in members[victim]:
        got, _ = read_to_disconnect(member, "news")
        assert got == list(range(1, len(got) + 1)), f"{nick} saw a gap before the disconnect"

    # The room outlived the worker: a newcomer sees the same sequence and history.
    status = daemon.settled_status(
        lambda s: (
            [w["state"] for w in s["workers"]] == ["running"] * 2
            and victim not in [w["pid"] for w in s["workers"]]
        )
    )
    assert status["respawns"] == 1
    with daemon.client() as newcomer:
        reply = newcomer.join("news", history=3)
        assert reply["seq"] == total
        assert [newcomer.next_event(timeout=5).data["seq"] for _ in range(3)] == [total - 2, total - 1, total]
    publisher.close()
    for group in members.values():
        for _, member in group:
            member.close()


# -- 3. a member that stops reading ------------------------------------------------


class Reader:
    """A member that keeps up, checking order as it reads."""

    def __init__(self, daemon: Daemon, room: str) -> None:
        self.client = daemon.client()
        self.room = room
        self.last = 0
        self.client.join(room)

    def read_until(self, seq: int) -> None:
        while self.last < seq:
            event = self.client.next_event()
            if event.kind != "message":
                continue
            assert event.data["seq"] == self.last + 1, f"gap: {self.last} then {event.data['seq']}"
            self.last = event.data["seq"]


def test_a_member_that_stops_reading_is_cut_off_while_twenty_others_get_everything(
    start_daemon: StartDaemon,
) -> None:
    daemon = start_daemon("--max-outbuf", "256K", "--send-timeout", "2", "--rate-limit", "1000000")
    fds = FdBaseline(daemon)
    pids = [daemon.pid, *daemon.worker_pids()]
    rss_before = {pid: rss_kib(pid) for pid in pids}
    readers = [Reader(daemon, "flood") for _ in range(20)]
    assert len({worker_of(daemon, inode(r.client)) for r in readers}) == 2
    slow = daemon.client()
    slow.join("flood")  # ... and never reads again: cut off by --max-outbuf
    stalled = daemon.client()
    stalled.join("quiet")  # gets less than --max-outbuf, then stalls: cut off by --send-timeout
    publisher = daemon.client()
    text = "x" * 1024
    # 250 KiB: at most ~200 KiB fit in the socket (net.core.wmem_default), the rest
    # waits in the worker, under --max-outbuf, making no progress.
    assert post(publisher, "quiet", [text] * 250) == list(range(1, 251))

    total, batch = 20_000, 50
    rss_peak = dict(rss_before)
    for start in range(0, total, batch):
        seqs = post(publisher, "flood", [text] * batch)
        assert seqs == list(range(start + 1, start + batch + 1))
        for reader in readers:
            reader.read_until(seqs[-1])  # at most 50 KiB behind: it fits in the socket buffer
        for pid in pids:
            rss_peak[pid] = max(rss_peak[pid], rss_kib(pid))
    assert all(reader.last == total for reader in readers)

    growth = {pid: rss_peak[pid] - rss_before[pid] for pid in pids}
    # Had the slow member's output been kept, its worker would hold > 20 MiB.
    assert max(growth.values()) < 16 * 1024, f"RSS grew by {growth} KiB"
    status = daemon.settled_status(lambda s: sum(w["cut_off"] for w in s["workers"]) >= 2)
    assert sum(w["cut_off"] for w in status["workers"]) == 2
    log = daemon.log()
    assert "cut off: outbound buffer passed 262144 bytes: the client is not reading" in log
    assert "cut off: no output could be sent for 2s: the client is not reading" in log

    # What the slow member did get is a gapless prefix; then the disconnect.
    for cut, room in ((slow, "flood"), (stalled, "quiet")):
        got, reason = read_to_disconnect(cut, room)
        assert got == list(range(1, len(got) + 1))
        # Whole frames to the end: a cut-off never leaves one split (the reason
        # itself reaches the client only if its socket had room left).
        assert "invalid frame" not in reason, reason
        assert 0 < len(got) < (total if room == "flood" else 250)
        cut.close()
    for reader in readers:
        reader.client.close()
    publisher.close()
    fds.assert_restored()


# -- 4. ipcctl send --dgram as a real user, ipcctl listen --json --------------------


def test_a_burst_larger_than_the_output_bound_reaches_a_member_the_kernel_can_hold_it_for(
    start_daemon: StartDaemon,
) -> None:
    """The bound is on what the daemon holds, not on what one loop pass
    brings: 150 KiB of messages in one pipelined burst (joined into a few
    deliveries) against --max-outbuf 64K all fit in the member's socket
    buffer, so a member that reads them afterwards gets every one."""
    daemon = start_daemon("--max-outbuf", "64K", "--rate-limit", "1000000")
    member = daemon.client()
    member.join("burst")
    publisher = daemon.client()
    assert post(publisher, "burst", ["y" * 1000] * 150) == list(range(1, 151))
    got = [e["seq"] for e in messages(read_until(member, "burst", 150), "burst")]
    assert got == list(range(1, 151))
    assert "cut off" not in daemon.log()
    publisher.close()
    member.close()


def test_a_datagram_post_by_a_real_user_reaches_listen_json_with_their_uid(
    daemon: Daemon, actors: Spawn, chat_users: list[ChatUser]
) -> None:
    user = chat_users[1]
    listener = subprocess.Popen(
        [*IPCCTL, "--socket-dir", str(daemon.socket_dir), "listen", "-r", "alerts", "--json", "-n", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: nicks_in(daemon, "alerts") == ["root"], 10, "ipcctl listen to join")
        seq = actors(user)("dgram_say", "alerts", "disk almost full")
        sent = ipcctl(daemon.socket_dir, "send", "--dgram", "-r", "alerts", "--json", "from the CLI")
        assert sent.returncode == 0, sent.stderr
        out, err = listener.communicate(timeout=15)
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.communicate()
    assert listener.returncode == 0, err
    assert json.loads(sent.stdout)["seq"] == 2
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == 2, out
    for line in lines:
        assert {"room", "from", "uid", "seq", "ts", "text"} <= line.keys()
        assert line["room"] == "alerts"
        assert abs(line["ts"] - time.time()) < 60
    first, second = lines
    assert (first["uid"], first["from"], first["seq"], first["text"]) == (
        user.uid,
        user.name,
        seq,
        "disk almost full",
    )
    assert seq == 1
    assert (second["uid"], second["from"], second["seq"], second["text"]) == (0, "root", 2, "from the CLI")


# -- 5. limits and refusals ---------------------------------------------------------


def test_rate_limit_message_size_and_refusals(start_daemon: StartDaemon) -> None:
    daemon = start_daemon(
        "--rate-limit",
        "5",
        "--max-message",
        "1K",
        "--history-size",
        "5",
        "--rooms-per-connection",
        "3",
        workers=1,  # one worker: the uid's one share covers the stream and the datagrams
    )
    with daemon.client() as burst:
        started = time.monotonic()
        # A stream is slowed down past the uid's share, never refused: 10 at
        # once (a burst of 2 x rate), the other 10 as 5/s refills.
        assert post(burst, "r", [f"burst {i}" for i in range(20)]) == list(range(1, 21))
        assert time.monotonic() - started >= 1.9
        assert burst.echo(b"still here") == b"still here"

    # A datagram cannot be slowed down: past the share it is refused.
    with DatagramClient(daemon.socket_dir, timeout=10) as dgram:
        outcomes: list[str] = []
        for i in range(15):
            try:
                dgram.say("r", f"datagram {i}")
                outcomes.append("ok")
            except ServerError as exc:
                outcomes.append(f"{exc.code_name}: {exc.message}")
        limited = [o for o in outcomes if o != "ok"]
        assert set(limited) == {"RATE_LIMITED: more than 5 posts/s from uid 0"}, outcomes
        assert len(limited) >= 5, outcomes  # the stream spent the share; at most 10 came back
        accepted = 20 + outcomes.count("ok")

        def say_again() -> int | None:
            try:
                return dgram.say("r", "after the burst")
            except ServerError as exc:
                if exc.code != ErrorCode.RATE_LIMITED:
                    raise
                return None

        assert wait_for(say_again, 5, "a token back at 5/s") == accepted + 1

    with daemon.client() as sizes:
        assert sizes.say("r", "é" * 512) == accepted + 2  # 1024 bytes: at the limit
        with pytest.raises(ServerError) as too_big:
            sizes.say("r", "x" * 1025)
        assert too_big.value.code == ErrorCode.LIMIT_EXCEEDED
        # A lone surrogate is valid JSON but has no UTF-8 form: once it took the master down.
        with pytest.raises(ServerError) as surrogate:
            sizes.request(Op.SAY, b'{"room": "r", "text": "\\ud800"}')
        assert surrogate.value.code == ErrorCode.BAD_REQUEST
        assert sizes.echo(b"the daemon lives") == b"the daemon lives"

    with daemon.client() as joiner:
        reply = joiner.join("r", history=50)
        assert (reply["seq"], reply["history"]) == (accepted + 2, 5)  # --history-size
        assert [joiner.next_event(timeout=5).data["seq"] for _ in range(5)] == list(
            range(accepted - 2, accepted + 3)
        )
        joiner.join("second")
        joiner.join("third")
        with pytest.raises(ServerError) as fourth:
            joiner.join("fourth")
        assert fourth.value.code == ErrorCode.LIMIT_EXCEEDED

    with daemon.client() as holder, daemon.client() as other:
        holder.nick("taken")
        with pytest.raises(ServerError) as taken:
            other.nick("taken")
        assert taken.value.code == ErrorCode.EXISTS
        with pytest.raises(ServerError) as bad:
            other.join("no spaces allowed")
        assert bad.value.code == ErrorCode.BAD_REQUEST
        holder.join("r")

        refused = ipcctl(daemon.socket_dir, "send", "--to", "nobody", "hi")
        assert refused.returncode == 1
        assert len(refused.stderr.splitlines()) == 1, refused.stderr
        assert "nobody" in refused.stderr

        listener = subprocess.Popen(
            [*IPCCTL, "--socket-dir", str(daemon.socket_dir), "listen", "--count", "3", "--nick", "counter"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            wait_for(lambda: "counter" in nicks_in(daemon, "lobby"), 10, "ipcctl listen to join the lobby")
            other.join("lobby")  # a notice: not counted
            assert post(other, "lobby", ["one", "two", "three"]) == [1, 2, 3]
            out, err = listener.communicate(timeout=15)
        finally:
            if listener.poll() is None:
                listener.kill()
                listener.communicate()
        assert listener.returncode == 0, err
        assert out.splitlines() == [f"[lobby] root: {word}" for word in ("one", "two", "three")]

        rooms = ipcctl(daemon.socket_dir, "rooms", "--json")
        assert rooms.returncode == 0, rooms.stderr
        listed = {r["room"]: r for r in json.loads(rooms.stdout)["rooms"]}
        assert (listed["r"]["seq"], listed["r"]["members"]) == (accepted + 2, 1)
        assert (listed["lobby"]["seq"], listed["lobby"]["members"]) == (3, 1)  # the listener left
        who = ipcctl(daemon.socket_dir, "who", "--json")
        assert who.returncode == 0, who.stderr
        members = {m["nick"]: m for m in json.loads(who.stdout)["members"]}
        assert set(members) == {"taken", "root"}
        assert members["taken"]["uid"] == 0
        assert members["taken"]["rooms"] == ["r"]
        in_room = ipcctl(daemon.socket_dir, "who", "r", "--json")
        assert [m["nick"] for m in json.loads(in_room.stdout)["members"]] == ["taken"]
        missing = ipcctl(daemon.socket_dir, "who", "no-such-room")
        assert missing.returncode == 1
        assert len(missing.stderr.splitlines()) == 1


# -- 6. fd hygiene ------------------------------------------------------------------


def test_chat_leaves_no_fds_and_no_sessions_behind(
    daemon: Daemon, actors: Spawn, chat_users: list[ChatUser]
) -> None:
    fds = FdBaseline(daemon)
    clients = [daemon.client() for _ in range(6)]
    for i, client in enumerate(clients):
        client.nick(f"c{i}")
        client.join("hygiene", history=10)
        client.join(f"own{i}")
    clients[0].say("hygiene", "hello")
    clients[1].msg("c2", "private")
    clients[2].part("hygiene")
    with pytest.raises(ServerError):
        clients[3].join("bad room")
    with DatagramClient(daemon.socket_dir, timeout=10) as dgram:
        dgram.say("hygiene", "by datagram")
    user = actors(chat_users[2])
    user("connect")
    user("call", "join", "hygiene", 5)
    user("post", [("hygiene", "from a real user")])
    assert user("dgram_say", "hygiene", "and by datagram") == 4
    # Leave in every way: unread deliveries, a request in flight, a process exit.
    clients[4].send(Op.SAY, encode_json({"room": "hygiene", "text": "and gone"}))
    for client in clients:
        client.close()
    user.close()
    status = daemon.settled_status(lambda s: s["chat"]["chatters"] == 0)
    assert status["chat"]["rooms"] == 2  # the lobby, and "hygiene" for its history
    fds.assert_restored()
    with daemon.client() as check:
        assert {r["room"] for r in check.rooms()} == {"lobby", "hygiene"}
