"""``python -m benchmarks``: run the scenarios and print one table per scenario.

Everything the run starts (servers, client processes, the temp dir holding
their sockets and logs) is owned by an ``ExitStack`` and torn down on the
way out, whether the run ends normally, by an error, by Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from types import FrameType

from benchmarks import fanout, loop_choice, sendpipe
from benchmarks.echo import SCENARIOS, Settings, progress
from benchmarks.load import BenchError
from benchmarks.rawecho import accept_spread
from benchmarks.report import Table, print_json, print_text
from benchmarks.servers import Server, ServerError

ALL = [*SCENARIOS, "loop", "fanout", "send-pipe"]


def _parser() -> argparse.ArgumentParser:
    cpus = os.cpu_count() or 1
    default_ipcd = shlex.join([str(Path(sys.executable).parent / "ipcd"), "serve"])
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="ipcd benchmarks: each figure beside a baseline measured in the same run.",
    )
    p.add_argument(
        "--quick", action="store_true", help="short run (1 s windows, 2000 round trips, 10 start-up rounds)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    p.add_argument(
        "--only",
        action="append",
        choices=ALL,
        metavar="NAME",
        help=f"run only NAME ({', '.join(ALL)}); repeatable",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=cpus,
        help="daemon and baseline worker processes (default: %(default)s)",
    )
    p.add_argument(
        "--connections", type=int, default=32, help="throughput connections (default: %(default)s)"
    )
    p.add_argument(
        "--client-procs", type=int, default=cpus, help="throughput client processes (default: %(default)s)"
    )
    p.add_argument(
        "--window", type=int, default=16, help="requests in flight per connection (default: %(default)s)"
    )
    p.add_argument("--body", type=int, default=64, help="echo body size in bytes (default: %(default)s)")
    p.add_argument(
        "--duration", type=float, help="measured seconds per throughput run (default: 3, quick: 1)"
    )
    p.add_argument("--rounds", type=int, help="round trips per latency run (default: 20000, quick: 2000)")
    p.add_argument("--ipcd", default=default_ipcd, help="command that serves ipcd (default: %(default)s)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir with the server logs")
    return p


def _settings(args: argparse.Namespace) -> Settings:
    return Settings(
        workers=max(1, args.workers),
        conns=max(1, args.connections),
        client_procs=max(1, args.client_procs),
        window=max(1, args.window),
        body=max(0, args.body),
        warmup=0.3 if args.quick else 1.0,
        duration=args.duration or (1.0 if args.quick else 3.0),
        rounds=args.rounds or (2000 if args.quick else 20000),
        startup_rounds=10 if args.quick else 30,
    )


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through every cleanup


def _run(
    args: argparse.Namespace, s: Settings, work: Path, stack: contextlib.ExitStack
) -> tuple[list[Table], list[str]]:
    names = args.only or ALL
    tables: list[Table] = []
    problems: list[str] = []
    echo_names = [n for n in names if n in SCENARIOS]
    servers: list[Server] = []
    if echo_names:
        workers = ["--socket-dir", "{dir}", "--workers", str(s.workers)]
        specs = [
            ("ipcd", [*shlex.split(args.ipcd), *workers]),
            ("raw", [sys.executable, "-m", "benchmarks.rawecho", *workers]),
        ]
        for name, template in specs:
            sock_dir = work / name
            argv = [a.replace("{dir}", str(sock_dir)) for a in template]
            progress(f"starting {name}: {shlex.join(argv)}")
            try:
                server = stack.enter_context(Server(name, argv, sock_dir, work / f"{name}.log"))
            except (ServerError, OSError) as exc:
                problems.append(f"{name} did not start: {exc}")
                echo_names = []
                break
            progress(f"{name} ready: {server.processes()} processes")
            servers.append(server)
    for name in echo_names:
        try:
            tables.append(SCENARIOS[name](servers[0], servers[1], s, problems))
        except (BenchError, ServerError, OSError) as exc:
            problems.append(f"{name}: {exc}")
    for server in reversed(servers):
        progress(f"stopping {server.name}")
        code = server.stop()
        if code != 0:
            problems.append(f"{server.name} exited with {code} on SIGTERM (expected 0)")
        if server.leftovers:
            problems.append(
                f"{server.name}: {server.leftovers} processes still alive after the master exited"
            )
        problems += [f"{server.name} log: {line}" for line in server.complaints()]
        for table in tables:
            if server.name == "raw" and table.scenario == "throughput":
                spread = accept_spread(server.log_text())
                table.notes.append(f"raw baseline, connections accepted per worker over the run: {spread}")
    if "loop" in names:
        try:
            tables.append(loop_choice.scenario(work, s, problems))
        except (BenchError, ServerError, OSError) as exc:
            problems.append(f"loop: {exc}")
    if "fanout" in names:
        try:
            tables.extend(fanout.scenario(work, s, problems, shlex.split(args.ipcd)))
        except (BenchError, ServerError, OSError) as exc:
            problems.append(f"fanout: {exc}")
    if "send-pipe" in names:
        try:
            tables.append(sendpipe.scenario(work, s, problems, shlex.split(args.ipcd)))
        except (BenchError, ServerError, OSError, subprocess.TimeoutExpired) as exc:
            problems.append(f"send-pipe: {exc}")
    return tables, problems


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    s = _settings(args)
    signal.signal(signal.SIGTERM, _on_sigterm)
    with contextlib.ExitStack() as stack:
        work = Path(tempfile.mkdtemp(prefix="ipcd-bench-"))
        if args.keep:
            stack.callback(progress, f"logs kept in {work}")
        else:
            stack.callback(_rmtree, work)
        try:
            tables, problems = _run(args, s, work, stack)
        except KeyboardInterrupt:
            progress("interrupted; cleaning up")
            return 130
    (print_json if args.json else print_text)(tables, dataclasses.asdict(s), problems, sys.stdout)
    return 1 if problems else 0


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
