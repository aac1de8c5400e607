"""Shared fixtures: a short temporary socket dir (AF_UNIX paths are limited
to 108 bytes, too short for pytest's tmp_path) and a running daemon."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon import Daemon


@pytest.fixture(autouse=True)
def own_state_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test's daemons keep their history journal in a state dir of the
    test's own (the default, ~/.local/state/ipcd or /var/lib/ipcd, is shared
    by everything on the machine)."""
    path = tmp_path_factory.mktemp("state") / "ipcd"
    monkeypatch.setenv("IPCD_STATE_DIR", str(path))
    return path


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ipcd-t", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def socket_dir(short_tmp: Path) -> Path:
    return short_tmp / "s"


@pytest.fixture
def daemon(socket_dir: Path) -> Iterator[Daemon]:
    """A daemon with 2 workers; the test fails if it does not stop cleanly."""
    running = Daemon(socket_dir, workers=2).start()
    try:
        yield running
    finally:
        if running.proc is not None and running.proc.poll() is None:
            code = running.stop()
            assert code == 0, f"ipcd exited {code} on SIGTERM:\n{running.log()}"
