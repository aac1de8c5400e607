"""Memory per idle connection: ipcd against the raw echo server.

Each connection does one echo round trip (so the daemon has really adopted
it and created whatever a used connection keeps), then sits idle. The cost
is the growth of the servers' resident memory (master plus workers) divided
by the number of connections. Kernel socket buffers are not in RSS and are
the same for both servers.
"""

from __future__ import annotations

import resource
import socket

from benchmarks.echo import Settings, progress
from benchmarks.report import Table
from benchmarks.servers import Server, _children
from ipcd.protocol import Op, encode_frame


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def server_rss(server: Server) -> int:
    assert server.proc is not None
    return sum(_rss_bytes(pid) for pid in (server.proc.pid, *_children(server.proc.pid)))


def _open_idle(server: Server, count: int) -> list[socket.socket]:
    frame = encode_frame(Op.ECHO, 1, b"x" * 16)
    conns = []
    for _ in range(count):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(server.stream_path)
        sock.sendall(frame)
        got = b""
        while len(got) < len(frame):
            chunk = sock.recv(len(frame) - len(got))
            if not chunk:
                raise ConnectionError(f"{server.name} closed an idle-test connection")
            got += chunk
        conns.append(sock)
    return conns


def idle(ipcd: Server, raw: Server, s: Settings, problems: list[str]) -> Table:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    count = min(2_000 if s.duration < 2 else 10_000, hard - 200)
    if soft < count + 100:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    table = Table("idle", f"memory per idle connection, {count:,} connections after one echo each")
    per_conn: dict[str, float] = {}
    for server in (ipcd, raw):
        progress(f"idle: {server.name}: opening {count:,} connections")
        before = server_rss(server)
        conns = _open_idle(server, count)
        try:
            after = server_rss(server)
        finally:
            for conn in conns:
                conn.close()
        per_conn[server.name] = (after - before) / count
        progress(f"idle: {server.name}: {per_conn[server.name]:,.0f} bytes per connection")
    table.add("server RSS per connection", "bytes", per_conn["ipcd"], per_conn["raw"], "lower")
    table.notes.append(
        f"at this rate 100,000 idle connections cost ipcd {per_conn['ipcd'] * 100_000 / 2**20:,.0f} MiB "
        "of user-space memory (plus kernel socket buffers)"
    )
    return table
