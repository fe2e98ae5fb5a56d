"""``mmwatchd run`` as a real child process, the way systemd runs it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def spawn_run(cfg: Path, cwd: Path, env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start ``mmwatchd run``; its JSON log goes to ``cwd/run.log`` (a pipe nobody reads would fill and block it)."""
    with open(cwd / "run.log", "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "mmwatchd", "run", "-c", str(cfg), "--log-format", "json"],
            cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
            stdout=subprocess.DEVNULL, stderr=log,
        )  # fmt: skip


def stop_run(proc: subprocess.Popen[bytes], cwd: Path) -> list[dict[str, Any]]:
    """SIGTERM, then check it stopped cleanly (exit 0, no traceback); return its log entries."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    log = (cwd / "run.log").read_bytes()
    assert proc.returncode == 0, log[-2000:]
    assert b"Traceback" not in log, log[-2000:]
    return [json.loads(line) for line in log.splitlines() if line.startswith(b"{")]


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)
