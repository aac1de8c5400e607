"""The fan-out's client processes: C, built here with gcc, driven over pipes.

Theory of operation
-------------------
Python subscribers cost more CPU than Redis does to serve them, so a figure
measured with them is the clients' speed, not the server's. The clients are
one small C program (``fanout_client.c``, our own code from
docs/protocol.md and the RESP format) compiled once per run into the work
directory. A subscriber process holds many connections on one epoll set;
it says ``ready`` on stdout once all are subscribed, takes the start time
and, at the end, the number of messages published as lines on stdin, and
answers with one JSON object. The publisher answers with one JSON object
when it is done. A shared file of one 8-byte slot per subscriber process
carries how far its slowest connection has got, which the publisher reads
to stay at most ``MAX_LAG`` messages ahead.
"""

from __future__ import annotations

import contextlib
import json
import select
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.cbuild import compile_c
from benchmarks.load import BenchError

SOURCE = Path(__file__).with_name("fanout_client.c")


def compile_client(work: Path) -> Path:
    return compile_c(SOURCE, work / "fanout_client", "fanout")


def spawn(argv: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        bufsize=0,
        start_new_session=True,  # a Ctrl-C reaches only the harness, which ends them
    )


def ready(proc: subprocess.Popen[bytes], deadline: float) -> None:
    """Waits for a subscriber process's ``ready`` line."""
    assert proc.stdout is not None
    line = b""
    while not line.endswith(b"\n"):
        readable, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        chunk = proc.stdout.read(1) if readable else b""
        if not chunk:
            raise BenchError(f"a subscriber process did not get ready (exit code {proc.poll()})")
        line += chunk
    if line != b"ready\n":
        raise BenchError(f"a subscriber process failed: {_why(line)}")


def tell(proc: subprocess.Popen[bytes], value: float | int) -> None:
    assert proc.stdin is not None
    proc.stdin.write(b"%r\n" % value)


def result(proc: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise BenchError(f"a client process exited with {proc.returncode}")
    answer: dict[str, Any] = json.loads(out)
    if "error" in answer:
        raise BenchError(answer["error"])
    return answer


def _why(line: bytes) -> str:
    try:
        return str(json.loads(line)["error"])
    except (ValueError, KeyError):
        return repr(line[:200])


@contextlib.contextmanager
def reaped(procs: list[subprocess.Popen[bytes]]) -> Iterator[None]:
    """Kills and waits for every process in ``procs`` when the block ends."""
    try:
        yield
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    pipe.close()
