"""``ipcd serve`` under ``systemd-socket-activate``: socket activation
without a manager. One activator listens on one socket type (``-d`` is
global), so two are chained: the outer one binds stream.sock and, on the
first connection, execs the inner one, which binds dgram.sock, passes both
on (``--fdname`` names them all) and execs the daemon with the pending
connection still queued. Same pid all the way down."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon import IPCCTL, children
from tests.systemd.manager import wait_until

ACTIVATE = shutil.which("systemd-socket-activate")
pytestmark = pytest.mark.skipif(ACTIVATE is None, reason="needs systemd-socket-activate")


def ipcctl(socket_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*IPCCTL, "--socket-dir", str(socket_dir), "--timeout", "20", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def activated(short_tmp: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    assert ACTIVATE is not None
    socket_dir = short_tmp / "s"
    socket_dir.mkdir(mode=0o755)
    stream, dgram = socket_dir / "stream.sock", socket_dir / "dgram.sock"
    command = [
        *(ACTIVATE, "-l", str(stream), "--fdname=stream"),
        *(ACTIVATE, "-l", str(dgram), "--datagram", "--fdname=stream:dgram"),
        *(sys.executable, "-m", "ipcd.cli.ipcd", "serve", "--socket-dir", str(socket_dir), "--workers", "2"),
        *("--state-dir", str(short_tmp / "state")),  # IPCD_STATE_DIR is dropped below
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_", "IPCD_"))}
    with (short_tmp / "ipcd.log").open("wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=log, env=env)
    try:
        # The activator says nothing we could wait on but this: the path appears once it listens.
        wait_until(lambda: stream.exists() or proc.poll() is not None, 10.0, "the activator to listen")
        assert proc.poll() is None, (short_tmp / "ipcd.log").read_text()
        yield proc, socket_dir
    finally:
        if proc.poll() is None:
            for pid in [*children(proc.pid), proc.pid]:
                os.kill(pid, signal.SIGKILL)
            proc.wait(10)


def test_serve_under_systemd_socket_activate(activated: tuple[subprocess.Popen[bytes], Path]) -> None:
    proc, socket_dir = activated
    log = socket_dir.parent / "ipcd.log"
    first = ipcctl(socket_dir, "echo", "first", "connection")
    assert (first.returncode, first.stdout) == (0, "first connection\n"), first.stderr + log.read_text()
    dgram = ipcctl(socket_dir, "echo", "--dgram", "by datagram")
    assert (dgram.returncode, dgram.stdout) == (0, "by datagram\n"), dgram.stderr + log.read_text()

    # The activators exec'ed the daemon: same pid, which LISTEN_PID names.
    with open(f"/proc/{proc.pid}/cmdline", "rb") as fh:
        assert b"ipcd.cli.ipcd" in fh.read()
    assert len(children(proc.pid)) == 2

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0, log.read_text()
    # Not the daemon's sockets: it must leave them where they are.
    assert (socket_dir / "stream.sock").exists()
    assert (socket_dir / "dgram.sock").exists()
