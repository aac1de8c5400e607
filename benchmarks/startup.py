"""CLI start-up: wall time of whole ``ipcctl`` commands against ``python -c pass``.

Theory of operation
-------------------
Scripts call ``ipcctl`` in loops, so what one call costs is mostly the
interpreter starting and importing, not the round trip. The baseline is the
floor no Python client can go under: the same interpreter (the venv's, with
its site-packages and ``.pth`` files) running ``-c pass``. Each round runs
the baseline and then every command once, as a user would, through the
console script, against the running daemon; the rounds interleave so that
a burst of load from elsewhere on the machine hits every column alike, and
the medians are compared. ``python -c 'import click'`` is the floor of any
command written with click. A C client doing the same echo (compiled here
from the frame format of docs/protocol.md) shows what a client without an
interpreter costs. The environment is the caller's: on this machine that
includes ``PYTHONDONTWRITEBYTECODE=1``, so the figures hold only with the
bytecode ``make install`` compiled.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.cbuild import compile_c
from benchmarks.echo import Settings, progress
from benchmarks.load import BenchError
from benchmarks.report import Table
from benchmarks.servers import Server

RUN_TIMEOUT = 30.0

_C_ECHO = r"""
/* ipcctl echo TEXT, in C, from docs/protocol.md section 2 and 11. */
#include <arpa/inet.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

static int read_exact(int fd, uint8_t *buf, size_t n) {
    while (n) {
        ssize_t got = read(fd, buf, n);
        if (got <= 0) return -1;
        buf += got; n -= (size_t)got;
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: c-echo SOCKET_DIR TEXT\n"); return 2; }
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un addr = { .sun_family = AF_UNIX };
    snprintf(addr.sun_path, sizeof addr.sun_path, "%s/stream.sock", argv[1]);
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) { perror("connect"); return 69; }
    uint32_t len = (uint32_t)strlen(argv[2]), id = htonl(1), blen = htonl(len);
    uint8_t h[16] = { 'I', 'P', 1, 0x02 /* ECHO */, 0, 0, 0, 0 };
    memcpy(h + 8, &id, 4); memcpy(h + 12, &blen, 4);
    if (write(fd, h, 16) != 16 || write(fd, argv[2], len) != (ssize_t)len) { perror("write"); return 69; }
    uint8_t r[16], body[4096];
    if (read_exact(fd, r, 16) < 0) { fprintf(stderr, "no reply\n"); return 69; }
    uint32_t rlen; memcpy(&rlen, r + 12, 4); rlen = ntohl(rlen);
    if (r[3] != 0x82 || rlen > sizeof body || read_exact(fd, body, rlen) < 0) {
        fprintf(stderr, "unexpected reply op 0x%02x\n", r[3]); return 1;
    }
    fwrite(body, 1, rlen, stdout); fputc('\n', stdout);
    return 0;
}
"""


def _c_echo(work: Path, problems: list[str]) -> Path | None:
    """The C client, compiled with gcc; None (and a problem) without gcc."""
    source = work / "c_echo.c"
    source.write_text(_C_ECHO)
    try:
        return compile_c(source, work / "c_echo", "startup")
    except BenchError as exc:
        problems.append(f"{exc}, so no C client to compare with")
        return None


def _wall(argv: list[str], expect: bytes | None) -> float:
    """Seconds one run of ``argv`` takes, start to exit; it must succeed."""
    start = time.perf_counter()
    result = subprocess.run(
        argv, capture_output=True, stdin=subprocess.DEVNULL, timeout=RUN_TIMEOUT, check=False
    )
    elapsed = time.perf_counter() - start
    if result.returncode != 0 or (expect is not None and result.stdout != expect):
        raise BenchError(f"{argv[0]} exited {result.returncode}: {result.stderr.decode(errors='replace')}")
    return elapsed


def startup(ipcd: Server, raw: Server, s: Settings, problems: list[str]) -> Table:
    rounds = s.startup_rounds
    work = Path(ipcd.socket_dir).parent
    bin_dir = Path(sys.executable).parent
    ipcctl = [str(bin_dir / "ipcctl"), "--socket-dir", str(ipcd.socket_dir)]
    stored = work / "startup-put.txt"
    stored.write_text("stored by the startup benchmark\n")
    commands: dict[str, tuple[list[str], bytes | None]] = {
        "python -c 'import click'": ([sys.executable, "-c", "import click"], b""),
        "ipcctl echo hi": ([*ipcctl, "echo", "hi"], b"hi\n"),
        "ipcctl send hi": ([*ipcctl, "send", "--room", "bench", "hi"], b""),
        "ipcctl put": ([*ipcctl, "put", "startup-bench", str(stored), "--replace"], b""),
        "ipcctl status": ([*ipcctl, "status"], None),
    }
    c_echo = _c_echo(work, problems)
    if c_echo is not None:
        commands["C client echo hi"] = ([str(c_echo), str(ipcd.socket_dir), "hi"], b"hi\n")
    baseline_argv = [sys.executable, "-c", "pass"]
    progress(f"startup: {rounds} rounds of python -c pass and {len(commands)} commands")
    baseline: list[float] = []
    samples: dict[str, list[float]] = {name: [] for name in commands}
    for argv, expect in commands.values():  # warm the page cache; not measured
        _wall(argv, expect)
    for _ in range(rounds):
        baseline.append(_wall(baseline_argv, b""))
        for name, (argv, expect) in commands.items():
            samples[name].append(_wall(argv, expect))
    _wall([*ipcctl, "rm", "startup-bench"], b"")
    table = Table(
        "startup",
        f"whole command, start to exit, median of {rounds} interleaved rounds",
        columns=("command", "python -c pass"),
    )
    floor = statistics.median(baseline) * 1000
    for name, times in samples.items():
        table.add(name, "ms", statistics.median(times) * 1000, floor, "lower")
    table.notes.append(
        f"baseline: {Path(sys.executable).name} -c pass from the same venv; ratio = how many "
        "interpreter start-ups one command costs (aim: at most 2.5); importing click alone "
        "is the floor of any click command"
    )
    return table
