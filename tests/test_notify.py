"""sd_notify: READY=1, STATUS=, RELOADING=1, STOPPING=1 on a real notify socket.

A datagram socket stands where systemd's would be: the daemon speaks the
real protocol to it (NOTIFY_SOCKET), and workers must not inherit it."""

from __future__ import annotations

import signal
import socket
from pathlib import Path

from ipcd.fdpass import enable_credentials, recv_with_fds
from tests.daemon import Daemon, wait_for


def test_notify_ready_status_reload_and_stop(short_tmp: Path) -> None:
    notify_path = short_tmp / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify_path))
    listener.settimeout(15)
    enable_credentials(listener)
    messages: list[str] = []
    senders: set[int] = set()

    def until(text: str) -> None:
        while not any(text in m for m in messages):
            got = recv_with_fds(listener, 4096)
            assert got.creds is not None
            senders.add(got.creds.pid)
            messages.append(got.data.decode())

    daemon = Daemon(short_tmp / "s", workers=2, env={"NOTIFY_SOCKET": str(notify_path)})
    try:
        daemon.start()
        until("READY=1")
        ready = next(m for m in messages if "READY=1" in m)
        assert f"MAINPID={daemon.pid}" in ready
        assert "STATUS=2 workers" in ready
        messages.clear()
        daemon.signal(signal.SIGHUP)
        until("RELOADING=1")
        until("READY=1")
        messages.clear()
        daemon.signal(signal.SIGTERM)
        until("STOPPING=1")
        assert senders == {daemon.pid}  # workers never talk to the manager
        assert daemon.stop() == 0
    finally:
        listener.close()
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.kill_all()


def test_watchdog_pings_at_half_the_interval(short_tmp: Path) -> None:
    notify_path = short_tmp / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify_path))
    listener.settimeout(15)
    env = {"NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "1000000"}
    daemon = Daemon(short_tmp / "s", workers=1, env=env)
    try:
        daemon.start()
        pings = wait_for(
            lambda: listener.recv(4096).decode().count("WATCHDOG=1") or None,
            timeout=10,
            what="a watchdog ping",
        )
        assert pings >= 1
    finally:
        listener.close()
        assert daemon.stop() == 0
