"""Pipelining with ipcd.client: many requests in flight on one connection.

    .venv/bin/python examples/pipelined_echo.py [--socket-dir DIR] [-n COUNT]

Sends COUNT echo requests without waiting, then collects the replies by
request id, and checks each one. Prints the request rate it reached.
"""

from __future__ import annotations

import argparse
import sys
import time

from ipcd.client import Client, ClientError
from ipcd.protocol import Op


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket-dir", default=None, help="where ipcd's sockets are (default /tmp/ipcd)")
    parser.add_argument("-n", "--count", type=int, default=10_000, help="requests to pipeline")
    args = parser.parse_args()
    try:
        with Client(args.socket_dir) as client:
            start = time.perf_counter()
            sent = {client.send(Op.ECHO, f"message {i}".encode()): i for i in range(args.count)}
            for request_id, index in sent.items():
                reply = client.wait_reply(request_id)
                if reply.body != f"message {index}".encode():
                    print(f"pipelined_echo: reply {request_id} is wrong: {reply.body!r}", file=sys.stderr)
                    return 1
            elapsed = time.perf_counter() - start
    except ClientError as exc:
        print(f"pipelined_echo: {exc}", file=sys.stderr)
        return 69
    print(f"{args.count} pipelined echoes in {elapsed * 1000:.1f} ms ({args.count / elapsed:,.0f}/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
