"""``ipcctl put | get | take | ls | rm`` as a user runs them: the real
command in a subprocess (root), its stdout, stderr and exit code.

Without a command ``get``/``take`` print the content (a regular file from
offset 0 whatever the shared offset, a pipe to its end); with ``-- CMD`` they
exec it with the fds at 3, 4, ... and the socket-activation variables.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ipcd import fdpass
from tests.daemon import IPCCTL, Daemon, holder_of, wait_for
from tests.handoff.users import FdLedger, StartDaemon

pytest_plugins = ["tests.handoff.users"]


def run(
    daemon: Daemon, *args: str, pass_fds: Sequence[int] = (), input: bytes | None = None
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [*IPCCTL, "--socket-dir", str(daemon.socket_dir), *args],
        input=input,
        capture_output=True,
        pass_fds=pass_fds,
        timeout=30,
        check=False,
    )
    return subprocess.CompletedProcess(
        result.args, result.returncode, result.stdout.decode(), result.stderr.decode()
    )


def start(daemon: Daemon, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*IPCCTL, "--socket-dir", str(daemon.socket_dir), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr}"
    assert result.stderr == ""
    return result.stdout


def refusal(result: subprocess.CompletedProcess[str], *needles: str, code: int = 1) -> str:
    """Exit ``code``, nothing on stdout, one line on stderr holding every needle."""
    assert result.returncode == code, f"exit {result.returncode}; stderr: {result.stderr!r}"
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {result.stderr!r}"
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def listed(daemon: Daemon) -> dict[str, dict[str, Any]]:
    out = json.loads(ok(run(daemon, "ls", "--json")))
    return {entry["name"]: entry for entry in out["entries"]}


def memfd_with(name: str, content: bytes) -> int:
    fd = os.memfd_create(name)
    os.pwrite(fd, content, 0)  # the shared offset stays at 0
    return fd


# -- content -----------------------------------------------------------------------


def test_get_prints_the_whole_file_whatever_the_shared_offset(
    start_daemon: StartDaemon, short_tmp: Path
) -> None:
    daemon = start_daemon()
    ledger = FdLedger(daemon)
    path = short_tmp / "report.txt"
    content = "".join(f"line {i:06d} of a file larger than one 64 KiB read\n" for i in range(4000))
    path.write_text(content)
    assert ok(run(daemon, "put", "report", str(path))) == ""
    ledger.expect(1)

    with daemon.client() as client:
        handoff = client.get("report")
    (fd,) = handoff.fds
    try:
        assert os.read(fd, 1000) == content[:1000].encode()  # moves the offset every copy shares
        assert ok(run(daemon, "get", "report")) == content
        assert os.lseek(fd, 0, os.SEEK_CUR) == 1000, "ipcctl get moved the shared offset"
        assert ok(run(daemon, "get", "report")) == content  # and again: get leaves it stored
    finally:
        os.close(fd)
    ledger.expect(1)
    assert ok(run(daemon, "rm", "report")) == ""
    ledger.expect(0)


def test_take_prints_a_pipe_to_its_end(start_daemon: StartDaemon) -> None:
    daemon = start_daemon()
    ledger = FdLedger(daemon)
    lines = "".join(f"job {i}\n" for i in range(500))
    # PATH '-': ipcctl stores its stdin, here the read end of a pipe holding the jobs.
    assert ok(run(daemon, "put", "jobs", "-", input=lines.encode())) == ""
    ledger.expect(1)
    assert listed(daemon)["jobs"]["fds"][0]["kind"] == "pipe"
    assert ok(run(daemon, "take", "jobs")) == lines
    ledger.expect(0)
    refusal(run(daemon, "take", "jobs"), "nothing is stored as 'jobs'", "NOT_FOUND")


def test_a_memfd_passes_by_fd_and_prints_its_content(start_daemon: StartDaemon) -> None:
    daemon = start_daemon()
    ledger = FdLedger(daemon)
    fd = memfd_with("notes", b"written to a memfd\n")
    try:
        assert ok(run(daemon, "put", "notes", "--fd", str(fd), pass_fds=[fd])) == ""
    finally:
        os.close(fd)
    ledger.expect(1)
    for _ in range(2):
        assert ok(run(daemon, "get", "notes")) == "written to a memfd\n"
    (info,) = listed(daemon)["notes"]["fds"]
    assert info["kind"] == "memfd"
    assert info["path"].startswith("/memfd:notes")
    assert info["size"] == 19
    assert ok(run(daemon, "take", "notes")) == "written to a memfd\n"
    ledger.expect(0)


def test_ls_describes_every_kind(start_daemon: StartDaemon, short_tmp: Path) -> None:
    daemon = start_daemon()
    ledger = FdLedger(daemon)
    path = short_tmp / "plain.txt"
    path.write_text("plain\n")
    unix_path = str(short_tmp / "srv.sock")
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(unix_path)
    unix.listen()
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    port = tcp.getsockname()[1]
    left, right = socket.socketpair()
    read_end, write_end = os.pipe()
    memfd = memfd_with("blob", b"blob")
    try:
        assert ok(run(daemon, "put", "file", str(path), "--ttl", "600")) == ""
        for name, fd in (
            ("pipe", read_end),
            ("unix", unix.fileno()),
            ("tcp", tcp.fileno()),
            ("pair", left.fileno()),
            ("blob", memfd),
        ):
            assert ok(run(daemon, "put", name, "--fd", str(fd), pass_fds=[fd])) == "", name
    finally:
        for sock in (unix, tcp, left, right):
            sock.close()
        fdpass.close_fds([read_end, write_end, memfd])
    ledger.expect(6)

    entries = listed(daemon)
    assert sorted(entries) == ["blob", "file", "pair", "pipe", "tcp", "unix"]
    for entry in entries.values():
        assert (entry["owner"], entry["count"], len(entry["fds"])) == (0, 1, 1)
        assert isinstance(entry["age"], float | int)
        assert 0 <= entry["age"] < 60
        assert entry["public"] is False
    assert 500 < entries["file"]["ttl"] <= 600
    assert all(entries[name]["ttl"] is None for name in entries if name != "file")

    def fd_info(name: str) -> dict[str, Any]:
        info: dict[str, Any] = entries[name]["fds"][0]
        assert info["name"] == name, "an fd is named after its entry by default"
        return info

    assert fd_info("file") | {"size": 6} == {
        "name": "file",
        "kind": "file",
        "path": str(path),
        "size": 6,
        "access": "r",
    }
    assert fd_info("pipe")["kind"] == "pipe"
    assert fd_info("pipe")["access"] == "r"
    assert {k: fd_info("unix")[k] for k in ("kind", "family", "type", "listening", "address")} == {
        "kind": "socket",
        "family": "unix",
        "type": "stream",
        "listening": True,
        "address": unix_path,
    }
    assert {k: fd_info("tcp")[k] for k in ("kind", "family", "type", "listening", "address")} == {
        "kind": "socket",
        "family": "inet",
        "type": "stream",
        "listening": True,
        "address": f"127.0.0.1:{port}",
    }
    assert (fd_info("pair")["kind"], fd_info("pair")["listening"]) == ("socket", False)
    assert fd_info("blob")["kind"] == "memfd"

    table = ok(run(daemon, "ls")).splitlines()
    assert table[0].split() == ["NAME", "OWNER", "AGE", "TTL", "FDS"]
    rows = {line.split()[0]: line for line in table[1:-1]}
    assert sorted(rows) == sorted(entries)
    assert rows["unix"].endswith(f"unix/stream listening {unix_path}")
    assert rows["tcp"].endswith(f"inet/stream listening 127.0.0.1:{port}")
    assert rows["file"].endswith(f"file {path}")
    assert rows["file"].split()[1] == "root"
    assert rows["file"].split()[3] in {"9m", "10m"}
    assert rows["pipe"].endswith("pipe")
    assert "memfd /memfd:blob" in rows["blob"]
    assert table[-1] == "your stored fds: 6 of 64"


# -- refusals ------------------------------------------------------------------------


def test_refusals_are_one_line_and_exit_1(start_daemon: StartDaemon, short_tmp: Path) -> None:
    daemon = start_daemon()
    ledger = FdLedger(daemon)
    path = short_tmp / "x.txt"
    path.write_text("x\n")
    refusal(run(daemon, "get", "ghost"), "nothing is stored as 'ghost'", "NOT_FOUND")
    refusal(run(daemon, "rm", "ghost"), "nothing is stored as 'ghost'", "NOT_FOUND")
    refusal(run(daemon, "put", "bad name", str(path)), "bad name 'bad name'", "BAD_REQUEST")
    ok(run(daemon, "put", "dup", str(path)))
    refusal(run(daemon, "put", "dup", str(path)), "'dup' is already stored; use --replace", "EXISTS")
    ledger.expect(1)
    ok(run(daemon, "put", "dup", str(path), "--replace"))
    ledger.expect(1)
    refusal(run(daemon, "put", "nothing"), "give one of PATH, --fd N or --listen ADDRESS", code=2)
    refusal(run(daemon, "put", "missing", str(path) + ".nope"), "cannot open", code=1)
    refusal(run(daemon, "put", "closed", "--fd", "77"), "fd 77 is not open", code=2)
    unknown = run(daemon, "put", "who", str(path), "--allow-uid", "no-such-user-here")
    assert unknown.returncode == 2  # click's usage error: usage, hint, then the error line
    assert unknown.stderr.splitlines()[-1] == "Error: Invalid value: no user named 'no-such-user-here'"
    ledger.expect(1)

    # A listening socket has nothing to print: take refuses before taking it.
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(short_tmp / "l.sock"))
    sock.listen()
    with sock:
        ok(run(daemon, "put", "srv", "--fd", str(sock.fileno()), pass_fds=[sock.fileno()]))
    for verb in ("get", "take"):
        refusal(run(daemon, verb, "srv"), "holds a listening socket", "-- CMD")
    assert "srv" in listed(daemon), "a refused take must leave the socket stored"
    ledger.expect(2)


# -- rendezvous --------------------------------------------------------------------


def _socket_inodes(pid: int) -> list[int]:
    inodes = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.append(int(target[8:-1]))
    return inodes


def waiting_for_reply(proc: subprocess.Popen[str], daemon: Daemon) -> bool:
    """ipcctl has sent its request, the daemon's worker has read all of it,
    and ipcctl sleeps (waiting for the answer)."""
    assert proc.poll() is None, f"ipcctl exited early: {proc.communicate()}"
    try:
        mine = _socket_inodes(proc.pid)
        with open(f"/proc/{proc.pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    out = subprocess.run(["ss", "-x", "-a", "-n"], capture_output=True, text=True, check=True).stdout
    for fields in (line.split() for line in out.splitlines()[1:]):
        # Netid State Recv-Q Send-Q Local-Address Port Peer-Address Port
        if len(fields) >= 8 and fields[4] == str(daemon.stream_path) and int(fields[7]) in mine:
            read_by_worker = fields[2] == "0" and bool(holder_of(int(fields[5]), daemon.worker_pids()))
            return read_by_worker and state == "S"
    return False


def test_get_wait_meets_a_later_put(start_daemon: StartDaemon) -> None:
    # One worker: the waiting GET and the PUT reach the store in the order
    # the worker read them, so "waiting" below means "queued in the store".
    daemon = start_daemon(workers=1)
    ledger = FdLedger(daemon)
    waiter = start(daemon, "get", "late", "--wait", "5")
    try:
        wait_for(lambda: waiting_for_reply(waiter, daemon), 10, "ipcctl get --wait to be waiting")
        fd = memfd_with("late", b"worth the wait\n")
        try:
            with daemon.client() as client:
                client.put("late", [fd])
        finally:
            os.close(fd)
        out, err = waiter.communicate(timeout=20)
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.communicate()
    assert (waiter.returncode, out, err) == (0, "worth the wait\n", "")
    ledger.expect(1)


def test_a_wait_nobody_meets_exits_75(start_daemon: StartDaemon) -> None:
    daemon = start_daemon()
    ledger = FdLedger(daemon)
    for verb in ("get", "take"):
        began = time.monotonic()
        result = run(daemon, verb, "never", "--wait", "0.3")
        assert time.monotonic() - began >= 0.3
        refusal(result, "timed out", "'never' was not put in time", code=75)
    ledger.expect(0)


# -- get/take with a command ------------------------------------------------------------


def test_take_with_a_command_gets_listen_fds(start_daemon: StartDaemon) -> None:
    daemon = start_daemon()
    ledger = FdLedger(daemon)
    ok(run(daemon, "put", "cfg", "-", input=b"the content\n"))
    ledger.expect(1)
    proc = start(
        daemon, "take", "cfg", "--", "sh", "-c", "echo $LISTEN_FDS $LISTEN_FDNAMES $LISTEN_PID $$; cat <&3"
    )
    out, err = proc.communicate(timeout=30)
    assert (proc.returncode, err) == (0, "")
    first, content = out.split("\n", 1)
    assert first.split() == ["1", "cfg", str(proc.pid), str(proc.pid)], "LISTEN_PID is the exec'd process"
    assert content == "the content\n"
    ledger.expect(0)


def test_get_with_a_command_places_every_fd_in_order(start_daemon: StartDaemon) -> None:
    daemon = start_daemon()
    ledger = FdLedger(daemon)
    fds = [memfd_with("a", b"first\n"), memfd_with("b", b"second\n")]
    try:
        with daemon.client() as client:
            client.put("two", fds, names=["alpha", "beta"])
    finally:
        fdpass.close_fds(fds)
    script = "echo $LISTEN_FDS $LISTEN_FDNAMES; cat <&3; cat <&4; ls /proc/$$/fd"
    out = ok(run(daemon, "get", "two", "--", "sh", "-c", script))
    lines = out.splitlines()
    assert lines[:3] == ["2 alpha:beta", "first", "second"]
    assert sorted(int(fd) for fd in lines[3:]) == [0, 1, 2, 3, 4], "only stdio and the handed fds"
    ledger.expect(2)  # get: still stored
    refusal(run(daemon, "get", "two", "--", "/no/such/program"), "cannot run /no/such/program", code=127)
    ledger.expect(2)


def test_take_a_listening_socket_after_a_worker_kill(start_daemon: StartDaemon, short_tmp: Path) -> None:
    daemon = start_daemon()
    ledger = FdLedger(daemon)
    path = str(short_tmp / "app.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen()
    with server:
        ok(run(daemon, "put", "app", "--fd", str(server.fileno()), pass_fds=[server.fileno()]))
    ledger.expect(1)
    victim = ledger.workers[0]
    os.kill(victim, signal.SIGKILL)
    ledger.workers_replaced(victim)
    ledger.expect(1)

    serve_one = (
        "import os, socket\n"
        "assert os.environ['LISTEN_PID'] == str(os.getpid())\n"
        "assert os.environ['LISTEN_FDS'] == '1' and os.environ['LISTEN_FDNAMES'] == 'app'\n"
        "listener = socket.socket(fileno=3)\n"
        "conn, _ = listener.accept()\n"
        "conn.sendall(conn.recv(100).upper())\n"
    )
    proc = start(daemon, "take", "app", "--", sys.executable, "-c", serve_one)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as peer:
            peer.settimeout(20)
            peer.connect(path)  # queued on the handed-off listener even before accept
            peer.sendall(b"hello through a handed-off socket")
            assert peer.recv(100) == b"HELLO THROUGH A HANDED-OFF SOCKET"
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert (proc.returncode, out, err) == (0, "", "")
    ledger.expect(0)


# -- usage and help ----------------------------------------------------------------


def test_a_command_with_options_needs_double_dash(start_daemon: StartDaemon) -> None:
    daemon = start_daemon()
    ok(run(daemon, "put", "cfg", "-", input=b"x\n"))
    for verb in ("get", "take"):
        line = refusal(run(daemon, verb, "cfg", "sh", "-c", "cat <&3"), code=2)
        assert line == (
            f"ipcctl: -c is not an option of {verb}; put -- before the command: "
            f"ipcctl {verb} cfg -- sh -c 'cat <&3'"
        )
    line = refusal(run(daemon, "get", "cfg", "--wait", "1", "gunicorn", "-w", "2", "app:app"), code=2)
    assert line.endswith("put -- before the command: ipcctl get cfg --wait 1 -- gunicorn -w 2 app:app")
    # Done as it says, it runs; an unknown option with no command is click's usage error.
    assert ok(run(daemon, "get", "cfg", "--", "sh", "-c", "cat <&3")) == "x\n"
    unknown = run(daemon, "get", "cfg", "--bogus")
    assert unknown.returncode == 2
    assert unknown.stderr.splitlines()[-1] == "Error: No such option '--bogus'."
    assert "cfg" in listed(daemon), "nothing was taken"


def test_help_shows_no_raw_types(start_daemon: StartDaemon) -> None:
    daemon = start_daemon()
    for verb in ("put", "get", "take", "ls", "rm"):
        text = ok(run(daemon, verb, "--help"))
        for raw in ("RANGE", "INTEGER", "FLOAT", "TEXT", "``", "[x>", "x>="):
            assert raw not in text, f"{raw!r} in 'ipcctl {verb} --help':\n{text}"
    put_help = ok(run(daemon, "put", "--help"))
    for shown in ("--ttl SECS", "--fd N", "--listen ADDRESS", "--backlog N", "--socket-mode MODE"):
        assert shown in put_help
    assert "--wait SECS" in ok(run(daemon, "get", "--help"))
    assert "NAME [-- CMD [ARGS]...]" in ok(run(daemon, "take", "--help"))


def test_a_write_only_fd_has_nothing_to_print(start_daemon: StartDaemon, short_tmp: Path) -> None:
    daemon = start_daemon()
    ledger = FdLedger(daemon)
    path = short_tmp / "out.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        ok(run(daemon, "put", "log", "--fd", str(fd), pass_fds=[fd]))
    finally:
        os.close(fd)
    ledger.expect(1)
    refusal(run(daemon, "get", "log"), "cannot read log", "-- CMD")
    refusal(run(daemon, "take", "log"), "log holds a write-only fd", "it stays stored")
    assert "log" in listed(daemon)
    ok(run(daemon, "take", "log", "--", "sh", "-c", "echo written >&3"))
    assert path.read_text() == "written\n"
    ledger.expect(0)
