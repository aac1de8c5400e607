"""Room history and seqs across ``systemctl --user restart`` and a stop and
start, under a real user manager: the state dir systemd made
(StateDirectory=) and the memfd in its fd store, each on its own."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipcd.client import Client
from tests.systemd.manager import user_manager
from tests.systemd.test_manager import SERVICE, Installed, install

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not Path("/lib/systemd/systemd").exists(),
    reason="needs root (unshare -m) and systemd",
)


@pytest.fixture
def ipcd() -> Iterator[Installed]:
    """The user units in a fresh user manager, socket dir %t/ipcd."""
    with user_manager() as running:
        yield install(running, user=True, socket_dir="%t/ipcd")


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
    assert _send(ipcd, "ops", "three") == [3]

    ipcd.systemctl("stop", SERVICE)  # the fd store is emptied: the state file brings it back
    ipcd.start()
    assert _history(ipcd, "ops") == [(1, "one"), (2, "two"), (3, "three")]
    assert _send(ipcd, "ops", "four") == [4]


def test_the_fd_store_alone_brings_history_back_across_a_restart(ipcd: Installed) -> None:
    ipcd.start()
    _send(ipcd, "ops", "one", "two")
    _journal(ipcd).unlink()  # the state file is gone: only the memfd in the fd store has them
    _send(ipcd, "ops", "three")
    ipcd.systemctl("restart", SERVICE)
    assert _history(ipcd, "ops") == [(1, "one"), (2, "two"), (3, "three")]
    assert "from systemd's fd store" in ipcd.log_path.read_text(), ipcd.diagnose()
    assert _journal(ipcd).stat().st_size > 0  # and written to a fresh state file again
