"""sd_notify: READY=1, STATUS=, RELOADING=1, STOPPING=1 on a real notify socket.

A datagram socket stands where systemd's would be: the daemon speaks the
real protocol to it (NOTIFY_SOCKET), and workers must not inherit it."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

from ipcd.fdpass import enable_credentials, recv_with_fds
from tests.daemon import Daemon


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


def test_watchdog_pings_at_a_flat_rate_of_twice_per_interval(short_tmp: Path) -> None:
    """WATCHDOG_USEC=1s: one WATCHDOG=1 every 0.5 s, and as many in the last
    seconds as in the first (a rescheduling bug once multiplied the timers:
    33 pings/s after 4 s, 112/s after 12 s)."""
    notify_path = short_tmp / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify_path))
    env = {"NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "1000000"}
    daemon = Daemon(short_tmp / "s", workers=1, env=env)
    window = 12.0
    try:
        daemon.start()
        pings: list[float] = []
        deadline = time.monotonic() + window
        while (left := deadline - time.monotonic()) > 0:
            listener.settimeout(left)
            try:
                data = listener.recv(4096).decode()
            except TimeoutError:
                break
            pings += [time.monotonic()] * data.count("WATCHDOG=1")
        first = sum(1 for t in pings if t < pings[0] + 4)
        last = sum(1 for t in pings if t >= deadline - 4)
        # 0.5 s apart: 8 in any 4 s (give or take scheduling), 24 in 12 s.
        assert 6 <= first <= 10, pings
        assert 6 <= last <= 10, pings
        assert 18 <= len(pings) <= 27, pings
        assert "not pinging the watchdog" not in daemon.log()  # healthy workers, every ping sent
    finally:
        listener.close()
        assert daemon.stop() == 0
