"""ROOMS and WHO are paged like HISTORY: a reply holds what fits the reply
budget (a quarter of --max-outbuf), at least one entry, and says where the
next page starts, so listing a large daemon never cuts the asker off as a
slow reader (before: 1000 rooms with long topics cut off `ipcctl rooms` at
--max-outbuf 64K)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ipcd.chat.hub import Limits
from ipcd.client import Client
from ipcd.protocol import ErrorCode, Op, encode_json
from tests.chat.test_hub import W1, W2, Conn, HubError, Sim
from tests.daemon import Daemon, ipcctl

BUDGET = 2000


def pages(conn: Conn, op: int, key: str, **args: object) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    after = None
    while True:
        reply = conn.call(op, **args, **({} if after is None else {"after": after}))
        assert len(encode_json(reply)) <= BUDGET + 512 or len(reply[key]) == 1  # a page fits, or is one entry
        got.append(reply)
        if not reply["more"]:
            assert "after" not in reply
            return got
        after = reply["after"]


def test_rooms_come_in_pages_that_join_up_in_name_order() -> None:
    sim = Sim(Limits(reply_budget=BUDGET, rooms_per_connection=64))
    conn = sim.connect(W1)
    names = [f"room-{i:03d}" for i in range(60)]
    for name in names:
        conn.join(name)
        conn.call(Op.TOPIC, room=name, topic="t" * 100)
    got = pages(conn, Op.ROOMS, "rooms")
    assert len(got) > 3
    listed = [r["room"] for page in got for r in page["rooms"]]
    assert listed == sorted([*names, "lobby"])


def test_who_comes_in_pages_too() -> None:
    sim = Sim(Limits(reply_budget=BUDGET))
    members = [sim.connect(W1 if i % 2 else W2) for i in range(40)]
    for i, member in enumerate(members):
        member.call(Op.NICK, nick=f"user{i:02d}")
        member.join("hall")
    for kwargs in ({}, {"room": "hall"}):
        got = pages(members[0], Op.WHO, "members", **kwargs)
        assert len(got) > 1
        assert [m["nick"] for page in got for m in page["members"]] == [f"user{i:02d}" for i in range(40)]


def test_an_entry_larger_than_the_budget_still_comes_alone() -> None:
    sim = Sim(Limits(reply_budget=10))
    conn = sim.connect(W1)
    conn.join("a")
    got = pages(conn, Op.ROOMS, "rooms")
    assert [[r["room"] for r in page["rooms"]] for page in got] == [["a"], ["lobby"]]


def test_a_bad_cursor_is_refused() -> None:
    sim = Sim()
    conn = sim.connect(W1)
    for op in (Op.ROOMS, Op.WHO):
        with pytest.raises(HubError, match="after") as refused:
            conn.call(op, after=5)
        assert refused.value.code == ErrorCode.BAD_REQUEST


def test_listing_a_large_daemon_does_not_cut_the_asker_off(socket_dir: Path) -> None:
    daemon = Daemon(socket_dir, "--max-outbuf", "64K", workers=2).start()
    clients = [Client(daemon.socket_dir, timeout=10) for _ in range(17)]
    try:
        made = 0
        for client in clients:
            for _ in range(60):
                if made == 1000:
                    break
                name = f"room-{made:04d}-" + "x" * 50
                client.join(name)
                client.topic(name, "t" * 256)  # 1000 x ~350 bytes: far past 64K of output
                made += 1
        listed = ipcctl(daemon.socket_dir, "--json", "rooms")
        assert listed.returncode == 0, listed.stderr
        assert listed.stdout.count('"room":') == 1001  # and lobby
        assert "cut off" not in daemon.log()
    finally:
        for client in clients:
            client.close()
        assert daemon.stop() == 0
