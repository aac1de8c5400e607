"""New connections: connect, one ECHO, close, against the raw baseline.

Theory of operation
-------------------
Every ``ipcctl`` call is a new connection, so what a connection costs the
server (the master accepts and passes it, a worker adopts, serves and drops
it) is a figure of its own, apart from echo on an open connection. The load
generator is C (compiled here with gcc, our own code from the frame format
of docs/protocol.md), two processes each making connections one after the
other as fast as they go, so that the client is not what limits the
server. Rounds alternate between ipcd and the raw pre-forked Python server;
the table gives connections per second and the servers' CPU time per
connection (from /proc, master and workers together), medians of the rounds.
"""

from __future__ import annotations

import statistics
import subprocess
import time
from pathlib import Path

from benchmarks.cbuild import compile_c
from benchmarks.echo import Settings, progress
from benchmarks.load import BenchError
from benchmarks.report import Table
from benchmarks.servers import Server

CLIENTS = 2
ROUNDS = 5

_C_CONNECT = r"""
/* connect, one ECHO, close; N times. Prints the number served. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: c-connect STREAM_SOCKET N\n"); return 2; }
    int n = atoi(argv[2]), served = 0;
    static const unsigned char frame[21] = {
        'I', 'P', 1, 0x02 /* ECHO */, 0, 0, 0, 0, 0, 0, 0, 1 /* id */, 0, 0, 0, 5, 'h', 'e', 'l', 'l', 'o'};
    unsigned char reply[64];
    struct sockaddr_un addr = { .sun_family = AF_UNIX };
    strncpy(addr.sun_path, argv[1], sizeof addr.sun_path - 1);
    for (int i = 0; i < n; i++) {
        int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) { perror("connect"); return 69; }
        if (write(fd, frame, sizeof frame) != (ssize_t)sizeof frame) { perror("write"); return 69; }
        size_t got = 0;
        while (got < sizeof frame) {
            ssize_t k = read(fd, reply + got, sizeof reply - got);
            if (k <= 0) break;
            got += (size_t)k;
        }
        /* ipcd answers ECHO_REPLY (0x82); the raw baseline sends the bytes back */
        served += got == sizeof frame && (reply[3] == 0x82 || reply[3] == 0x02);
        close(fd);
    }
    printf("%d\n", served);
    return 0;
}
"""


def _compile(work: Path) -> Path:
    source = work / "c_connect.c"
    source.write_text(_C_CONNECT)
    return compile_c(source, work / "c_connect", "connect")


def _round(binary: Path, server: Server, each: int) -> tuple[float, float]:
    """(connections/s, server CPU seconds per connection) of one round."""
    cpu_before = server.cpu_seconds()
    start = time.perf_counter()
    procs = [
        subprocess.Popen([str(binary), server.stream_path, str(each)], stdout=subprocess.PIPE)
        for _ in range(CLIENTS)
    ]
    served = 0
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        if proc.returncode != 0:
            raise BenchError(f"connect: the load generator exited {proc.returncode} against {server.name}")
        served += int(out)
    wall = time.perf_counter() - start
    cpu = server.cpu_seconds() - cpu_before
    if served != CLIENTS * each:
        raise BenchError(f"connect: {server.name} served {served} of {CLIENTS * each} connections")
    return served / wall, cpu / served


def connect(ipcd: Server, raw: Server, s: Settings, problems: list[str]) -> Table:
    binary = _compile(Path(ipcd.socket_dir).parent)
    each = 2000 if s.duration < 2 else 10000
    progress(f"connect: {ROUNDS} rounds of {CLIENTS} x {each} connections, ipcd and raw in turn")
    _round(binary, ipcd, 200)  # warm up both
    _round(binary, raw, 200)
    results: dict[str, list[tuple[float, float]]] = {"ipcd": [], "raw": []}
    for _ in range(ROUNDS):
        for server in (ipcd, raw):
            results[server.name].append(_round(binary, server, each))
    rate = {name: statistics.median(r[0] for r in rounds) for name, rounds in results.items()}
    cpu = {name: statistics.median(r[1] for r in rounds) * 1e6 for name, rounds in results.items()}
    title = f"new connections: connect, one ECHO, close; {CLIENTS} C clients, median of {ROUNDS} rounds"
    table = Table("connect", title)
    table.add("connections", "conn/s", rate["ipcd"], rate["raw"], "higher")
    table.add("server CPU per connection", "us", cpu["ipcd"], cpu["raw"], "lower")
    table.notes.append("server CPU: master and workers (ipcd) or all processes (raw), from /proc")
    return table
