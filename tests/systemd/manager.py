"""A real systemd user manager for integration tests.

Theory of operation: systemd is installed but is not PID 1 here, and a user
manager refuses to run unless ``/run/systemd/system`` exists. So it runs in
a private mount namespace (``unshare -m``) with a tmpfs on ``/run/systemd``:
nothing the host sees changes. Everything it needs to be reached lives in
``XDG_RUNTIME_DIR``, a fresh dir under the host's /run (not /tmp, which
``PrivateTmp=`` would hide from services), so this process talks to it from
outside the namespace with ``systemctl --user`` (over
``$XDG_RUNTIME_DIR/systemd/private``). Units come from
``$XDG_CONFIG_HOME/systemd/user``, also fresh.

Before it execs the manager, the launcher moves itself into a cgroup of its
own (``ipcd-test-<random>``): a manager roots its tree at its cgroup, so
every service it starts lands below that cgroup and nowhere else (a manager
started in the root cgroup would adopt, and move, every process on the
machine). Tear-down stops the manager, then kills whatever is left in that
cgroup and removes it. Readiness is the manager's own ``READY=1`` on a
notify socket we hand it; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from tests.daemon import wait_for

wait_until = wait_for  # the harness's name for it

T = TypeVar("T")

SYSTEMD = Path("/lib/systemd/systemd")
# Runs as the first process in the new mount namespace, then becomes the
# manager. The tmpfs on /run/systemd gets what a booted system has there:
# "system" (sd_booted) and the "inaccessible" nodes sandboxing options such
# as ProtectKernelLogs= mount over what they hide. /run must be a mount
# point, as on a booted system: options that imply MountAPIVFS= (such as
# ProtectKernelTunables=) put a fresh tmpfs on a /run that is not one,
# hiding the manager's notify socket from the service.
_LAUNCHER = """
import os, stat, subprocess, sys
for cgroup in sys.argv[2:]:
    with open(os.path.join(cgroup, "cgroup.procs"), "w") as fh:
        fh.write(str(os.getpid()))
if not os.path.ismount("/run"):  # else a sandboxed service gets an empty tmpfs there
    subprocess.run(["mount", "--bind", "/run", "/run"], check=True)
subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "ipcd-test", "/run/systemd"], check=True)
os.mkdir("/run/systemd/system")
nodes = "/run/systemd/inaccessible"
os.mkdir(nodes)
os.mkdir(nodes + "/dir", 0)
for name, kind, dev in (("reg", stat.S_IFREG, 0), ("fifo", stat.S_IFIFO, 0), ("sock", stat.S_IFSOCK, 0),
                        ("chr", stat.S_IFCHR, os.makedev(0, 0)), ("blk", stat.S_IFBLK, os.makedev(0, 0))):
    os.mknod(os.path.join(nodes, name), kind, dev)
    os.chmod(os.path.join(nodes, name), 0)
os.execv(sys.argv[1], [sys.argv[1], "--user"])
"""


class ManagerError(Exception):
    """The user manager could not be started or did not answer."""


def _cgroup_hierarchies() -> list[Path]:
    """Mount points of the hierarchies systemd tracks processes with: the
    unified (v2) one and, on legacy or hybrid set-ups, ``name=systemd``."""
    found = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            fields = line.split()
            sep = fields.index("-")
            mount_point, fstype, options = Path(fields[4]), fields[sep + 1], fields[-1]
            if fstype == "cgroup2" or (fstype == "cgroup" and "name=systemd" in options.split(",")):
                found.append(mount_point)
    return found


def _cgroup_pids(cgroups: list[Path]) -> set[int]:
    pids: set[int] = set()
    for root in cgroups:
        for procs in root.rglob("cgroup.procs"):
            with contextlib.suppress(OSError, ValueError):
                pids.update(int(p) for p in procs.read_text().split())
    return pids


class UserManager:
    """``systemd --user`` in a private mount namespace, with its own
    runtime dir, config dir and cgroup under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.runtime_dir = root / "rt"
        self.config_home = root / "cf"
        self.state_home = root / "st"  # StateDirectory= of a user unit is under it
        self.unit_dir = self.config_home / "systemd" / "user"
        self.log_path = root / "manager.log"
        name = f"ipcd-test-{secrets.token_hex(4)}"
        self.cgroups = [hierarchy / name for hierarchy in _cgroup_hierarchies()]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        """The environment for ``systemctl --user`` aimed at this manager."""
        env = {k: v for k, v in os.environ.items() if k != "DBUS_SESSION_BUS_ADDRESS"}
        env.update(
            XDG_RUNTIME_DIR=str(self.runtime_dir),
            XDG_CONFIG_HOME=str(self.config_home),
            XDG_STATE_HOME=str(self.state_home),
            SYSTEMD_PAGER="",
            SYSTEMD_COLORS="0",
            LC_ALL="C.UTF-8",
        )
        return env

    # -- life cycle -----------------------------------------------------------

    def start(self, timeout: float = 20.0) -> UserManager:
        if not SYSTEMD.exists() or shutil.which("unshare") is None:
            raise ManagerError(f"need {SYSTEMD} and unshare(1)")
        self.runtime_dir.mkdir(mode=0o700)
        self.unit_dir.mkdir(parents=True)
        for cgroup in self.cgroups:
            cgroup.mkdir()
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify_path = self.root / "notify"
        notify.bind(str(notify_path))
        # The manager passes its own environment to its services: keep it
        # small, so nothing from the test run (IPCD_*, ...) leaks into them.
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/root"),
            "LANG": "C.UTF-8",
            "XDG_RUNTIME_DIR": str(self.runtime_dir),
            "XDG_CONFIG_HOME": str(self.config_home),
            "XDG_STATE_HOME": str(self.state_home),
            "NOTIFY_SOCKET": str(notify_path),
        }
        try:
            launcher = ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", _LAUNCHER]
            launcher += [str(SYSTEMD), *(str(c) for c in self.cgroups)]
            with self.log_path.open("ab") as log:
                self.proc = subprocess.Popen(
                    launcher,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                )
            self._wait_ready(notify, timeout)
        except BaseException:
            self.stop()
            raise
        finally:
            notify.close()
        return self

    def _wait_ready(self, notify: socket.socket, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise ManagerError(f"systemd --user exited with {self.proc.returncode}:\n{self.log()}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise ManagerError(f"systemd --user not ready after {timeout}s:\n{self.log()}")
            notify.settimeout(min(left, 0.5))
            try:
                message = notify.recv(4096)
            except TimeoutError:
                continue
            if b"READY=1" in message.split(b"\n"):
                break
        private = self.runtime_dir / "systemd" / "private"
        wait_until(private.exists, 5.0, f"{private} to appear")

    def stop(self, timeout: float = 30.0) -> None:
        """Stop every unit and the manager, kill leftovers, remove the cgroup."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            # exit.target stops every unit, in order, then the manager exits.
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.systemctl("exit", check=False, timeout=10)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        self._kill_leftovers()

    def _kill_leftovers(self) -> None:
        def empty() -> bool:
            pids = _cgroup_pids(self.cgroups)
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            return not pids

        wait_until(empty, 10.0, "the test manager's cgroup to empty")
        for cgroup in self.cgroups:
            if cgroup.exists():
                for sub in sorted(cgroup.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                    if sub.is_dir():
                        with contextlib.suppress(OSError):
                            sub.rmdir()
                with contextlib.suppress(OSError):
                    cgroup.rmdir()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    # -- talking to it ----------------------------------------------------------

    def systemctl(
        self, *args: str, check: bool = True, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["systemctl", "--user", "--no-pager", "--no-ask-password", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise ManagerError(
                f"systemctl --user {' '.join(args)} exited {result.returncode}:\n"
                f"{result.stdout}{result.stderr}"
            )
        return result

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.systemctl("show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def prop(self, unit: str, prop: str) -> str:
        return self.show(unit, prop).get(prop, "")

    def main_pid(self, unit: str) -> int:
        return int(self.prop(unit, "MainPID") or 0)

    def install(self, files: Mapping[str, str]) -> None:
        """Write unit files (name -> text) and drop-ins ("unit.d/x.conf"),
        then daemon-reload."""
        for name, text in files.items():
            path = self.unit_dir / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        self.systemctl("daemon-reload")


@contextlib.contextmanager
def user_manager(parent: str = "/run", **kwargs: Any) -> Iterator[UserManager]:
    """A started :class:`UserManager` in a fresh short temp dir under
    ``parent``, torn down (units stopped, leftovers killed, dir removed)
    however the body ends. Not in /tmp: a service with ``PrivateTmp=yes``
    could not reach the manager's notify socket there."""
    root = Path(tempfile.mkdtemp(prefix="ipcd-sd", dir=parent))
    manager = UserManager(root)
    try:
        yield manager.start(**kwargs)
    finally:
        try:
            manager.stop()
        finally:
            shutil.rmtree(root, ignore_errors=True)
