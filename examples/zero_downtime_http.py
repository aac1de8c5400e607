"""Zero-downtime restart: an HTTP server hands its listening socket to the next version.

    .venv/bin/python examples/zero_downtime_http.py [--port 8080] [--name web] [--label v1]
    kill -TERM <pid>      # hands the socket to ipcd, finishes in-flight requests, exits
    .venv/bin/python examples/zero_downtime_http.py --label v2    # takes the socket over

or, the socket-activation way (any server that honours LISTEN_FDS can do this)::

    ipcctl take web -- .venv/bin/python examples/zero_downtime_http.py --label v2

On start the server uses, in this order: a socket passed by socket
activation (``LISTEN_FDS``/``LISTEN_PID``, fd 3), the socket stored in ipcd
under ``--name`` (``Client.take``; with ``--wait SECS`` it waits that long
for the old version to hand it over), or a new socket bound to
``--host``/``--port``. It prints one line, ``serving on HOST:PORT pid=PID
label=LABEL (how it got the socket)``, when it accepts connections, and
answers every GET with ``LABEL pid=PID`` (``GET /?delay=SECS``: slowly).

On SIGTERM it first PUTs the listening socket into ipcd (``replace=True``),
prints ``handed over ...``, then stops accepting, finishes the requests in
flight and exits. The listening socket itself never closes: ipcd holds a
copy, so a connection that arrives while no process is accepting completes
its TCP handshake in the kernel and waits in the socket's listen backlog
until the next version accepts it. None is refused. SIGINT (Ctrl-C) stops
without handing over; ``ipcctl rm NAME`` forgets a socket nobody will take.

Uses only the standard library and ipcd.client; ``IPCD_SOCKET_DIR`` or
``--socket-dir`` selects the daemon.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from socketserver import ThreadingMixIn
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ipcd.client import Client, ClientError, ServerError
from ipcd.protocol import ErrorCode

SD_LISTEN_FDS_START = 3
BACKLOG = 1024  # connections that may wait in the kernel while no version accepts


class Server(ThreadingMixIn, HTTPServer):
    """One thread per request; ``server_close`` waits for all of them
    (``ThreadingHTTPServer`` would not: its threads are daemons)."""

    daemon_threads = False
    block_on_close = True
    label = "http"

    def __init__(self, sock: socket.socket, label: str) -> None:
        super().__init__(sock.getsockname()[:2], Handler, bind_and_activate=False)
        self.socket.close()  # the unbound socket HTTPServer made; use the one we were given
        self.socket = sock
        self.label = label


class Handler(BaseHTTPRequestHandler):
    server: Server
    protocol_version = "HTTP/1.0"  # one request per connection: a restart never strands a keep-alive
    timeout = 10  # a client that sends nothing cannot hold up a restart for long

    def do_GET(self) -> None:
        """``LABEL pid=PID``; with ``?delay=SECS`` (at most 30) the headers come
        at once and the body SECS later: a slow request, to watch a restart
        finish it."""
        try:
            delay = float(parse_qs(urlsplit(self.path).query).get("delay", ["0"])[0])
        except ValueError:
            delay = -1.0
        if not 0 <= delay <= 30:
            self.send_error(400, "delay must be a number of seconds from 0 to 30")
            return
        body = f"{self.server.label} pid={os.getpid()}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()  # sends the headers
        if delay:
            time.sleep(delay)
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet; a real service would log to the journal


def activated_socket() -> socket.socket | None:
    """The listening socket passed by socket activation (sd_listen_fds(3)), if any."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or not os.environ.get("LISTEN_FDS"):
        return None
    count = int(os.environ["LISTEN_FDS"])
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(key, None)  # not for our children
    if count != 1:
        raise SystemExit(f"zero_downtime_http: expected 1 socket in LISTEN_FDS, got {count}")
    os.set_inheritable(SD_LISTEN_FDS_START, False)
    return socket.socket(fileno=SD_LISTEN_FDS_START)


def stored_socket(client: Client, name: str, wait: float) -> socket.socket | None:
    """The listening socket the previous version stored in ipcd as ``name``, if any."""
    try:
        handoff = client.take(name, wait)
    except ServerError as exc:
        if exc.code in (ErrorCode.NOT_FOUND, ErrorCode.TIMED_OUT):
            return None
        raise
    first, *rest = handoff.fds
    for fd in rest:
        os.close(fd)
    return socket.socket(fileno=first)


def new_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(BACKLOG)
    return sock


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket-dir", default=None, help="where ipcd's sockets are (default /tmp/ipcd)")
    parser.add_argument("--name", default="web", help="name of the socket in ipcd (default web)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind if no socket is handed over")
    parser.add_argument("--port", type=int, default=8080, help="port to bind (0: any) if none is handed over")
    parser.add_argument("--label", default="http", help="version label put in every response")
    parser.add_argument("--wait", type=float, default=0.0, help="wait up to SECS for a socket to take")
    args = parser.parse_args()

    # Signals are received by sigwait() in the main thread only: block them
    # before any thread starts (threads inherit the mask), so a SIGTERM that
    # comes early waits its turn.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        sock = activated_socket()
        source = "socket activation"
        if sock is None:
            with Client(args.socket_dir) as client:
                sock = stored_socket(client, args.name, args.wait)
            source = f"taken from ipcd as {args.name!r}"
        if sock is None:
            sock = new_socket(args.host, args.port)
            source = "newly bound"
    except (ClientError, OSError) as exc:
        print(f"zero_downtime_http: cannot get a listening socket: {exc}", file=sys.stderr)
        return 69
    # Every version shares this one open socket, so this flag is shared too:
    # a version that is stopping and one that is starting may both be woken
    # for the same connection, and the loser must get EAGAIN, not block.
    sock.setblocking(False)
    sock.listen(BACKLOG)  # the backlog is the socket's own: set it again whoever bound it

    server = Server(sock, args.label)
    host, port = sock.getsockname()[:2]
    # poll_interval bounds how long shutdown() waits for the accept loop to notice.
    loop = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="accept")
    loop.start()
    print(f"serving on {host}:{port} pid={os.getpid()} label={args.label} ({source})", flush=True)

    signum = signal.sigwait({signal.SIGTERM, signal.SIGINT})
    status = 0
    if signum == signal.SIGTERM:
        try:
            with Client(args.socket_dir) as client:
                client.put(args.name, [sock.fileno()], replace=True)
            print(f"handed over {host}:{port} to ipcd as {args.name!r}", flush=True)
        except ClientError as exc:
            print(f"zero_downtime_http: could not hand the socket over: {exc}", file=sys.stderr)
            status = 1
    server.shutdown()  # stop accepting; what is queued now waits for the next version
    loop.join()
    server.server_close()  # closes our copy of the socket, then joins the request threads
    return status


if __name__ == "__main__":
    sys.exit(main())
