"""``ipcctl``: the command-line client of ipcd.

Exit codes: 0 ok; 1 the daemon refused; 2 usage; 69 daemon unreachable
(or untrusted: it may be an impostor); 75 timed out. Errors are one line on stderr: what happened, what to do.
"""

from __future__ import annotations

import pwd
import time
from pathlib import Path

import click

from ipcd import __version__
from ipcd.cli.common import (
    EXIT_TIMEOUT,
    Options,
    fail,
    handles_errors,
    interrupted,
    json_option,
    pass_options,
    run,
)
from ipcd.cli.lazygroup import LazyGroup
from ipcd.cli.pingstats import PingStats
from ipcd.client import RequestTimeout, uid_of
from ipcd.paths import DAEMON_UID_ENV, DEFAULT_SOCKET_DIR, SOCKET_DIR_ENV

# Commands in other modules, imported only when run (start-up time: see LazyGroup).
LAZY_COMMANDS = {
    "send": "ipcd.cli.chatcmds:send",
    "listen": "ipcd.cli.chatcmds:listen",
    "chat": "ipcd.cli.chatui:chat",
    "rooms": "ipcd.cli.chatcmds:rooms",
    "who": "ipcd.cli.chatcmds:who",
    "put": "ipcd.cli.handoffcmds:put",
    "get": "ipcd.cli.handoffcmds:get",
    "take": "ipcd.cli.handoffcmds:take",
    "ls": "ipcd.cli.handoffcmds:ls",
    "rm": "ipcd.cli.handoffcmds:rm",
    "completion": "ipcd.cli.completion:completion",
}


def _daemon_uid(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    """A user name or uid; the name is looked up only when one is given."""
    if not value:
        return None
    try:
        return uid_of(value)
    except KeyError:
        raise click.BadParameter(f"no such user: {value!r}; give a user name or a uid") from None


@click.group(
    cls=LazyGroup,
    lazy_commands=LAZY_COMMANDS,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, prog_name="ipcctl")
@click.option(
    "--socket-dir",
    type=click.Path(file_okay=False, path_type=Path),
    metavar="DIR",
    envvar=SOCKET_DIR_ENV,
    show_envvar=True,
    default=DEFAULT_SOCKET_DIR,
    show_default=True,
    help="Where the daemon's sockets are.",
)
@click.option("--json", "json_output", is_flag=True, help="One JSON object per result, for scripts.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.001),
    metavar="SECS",
    default=10.0,
    show_default=True,
    help="Seconds to wait for the daemon.",
)
@click.option(
    "--daemon-uid",
    metavar="USER",
    envvar=DAEMON_UID_ENV,
    show_envvar=True,
    callback=_daemon_uid,
    help="The user the daemon runs as (name or uid), besides root. "
    "Default: the socket dir's owner, which must be root or you.",
)
@click.pass_context
def cli(
    ctx: click.Context, socket_dir: Path, json_output: bool, timeout: float, daemon_uid: int | None
) -> None:
    """Talk to the ipcd daemon.

    Exit codes: 0 ok, 1 the daemon refused, 2 usage, 69 daemon unreachable
    (or what listens may be an impostor), 75 timed out, 130 interrupted (Ctrl-C).

    Before sending anything, ipcctl checks that the socket dir and every
    directory on the way to it can be changed only by root, you or the
    daemon's user, and that the daemon's uid (from the kernel) is root or
    --daemon-uid; otherwise it refuses (exit 69, code UNTRUSTED).

    Errors are one line on stderr. With --json (before or after the
    command), an error is one JSON object on one line of stderr instead:

    \b
      {"error": {"code": "NOT_FOUND", "exit_status": 1, "message": "..."}}

    where code is the daemon's error code (NOT_FOUND, PERMISSION_DENIED, ...)
    or USAGE, UNREACHABLE, UNTRUSTED, TIMED_OUT, CONNECTION_LOST, FAILED, EXEC_FAILED.
    """
    ctx.obj = Options(socket_dir, json_output, timeout, daemon_uid)


@cli.command()
@json_option
@click.option("--dgram", is_flag=True, help="Use the datagram socket.")
@click.argument("text", nargs=-1, required=True)
@pass_options
@handles_errors
def echo(opts: Options, dgram: bool, text: tuple[str, ...]) -> None:
    """Send TEXT to the daemon and print what comes back."""
    payload = " ".join(text).encode()
    maker = opts.datagram_client if dgram else opts.client
    with maker() as client:
        start = time.perf_counter()
        reply = client.echo(payload)
        rtt = time.perf_counter() - start
    if opts.json:
        opts.emit(
            {
                "text": reply.decode(errors="replace"),
                "bytes": len(reply),
                "transport": "dgram" if dgram else "stream",
                "rtt_ms": round(rtt * 1000, 4),
            }
        )
    else:
        click.echo(reply.decode(errors="replace"))


@cli.command()
@json_option
@click.option(
    "-c",
    "--count",
    type=click.IntRange(min=1),
    metavar="N",
    default=5,
    show_default=True,
    help="Requests to send.",
)
@click.option(
    "-s",
    "--size",
    type=click.IntRange(min=0, max=1 << 19),
    metavar="BYTES",
    default=56,
    show_default=True,
    help="Payload bytes per request.",
)
@click.option(
    "-i",
    "--interval",
    type=click.FloatRange(min=0),
    metavar="SECS",
    default=0.0,
    show_default=True,
    help="Seconds between requests.",
)
@click.option("-q", "--quiet", is_flag=True, help="Only the summary.")
@click.option("--dgram", is_flag=True, help="Use the datagram socket (lost replies count as loss).")
@pass_options
@handles_errors
def ping(opts: Options, count: int, size: int, interval: float, quiet: bool, dgram: bool) -> None:
    """Measure round trips to the daemon, like ping(8). Ctrl-C stops it:
    the statistics so far are printed, and it exits 130."""
    payload = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    stats = PingStats()
    maker = opts.datagram_client if dgram else opts.client
    target = str(opts.socket_dir / ("dgram.sock" if dgram else "stream.sock"))
    verbose = not quiet and not opts.json
    if verbose:
        click.echo(f"PING {target}: {size} data bytes")
    started = time.perf_counter()
    stopped = False  # by Ctrl-C: like ping(8), show the statistics so far, then exit 130
    with maker() as client:
        try:
            for seq in range(1, count + 1):
                try:
                    rtt = client.ping(payload)
                except RequestTimeout:
                    if not dgram:
                        raise
                    stats.sent += 1  # counted once answered or lost: an interrupted one is neither
                    if verbose:
                        click.echo(f"request seq={seq} timed out")
                    continue
                stats.sent += 1
                stats.rtts.append(rtt)
                if verbose:
                    click.echo(f"{size + 16} bytes from {target}: seq={seq} time={rtt * 1000:.3f} ms")
                if interval and seq < count:
                    time.sleep(interval)
        except KeyboardInterrupt:
            stopped = True
    elapsed = time.perf_counter() - started
    if opts.json:
        opts.emit(
            {"target": target, "transport": "dgram" if dgram else "stream", "size": size, **stats.summary()}
        )
    else:
        if verbose:
            click.echo("")
        for line in stats.lines(target, elapsed):
            click.echo(line)
    if stopped:
        interrupted()
    if not stats.received:
        fail(f"no replies from {target}", EXIT_TIMEOUT)


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{n} B"
        size /= 1024
    return f"{n} B"


def _human_duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{days}d"] if days else []
    if hours or days:
        parts.append(f"{hours}h")
    if minutes or hours or days:
        parts.append(f"{minutes}m")
    parts.append(f"{secs}s")
    return "".join(parts)


@cli.command()
@json_option
@pass_options
@handles_errors
def status(opts: Options) -> None:
    """Show the daemon, its workers and their connections."""
    with opts.client() as client:
        doc = client.status()
    if opts.json:
        opts.emit(doc)
        return
    totals = doc["totals"]
    click.echo(f"ipcd {doc['version']}, master pid {doc['pid']}, up {_human_duration(doc['uptime'])}")
    click.echo(f"sockets: {doc['sockets']['stream']}, {doc['sockets']['dgram']}")
    click.echo(
        f"workers: {totals['workers']}, connections: {totals['connections']}, "
        f"rss: {_human_bytes(totals['rss'])} in all, respawns: {doc['respawns']}"
    )
    chat = doc.get("chat")
    if chat:
        click.echo(f"chat: {chat['rooms']} rooms, {chat['chatters']} chatters, {chat['messages']} messages")
    store = doc.get("store")
    if store:
        click.echo(f"fd store: {store['entries']} entries, {store['stored_fds']} stored fds")
    click.echo(f"{'PID':>8}  {'STATE':<9} {'CONNS':>6} {'RSS':>10} {'RECEIVED':>9} {'UPTIME':>9}")
    for w in doc["workers"]:
        click.echo(
            f"{w['pid']:>8}  {w['state']:<9} {w['connections']:>6} {_human_bytes(w['rss']):>10} "
            f"{w['received']:>9} {_human_duration(w['uptime']):>9}"
        )
    holders = doc.get("uids")
    if holders:
        limits = doc.get("limits", {})
        click.echo(
            "held per uid (budget of each: "
            f"{limits.get('connections_per_uid', '?')} connections, "
            f"{_human_bytes(limits['partial_bytes_per_uid']) if 'partial_bytes_per_uid' in limits else '?'}"
            " of partial frames and "
            f"{_human_bytes(limits['forward_bytes_per_uid']) if 'forward_bytes_per_uid' in limits else '?'}"
            " of requests for the master per worker, "
            f"{limits.get('rooms_per_uid', '?')} rooms, {limits.get('joins_per_uid', '?')} joins, "
            f"{_human_bytes(limits['history_bytes_per_uid']) if 'history_bytes_per_uid' in limits else '?'}"
            " of history, "
            f"{limits.get('waiters_per_uid', '?')} waiters, {limits.get('fd_quota', '?')} fds, "
            f"{limits.get('rate_limit', '?')} posts/s (DEBT: posts past it, being paid back), "
            f"{limits.get('message_ids_per_uid', '?')} message ids (IDS); "
            f"root and the daemon's uid {limits.get('privileged_budget_factor', '?')}x that, fds excepted):"
        )
        click.echo(
            f"{'UID':>8}  {'USER':<16} {'CONNS':>6} {'PARTIAL':>8} {'FORWARD':>8} {'ROOMS':>6} {'JOINS':>6} "
            f"{'HISTORY':>8} {'DEBT':>6} {'IDS':>5} "
            f"{'WAITERS':>8} {'FDS':>5}"
        )
        for held in holders:
            click.echo(
                f"{held['uid']:>8}  {_user_name(held['uid']):<16} {held.get('connections', 0):>6} "
                f"{_human_bytes(held.get('partial_bytes', 0)):>8} "
                f"{_human_bytes(held.get('forward_bytes', 0)):>8} {held['rooms']:>6} {held['joins']:>6} "
                f"{_human_bytes(held.get('history_bytes', 0)):>8} {held.get('rate_debt', 0):>6} "
                f"{held.get('message_ids', 0):>5} "
                f"{held['waiters']:>8} {held['stored_fds']:>5}"
            )


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name[:16]
    except KeyError:
        return "-"


def main() -> None:
    run(cli)


if __name__ == "__main__":
    main()
