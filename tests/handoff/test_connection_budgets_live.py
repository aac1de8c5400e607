"""The connection path's per-uid budgets with two real users.

User "a" (``other``) opens connections past ``--connections-per-uid``, or
holds an almost complete maximum-size frame on many connections past
``--partial-bytes-per-uid``; the daemon refuses the connections past the
first budget and cuts off the connections whose reads pass the second,
each with an OVER_BUDGET frame naming the budget. Meanwhile user "b"
(``owner``) echoes (a large frame too), chats and hands an fd off. After
"a" leaves, the daemon's fds are at their baseline and the workers' RSS
within :data:`WORKER_RSS_TOLERANCE` of where it was before the attack.

The budgets are set low by flag so that the attack is quick. "a" runs in a
forked child that dropped to its uid (tests.handoff.users); it reports on a
pipe once it has done its part, then holds everything until the test
closes the other pipe.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
from pathlib import Path
from typing import Any

import pytest

from ipcd.client import Client, ConnectionLost
from ipcd.protocol import NEED_DATA, ErrorCode, FrameDecoder, Op, decode_error, encode_header
from tests.daemon import Daemon, ipcctl, rss_kib
from tests.handoff.test_uid_budgets_live import b_is_served, hold_until_told, warm_up
from tests.handoff.users import FdLedger, FdUsers, StartDaemon, as_user, ipcctl_as, start_as

pytest_plugins = ["tests.handoff.users"]

CONNECTION_BUDGET = 40
PARTIAL_BUDGET = 4 << 20  # per uid in each worker
FRAME = 1 << 20  # the default --max-frame-size
ALMOST = FRAME - 16 - 1024  # body bytes sent: the frame lacks its last KiB
HELD = 16 + ALMOST  # what one such connection makes its worker buffer
PARTIAL_CONNECTIONS = 40  # 40 MiB held without the budget
READ = 256 << 10  # a worker's read buffer: how far one read may pass the budget
# What the workers may keep, together, of the attack after it left: freed
# decoder buffers go back to the allocator, which keeps some for reuse
# (measured: see docs/security.md).
WORKER_RSS_TOLERANCE = 6 << 20


# -- what the attacker's child does -------------------------------------------------


def open_connections(socket_dir: str, count: int, ready_w: int, leave_r: int) -> dict[str, Any]:
    """Open ``count`` connections one after the other and echo on each;
    hold the ones served."""
    held: list[Client] = []
    refusals: dict[str, int] = {}
    for i in range(count):
        client = Client(socket_dir, timeout=10)
        try:
            client.echo(f"a-{i}".encode())
        except ConnectionLost as exc:  # OVER_BUDGET is fatal: the daemon closed it
            client.close()
            key = f"{exc.code_name}: {exc}"
            refusals[key] = refusals.get(key, 0) + 1
            continue
        held.append(client)
    report = {"served": len(held), "refusals": refusals}
    hold_until_told(ready_w, leave_r, report)
    for client in held:
        client.close()
    return report


def _parting_words(sock: socket.socket) -> str:
    """The ERROR frame a cut-off connection got before its EOF."""
    decoder = FrameDecoder()
    sock.settimeout(10)
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:  # it closed with our unread bytes: its frame came before
            break
        if not data:
            break
        decoder.receive_data(data)
    while (frame := decoder.next_event()) is not NEED_DATA:
        if frame.op == Op.ERROR:
            code, message = decode_error(frame.body)
            return f"{ErrorCode(code).name}: {message}"
    return "EOF without an ERROR frame"


def hold_partial_frames(socket_dir: str, count: int, ready_w: int, leave_r: int) -> dict[str, Any]:
    """On each of ``count`` connections send all but the last KiB of a
    maximum-size ECHO frame; report once sent, hold them until told to
    leave, then say which were cut off, and why."""
    body = b"a" * ALMOST
    socks = []
    for _ in range(count):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(f"{socket_dir}/stream.sock")
        socks.append(sock)
    broken = 0
    for sock in socks:
        try:
            sock.sendall(encode_header(Op.ECHO, 1, FRAME - 16) + body)
        except OSError:
            broken += 1  # cut off while sending: its parting words are read below
    hold_until_told(ready_w, leave_r, {"sent": count, "broken_while_sending": broken})
    # The test has seen the daemon settle: a connection that was cut off is
    # readable (its ERROR frame and EOF); one still held has nothing to read.
    readable = select.select(socks, [], [], 0)[0]
    words: dict[str, int] = {}
    for sock in readable:
        said = _parting_words(sock)
        words[said] = words.get(said, 0) + 1
    for sock in socks:
        sock.close()
    return {"cut_off": len(readable), "words": words}


# -- the test's side --------------------------------------------------------------------


def worker_rss(daemon: Daemon) -> int:
    return sum(rss_kib(pid) for pid in daemon.worker_pids()) * 1024


def echo_large(socket_dir: str) -> int:
    """One almost maximum-size echo: b's own partial frames are b's budget."""
    payload = b"b" * (FRAME - 16 - 4096)
    with Client(socket_dir, timeout=10) as client:
        return len(client.echo(payload))


def test_one_uid_cannot_hold_every_connection(start_daemon: StartDaemon, fd_users: FdUsers) -> None:
    daemon = start_daemon("--connections-per-uid", str(CONNECTION_BUDGET))
    a, b = fd_users.other, fd_users.owner
    assert daemon.status()["limits"]["connections_per_uid"] == CONNECTION_BUDGET
    warm_up(daemon, b)
    ledger = FdLedger(daemon)
    refusal = (
        f"uid {a.pw_uid} holds {CONNECTION_BUDGET} connections, its limit (the daemon's "
        f"--connections-per-uid is {CONNECTION_BUDGET} per uid): close some of your connections, "
        "or retry later"
    )
    for attack in range(2):  # twice: what the first held was given back, exactly
        ready_r, ready_w = os.pipe()
        leave_r, leave_w = os.pipe()
        pending = start_as(
            a, open_connections, str(daemon.socket_dir), CONNECTION_BUDGET + 10, ready_w, leave_r,
            keep=(ready_w, leave_r),
        )  # fmt: skip
        os.close(ready_w)
        os.close(leave_r)
        try:
            assert select.select([ready_r], [], [], 30)[0], "the attacker did not reach its budget"
            data = os.read(ready_r, 1 << 20)
            assert data, f"the attacker failed: {pending.result(5)}"
            report = json.loads(data)
            assert report == {"served": CONNECTION_BUDGET, "refusals": {f"OVER_BUDGET: {refusal}": 10}}
            held = daemon.settled_status(lambda s: (holdings_of(s, a.pw_uid) or {}).get("connections") == 40)
            assert holdings_of(held, a.pw_uid) == {
                "uid": a.pw_uid,
                "connections": CONNECTION_BUDGET,
                "partial_bytes": 0,
                "forward_bytes": 0,
                "history_bytes": 0,
                "rate_debt": 0,
                "message_ids": 0,
                "rooms": 0,
                "joins": 0,
                "waiters": 0,
                "stored_fds": 0,
            }
            refused = ipcctl_as(a, daemon.socket_dir, "echo", "hi")
            assert (refused.returncode, refused.stdout) == (1, ""), refused
            assert refused.stderr.splitlines() == [f"ipcctl: the daemon refused: {refusal} (OVER_BUDGET)"]
            for round_ in range(2):
                b_is_served(daemon, b, f"b-{attack}-{round_}")
            shown = ipcctl(daemon.socket_dir, "status")
            assert shown.returncode == 0, shown.stderr
            row = next(
                line.split() for line in shown.stdout.splitlines() if line.split()[:1] == [str(a.pw_uid)]
            )
            assert row[:3] == [str(a.pw_uid), a.pw_name, str(CONNECTION_BUDGET)]
        finally:
            os.close(ready_r)
            os.close(leave_w)
            outcome = pending.result(20)
        assert outcome.ok, outcome
        daemon.settled_status(lambda s: holdings_of(s, a.pw_uid) is None)
        ledger.expect(0)
    assert "refusing connections: " + refusal in daemon.log()


def holdings_of(status: dict[str, Any], uid: int) -> dict[str, Any] | None:
    return next((held for held in status["uids"] if held["uid"] == uid), None)


def test_one_uid_cannot_fill_the_workers_with_partial_frames(
    start_daemon: StartDaemon, fd_users: FdUsers
) -> None:
    daemon = start_daemon("--partial-bytes-per-uid", str(PARTIAL_BUDGET))
    a, b = fd_users.other, fd_users.owner
    assert daemon.status()["limits"]["partial_bytes_per_uid"] == PARTIAL_BUDGET
    warm_up(daemon, b)
    assert as_user(b, echo_large, str(daemon.socket_dir)).value == FRAME - 16 - 4096
    ledger = FdLedger(daemon)
    rss = [worker_rss(daemon)]
    refusal = (
        f"OVER_BUDGET: uid {a.pw_uid} holds {{}} bytes of partly received frames, its limit (the "
        f"daemon's --partial-bytes-per-uid is {PARTIAL_BUDGET} per uid in each worker): this connection "
        "is cut off; send each frame whole, on fewer connections at once"
    )
    for attack in range(2):
        ready_r, ready_w = os.pipe()
        leave_r, leave_w = os.pipe()
        pending = start_as(
            a, hold_partial_frames, str(daemon.socket_dir), PARTIAL_CONNECTIONS, ready_w, leave_r,
            keep=(ready_w, leave_r),
        )  # fmt: skip
        os.close(ready_w)
        os.close(leave_r)
        try:
            assert select.select([ready_r], [], [], 30)[0], "the attacker did not send its frames"
            data = os.read(ready_r, 1 << 20)
            assert data, f"the attacker failed: {pending.result(5)}"
            assert json.loads(data)["sent"] == PARTIAL_CONNECTIONS

            def settled(status: dict[str, Any]) -> bool:
                # Every connection of a still open holds its whole partial frame.
                held = holdings_of(status, a.pw_uid) or {}
                return bool(held.get("partial_bytes", -1) == held.get("connections", 0) * HELD)

            held = holdings_of(daemon.settled_status(settled), a.pw_uid)
            assert held is not None
            kept = held["connections"]
            # Each of the 2 workers holds at most the budget's worth for a.
            assert 2 <= kept <= 2 * (PARTIAL_BUDGET // HELD), held
            assert held["partial_bytes"] <= 2 * PARTIAL_BUDGET
            grown = worker_rss(daemon) - rss[0]
            assert grown < 2 * (PARTIAL_BUDGET + READ) + WORKER_RSS_TOLERANCE, f"workers grew {grown} bytes"
            for round_ in range(2):
                b_is_served(daemon, b, f"b-{attack}-{round_}")
                assert as_user(b, echo_large, str(daemon.socket_dir)).value == FRAME - 16 - 4096
        finally:
            os.close(ready_r)
            os.close(leave_w)
            outcome = pending.result(30)
        assert outcome.ok, outcome
        assert outcome.value["cut_off"] == PARTIAL_CONNECTIONS - kept
        words = outcome.value["words"]
        assert sum(words.values()) == PARTIAL_CONNECTIONS - kept
        prefix, suffix = refusal.split("{}")
        for said in words:
            assert said.startswith(prefix), said
            assert said.endswith(suffix), said
            over = int(said[len(prefix) : -len(suffix)])
            assert PARTIAL_BUDGET < over <= PARTIAL_BUDGET + READ, said
        daemon.settled_status(lambda s: holdings_of(s, a.pw_uid) is None)
        ledger.expect(0)
        rss.append(worker_rss(daemon))
    assert "bytes of partly received frames, its limit" in daemon.log()
    # Both attacks: what they made the workers buffer was given back.
    assert max(rss[1:]) <= rss[0] + WORKER_RSS_TOLERANCE, f"worker RSS {rss}: the attack kept too much"


def test_a_client_error_names_the_connection_budget(start_daemon: StartDaemon, fd_users: FdUsers) -> None:
    """The library's view: the refused connection's first request raises
    ConnectionLost with the daemon's reason and its code, whether the client
    met the close while sending or while reading; b is not affected."""
    daemon = start_daemon("--connections-per-uid", "1")
    a, b = fd_users.other, fd_users.owner

    outcome = as_user(a, second_connection, str(daemon.socket_dir))
    assert outcome.ok, outcome
    assert outcome.value == (
        "OVER_BUDGET",
        f"uid {a.pw_uid} holds 1 connections, its limit (the daemon's --connections-per-uid is 1 per "
        "uid): close some of your connections, or retry later",
    )
    outcome = as_user(b, echo_large, str(daemon.socket_dir))
    assert outcome.value == FRAME - 16 - 4096


def second_connection(socket_dir: str) -> tuple[str | None, str]:
    """Hold one connection, echo on a second: the second's fate."""
    with Client(socket_dir, timeout=10) as first, Client(socket_dir, timeout=10) as second:
        first.echo(b"first")
        try:
            second.echo(b"second")
        except ConnectionLost as exc:
            return exc.code_name, str(exc)
        return None, "served"


def test_the_budgets_come_from_config_and_environment_and_change_on_reload(
    start_daemon: StartDaemon, fd_users: FdUsers, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = short_tmp / "ipcd.toml"
    config.write_text('connections-per-uid = 5\npartial-bytes-per-uid = "8M"\n')
    monkeypatch.setenv("IPCD_PARTIAL_BYTES_PER_UID", "2M")  # the environment wins over the file
    daemon = start_daemon("--config", str(config))
    limits = daemon.status()["limits"]
    assert (limits["connections_per_uid"], limits["partial_bytes_per_uid"]) == (5, 2 << 20)
    a = fd_users.other
    assert as_user(a, second_connection, str(daemon.socket_dir)).value == (None, "served")

    config.write_text("connections-per-uid = 1\n")
    daemon.signal(signal.SIGHUP)
    daemon.settled_status(lambda s: s["limits"]["connections_per_uid"] == 1)
    outcome = as_user(a, second_connection, str(daemon.socket_dir))
    assert outcome.value == (
        "OVER_BUDGET",
        f"uid {a.pw_uid} holds 1 connections, its limit (the daemon's --connections-per-uid is 1 per "
        "uid): close some of your connections, or retry later",
    )
