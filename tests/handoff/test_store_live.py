"""The fd store on a live daemon: limits, validation, TTL, fd accounting,
worker crashes and rendezvous, through :class:`ipcd.client.Client`.

fds handed to the daemon are mostly pipe write ends: once the daemon has
closed its copy the read end sees EOF, which proves a refused or removed
fd was closed directly; :class:`FdLedger` checks after every step that the
master holds its baseline plus exactly the stored fds, workers their
baseline.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ipcd import fdpass
from ipcd.client import Client, Handoff, ServerError
from ipcd.protocol import Op, decode_json, encode_json, reply_op
from tests.daemon import Daemon, Pipes, holder_of, ipcctl, server_side_inode
from tests.handoff.users import FdLedger, FdUsers, StartDaemon, as_user

pytest_plugins = ["tests.handoff.users"]


def refused(code: str, call: Any, *args: Any, **kwargs: Any) -> str:
    """``call(*args, **kwargs)`` fails with the daemon's ``code``; its message."""
    with pytest.raises(ServerError) as info:
        call(*args, **kwargs)
    assert info.value.code_name == code, f"{info.value.code_name}: {info.value.message}"
    assert info.value.message
    return info.value.message


def names(daemon: Daemon) -> list[str]:
    with daemon.client() as client:
        return [entry["name"] for entry in client.ls()["entries"]]


def put_as(socket_dir: str, name: str, fds: list[int]) -> dict[str, Any]:
    with Client(socket_dir, timeout=10) as client:
        return client.put(name, fds)


# -- limits ------------------------------------------------------------------------


def test_quota_is_per_owner_uid_and_freed_by_take(start_daemon: StartDaemon, fd_users: FdUsers) -> None:
    daemon = start_daemon("--fd-quota", "4")
    ledger = FdLedger(daemon)
    with Pipes(4) as mine, daemon.client() as client:
        client.put("q1", mine.write_ends[:2])
        client.put("q2", mine.write_ends[2:3])
        client.put("q3", mine.write_ends[3:])
        mine.drop_write_ends()
        assert client.ls()["quota"] == {"used": 4, "quota": 4}
        with Pipes(1) as fifth:
            message = refused("LIMIT_EXCEEDED", client.put, "q4", fifth.write_ends)
            assert "uid 0 would hold 5 stored fds; the quota is 4" in message
            assert "take or remove some first" in message
            fifth.drop_write_ends()
            fifth.assert_closed_elsewhere()
        assert mine.held_elsewhere()
    ledger.expect(4)
    result = ipcctl(daemon.socket_dir, "put", "q4", "/dev/null")
    assert (result.returncode, result.stdout) == (1, ""), result
    assert result.stderr.splitlines() == [
        "ipcctl: the daemon refused: uid 0 would hold 5 stored fds; the quota is 4: "
        "take or remove some first (LIMIT_EXCEEDED)"
    ]
    ledger.expect(4)

    # Another uid has a quota of its own.
    with Pipes(5) as theirs:
        sock_dir = str(daemon.socket_dir)
        owner = fd_users.owner
        assert as_user(owner, put_as, sock_dir, "o1", theirs.write_ends[:4], keep=theirs.write_ends).ok
        over = as_user(owner, put_as, sock_dir, "o2", theirs.write_ends[4:], keep=theirs.write_ends)
        assert over.code == "LIMIT_EXCEEDED", over
        assert f"uid {fd_users.owner.pw_uid} would hold 5" in over.message
        theirs.drop_write_ends()
        theirs.some(4).assert_closed_elsewhere()
        assert theirs.some(0, 1, 2, 3).held_elsewhere()
    ledger.expect(8)

    # Taking one frees quota: the fifth fits now.
    with daemon.client() as client:
        handoff = client.take("q2")
        fdpass.close_fds(handoff.fds)
        with Pipes(1) as fifth:
            assert client.put("q4", fifth.write_ends)["count"] == 1
            fifth.drop_write_ends()
            assert fifth.held_elsewhere()
            assert client.ls()["quota"] == {"used": 4, "quota": 4}
            ledger.expect(8, clients=1)
            # Replacing an entry of one's own counts only the difference.
            with Pipes(2) as again:
                assert client.put("q1", again.write_ends, replace=True)["replaced"] is True
                again.drop_write_ends()
                ledger.expect(8, clients=1)
                client.rm("q1")
                again.assert_closed_elsewhere()
    ledger.expect(6)


def test_default_quota_is_64_fds(start_daemon: StartDaemon) -> None:
    daemon = start_daemon()
    ledger = FdLedger(daemon)
    with Pipes(65) as pipes, daemon.client() as client:
        for index in range(4):  # 16 per entry: the default --max-fds
            client.put(f"bulk{index}", pipes.write_ends[16 * index : 16 * (index + 1)])
        message = refused("LIMIT_EXCEEDED", client.put, "one-more", pipes.write_ends[64:])
        assert "the quota is 64" in message
        pipes.drop_write_ends()
        pipes.some(64).assert_closed_elsewhere()
        assert pipes.some(*range(64)).held_elsewhere()
        assert client.ls()["quota"] == {"used": 64, "quota": 64}
        ledger.expect(64, clients=1)
        for index in range(4):
            client.rm(f"bulk{index}")
        pipes.some(*range(64)).assert_closed_elsewhere()
    ledger.expect(0)


def test_too_many_fds_in_one_put_are_all_closed(start_daemon: StartDaemon) -> None:
    daemon = start_daemon("--max-fds", "3")
    ledger = FdLedger(daemon)
    with daemon.client() as client:
        with Pipes(3) as three:
            assert client.put("three", three.write_ends)["count"] == 3
            three.drop_write_ends()
            assert three.held_elsewhere()
        ledger.expect(3, clients=1)
        for count in (4, 8):
            with Pipes(count) as over:
                with pytest.raises(ServerError) as info:
                    client.put(f"over{count}", over.write_ends)
                assert info.value.code_name in {"FDS_TRUNCATED", "LIMIT_EXCEEDED"}, info.value
                assert "closed" in info.value.message or "at most" in info.value.message, info.value.message
                over.drop_write_ends()
                over.assert_closed_elsewhere()
            ledger.expect(3, clients=1)
        # The connection is still good, and nothing was stored.
        assert [e["name"] for e in client.ls()["entries"]] == ["three"]
    ledger.expect(3)


# -- validation ---------------------------------------------------------------------

BAD_NAMES = [
    "",
    "-dash",
    ".hidden",
    "has space",
    "tab\there",
    "x" * 129,
    "naïve",
    "semi;colon",
    "a\nb",
    "web:443",
]


def test_bad_names_and_arguments_are_refused_and_their_fds_closed(start_daemon: StartDaemon) -> None:
    daemon = start_daemon()
    ledger = FdLedger(daemon)
    with daemon.client() as client:
        for name in BAD_NAMES:
            with Pipes(1) as pipes:
                message = refused("BAD_REQUEST", client.put, name, pipes.write_ends)
                assert "bad name" in message
                assert "letters, digits" in message
                pipes.drop_write_ends()
                pipes.assert_closed_elsewhere()
            for call in (client.get, client.take, client.rm):
                refused("BAD_REQUEST", call, name)
        bad_args: list[dict[str, Any]] = [
            {"ttl": -1},
            {"ttl": 0},
            {"names": ["has:colon"]},
            {"allow_uids": [-5]},
        ]
        for options in bad_args:
            with Pipes(1) as pipes:  # as bytes: Client.put refuses a bad ttl before sending
                body = encode_json({"name": "fine-name", **options})
                refused("BAD_REQUEST", client.request, Op.PUT, body, pipes.write_ends)
                pipes.drop_write_ends()
                pipes.assert_closed_elsewhere()
        refused("BAD_REQUEST", client.put, "no-fds", [])
        # A GET carries no fds: any that come with one are closed.
        with Pipes(1) as pipes:
            with pytest.raises(ServerError) as info:
                client.request(Op.GET, encode_json({"name": "x"}), pipes.write_ends)
            assert info.value.code_name in {"FDS_NOT_EXPECTED", "FD_MISMATCH"}, info.value
            pipes.drop_write_ends()
            pipes.assert_closed_elsewhere()
        ledger.expect(0, clients=1)
        # The longest valid name and every allowed character.
        for name in ("x" * 128, "svc.web-1_a@host/port"):
            with Pipes(1) as pipes:
                assert client.put(name, pipes.write_ends)["name"] == name
                pipes.drop_write_ends()
                client.rm(name)
                pipes.assert_closed_elsewhere()
    ledger.expect(0)


def test_missing_names_and_duplicates(start_daemon: StartDaemon) -> None:
    daemon = start_daemon()
    ledger = FdLedger(daemon)
    with daemon.client() as client, Pipes(2) as pipes:
        for call in (client.get, client.take, client.rm):
            assert "nothing is stored as 'ghost'" in refused("NOT_FOUND", call, "ghost")
        client.put("dup", pipes.write_ends[:1])
        message = refused("EXISTS", client.put, "dup", pipes.write_ends[1:])
        assert "use --replace" in message
        pipes.drop_write_ends()
        pipes.some(1).assert_closed_elsewhere()
        assert pipes.some(0).held_elsewhere()
        ledger.expect(1, clients=1)
    ledger.expect(1)


# -- what each operation does to the daemon's fds ----------------------------------------


def test_get_take_and_rm_account_for_every_fd(start_daemon: StartDaemon) -> None:
    daemon = start_daemon()
    ledger = FdLedger(daemon)
    with Pipes(2) as pipes:
        with daemon.client() as client:
            reply = client.put("pair", pipes.write_ends, names=["left", "right"])
            assert reply == {"name": "pair", "count": 2, "replaced": False}
        pipes.drop_write_ends()
        ledger.expect(2)
        with daemon.client() as client:
            got = client.get("pair")
            assert (got.name, got.names, got.owner, len(got.fds)) == ("pair", ("left", "right"), 0, 2)
            fdpass.close_fds(got.fds)
        assert pipes.held_elsewhere()
        ledger.expect(2)  # a GET changes nothing in the daemon
        with daemon.client() as client:
            taken = client.take("pair")
            assert taken.names == ("left", "right")
        ledger.expect(0)  # the daemon let go; ours are now the only copies
        assert pipes.held_elsewhere()
        fdpass.close_fds(taken.fds)
        pipes.assert_closed_elsewhere()

    with Pipes(1) as pipes:
        with daemon.client() as client:
            client.put("gone-soon", pipes.write_ends)
        pipes.drop_write_ends()
        ledger.expect(1)
        with daemon.client() as client:
            client.rm("gone-soon")
        pipes.assert_closed_elsewhere()
        ledger.expect(0)


def test_ttl_expires_the_entry_and_closes_its_fds(start_daemon: StartDaemon) -> None:
    daemon = start_daemon()
    ledger = FdLedger(daemon)
    with Pipes(2) as pipes:
        with daemon.client() as client:
            client.put("short", pipes.write_ends[:1], ttl=0.5)
            client.put("long", pipes.write_ends[1:], ttl=3600)
            listed = {e["name"]: e for e in client.ls()["entries"]}
        pipes.drop_write_ends()
        assert 0 < listed["short"]["ttl"] <= 0.5
        assert 3500 < listed["long"]["ttl"] <= 3600
        pipes.some(0).assert_closed_elsewhere(timeout=10)  # closed at expiry
        assert names(daemon) == ["long"]
        assert pipes.some(1).held_elsewhere()
        ledger.expect(1)


# -- worker crashes ------------------------------------------------------------------


def clients_on_each_worker(daemon: Daemon) -> Iterator[tuple[int, Client]]:
    """(worker pid, a client it serves) until every worker serves one."""
    workers = daemon.worker_pids()
    seen: set[int] = set()
    spare: list[Client] = []
    try:
        for _ in range(40):
            client = daemon.client()
            client.echo(b"where am I")
            (pid,) = holder_of(server_side_inode(client.sock), workers)
            if pid in seen:
                spare.append(client)
                continue
            seen.add(pid)
            yield pid, client
            if seen == set(workers):
                return
        pytest.fail(f"40 connections never reached every worker of {workers}")
    finally:
        for client in spare:
            client.close()


def test_kill_9_of_any_worker_loses_no_entry(start_daemon: StartDaemon) -> None:
    daemon = start_daemon()
    ledger = FdLedger(daemon)
    stored = []
    with Pipes(4) as pipes:
        ends = iter(pipes.write_ends)
        for pid, client in clients_on_each_worker(daemon):
            with client:
                for kind in ("pipe", "memfd"):
                    if kind == "pipe":
                        fd = next(ends)
                        client.put(f"via-{pid}-pipe", [fd])
                    else:
                        memfd = os.memfd_create("kept")
                        os.write(memfd, b"survives\n")
                        client.put(f"via-{pid}-memfd", [memfd])
                        os.close(memfd)
                    stored.append(f"via-{pid}-{kind}")
        pipes.drop_write_ends()
        ledger.expect(4)
        first_workers = list(ledger.workers)
        for victim in first_workers:
            os.kill(victim, signal.SIGKILL)
            ledger.workers_replaced(victim)
            assert names(daemon) == sorted(stored)
            ledger.expect(4)
        assert "killed by SIGKILL" in daemon.log()
        assert pipes.some(0, 1).held_elsewhere()
        with daemon.client() as client:
            got = client.get(stored[1])
            assert os.pread(got.fds[0], 100, 0) == b"survives\n"
            fdpass.close_fds(got.fds)
        ledger.expect(4)


def test_a_listening_socket_handed_off_survives_a_worker_kill(
    start_daemon: StartDaemon, short_tmp: Path
) -> None:
    daemon = start_daemon()
    ledger = FdLedger(daemon)
    path = str(short_tmp / "app.sock")
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(path)
    unix.listen()
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    tcp_address = tcp.getsockname()
    with daemon.client() as client:
        client.put("listeners", [unix.fileno(), tcp.fileno()], names=["unix", "tcp"])
        (entry,) = client.ls()["entries"]
    unix.close()  # only the daemon holds them now
    tcp.close()
    assert [(fd["kind"], fd["family"], fd["listening"]) for fd in entry["fds"]] == [
        ("socket", "unix", True),
        ("socket", "inet", True),
    ]
    assert entry["fds"][0]["address"] == path
    assert entry["fds"][1]["address"] == f"127.0.0.1:{tcp_address[1]}"
    ledger.expect(2)

    victim = ledger.workers[0]
    os.kill(victim, signal.SIGKILL)
    ledger.workers_replaced(victim)
    ledger.expect(2)

    with daemon.client() as client:
        handoff = client.take("listeners")
    ledger.expect(0)
    assert handoff.names == ("unix", "tcp")
    servers = [socket.socket(fileno=fd) for fd in handoff.fds]
    try:
        for server, (family, address) in zip(
            servers, ((socket.AF_UNIX, path), (socket.AF_INET, tcp_address)), strict=True
        ):
            server.settimeout(10)
            with socket.socket(family, socket.SOCK_STREAM) as peer:
                peer.settimeout(10)
                peer.connect(address)
                conn, _ = server.accept()
                with conn:
                    peer.sendall(b"ping through the handed-off socket")
                    assert conn.recv(100) == b"ping through the handed-off socket"
                    conn.sendall(b"pong")
                    assert peer.recv(100) == b"pong"
    finally:
        for server in servers:
            server.close()


# -- rendezvous -------------------------------------------------------------------


def wait_registered(client: Client, op: Op, name: str, wait: float) -> int:
    """Send a waiting GET or TAKE and return its request id once the store
    has queued it: an LS on the same connection travels the same channel
    to the master behind it, so its answer proves the waiter is there."""
    request_id = client.send(op, encode_json({"name": name, "wait": wait}))
    client.request(Op.LS, b"{}")
    return request_id


def handoff_of(client: Client, request_id: int, op: Op) -> Handoff:
    reply = client.wait_reply(request_id)
    assert reply.op == reply_op(op)
    meta = decode_json(reply.body)
    return Handoff(meta["name"], reply.fds, tuple(meta["names"]), meta["owner"])


def put_memfd(daemon: Daemon, name: str, content: bytes) -> None:
    fd = os.memfd_create(name)
    try:
        os.write(fd, content)
        with daemon.client() as client:
            client.put(name, [fd])
    finally:
        os.close(fd)


def test_waiters_are_served_in_order_and_a_take_ends_the_round(start_daemon: StartDaemon) -> None:
    daemon = start_daemon()
    ledger = FdLedger(daemon)
    getter, taker, second = (daemon.client(timeout=20) for _ in range(3))
    try:
        get_id = wait_registered(getter, Op.GET, "job", 15)
        take_id = wait_registered(taker, Op.TAKE, "job", 15)
        second_id = wait_registered(second, Op.TAKE, "job", 15)
        ledger.expect(0, clients=3)

        put_memfd(daemon, "job", b"first")
        for client, request_id, op in ((getter, get_id, Op.GET), (taker, take_id, Op.TAKE)):
            got = handoff_of(client, request_id, op)
            assert (got.name, len(got.fds)) == ("job", 1)
            assert os.pread(got.fds[0], 100, 0) == b"first"
            fdpass.close_fds(got.fds)
        # The second taker keeps waiting: the next answer on its connection
        # is to a request sent after the put, not its TAKE.
        probe = second.send(Op.LS, b"{}")
        frame = second.receive()
        assert frame.request_id == probe, "the second TAKE waiter was answered by a put it did not win"
        assert decode_json(frame.body)["entries"] == []
        ledger.expect(0, clients=3)

        put_memfd(daemon, "job", b"second")
        got = handoff_of(second, second_id, Op.TAKE)
        assert os.pread(got.fds[0], 100, 0) == b"second"
        fdpass.close_fds(got.fds)
        assert names(daemon) == []
    finally:
        for client in (getter, taker, second):
            client.close()
    ledger.expect(0)


def test_a_wait_that_nobody_meets_times_out(start_daemon: StartDaemon) -> None:
    daemon = start_daemon()
    ledger = FdLedger(daemon)
    with daemon.client() as client:
        message = refused("TIMED_OUT", client.get, "never", wait=0.3)
        assert "'never' was not put in time" in message
        refused("TIMED_OUT", client.take, "never", wait=0.2)
        assert client.echo(b"same connection") == b"same connection"
    # A put after the deadline stays stored: no forgotten waiter takes it.
    put_memfd(daemon, "never", b"late")
    assert names(daemon) == ["never"]
    ledger.expect(1)


def test_ls_lists_a_path_that_is_not_utf8(daemon: Daemon, short_tmp: Path) -> None:
    """The master reads a stored file's path from /proc as a string with
    surrogateescape for bytes that are not UTF-8; such a string has no
    UTF-8 form, and JSON bodies are UTF-8: it is sent escaped instead, and
    LS still answers (a plain UTF-8 encoder fails it as an internal error,
    for everyone who may see the entry)."""
    path = os.fsencode(short_tmp) + b"/caf\xe9"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        with daemon.client() as client:
            client.put("not-utf8", [fd])
            [entry] = [e for e in client.ls()["entries"] if e["name"] == "not-utf8"]
            assert os.fsencode(entry["fds"][0]["path"]) == path
            client.rm("not-utf8")
    finally:
        os.close(fd)
