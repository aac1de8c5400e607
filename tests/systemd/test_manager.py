"""ipcd under a real systemd user manager (see manager.py): the user units
as ``ipcd install-units --user`` writes them, and the sandboxed system units
run the same way. Socket activation, notify, reload, the fd store across a
restart, the watchdog and a clean stop, each seen from outside as a user or
an admin would see them: ``ipcctl`` and ``systemctl --user``."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ipcd.client import Client, ClientError
from ipcd.units import plan, python_path, write
from tests.daemon import IPCCTL, children
from tests.systemd.manager import UserManager, user_manager, wait_until

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not Path("/lib/systemd/systemd").exists(),
    reason="needs root (unshare -m) and systemd",
)

SERVICE = "ipcd.service"
SOCKET = "ipcd.socket"


@dataclasses.dataclass
class Installed:
    """ipcd's units installed in a test manager."""

    manager: UserManager
    socket_dir: Path
    log_path: Path

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.manager.systemctl(*args, check=check)

    def ipcctl(self, *args: str, pass_fds: tuple[int, ...] = ()) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*IPCCTL, "--socket-dir", str(self.socket_dir), "--timeout", "20", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            pass_fds=pass_fds,
        )

    def echo(self, text: str, *flags: str) -> None:
        result = self.ipcctl("echo", *flags, text)
        assert (result.returncode, result.stdout) == (0, text + "\n"), result.stderr + self.diagnose()

    def status(self) -> dict[str, Any]:
        with Client(self.socket_dir, timeout=20) as client:
            return client.status()

    def running_workers(self) -> set[int]:
        return {w["pid"] for w in self.status()["workers"] if w["state"] == "running"}

    def entries(self) -> dict[str, Any]:
        """``ipcctl ls``: stored entries by name."""
        result = self.ipcctl("--json", "ls")
        assert result.returncode == 0, result.stderr + self.diagnose()
        return {e["name"]: e for e in json.loads(result.stdout)["entries"]}

    def main_pid(self) -> int:
        return self.manager.main_pid(SERVICE)

    def start(self) -> int:
        """Start the service (Type=notify: returns once READY=1 came); its pid."""
        self.systemctl("start", SERVICE)
        return self.main_pid()

    def diagnose(self) -> str:
        status = self.systemctl("status", SERVICE, SOCKET, check=False).stdout
        try:
            log = self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            log = "(no daemon log)"
        return f"\n--- systemctl status ---\n{status}\n--- daemon log ---\n{log}"


def install(manager: UserManager, user: bool, socket_dir: str, extra: str = "") -> Installed:
    """Render ipcd's units into the manager's unit dir, with a drop-in that
    keeps the test small (2 workers) and sends the daemon's stderr to a file
    (there is no journal in the test namespace)."""
    for unit in plan(user, manager.unit_dir, socket_dir, python_path()):
        if unit.path.suffix in (".socket", ".service"):
            write(unit)
    log_path = manager.root / "ipcd.log"
    drop_in = (
        "[Service]\n"
        "Environment=IPCD_WORKERS=2\n"
        f"StandardOutput=append:{log_path}\n"
        "StandardError=inherit\n"
        f"{extra}"
    )
    manager.install({f"{SERVICE}.d/test.conf": drop_in})
    real_dir = socket_dir.replace("%t", str(manager.runtime_dir))
    return Installed(manager, Path(real_dir), log_path)


@pytest.fixture
def manager() -> Iterator[UserManager]:
    with user_manager() as running:
        yield running


@pytest.fixture
def ipcd(manager: UserManager) -> Installed:
    """The user units, socket dir %t/ipcd (in the manager's runtime dir)."""
    return install(manager, user=True, socket_dir="%t/ipcd")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def become_active(ipcd: Installed) -> None:
    """The service is active: systemd reads READY=1 on its own time, so a
    request the daemon already answered may come before it (under load)."""
    try:
        wait_until(lambda: ipcd.manager.prop(SERVICE, "ActiveState") == "active", 10.0, "the service active")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{ipcd.diagnose()}") from None


def test_first_stream_request_activates_the_service(ipcd: Installed) -> None:
    ipcd.systemctl("start", SOCKET)
    assert ipcd.manager.prop(SERVICE, "ActiveState") == "inactive"
    for name in ("stream.sock", "dgram.sock"):
        st = os.stat(ipcd.socket_dir / name)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o666
    ipcd.echo("hello, activation")
    become_active(ipcd)
    ipcd.echo("and over datagrams", "--dgram")


def test_first_datagram_activates_the_service(ipcd: Installed) -> None:
    """The datagram that starts the daemon is answered too: PassCredentials=
    gave it the sender's credentials before the daemon was there to ask."""
    ipcd.systemctl("start", SOCKET)
    ipcd.echo("hello by datagram", "--dgram")
    become_active(ipcd)


def test_a_folder_named_ipcd_in_the_working_directory_cannot_shadow_the_package(
    manager: UserManager, tmp_path: Path
) -> None:
    """A user service runs in the user's home, where a clone of this repo is
    usually called ``ipcd``; ``/tmp`` holds ``/tmp/ipcd``. Neither may be
    imported instead of the installed package: that once made the service
    exit 1 (and let whoever could create the folder run code as the daemon)."""
    workdir = tmp_path / "home"
    planted = workdir / "ipcd"
    planted.mkdir(parents=True)
    marker = tmp_path / "planted-code-ran"
    (planted / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\nraise SystemExit(1)\n")
    (planted / "cli").mkdir()
    (planted / "cli" / "__init__.py").write_text("")
    ipcd = install(manager, user=True, socket_dir="%t/ipcd", extra=f"WorkingDirectory={workdir}\n")
    ipcd.systemctl("start", SOCKET)
    ipcd.echo("the installed ipcd answers")
    become_active(ipcd)
    assert not marker.exists(), "the service imported the planted package"


def test_status_line_shows_live_figures(ipcd: Installed, tmp_path: Path) -> None:
    ipcd.start()
    status = ipcd.systemctl("status", SERVICE, check=False).stdout
    assert re.search(r'Status: "2 workers, \d+ connections, \d+ rooms, 0 stored fds"', status), status
    held = tmp_path / "held"
    held.write_text("x")
    assert ipcd.ipcctl("put", "status-probe", str(held)).returncode == 0
    wait_until(
        lambda: "1 stored fds" in ipcd.manager.prop(SERVICE, "StatusText"),
        10.0,
        "STATUS= to count the stored fd" + ipcd.diagnose(),
    )


def test_reload_replaces_workers_without_a_failed_request(ipcd: Installed) -> None:
    """Five reloads in a row, each while the workers replaced by the last one
    still drain (idle clients stay connected, as chat listeners do), under
    four client loops making a new connection per request, as ipcctl does:
    every request is answered."""
    master = ipcd.start()
    done = threading.Event()
    failures: list[str] = []
    served = [0]

    def client_loop() -> None:
        while not done.is_set():
            try:
                with Client(ipcd.socket_dir, timeout=10) as client:
                    if client.echo(b"during reload") != b"during reload":
                        failures.append("wrong echo")
            except ClientError as exc:
                failures.append(repr(exc))
            served[0] += 1

    def workers() -> set[int]:
        try:
            return ipcd.running_workers()
        except ClientError as exc:  # a status request is a request too
            failures.append(f"status: {exc!r}")
            return set()

    threads = [threading.Thread(target=client_loop) for _ in range(8)]
    for thread in threads:
        thread.start()
    replaced: set[int] = set()
    try:
        wait_until(lambda: served[0] >= 20, 10.0, "the client loops to get going")
        with contextlib.ExitStack() as idle:
            for _ in range(10):
                old = ipcd.running_workers()
                assert len(old) == 2
                replaced |= old
                for _ in range(4):
                    client = idle.enter_context(Client(ipcd.socket_dir, timeout=10))
                    assert client.echo(b"idle") == b"idle"
                ipcd.systemctl("reload", SERVICE)
                wait_until(
                    lambda: (w := workers()) and len(w) == 2 and not w & old,  # noqa: B023 - called at once
                    20.0,
                    "a new generation of workers" + ipcd.diagnose(),
                )
        wait_until(lambda: not any(alive(pid) for pid in replaced), 20.0, "the old workers to finish")
        after = served[0]
        wait_until(lambda: served[0] >= after + 20, 10.0, "requests served by the new workers")
    finally:
        done.set()
        for thread in threads:
            thread.join(30)
    assert failures == [], f"{len(failures)} of {served[0]} requests failed: {failures[:3]}{ipcd.diagnose()}"
    assert ipcd.main_pid() == master, "a reload must not restart the master"
    assert ipcd.manager.prop(SERVICE, "ActiveState") == "active"


def test_stored_entries_survive_a_restart(ipcd: Installed, tmp_path: Path) -> None:
    before = ipcd.start()
    kept = tmp_path / "kept.txt"
    kept.write_text("survives restarts\n")
    assert ipcd.ipcctl("put", "kept", str(kept)).returncode == 0
    kept.unlink()  # only the stored fd has it now
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        port = tcp.getsockname()[1]
        result = ipcd.ipcctl("put", "tcp", "--fd", str(tcp.fileno()), pass_fds=(tcp.fileno(),))
        assert result.returncode == 0, result.stderr

    ipcd.systemctl("restart", SERVICE)
    after = ipcd.main_pid()
    assert after not in (0, before)
    listing = ipcd.entries()
    assert set(listing) == {"kept", "tcp"}, f"{listing}{ipcd.diagnose()}"
    (tcp_fd,) = listing["tcp"]["fds"]
    assert (tcp_fd["family"], tcp_fd["listening"], tcp_fd["address"]) == ("inet", True, f"127.0.0.1:{port}")

    taken = ipcd.ipcctl("take", "kept")
    assert (taken.returncode, taken.stdout) == (0, "survives restarts\n"), taken.stderr
    check = (
        "import socket; s = socket.socket(fileno=3); "
        "print(s.family.name, s.getsockname()[1], s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))"
    )
    taken = ipcd.ipcctl("take", "tcp", "--", sys.executable, "-c", check)
    assert (taken.returncode, taken.stdout) == (0, f"AF_INET {port} 1\n"), taken.stderr

    # Taken entries leave systemd's fd store too: they do not come back.
    ipcd.systemctl("restart", SERVICE)
    assert ipcd.entries() == {}


def test_watchdog_restarts_a_hung_master(manager: UserManager) -> None:
    ipcd = install(manager, user=True, socket_dir="%t/ipcd", extra="WatchdogSec=2\n")
    hung = ipcd.start()
    workers = set(children(hung))
    ipcd.echo("before the hang")
    os.kill(hung, signal.SIGSTOP)
    wait_until(
        lambda: ipcd.main_pid() not in (0, hung) and ipcd.manager.prop(SERVICE, "ActiveState") == "active",
        20.0,
        "the watchdog to restart the service" + ipcd.diagnose(),
    )
    assert ipcd.manager.prop(SERVICE, "NRestarts") == "1"
    assert not alive(hung)
    assert not any(alive(pid) for pid in workers)
    ipcd.echo("after the restart")


def test_stop_is_clean(ipcd: Installed) -> None:
    ipcd.systemctl("start", SOCKET)
    ipcd.echo("wake up")
    master = ipcd.main_pid()
    workers = set(children(master))
    assert len(workers) == 2

    # The service alone: the sockets are systemd's, so they stay and the
    # next request starts the daemon again.
    ipcd.systemctl("stop", SERVICE)
    props = ipcd.manager.show(SERVICE, "Result", "ExecMainCode", "ExecMainStatus", "ActiveState")
    assert props == {
        "Result": "success",
        "ExecMainCode": "1",  # CLD_EXITED: it exited, was not killed
        "ExecMainStatus": "0",
        "ActiveState": "inactive",
    }, ipcd.diagnose()
    assert not alive(master)
    assert not any(alive(pid) for pid in workers)
    assert (ipcd.socket_dir / "stream.sock").exists()
    assert (ipcd.socket_dir / "dgram.sock").exists()
    ipcd.echo("wake up again")

    ipcd.systemctl("stop", SOCKET, SERVICE)
    assert ipcd.manager.show(SERVICE, "Result", "ExecMainStatus") == {
        "Result": "success",
        "ExecMainStatus": "0",
    }
    assert ipcd.manager.prop(SOCKET, "ActiveState") == "inactive"
    assert not (ipcd.socket_dir / "stream.sock").exists(), "RemoveOnStop= removes the sockets"


def test_sandboxed_system_units(manager: UserManager) -> None:
    """The system units, sandbox and all, in the (root) test manager, with
    the socket dir in /tmp: the daemon reaches its sockets only through the
    fds systemd passed (it runs with PrivateTmp=yes), holds and inspects a
    TCP socket it could not create (RestrictAddressFamilies=AF_UNIX), answers
    datagrams, reloads, and keeps stored entries across a restart."""
    socket_dir = Path(tempfile.mkdtemp(prefix="ipcd-sys", dir="/tmp")) / "s"
    try:
        ipcd = install(manager, user=False, socket_dir=str(socket_dir))
        ipcd.systemctl("start", SOCKET)
        ipcd.echo("sandboxed")
        ipcd.echo("sandboxed datagram", "--dgram")
        master = ipcd.main_pid()
        assert not Path(f"/proc/{master}/root{socket_dir}").exists(), "PrivateTmp= should hide it"
        workers = ipcd.status()["workers"]
        assert [w["rss"] > 0 for w in workers] == [True, True], workers  # /proc/<worker> is readable
        old = ipcd.running_workers()
        ipcd.systemctl("reload", SERVICE)  # ExecReload= works in the sandbox too
        wait_until(lambda: not ipcd.running_workers() & old, 20.0, "new workers" + ipcd.diagnose())
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            tcp.listen()
            result = ipcd.ipcctl("put", "tcp", "--fd", str(tcp.fileno()), pass_fds=(tcp.fileno(),))
            assert result.returncode == 0, result.stderr + ipcd.diagnose()
            port = tcp.getsockname()[1]
        ipcd.systemctl("restart", SERVICE)
        (fd,) = ipcd.entries()["tcp"]["fds"]
        assert (fd["family"], fd["address"]) == ("inet", f"127.0.0.1:{port}")
        ipcd.systemctl("stop", SOCKET, SERVICE)
        assert ipcd.manager.prop(SERVICE, "ExecMainStatus") == "0", ipcd.diagnose()
    finally:
        shutil.rmtree(socket_dir.parent, ignore_errors=True)
