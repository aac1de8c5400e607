"""What a user checks first: echo, ping and status through ipcctl."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.daemon import Daemon, ipcctl


def test_echo_over_stream(daemon: Daemon) -> None:
    result = ipcctl(daemon.socket_dir, "echo", "hi")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hi\n"


def test_echo_joins_words_and_keeps_utf8(daemon: Daemon) -> None:
    result = ipcctl(daemon.socket_dir, "echo", "grüße", "aus", "Köln")
    assert result.stdout == "grüße aus Köln\n"


def test_echo_over_datagram(daemon: Daemon) -> None:
    result = ipcctl(daemon.socket_dir, "echo", "--dgram", "hi")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hi\n"


def test_echo_json(daemon: Daemon) -> None:
    result = ipcctl(daemon.socket_dir, "--json", "echo", "--dgram", "hi")
    doc = json.loads(result.stdout)
    assert doc["text"] == "hi"
    assert doc["transport"] == "dgram"


def test_ping_prints_statistics(daemon: Daemon) -> None:
    result = ipcctl(daemon.socket_dir, "ping", "-c", "100")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert sum(" seq=" in line for line in lines) == 100
    assert "100 requests transmitted, 100 received, 0% loss" in result.stdout
    assert "rtt min/avg/max/p99/mdev = " in result.stdout


def test_ping_json_over_datagram(daemon: Daemon) -> None:
    result = ipcctl(daemon.socket_dir, "--json", "ping", "--dgram", "-c", "20", "-s", "1000")
    doc = json.loads(result.stdout)
    assert doc["sent"] == 20
    assert doc["received"] == 20
    assert doc["size"] == 1000
    assert 0 < doc["min_ms"] <= doc["p99_ms"] <= doc["max_ms"]


def test_status_json_lists_every_worker(daemon: Daemon) -> None:
    result = ipcctl(daemon.socket_dir, "--json", "status")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["pid"] == daemon.pid
    assert doc["version"]
    assert doc["uptime"] >= 0
    workers = doc["workers"]
    assert len(workers) == 2
    for worker in workers:
        assert set(worker) >= {"pid", "connections", "rss"}
        assert worker["rss"] > 0
        os.kill(worker["pid"], 0)  # a live process
    assert doc["served_by"] in {w["pid"] for w in workers}
    assert doc["sockets"]["stream"] == str(daemon.stream_path)


def test_status_tells_a_client_the_limits_it_must_respect(short_tmp: Path) -> None:
    """A client written from the protocol doc can learn every limit that
    would refuse or cut it off, as the daemon was configured."""
    daemon = Daemon(
        short_tmp / "s", "--max-frame-size", "64K", "--max-fds", "4", "--max-outbuf", "1M", workers=1
    ).start()
    try:
        limits = daemon.status()["limits"]
        assert limits["max_frame_size"] == 65536
        assert limits["max_fds"] == 4
        assert limits["max_outbuf"] == 1 << 20
        assert limits["pause_reading_at"] == 256 * 1024
        assert limits["max_datagram"] == 256 * 1024
        assert limits["max_message"] == 16 * 1024
        assert limits["max_in_flight"] == 256
        assert limits["connection_fd_budget"] == 64  # 4 x max-fds, at least 64
        assert limits["channel_fd_budget"] == 256
        assert limits["channel_byte_budget"] == 8 << 20  # 2 x max-outbuf, at least 8 MiB
        assert limits["max_channel_backlog"] == 64 << 20
        assert limits["rate_burst"] == 2 * limits["rate_limit"]
        for key in ("history_size", "rooms_per_connection", "fd_quota", "rate_limit", "idle_timeout"):
            assert key in limits
    finally:
        assert daemon.stop() == 0


def test_status_human(daemon: Daemon) -> None:
    result = ipcctl(daemon.socket_dir, "status")
    assert result.returncode == 0
    assert f"master pid {daemon.pid}" in result.stdout
    for pid in daemon.worker_pids():
        assert str(pid) in result.stdout


def test_unreachable_daemon_exits_69_with_one_line(short_tmp: Path) -> None:
    result = ipcctl(short_tmp / "nowhere", "echo", "hi")
    assert result.returncode == 69
    assert result.stderr.count("\n") == 1
    assert "ipcd serve" in result.stderr


def test_socket_dir_from_environment(daemon: Daemon) -> None:
    env = {**os.environ, "IPCD_SOCKET_DIR": str(daemon.socket_dir)}
    result = subprocess.run(
        [sys.executable, "-m", "ipcd.cli.ipcctl", "echo", "env"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert result.stdout == "env\n", result.stderr


def test_sigterm_stops_cleanly_and_removes_sockets(daemon: Daemon) -> None:
    workers = daemon.worker_pids()
    daemon.signal(signal.SIGTERM)
    assert daemon.stop() == 0
    assert not daemon.stream_path.exists()
    assert not daemon.dgram_path.exists()
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
