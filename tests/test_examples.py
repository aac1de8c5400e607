"""Every example runs against a real daemon and does what its docstring says."""

from __future__ import annotations

import subprocess
import sys

from tests.daemon import REPO, Daemon


def test_pipelined_echo_example(daemon: Daemon) -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "examples" / "pipelined_echo.py"),
            "--socket-dir",
            str(daemon.socket_dir),
            "-n",
            "5000",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("5000 pipelined echoes in ")
