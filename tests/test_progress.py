"""Progress of long runs: a bar on a terminal, periodic log lines elsewhere; and the search index kept
current by every sidecar written.

The terminal tests run a real ``mmwatchd`` child on a real pseudo-terminal and read what it drew the way a terminal
shows it (carriage returns overwrite the line); the log-line tests drive the interval with the daemon's clock.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import sqlite3
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest
from configs import load_config, write_config
from fakevlm import FakeVLM, chat_completion
from media import make_jpeg, make_named_text
from running import REPO, spawn_run, stop_run, wait_until

from mmwatchd import log as log_mod
from mmwatchd.cli import ONE_SHOT_ATTEMPTS, _LazyClient, _start_one_shot, main
from mmwatchd.daemon import Daemon
from mmwatchd.progress import Reporter, Snapshot
from mmwatchd.state import State

ENV = {"MMWATCHD_TEST_KEY": "sk-progress"}
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
#: A console log line as structlog draws it: timestamp, [level], event.
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z \[(debug|info|warning|error)\s*\] [a-z_.]+ ")


class Clock:
    """The daemon's clock, moved on only by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def old_jpegs(folder: Path, n: int) -> list[Path]:
    """``n`` photos last changed a minute ago: a scan sends them at once instead of letting them settle first."""
    made = []
    for i in range(n):
        p = make_jpeg(folder / f"{i:03d}.jpg", (64, 48), seed=i)
        os.utime(p, (time.time() - 60, time.time() - 60))
        made.append(p)
    return made


# -- on a terminal ---------------------------------------------------------------------------------------------


def run_on_pty(args: list[str], cwd: Path, *, until: float = 300.0, stop_when: bytes | None = None) -> tuple[int, str]:
    """Run ``mmwatchd ARGS`` with stdout and stderr on a pseudo-terminal 120 columns wide; return its exit code and
    what a terminal would show (:func:`screen`). ``stop_when``: SIGTERM it once that has been drawn (``run``)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmwatchd", *args], cwd=cwd, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
        env={**os.environ, "PYTHONPATH": str(REPO), **ENV}, start_new_session=True,
    )  # fmt: skip
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + until
    signalled = False
    try:
        while True:
            assert time.monotonic() < deadline, "the command did not end in time"
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every writer has closed the terminal
                    break
                if not data:
                    break
                out += data
            seen = ANSI.sub("", out.decode(errors="replace"))
            if stop_when is not None and not signalled and stop_when.decode() in seen:
                proc.send_signal(signal.SIGTERM)
                signalled = True
    finally:
        os.close(master)
        if proc.poll() is None and time.monotonic() >= deadline:
            proc.kill()
        proc.wait(timeout=60)
    return proc.returncode, out.decode("utf-8", errors="replace")


def screen(raw: str) -> list[str]:
    """The lines a terminal would show for ``raw``: colours dropped, each carriage return going back to the start of
    the line, so what a bar redraw or clear overwrote is gone, and what was left half-overwritten shows."""
    lines = []
    for text in ANSI.sub("", raw).split("\n"):
        line: list[str] = []
        col = 0
        for ch in text:
            if ch == "\r":
                col = 0
                continue
            if col < len(line):
                line[col] = ch
            else:
                line.append(ch)
            col += 1
        lines.append("".join(line).rstrip())
    return [line for line in lines if line]


def drawn(raw: str, label: str) -> list[str]:
    """Every state of the bar that was drawn, in order (each redraw starts with a carriage return)."""
    return [part.strip() for part in re.split(r"[\r\n]", ANSI.sub("", raw)) if part.startswith(f"{label}:")]


class TestTerminal:
    def test_scan_shows_a_bar_that_reaches_the_total_and_log_lines_stay_whole(self, tmp_path: Path) -> None:
        with FakeVLM(latency_s=0.05) as fake:
            cfg = write_config(tmp_path, base_url=fake.base_url)
            photos = old_jpegs(tmp_path / "inbox", 120)
            make_named_text(tmp_path / "inbox" / "broken.jpg", "not a photo at all\n")  # an error sidecar
            code, raw = run_on_pty(["scan", "-c", str(cfg)], tmp_path)
        assert code == 1, raw[-2000:]  # one file failed
        assert all(p.with_name(p.name + ".json").exists() for p in photos)
        states = drawn(raw, "scan")
        assert any("%|" in s for s in states), states[:5]  # a bar, once the walk had found every file
        assert re.search(r"\| 121/121, 1 failed, 0 in flight", states[-1]), states[-1]
        shown = screen(raw)
        bars = [line for line in shown if line.startswith("scan:")]
        assert bars and "121/121" in bars[-1], bars[-3:]
        # Every other line is whole: a log line, or the summary printed after the bar.
        rest = [line for line in shown if not line.startswith("scan:")]
        for line in rest:
            assert LOG_LINE.match(line) or line.startswith(("ok ", "error ", "scan done:")), repr(line)
        done = [line for line in rest if " job.done " in line]
        assert len(done) == 120 and all(line.rstrip().endswith("status=ok") for line in done), done[:3]
        assert any(" job.failed " in line and "broken.jpg" in line for line in rest)
        assert "scan done: 120 described, 1 failed" in rest[-1]

    def test_once_with_several_files_shows_the_bar(self, tmp_path: Path) -> None:
        with FakeVLM(latency_s=0.05) as fake:
            cfg = write_config(tmp_path, base_url=fake.base_url)
            photos = old_jpegs(tmp_path / "inbox", 5)
            code, raw = run_on_pty(["once", "-c", str(cfg), *map(str, photos)], tmp_path)
            assert code == 0, raw[-2000:]
            code_one, raw_one = run_on_pty(["once", "-c", str(cfg), "--force", str(photos[0])], tmp_path)
        states = drawn(raw, "once")
        assert states and "5/5, 0 failed, 0 in flight" in states[-1], states[-3:]
        assert all("%|" in s or "still finding files" in s for s in states), states
        assert code_one == 0 and not drawn(raw_one, "once")  # one file: nothing to follow

    def test_run_shows_the_startup_backlog(self, tmp_path: Path) -> None:
        with FakeVLM(latency_s=0.05) as fake:
            cfg = write_config(tmp_path, base_url=fake.base_url)
            photos = old_jpegs(tmp_path / "inbox", 30)
            code, raw = run_on_pty(["run", "-c", str(cfg)], tmp_path, stop_when=b"30/30")
        assert code == 0, raw[-2000:]
        assert all(p.with_name(p.name + ".json").exists() for p in photos)
        states = drawn(raw, "startup scan")
        assert "30/30, 0 failed, 0 in flight" in states[-1], states[-3:]
        shown = screen(raw)
        assert any(" daemon.stopped " in line for line in shown)
        for line in shown:
            assert line.startswith("startup scan:") or LOG_LINE.match(line), repr(line)


# -- not a terminal --------------------------------------------------------------------------------------------


class TestLogLines:
    def test_a_line_every_interval_on_the_daemons_clock_and_none_before(
        self, tmp_path: Path, fake_vlm: FakeVLM, capsys: pytest.CaptureFixture[str]
    ) -> None:
        cfg = load_config(tmp_path, base_url=fake_vlm.base_url, progress_interval_s=30)
        log_mod.setup("info", fmt="json")
        photos = old_jpegs(tmp_path / "inbox", 3)
        release = threading.Event()
        for _ in photos:
            fake_vlm.enqueue(json=chat_completion("a test photo"), hold=release, path="/v1/chat/completions")
        clock = Clock()
        state = State(tmp_path / "state" / "state.sqlite3")
        daemon = Daemon(cfg, _LazyClient(cfg, state), state=state, clock=clock,  # type: ignore[arg-type]
                        one_shot_attempts=ONE_SHOT_ATTEMPTS)  # fmt: skip
        reporter = Reporter(daemon.progress, clock=clock, interval_s=cfg.progress_interval_s, tty=False)
        try:
            _start_one_shot(daemon, iter(photos), lambda files: daemon.submit_all(files, scanned=True))
            wait_until(lambda: len(fake_vlm.chat_requests) == 2)  # concurrency 2: both workers wait for answers
            wait_until(lambda: daemon.progress().in_flight == 2)
            reporter.tick()
            clock.now += 29.9
            reporter.tick()
            assert reporter.lines == 0
            clock.now += 0.1
            reporter.tick()
            release.set()
            daemon.wait_idle()
            reporter.tick()  # finished, but the interval has not passed again
            clock.now += 30
            reporter.tick()
        finally:
            daemon.close()
        lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if '"progress"' in line]
        assert reporter.lines == 2 and len(lines) == 2
        first, last = lines
        assert first["event"] == "progress" and first["what"] == "scan"
        assert (first["done"], first["total"], first["failed"], first["in_flight"]) == (0, 3, 0, 2)
        assert first["endpoint"] == "up" and first["rate_per_min"] == 0.0 and first["eta_s"] is None
        assert (last["done"], last["total"], last["failed"], last["in_flight"]) == (3, 3, 0, 0)
        assert last["rate_per_min"] == 3.0 and last["eta_s"] == 0  # 3 files in the 60 s the clock moved

    def test_scan_to_a_file_logs_progress_lines_and_a_fast_one_none(self, tmp_path: Path) -> None:
        with FakeVLM(latency_s=0.05) as fake:
            cfg = write_config(tmp_path, base_url=fake.base_url, progress_interval_s=0.2,
                               endpoint={"concurrency": 1})  # fmt: skip
            old_jpegs(tmp_path / "inbox", 40)  # 40 answers one after the other: two seconds at the very least
            slow = self._scan(cfg, tmp_path / "slow.log")
            fast_cfg = write_config(tmp_path / "fast", base_url=fake.base_url)  # the default 30 s
            old_jpegs(tmp_path / "fast" / "inbox", 3)
            fast = self._scan(fast_cfg, tmp_path / "fast.log")
        lines = [e for e in slow if e["event"] == "progress"]
        assert lines, [e["event"] for e in slow]
        for e in lines:
            assert e["level"] == "info" and e["what"] == "scan"
            assert {"done", "total", "failed", "in_flight", "rate_per_min", "eta_s", "endpoint"} <= e.keys()
            assert 0 <= e["done"] <= 40 and e["total"] in (None, 40) and e["failed"] == 0
        assert [e["done"] for e in lines] == sorted(e["done"] for e in lines)
        assert sum(e["event"] == "job.done" for e in slow) == 40
        assert sum(e["event"] == "job.done" for e in fast) == 3
        assert not [e for e in fast if e["event"] == "progress"]

    @staticmethod
    def _scan(cfg: Path, log: Path) -> list[dict]:
        with open(log, "wb") as err:
            run = subprocess.run(
                [sys.executable, "-m", "mmwatchd", "scan", "-c", str(cfg)], stdout=subprocess.DEVNULL, stderr=err,
                env={**os.environ, "PYTHONPATH": str(REPO), **ENV}, timeout=300,
            )  # fmt: skip
        text = log.read_text()
        assert run.returncode == 0, text[-2000:]
        assert "\r" not in text and "%|" not in text  # no bar where there is no terminal
        return [json.loads(line) for line in text.splitlines()]  # every line is a JSON log line


class TestEndpointState:
    def test_rate_limited_while_a_429_retry_waits(self, tmp_path: Path, fake_vlm: FakeVLM) -> None:
        cfg = load_config(tmp_path, base_url=fake_vlm.base_url)
        log_mod.setup("warning", fmt="json")
        photo = old_jpegs(tmp_path / "inbox", 1)[0]
        fake_vlm.enqueue(status=429, json={"error": {"message": "slow down"}}, headers={"Retry-After": "120"},
                         path="/v1/chat/completions")  # fmt: skip
        clock = Clock()
        state = State(tmp_path / "state" / "state.sqlite3")
        daemon = Daemon(cfg, _LazyClient(cfg, state), state=state, clock=clock,  # type: ignore[arg-type]
                        one_shot_attempts=ONE_SHOT_ATTEMPTS)  # fmt: skip
        try:
            _start_one_shot(daemon, iter(()), daemon.submit_all)
            assert daemon.progress().endpoint == "up"
            daemon.submit(photo)
            wait_until(lambda: daemon.progress().endpoint == "rate-limited")
            clock.now += 121  # the retry is due: it goes through
            wait_until(lambda: photo.with_name(photo.name + ".json").exists())
            daemon.wait_idle()
            assert daemon.progress() == Snapshot(done=1, failed=0, in_flight=0, total=1, endpoint="up")
        finally:
            daemon.close()

    def test_waiting_for_the_endpoint_while_it_is_down(self, tmp_path: Path, fake_vlm: FakeVLM) -> None:
        cfg = load_config(tmp_path, base_url=fake_vlm.base_url)
        log_mod.setup("error", fmt="json")
        fake_vlm.pause()
        daemon = Daemon(cfg, _LazyClient(cfg, None))  # type: ignore[arg-type]
        try:
            daemon.start()
            wait_until(lambda: daemon.progress().endpoint == "waiting for the endpoint")
        finally:
            daemon.stop()
            fake_vlm.resume()


# -- the search index ------------------------------------------------------------------------------------------


class TestSearchIndex:
    def test_every_sidecar_a_scan_writes_is_in_the_index_without_a_refresh(
        self, tmp_path: Path, fake_vlm: FakeVLM
    ) -> None:
        cfg = write_config(tmp_path, base_url=fake_vlm.base_url)
        photos = old_jpegs(tmp_path / "inbox", 4)
        make_named_text(tmp_path / "inbox" / "broken.jpg", "not a photo at all\n")
        assert main(["scan", "-c", str(cfg)]) == 1  # the broken one failed, with an error sidecar
        db = sqlite3.connect(tmp_path / "state" / "search.sqlite3")
        try:
            rows = dict(db.execute("SELECT media, status FROM docs").fetchall())
            matched = db.execute("SELECT count(*) FROM fts WHERE fts MATCH 'images'").fetchone()[0]
        finally:
            db.close()
        assert {os.fsdecode(k): v for k, v in rows.items()} == {
            **{str(p): "ok" for p in photos},
            str(tmp_path / "inbox" / "broken.jpg"): "error",
        }
        assert matched == 4  # the fake's captions ("saw 1 images ...") are searchable at once

    def test_an_index_that_cannot_be_written_is_a_single_warning(
        self, tmp_path: Path, fake_vlm: FakeVLM, capsys: pytest.CaptureFixture[str]
    ) -> None:
        cfg = write_config(tmp_path, base_url=fake_vlm.base_url)
        photos = old_jpegs(tmp_path / "inbox", 3)
        (tmp_path / "state" / "search.sqlite3").mkdir(parents=True)  # not a database file
        assert main(["scan", "-c", str(cfg), "--log-format", "json"]) == 0
        assert all(p.with_name(p.name + ".json").exists() for p in photos)
        warnings = [json.loads(line) for line in capsys.readouterr().err.splitlines() if "search.index_failed" in line]
        assert len(warnings) == 1 and "search.sqlite3" in warnings[0]["reason"]


class TestRunLogLines:
    def test_run_logs_the_startup_backlog_then_says_it_is_through(self, tmp_path: Path) -> None:
        with FakeVLM(latency_s=0.1) as fake:
            cfg = write_config(tmp_path, base_url=fake.base_url, progress_interval_s=0.2,
                               endpoint={"concurrency": 1})  # fmt: skip
            photos = old_jpegs(tmp_path / "inbox", 30)  # three seconds of answers at the very least
            proc = spawn_run(cfg, tmp_path, env=ENV)
            try:
                wait_until(lambda: b'"progress.done"' in (tmp_path / "run.log").read_bytes(), timeout=120)
            finally:
                logs = stop_run(proc, tmp_path)
        assert all(p.with_name(p.name + ".json").exists() for p in photos)
        lines = [e for e in logs if e["event"] == "progress"]
        assert lines and all(e["what"] == "startup scan" for e in lines)
        done = [e for e in logs if e["event"] == "progress.done"]
        assert len(done) == 1 and (done[0]["done"], done[0]["total"], done[0]["failed"]) == (30, 30, 0)
        assert [e["event"] for e in logs].index("progress.done") > max(
            i for i, e in enumerate(logs) if e["event"] == "progress"
        )
