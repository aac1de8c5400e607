"""A uid's chat rate is one share for the whole daemon, with two real users.

The issue's attack: user "a" posts from many connections, which the
master spreads over both workers. Each worker's own share would let "a"
post ``--rate-limit`` on each (twice the limit here); the hub counts "a"
daemon-wide and has the workers hold it (ipcd.chat.postrate), so what "a"
gets acknowledged stays near one share: under :func:`allowed`, the burst
plus 1.5 times the rate for the time it flooded. Nothing of "a" is
refused, only slowed. Meanwhile user "b" echoes, chats and hands an fd
off (tests.handoff.test_uid_budgets_live.b_is_served), all before "a" has
stopped; after "a" leaves, the daemon's fds are at their baseline.

"a" runs in a forked child that dropped to its uid (tests.handoff.users):
it connects, says so on a pipe, and floods once the test writes "go".
"""

from __future__ import annotations

import os
import pwd
import select
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ipcd.chat.fairshare import BURST_FACTOR
from ipcd.client import Client
from ipcd.protocol import NEED_DATA, Frame, Op, decode_error, encode_json
from tests.chat.conftest import StartDaemon
from tests.chat.users import ChatUser
from tests.daemon import wait_for
from tests.handoff.test_uid_budgets_live import b_is_served
from tests.handoff.users import FdLedger, start_as

RATE = 200.0  # --rate-limit: posts per second per uid
CONNECTIONS = 20  # "a"'s, ten on each worker
WINDOW = 32  # SAYs each connection keeps unanswered
FLOOD = 4.0  # seconds "a" posts for


def allowed(seconds: float) -> float:
    """What one uid may have acknowledged in ``seconds`` from the start of
    a flood: its burst, and its rate with a half of it in tolerance (the
    throttles' overshoot, docs/security.md). Two per-worker shares would
    give two bursts and twice the rate."""
    return RATE * BURST_FACTOR + 1.5 * RATE * seconds


def _received(client: Client) -> Iterator[Frame]:
    """The frame a readable connection brings, and any more its read buffered."""
    yield client.receive()
    while (frame := client.decoder.next_event()) is not NEED_DATA:
        yield frame


def flood(socket_dir: str, ready_w: int, go_r: int) -> dict[str, Any]:
    """As "a": connect, report, then keep WINDOW SAYs unanswered on every
    connection for FLOOD seconds; count what was acknowledged (and any
    refusal) by then."""
    clients = [Client(socket_dir, timeout=10) for _ in range(CONNECTIONS)]
    for client in clients:
        client.echo(b"here")  # answered by a worker: the connection is placed
    os.write(ready_w, b"connected")
    os.close(ready_w)
    os.read(go_r, 1)
    body = encode_json({"room": "a-flood", "text": "flood"})
    start = time.monotonic()
    end = start + FLOOD
    for client in clients:
        for _ in range(WINDOW):
            client.send(Op.SAY, body)
    by_fd = {client.fileno(): client for client in clients}
    acked = 0
    refused: dict[str, int] = {}
    while (now := time.monotonic()) < end:
        for fd in select.select(list(by_fd), [], [], end - now)[0]:
            client = by_fd[fd]
            for frame in _received(client):
                if frame.op == Op.SAY_REPLY:
                    acked += 1
                else:
                    message = decode_error(frame.body)[1] if frame.op == Op.ERROR else f"op {frame.op}"
                    refused[message] = refused.get(message, 0) + 1
                client.send(Op.SAY, body)  # never more than WINDOW unanswered: this cannot block
    for client in clients:
        client.close()
    return {"acked": acked, "refused": refused, "start": start, "end": end}


def test_one_uid_on_every_worker_gets_one_share_and_another_uid_is_served(
    start_daemon: StartDaemon, chat_users: list[ChatUser], short_tmp: Path
) -> None:
    short_tmp.chmod(0o755)  # mkdtemp made it 0700: the other users could not reach the sockets
    daemon = start_daemon("--rate-limit", f"{RATE:g}", workers=2)
    a, b = (pwd.getpwnam(user.name) for user in chat_users[:2])
    ledger = FdLedger(daemon)
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pending = start_as(a, flood, str(daemon.socket_dir), ready_w, go_r, keep=(ready_w, go_r))
    os.close(ready_w)
    os.close(go_r)
    try:
        assert select.select([ready_r], [], [], 20)[0], "the attacker did not connect in 20 s"
        assert os.read(ready_r, 100) == b"connected", pending.result(5)
        spread = [w["connections"] for w in daemon.status()["workers"]]
        assert len(spread) == 2
        assert min(spread) >= CONNECTIONS // 4, f"a's connections per worker: {spread}"
        os.write(go_w, b"g")
        wait_for(
            lambda: any(h["uid"] == a.pw_uid and h["rate_debt"] > 0 for h in daemon.status()["uids"]),
            what="a's posts past its share to show in STATUS",
        )
        b_is_served(daemon, b, "b-meanwhile")
        b_done = time.monotonic()
    finally:
        os.close(ready_r)
        os.close(go_w)
    outcome = pending.result(FLOOD + 20)
    assert outcome.ok, outcome
    report = outcome.value
    assert report["refused"] == {}  # slowed, never refused
    assert b_done < report["end"], "b was served only after a stopped flooding"
    seconds = report["end"] - report["start"]
    assert RATE * BURST_FACTOR <= report["acked"] <= allowed(seconds), (
        f"a had {report['acked']} posts acknowledged in {seconds:.2f}s over 2 workers; "
        f"one share allows {allowed(seconds):.0f}"
    )
    assert sum(w["held"] for w in daemon.status()["workers"]) > 0  # held, as STATUS says
    ledger.expect(0)
