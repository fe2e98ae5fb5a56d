"""``mmwatchd run`` as a real child process, the way systemd runs it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def spawn_run(
    cfg: Path, cwd: Path, env: Mapping[str, str] | None = None, *, command: str = "run"
) -> subprocess.Popen[bytes]:
    """Start ``mmwatchd run`` (or ``command``); its JSON log goes to ``cwd/run.log`` (a pipe nobody reads would fill
    and block it). It leads a session of its own, as a service does: :func:`session_processes` finds whatever it
    started, even after it has exited."""
    with open(cwd / "run.log", "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "mmwatchd", command, "-c", str(cfg), "--log-format", "json"],
            cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
            stdout=subprocess.DEVNULL, stderr=log, start_new_session=True,
        )  # fmt: skip


def stop_run(proc: subprocess.Popen[bytes], cwd: Path) -> list[dict[str, Any]]:
    """SIGTERM, then check it stopped cleanly (exit 0, no traceback, no process of its own left at the moment it
    exited, which is when systemd SIGKILLs whatever is left of a unit); return its log entries."""
    proc.send_signal(signal.SIGTERM)
    left = exited_leaving(proc, timeout=30)
    proc.wait()
    assert not left, f"processes outlived the daemon: {left}"
    log = (cwd / "run.log").read_bytes()
    assert proc.returncode == 0, log[-2000:]
    assert b"Traceback" not in log, log[-2000:]
    return log_entries(cwd)


def exited_leaving(proc: subprocess.Popen[bytes], timeout: float) -> list[tuple[int, str]]:
    """Wait for ``proc`` to exit (killing it after ``timeout`` s) and return the processes of its session still
    alive at that moment: it is looked at before it is reaped, as systemd looks at a unit when its main process
    ends."""
    deadline = time.monotonic() + timeout
    while True:
        # WNOWAIT: the exit is seen, the zombie stays, so the session is listed before anything else can happen.
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG)
        if info is not None:
            return [p for p in session_processes(proc.pid) if p[0] != proc.pid]
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise subprocess.TimeoutExpired(proc.args, timeout)
        time.sleep(0.005)


def log_entries(cwd: Path) -> list[dict[str, Any]]:
    log = (cwd / "run.log").read_bytes()
    return [json.loads(line) for line in log.splitlines() if line.startswith(b"{")]


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def session_processes(sid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every live process in session ``sid`` (a :func:`spawn_run` child's pid): its
    descendants stay in its session even once they are orphaned."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        state, session = fields[0], int(fields[3])
        if session == sid and state != "Z":
            found.append((int(entry), cmdline.strip()))
    return found


class NotifySocket:
    """systemd's side of sd_notify: a datagram socket read as datagrams arrive (its queue is short), each one
    stored with what ``probe()`` said when it came."""

    def __init__(self, path: Path, probe: Callable[[], Any] = lambda: None) -> None:
        self.path = path
        self._probe = probe
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.05)
        self._lock = threading.Lock()
        self.received: list[tuple[str, Any]] = []
        self._reading = True
        self._thread = threading.Thread(target=self._read, name="notify-socket")
        self._thread.start()

    @property
    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": str(self.path)}

    def _read(self) -> None:
        while self._reading:
            try:
                data = self._sock.recv(4096).decode()
            except TimeoutError:
                continue
            with self._lock:
                self.received.append((data, self._probe()))

    def messages(self) -> list[tuple[str, Any]]:
        with self._lock:
            return list(self.received)

    def close(self) -> None:
        self._reading = False
        self._thread.join()
        self._sock.close()
