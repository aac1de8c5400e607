"""Logs go to journald with structured fields when stderr is the journal.

A real journald is not running here, so this test stands one socket in for
it, in a private mount namespace (a tmpfs on /run/systemd): the daemon
speaks the journal's native protocol to /run/systemd/journal/socket, and the
test reads what it sent, field by field."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

_INSIDE = textwrap.dedent(
    """
    import os, socket, subprocess, sys, time
    sys.path[:0] = {paths!r}
    from ipcd.protocol import encode_frame
    os.makedirs("/run/systemd/journal", exist_ok=True)
    journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journal.bind("/run/systemd/journal/socket")
    journal.settimeout(15)
    log = open({log!r}, "wb")
    st = os.fstat(log.fileno())
    env = dict(os.environ, JOURNAL_STREAM=f"{{st.st_dev}}:{{st.st_ino}}")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "ipcd.cli.ipcd", "serve", "--socket-dir", {socket_dir!r}, "--workers", "1"],
        stderr=log, stdout=log, env=env,
    )
    path = os.path.join({socket_dir!r}, "stream.sock")
    deadline = time.monotonic() + 15
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)
    client = socket.socket(socket.AF_UNIX)
    client.connect(path)
    client.sendall(b"not a frame at all")  # a protocol error, logged with the peer's identity
    found = []
    try:
        while True:
            entry = journal.recv(65536)
            found.append(entry)
            if b"OPERATION=protocol-error" in entry:
                break
    finally:
        client.close()
        daemon.terminate()
        daemon.wait(15)
    sys.stdout.buffer.write(b"\\0".join(found))
    """
)


_MOUNT_AND_EXEC = (
    "mkdir -p /run/systemd && mount -t tmpfs tmpfs /run/systemd && "  # private: the host's /run is untouched
    'exec "$0" -c "$1"'
)


def test_protocol_error_is_logged_to_the_journal_with_peer_fields(short_tmp: Path) -> None:
    script = _INSIDE.format(
        paths=[p for p in sys.path if p], log=str(short_tmp / "stderr.log"), socket_dir=str(short_tmp / "s")
    )
    result = subprocess.run(
        [
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            _MOUNT_AND_EXEC,
            sys.executable,
            script,
        ],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    entries = result.stdout.split(b"\0")
    error = next(e for e in entries if b"OPERATION=protocol-error" in e)
    fields = dict(line.split(b"=", 1) for line in error.split(b"\n") if b"=" in line)
    assert fields[b"SYSLOG_IDENTIFIER"] == b"ipcd"
    assert fields[b"PEER_UID"] == b"0"
    assert int(fields[b"PEER_PID"]) > 0
    assert b"protocol error" in fields[b"MESSAGE"]
    assert b"PRIORITY" in fields
    # and nothing went to stderr: the journal took it
    assert b"protocol error" not in (short_tmp / "stderr.log").read_bytes()
