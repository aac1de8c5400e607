"""The pre-fork model: connections passed as fds, spread, survived, replaced."""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from ipcd.client import Client, ConnectionLost, ServerError
from ipcd.protocol import ErrorCode, Op, encode_frame, encode_json
from ipcd.settings import OPTIONS
from tests.daemon import (
    Daemon,
    children,
    fd_count,
    holder_of,
    listening_inode,
    raw_connect,
    server_side_inode,
    wait_for,
)


def test_connections_are_spread_and_arrive_as_passed_fds(daemon: Daemon) -> None:
    workers = daemon.worker_pids()
    received_before = sum(w["received"] for w in daemon.status()["workers"])  # this query included
    clients = [daemon.client() for _ in range(8)]
    try:
        for client in clients:
            assert client.echo(b"x") == b"x"
        # Every server-side end sits in exactly one worker, never in the master.
        owners = []
        for client in clients:
            inode = server_side_inode(client.sock)
            assert holder_of(inode, [daemon.pid]) == []
            holders = holder_of(inode, workers)
            assert len(holders) == 1
            owners.append(holders[0])
        assert set(owners) == set(workers), f"all connections on one worker: {owners}"
        assert max(owners.count(pid) for pid in workers) <= 5
        # Workers cannot accept: only the master holds the listening socket.
        listener = listening_inode(daemon.stream_path)
        assert holder_of(listener, [daemon.pid]) == [daemon.pid]
        assert holder_of(listener, workers) == []
        # And each connection was counted as received over the channel:
        # 8 clients and every status query made to find out (each is a
        # connection too). Counts reach the master within 20 ms of a change.
        queries = [0]

        def settled(status: dict[str, Any]) -> bool:
            queries[0] += 1
            received = sum(int(w["received"]) for w in status["workers"])
            open_now = sum(int(w["connections"]) for w in status["workers"])
            return received == received_before + 8 + queries[0] and open_now == 9

        daemon.settled_status(settled)
    finally:
        for client in clients:
            client.close()


def test_kill_9_of_a_worker_loses_only_its_connections(daemon: Daemon) -> None:
    workers = daemon.worker_pids()
    master_baseline = fd_count(daemon.pid)
    # Idle workers hold the same fds; sample once they agree (the status
    # query behind worker_pids() may still be open on one of them).
    worker_baseline = wait_for(
        lambda: fd_count(workers[0]) == fd_count(workers[1]) and fd_count(workers[0]), what="idle workers"
    )
    clients = [daemon.client() for _ in range(6)]
    for client in clients:
        client.echo(b"warm")
    by_worker: dict[int, list[int]] = {pid: [] for pid in workers}
    for index, client in enumerate(clients):
        by_worker[holder_of(server_side_inode(client.sock), workers)[0]].append(index)
    victim, survivor = workers
    assert by_worker[victim]
    assert by_worker[survivor]

    os.kill(victim, signal.SIGKILL)
    for index in by_worker[victim]:
        with pytest.raises(ConnectionLost):
            clients[index].echo(b"are you there")
    for index in by_worker[survivor]:
        assert clients[index].echo(b"still here") == b"still here"

    status = daemon.settled_status(
        lambda s: (
            len([w for w in s["workers"] if w["state"] == "running"]) == 2
            and victim not in {w["pid"] for w in s["workers"]}
        )
    )
    assert status["respawns"] == 1
    fresh = next(w["pid"] for w in status["workers"] if w["pid"] != survivor)
    for client in clients:
        client.close()
    wait_for(lambda: fd_count(daemon.pid) == master_baseline, what="master fd count back to baseline")
    wait_for(lambda: fd_count(fresh) == worker_baseline, what="new worker fd count at baseline")
    assert "killed by SIGKILL" in daemon.log()


def test_a_hung_worker_is_killed_and_replaced(socket_dir: Path) -> None:
    daemon = Daemon(socket_dir, "--worker-timeout", "1", workers=2).start()
    try:
        victim = daemon.worker_pids()[0]
        os.kill(victim, signal.SIGSTOP)
        wait_for(
            lambda: victim not in children(daemon.pid), timeout=15, what="the stopped worker to be reaped"
        )
        daemon.settled_status(lambda s: len([w for w in s["workers"] if w["state"] == "running"]) == 2)
        assert "has not answered" in daemon.log()
    finally:
        assert daemon.stop() == 0


def test_workers_exit_when_the_master_dies(daemon: Daemon) -> None:
    workers = daemon.worker_pids()
    assert daemon.proc is not None
    os.kill(daemon.pid, signal.SIGKILL)
    daemon.proc.wait(10)

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    for pid in workers:
        wait_for(functools.partial(gone, pid), timeout=10, what=f"orphaned worker {pid} to exit")


def test_reload_replaces_workers_and_drains_the_old(socket_dir: Path, short_tmp: Path) -> None:
    config = short_tmp / "ipcd.toml"
    config.write_text("workers = 1\n")
    daemon = Daemon(socket_dir, "--config", str(config), workers=None).start()
    try:
        old = daemon.worker_pids()
        assert len(old) == 1
        held = daemon.client()
        assert held.echo(b"before") == b"before"

        config.write_text("workers = 3\n")
        daemon.signal(signal.SIGHUP)
        status = daemon.settled_status(
            lambda s: len([w for w in s["workers"] if w["state"] == "running" and w["generation"] == 2]) == 3
        )
        new = {w["pid"] for w in status["workers"] if w["generation"] == 2}
        assert status["served_by"] in new  # new connections go to the new generation
        draining = [w for w in status["workers"] if w["state"] == "draining"]
        assert [w["pid"] for w in draining] == old
        assert held.echo(b"during") == b"during"  # the old worker finishes its work

        held.close()
        daemon.settled_status(lambda s: {w["pid"] for w in s["workers"]} == new)
        wait_for(lambda: old[0] not in children(daemon.pid), what="drained worker to exit")
    finally:
        assert daemon.stop() == 0


def test_reload_drain_timeout_closes_lingering_connections(daemon_args: list[str], socket_dir: Path) -> None:
    daemon = Daemon(socket_dir, *daemon_args, workers=1).start()
    try:
        held = daemon.client()
        held.echo(b"x")
        daemon.signal(signal.SIGHUP)
        started = time.monotonic()

        def keep_talking() -> None:
            while time.monotonic() - started < 10:
                held.echo(b"still?")
                time.sleep(0.05)

        with pytest.raises((ConnectionLost, ServerError)) as caught:
            keep_talking()
        assert "drain timeout" in str(caught.value)
        held.close()
    finally:
        assert daemon.stop() == 0


def test_a_reload_sends_idle_listeners_away_at_once_and_lets_requests_finish(socket_dir: Path) -> None:
    """Old workers retire at a reload: a room member with nothing in flight
    is told at once (not at the drain timeout, never reached here) that it
    should reconnect; a member waiting for a reply gets the reply first; a
    connection that is not listening is served until it closes."""
    daemon = Daemon(socket_dir, "--drain-timeout", "3600", workers=1).start()
    listener, waiter, held = daemon.client(), daemon.client(), daemon.client()
    try:
        listener.join("news")
        waiter.join("news")
        get = waiter.send(Op.GET, encode_json({"name": "later", "wait": 60}))
        assert held.echo(b"x") == b"x"
        old = daemon.worker_pids()

        daemon.signal(signal.SIGHUP)
        notice = sent_away(listener)
        assert notice.code == ErrorCode.SHUTTING_DOWN
        assert str(notice) == (
            "ipcd reloaded and this connection's worker is retiring; reconnect to reach the new workers"
        )
        assert held.echo(b"still served") == b"still served"

        read_end, write_end = os.pipe()
        try:
            with daemon.client() as putter:  # a new connection: served by the new generation
                putter.put("later", [read_end])
        finally:
            os.close(read_end)
            os.close(write_end)
        reply = waiter.wait_reply(get)
        assert reply.op == Op.GET_REPLY
        os.close(*reply.fds)
        assert "reconnect to reach the new workers" in str(sent_away(waiter))  # idle now: sent away too

        held.close()
        daemon.settled_status(lambda s: not set(old) & {w["pid"] for w in s["workers"]})
    finally:
        for client in (listener, waiter, held):
            client.close()
        assert daemon.stop() == 0


def sent_away(client: Client) -> ConnectionLost:
    """How the daemon closed ``client``'s connection, past the notices
    (joins) it delivered before."""
    while True:
        try:
            event = client.next_event(timeout=10)
        except ConnectionLost as exc:
            return exc
        assert event.kind == "notice", event


@pytest.fixture
def daemon_args() -> list[str]:
    return ["--drain-timeout", "0.5"]


def test_bad_config_on_reload_keeps_the_running_one(socket_dir: Path, short_tmp: Path) -> None:
    config = short_tmp / "ipcd.toml"
    config.write_text("workers = 1\n")
    daemon = Daemon(socket_dir, "--config", str(config), workers=None).start()
    try:
        pids = daemon.worker_pids()
        config.write_text("workers = 'many'\n")
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: "reload refused" in daemon.log(), what="the refusal in the log")
        assert daemon.worker_pids() == pids
        with daemon.client() as client:
            assert client.echo(b"ok") == b"ok"
    finally:
        assert daemon.stop() == 0


def test_workers_failing_at_boot_stop_the_daemon(short_tmp: Path) -> None:
    """An in-place upgrade that broke the worker module: the first generation
    booted, every respawn fails. The daemon must stop with a clear error."""
    package = short_tmp / "pkg"
    shutil.copytree(
        Path(__file__).resolve().parents[2] / "ipcd",
        package / "ipcd",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    daemon = Daemon(
        short_tmp / "s", workers=1, env={"PYTHONPATH": str(package), "PYTHONDONTWRITEBYTECODE": "1"}
    )
    daemon.cwd = short_tmp  # python -m puts the cwd first on sys.path
    daemon.start()
    try:
        (package / "ipcd" / "server" / "worker.py").write_text("this is not python\n")
        os.kill(daemon.worker_pids()[0], signal.SIGKILL)
        assert daemon.proc is not None
        try:
            code = daemon.proc.wait(30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the daemon kept running:\n{daemon.log()}")
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.kill_all()
    assert code == 3
    log = daemon.log()
    assert "workers keep failing to boot (5 in a row" in log
    assert log.count("failed to boot") >= 5
    assert not daemon.stream_path.exists()


def test_config_file_and_env_and_flags_precedence(short_tmp: Path) -> None:
    config = short_tmp / "ipcd.toml"
    config.write_text("workers = 3\nmax-frame-size = '64K'\n")
    env = {**os.environ, "IPCD_WORKERS": "2"}
    daemon = Daemon(short_tmp / "s", "--config", str(config), workers=None, env=env)
    daemon.workers = 2
    daemon.start()
    try:
        assert len(daemon.worker_pids()) == 2  # environment beats the file
    finally:
        assert daemon.stop() == 0
    flags = Daemon(short_tmp / "s", "--config", str(config), workers=1, env=env)
    flags.start()
    try:
        assert len(flags.worker_pids()) == 1  # the flag beats the environment
        with flags.client() as client:
            with pytest.raises(ServerError) as too_big:
                client.echo(b"x" * 70_000)
            assert too_big.value.code == ErrorCode.TOO_LARGE
    finally:
        flags.stop()


def test_serve_help_documents_every_setting() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ipcd.cli.ipcd", "serve", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for spec in OPTIONS:
        assert spec.flag in out
        assert spec.envvar in out


def test_master_out_of_fds_pauses_accepting_and_recovers(daemon: Daemon) -> None:
    """EMFILE on accept: the listener stays readable, so a naive loop would
    spin at 100% CPU. The master must pause, log, and serve once fds free up."""
    limit = fd_count(daemon.pid)
    hard = int(
        subprocess.run(
            ["prlimit", "--noheadings", "--output=HARD", "--nofile", f"--pid={daemon.pid}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    subprocess.run(["prlimit", f"--nofile={limit}:", f"--pid={daemon.pid}"], check=True)
    waiting = raw_connect(daemon)  # queued in the backlog; accept fails with EMFILE
    try:
        waiting.sendall(encode_frame(Op.ECHO, 7, b"patience"))
        wait_for(lambda: "pausing accepts" in daemon.log(), what="the EMFILE pause in the log")
        cpu_before = _cpu_ticks(daemon.pid)
        time.sleep(0.5)
        assert _cpu_ticks(daemon.pid) - cpu_before < 25  # < 0.25 s of CPU in 0.5 s: no busy loop
        subprocess.run(["prlimit", f"--nofile={hard}:", f"--pid={daemon.pid}"], check=True)
        reply = waiting.recv(100)
        assert reply == encode_frame(Op.ECHO_REPLY, 7, b"patience")
    finally:
        waiting.close()


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime
