"""Room history and seqs across ``systemctl --user restart`` and a stop and
start, under a real user manager: in the state dir systemd made
(StateDirectory=), or without one in a memfd in systemd's fd store."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ipcd.client import Client
from ipcd.units import python_path
from tests.systemd.manager import UserManager
from tests.systemd.test_manager import SERVICE, Installed, install, ipcd, manager

__all__ = ["ipcd", "manager"]  # the fixtures, shared with test_manager

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not Path("/lib/systemd/systemd").exists(),
    reason="needs root (unshare -m) and systemd",
)


def _send(ipcd: Installed, room: str, *texts: str) -> list[int]:
    """Each text sent by ``ipcctl send``, acknowledged: its seq."""
    seqs = []
    for text in texts:
        result = ipcd.ipcctl("--json", "send", "--room", room, text)
        assert result.returncode == 0, result.stderr + ipcd.diagnose()
        seqs.append(json.loads(result.stdout)["seq"])
    return seqs


def _history(ipcd: Installed, room: str) -> list[tuple[int, str]]:
    with Client(ipcd.socket_dir, timeout=20) as client:
        return [(m["seq"], m["text"]) for m in client.history(room)]


def _journal(ipcd: Installed) -> Path:
    """In the unit's StateDirectory=: under $XDG_STATE_HOME, or $XDG_CONFIG_HOME
    for a user manager as old as this machine's (252)."""
    homes = (ipcd.manager.state_home, ipcd.manager.config_home)
    found = [home / "ipcd" / "history.journal" for home in homes if (home / "ipcd").is_dir()]
    assert len(found) == 1, f"no state dir (or two) made by StateDirectory= in {homes}"
    return found[0]


def test_restart_and_stop_start_keep_history_and_seq(ipcd: Installed) -> None:
    first = ipcd.start()
    assert _send(ipcd, "ops", "one") == [1]
    assert _send(ipcd, "ops", "two") == [2]
    assert _journal(ipcd).stat().st_size > 0, "the journal is in the unit's StateDirectory="

    ipcd.systemctl("restart", SERVICE)
    assert ipcd.main_pid() not in (0, first)
    assert _history(ipcd, "ops") == [(1, "one"), (2, "two")]
    assert f"restored 2 messages in 1 rooms from {_journal(ipcd)}" in ipcd.log_path.read_text()
    assert _send(ipcd, "ops", "three") == [3]  # the numbering goes on
    resumed = ipcd.ipcctl("--json", "listen", "--room", "ops", "--since", "1", "-n", "2")
    assert resumed.returncode == 0, resumed.stderr + ipcd.diagnose()
    assert [(m["seq"], m["text"]) for m in map(json.loads, resumed.stdout.splitlines())] == [
        (2, "two"),  # posted before the restart
        (3, "three"),
    ]

    ipcd.systemctl("stop", SERVICE)  # the fd store is emptied: the state file has it all
    ipcd.start()
    assert _history(ipcd, "ops") == [(1, "one"), (2, "two"), (3, "three")]
    assert _send(ipcd, "ops", "four") == [4]


def test_without_a_state_dir_the_fd_store_keeps_history_across_restarts_only(manager: UserManager) -> None:
    """--state-dir '': the journal is a memfd in systemd's fd store, which a
    restart (or a crash: Restart=on-failure) keeps and a stop empties."""
    serve = f"{python_path()} -I -m ipcd.cli.ipcd serve --socket-dir %t/ipcd --state-dir ''"
    ipcd = install(manager, user=True, socket_dir="%t/ipcd", extra=f"ExecStart=\nExecStart={serve}\n")
    ipcd.start()
    assert _send(ipcd, "ops", "one", "two") == [1, 2]
    ipcd.systemctl("restart", SERVICE)
    assert _history(ipcd, "ops") == [(1, "one"), (2, "two")]
    assert "restored 2 messages in 1 rooms from systemd's fd store" in ipcd.log_path.read_text(), (
        ipcd.diagnose()
    )
    assert _send(ipcd, "ops", "three") == [3]
    assert not any(ipcd.manager.root.rglob("history.journal")), "no state file was written"

    ipcd.systemctl("stop", SERVICE)
    ipcd.start()
    assert _send(ipcd, "ops", "a new start") == [1]  # the fd store was emptied by the stop
