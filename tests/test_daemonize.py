"""ipcd start / stop / status: background mode with python-daemon."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
from pathlib import Path

from tests.daemon import Daemon, ipcctl, run_cli_as, wait_for

IPCD = [sys.executable, "-m", "ipcd.cli.ipcd"]


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*IPCD, *args], capture_output=True, text=True, timeout=60, check=False, env=env)


def test_start_status_stop_with_a_stale_pidfile(short_tmp: Path) -> None:
    socket_dir = short_tmp / "s"
    pidfile = short_tmp / "ipcd.pid"
    log = short_tmp / "ipcd.log"
    pidfile.write_text("999999\n")  # a stale pidfile: no such process
    started = _run(
        "start",
        "--socket-dir",
        str(socket_dir),
        "--workers",
        "1",
        "--pidfile",
        str(pidfile),
        "--log-file",
        str(log),
    )
    assert started.returncode == 0, started.stderr
    pid = int(wait_for(lambda: pidfile.read_text().strip() if pidfile.exists() else None, what="the pidfile"))
    assert pid != 999999
    assert os.getsid(pid) != os.getsid(0)  # detached into its own session
    assert ipcctl(socket_dir, "echo", "from the background").stdout == "from the background\n"

    status = _run("status", "--socket-dir", str(socket_dir), "--pidfile", str(pidfile))
    assert status.returncode == 0
    assert f"master pid {pid}" in status.stdout

    again = _run("start", "--socket-dir", str(socket_dir), "--pidfile", str(pidfile))
    assert again.returncode == 1
    assert "already running" in again.stderr
    assert again.stderr.count("\n") == 1

    stopped = _run("stop", "--pidfile", str(pidfile))
    assert stopped.returncode == 0, stopped.stderr
    assert not pidfile.exists()
    assert not (socket_dir / "stream.sock").exists()
    assert "ipcd stopped" in log.read_text()
    gone = _run("status", "--socket-dir", str(socket_dir), "--pidfile", str(pidfile))
    assert gone.returncode == 3


def test_stop_with_a_stale_pidfile_cleans_it(short_tmp: Path) -> None:
    pidfile = short_tmp / "ipcd.pid"
    pidfile.write_text(f"{os.getpid()}\n")  # alive, but not an ipcd: stale all the same
    result = _run("stop", "--pidfile", str(pidfile))
    assert result.returncode == 0
    assert "stale pidfile" in result.stderr + result.stdout
    assert not pidfile.exists()


def test_start_reports_errors_before_detaching(short_tmp: Path) -> None:
    target = short_tmp / "real"
    target.mkdir()
    (short_tmp / "link").symlink_to(target)
    result = _run("start", "--socket-dir", str(short_tmp / "link"), "--pidfile", str(short_tmp / "p.pid"))
    assert result.returncode == 1
    assert "symlink" in result.stderr
    assert not (short_tmp / "p.pid").exists()


def test_stop_leaves_a_process_that_only_looks_like_ipcd_alone(short_tmp: Path) -> None:
    """A pidfile naming a live process whose command line merely mentions
    ipcd (here a path component) is stale: stop must not signal it."""
    decoy_dir = short_tmp / "ipcd"
    decoy_dir.mkdir()
    decoy = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", str(decoy_dir / "serve-ish")]
    )
    try:
        pidfile = short_tmp / "ipcd.pid"
        pidfile.write_text(f"{decoy.pid}\n")
        result = _run("stop", "--pidfile", str(pidfile), "--timeout", "1")
        assert result.returncode == 0
        assert "stale pidfile" in result.stderr + result.stdout
        assert decoy.poll() is None  # still running: never signalled
    finally:
        decoy.kill()
        decoy.wait(10)


def test_stop_and_status_find_the_default_pidfile_by_socket_dir(short_tmp: Path) -> None:
    """start, status and stop all default the pidfile to <socket dir>/ipcd.pid."""
    socket_dir = short_tmp / "s"
    log = short_tmp / "ipcd.log"
    started = _run("start", "--socket-dir", str(socket_dir), "--workers", "1", "--log-file", str(log))
    assert started.returncode == 0, started.stderr
    pidfile = socket_dir / "ipcd.pid"
    wait_for(pidfile.exists, what="the pidfile")
    status = _run("status", "--socket-dir", str(socket_dir))
    assert status.returncode == 0, status.stdout + status.stderr
    stopped = _run("stop", "--socket-dir", str(socket_dir))
    assert stopped.returncode == 0, stopped.stderr
    assert "stopped" in stopped.stdout
    assert not pidfile.exists()
    assert _run("status", "--socket-dir", str(socket_dir)).returncode == 3


def test_status_says_permission_denied_not_not_running(short_tmp: Path) -> None:
    """A user the socket's mode shuts out is told so (exit 4, LSB's
    "unknown"), not that ipcd is not running."""
    short_tmp.chmod(0o755)  # the socket's own mode is what shuts nobody out
    socket_dir = short_tmp / "s"
    daemon = Daemon(socket_dir, "--socket-mode", "0600", workers=1).start()
    try:
        code, out, err = _as_nobody(["status", "--socket-dir", str(socket_dir)])
        assert code == 4, (out, err)
        assert "not running" not in out + err
        lines = err.splitlines()
        assert len(lines) == 1, err
        assert "Permission denied" in lines[0]
        assert lines[0].lower().count("permission denied") == 1, lines[0]
    finally:
        assert daemon.stop() == 0


def _as_nobody(args: list[str]) -> tuple[int, str, str]:
    from ipcd.cli.ipcd import cli  # noqa: PLC0415

    nobody = pwd.getpwnam("nobody")
    return run_cli_as(nobody.pw_uid, nobody.pw_gid, lambda argv: cli.main(args=argv, prog_name="ipcd"), args)
