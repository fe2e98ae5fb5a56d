"""``mmwatchd run`` as systemd runs it: a real child process, real signals, a real notify socket, a startup backlog
against a slow endpoint."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
from configs import write_config
from fakevlm import FakeVLM, chat_completion
from media import make_jpeg
from running import NotifySocket, exited_leaving, session_processes, spawn_run, stop_run, wait_until

from mmwatchd.sidecar import LOCK_MARK

BACKLOG = 150
LATENCY_S = 0.3
CONCURRENCY = 2


def _backlog(inbox: Path, n: int = BACKLOG) -> list[Path]:
    data = make_jpeg(inbox.parent / "one.jpg", (32, 24)).read_bytes()
    inbox.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = inbox / f"{i:04}.jpg"
        path.write_bytes(data)
        os.utime(path, (1_600_000_000, 1_600_000_000))  # long settled
        paths.append(path)
    return paths


def _slow(fake: FakeVLM, n: int = BACKLOG) -> None:
    for i in range(n):
        fake.enqueue(json=chat_completion(f"answer {i}"), delay_s=LATENCY_S, path="/v1/chat/completions")


def _whole_sidecars(inbox: Path) -> int:
    names = os.listdir(inbox)
    assert not [n for n in names if "mmwatchd-tmp" in n], "a sidecar was left half-written"
    sidecars = [n for n in names if n.endswith(".json")]
    for n in sidecars:
        json.loads((inbox / n).read_text())
    return len(sidecars)


@pytest.fixture
def notify(tmp_path: Path, fake_vlm: FakeVLM):  # type: ignore[no-untyped-def]
    sock = NotifySocket(tmp_path / "notify.sock", probe=lambda: len(fake_vlm.chat_requests))
    try:
        yield sock
    finally:
        sock.close()


class TestBacklog:
    def test_watchdog_pings_and_status_go_on_through_the_backlog_and_sigterm_stops_it(
        self, tmp_path: Path, fake_vlm: FakeVLM, notify: NotifySocket
    ) -> None:
        inbox = tmp_path / "inbox"
        _backlog(inbox)
        _slow(fake_vlm)
        cfg = write_config(tmp_path, base_url=fake_vlm.base_url, endpoint={"concurrency": CONCURRENCY},
                           rescan_interval_s=0)  # fmt: skip
        # WatchdogSec=1s: a ping is due every 0.5 s.
        proc = spawn_run(cfg, tmp_path, env={**notify.env, "WATCHDOG_USEC": "1000000"})
        early = 40  # requests answered so far: at least 110 of the 150 files still waiting

        def pings_during_backlog() -> bool:
            msgs = notify.messages()
            assert (
                len(fake_vlm.chat_requests) <= early
                or len([m for m, seen in msgs if m == "WATCHDOG=1" and seen <= early]) >= 3
            ), f"the backlog was {early} requests in and the watchdog had not been pinged 3 times: {msgs}"
            pings = [m for m, seen in msgs if m == "WATCHDOG=1" and seen <= early]
            # STATUS= follows the work: a line that reports files done, while the backlog is still long.
            status = [m for m, seen in msgs if m.startswith("STATUS=") and "endpoint up" in m and seen <= early
                      and not m.startswith("STATUS=0 queued") and not re.search(r" 0 done", m)]  # fmt: skip
            return len(pings) >= 3 and bool(status)

        try:
            wait_until(pings_during_backlog, timeout=120)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        seen_at_signal = len(fake_vlm.chat_requests)
        assert seen_at_signal < BACKLOG
        logs = stop_run(proc, tmp_path)
        after = len(fake_vlm.chat_requests) - seen_at_signal
        assert after <= CONCURRENCY, f"{after} requests were sent after SIGTERM"
        assert _whole_sidecars(inbox) < BACKLOG
        assert session_processes(proc.pid) == [], "processes outlived the daemon"
        events = [e["event"] for e in logs]
        assert "daemon.stopping" in events and "daemon.stopped" in events
        assert notify.messages()[-1][0] == "STOPPING=1"

    def test_a_request_in_flight_at_sigterm_is_not_retried_by_the_sdk(self, tmp_path: Path, fake_vlm: FakeVLM) -> None:
        """The SDK retries a 5xx by itself (endpoint.max_retries): after a stop, that retry must not leave."""
        inbox = tmp_path / "inbox"
        _backlog(inbox, 3)
        fake_vlm.enqueue(status=503, json={"error": {"message": "overloaded"}}, headers={"Retry-After": "0"},
                         delay_s=2.0, path="/v1/chat/completions")  # fmt: skip
        cfg = write_config(tmp_path, base_url=fake_vlm.base_url, endpoint={"concurrency": 1, "max_retries": 2})
        proc = spawn_run(cfg, tmp_path)
        try:
            fake_vlm.wait_for_requests(2, timeout=60)  # GET /models, then the request that will get the 503
        finally:
            stop_run(proc, tmp_path)
        assert len(fake_vlm.chat_requests) == 1
        assert _whole_sidecars(inbox) == 0

    def test_an_idle_stop_ends_every_process_it_started(self, tmp_path: Path, fake_vlm: FakeVLM) -> None:
        make_jpeg(tmp_path / "inbox" / "a.jpg", (32, 24))
        cfg = write_config(tmp_path, base_url=fake_vlm.base_url)
        proc = spawn_run(cfg, tmp_path)
        wait_until(lambda: (tmp_path / "inbox" / "a.jpg.json").exists())
        wait_until(lambda: len(session_processes(proc.pid)) > 1)  # the decoder processes run
        stop_run(proc, tmp_path)
        assert session_processes(proc.pid) == [], "processes outlived the daemon"


def _scan(cfg: Path, cwd: Path, timeout: float = 120) -> tuple[int, str]:
    """``mmwatchd scan`` as a child process; (exit code, stderr). A scan that hangs fails the test."""
    proc = spawn_run(cfg, cwd, command="scan")
    try:
        proc.wait(timeout=timeout)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc.returncode, (cwd / "run.log").read_text(errors="replace")


class TestRequestCaps:
    def test_the_daily_cap_counts_every_http_request_and_ends_a_scan(self, tmp_path: Path, fake_vlm: FakeVLM) -> None:
        # The first file's first request gets a 500, which the SDK retries by itself: two HTTP requests, one file.
        fake_vlm.enqueue(status=500, json={"error": {"message": "try again"}}, path="/v1/chat/completions")
        inbox = tmp_path / "inbox"
        _backlog(inbox, 6)
        cfg = write_config(tmp_path, base_url=fake_vlm.base_url,
                           endpoint={"max_requests_per_day": 3, "max_retries": 2, "concurrency": 2})  # fmt: skip
        code, log = _scan(cfg, tmp_path)
        assert code == 1
        assert "max_requests_per_day (3) reached" in log
        assert len(fake_vlm.chat_requests) == 3  # the cap, exactly: retries counted, no two workers over it
        assert _whole_sidecars(inbox) == 2
        from mmwatchd.state import State

        with State(tmp_path / "state" / "state.sqlite3") as state:
            assert state.requests_today() == 3


class TestStateFailures:
    def test_a_full_state_disk_costs_no_worker_and_the_scan_ends(self, tmp_path: Path, fake_vlm: FakeVLM) -> None:
        import mounts

        with mounts.tmpfs(tmp_path / "state", size="2m") as state_dir:
            inbox = tmp_path / "inbox"
            _backlog(inbox, 5)
            fake_vlm.enqueue(json=chat_completion("first"), delay_s=1.0, path="/v1/chat/completions")
            cfg = write_config(tmp_path, base_url=fake_vlm.base_url, endpoint={"concurrency": 1},
                               state_dir=str(state_dir))  # fmt: skip
            proc = spawn_run(cfg, tmp_path, command="scan")
            try:
                fake_vlm.wait_for_requests(2, timeout=60)  # GET /models, then the first file's request
                with open(state_dir / "filler", "wb") as fh:  # the state disk fills up under the running scan
                    try:
                        while True:
                            fh.write(b"\0" * 65536)
                            fh.flush()
                    except OSError:
                        pass
                proc.wait(timeout=120)
            finally:
                if proc.returncode is None:
                    proc.kill()
                    proc.wait()
            log = (tmp_path / "run.log").read_text(errors="replace")
            assert proc.returncode == 0, log[-3000:]
            assert "state.failed" in log and "Traceback" not in log
            assert _whole_sidecars(inbox) == 5


class TestSettle:
    def test_a_file_still_being_written_when_the_daemon_starts_is_described_once_whole(
        self, tmp_path: Path, fake_vlm: FakeVLM
    ) -> None:
        data = make_jpeg(tmp_path / "src.jpg", (900, 700)).read_bytes()
        chunks = [data[i : i + len(data) // 8 + 1] for i in range(0, len(data), len(data) // 8 + 1)]
        cfg = write_config(tmp_path, base_url=fake_vlm.base_url, settle_s=2)
        target = tmp_path / "inbox" / "copy.jpg"
        side = target.with_name("copy.jpg.json")
        log = tmp_path / "run.log"
        with open(target, "wb") as fh:
            fh.write(chunks[0])
            fh.flush()
            proc = spawn_run(cfg, tmp_path)
            try:
                # The copy goes on while the daemon starts (however long that takes here), so its startup scan
                # finds the file half-written and just changed; then the rest arrives, a chunk every 0.2 s (well
                # within settle_s: a slow network copy).
                while not log.exists() or b"daemon.scanned" not in log.read_bytes():
                    os.utime(target)
                    time.sleep(0.2)
                for chunk in chunks[1:]:
                    fh.write(chunk)
                    fh.flush()
                    time.sleep(0.2)
                fh.close()
                wait_until(lambda: side.exists() and json.loads(side.read_text())["source"]["size"] == len(data))
            finally:
                stop_run(proc, tmp_path)
        doc = json.loads(side.read_text())
        assert doc["status"] == "ok"
        assert len(fake_vlm.chat_requests) == 1


class TestOverflow:
    def test_a_real_kernel_event_queue_overflow_loses_nothing(self, tmp_path: Path, fake_vlm: FakeVLM) -> None:
        """The daemon is stopped (SIGSTOP) while more events than the kernel queues for one inotify instance
        (``fs.inotify.max_queued_events``, read, never changed) happen in its folder: on SIGCONT it reads a real
        IN_Q_OVERFLOW, rescans, and sends every file exactly once. Nothing depends on timing."""
        limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
        if limit > 200_000:
            pytest.skip(f"max_queued_events is {limit}: too many events to make here")
        inbox = tmp_path / "inbox"
        cfg = write_config(tmp_path, base_url=fake_vlm.base_url, rule={"prompt": "{name}"}, rescan_interval_s=0)
        proc = spawn_run(cfg, tmp_path)
        try:
            wait_until(lambda: b"daemon.scanned" in (tmp_path / "run.log").read_bytes())  # watching, scan done
            os.kill(proc.pid, signal.SIGSTOP)
            try:
                data = make_jpeg(tmp_path / "tiny.jpg", (16, 12)).read_bytes()
                paths = []
                for i in range(300):
                    path = inbox / f"{i:04}.jpg"
                    path.write_bytes(data)
                    paths.append(path)
                # Each touch is one IN_ATTRIB; the kernel merges an event only with an identical one just
                # before it, so going round the files makes one queued event per touch.
                st = [p.stat() for p in paths]
                for n in range(limit + 10):
                    i = n % len(paths)
                    os.utime(paths[i], ns=(st[i].st_atime_ns, st[i].st_mtime_ns))
            finally:
                os.kill(proc.pid, signal.SIGCONT)
            wait_until(lambda: len(fake_vlm.chat_requests) >= 300, timeout=180)
            wait_until(lambda: b"daemon.scanned" in (tmp_path / "run.log").read_bytes().split(b"watch.overflow")[-1])
        finally:
            logs = stop_run(proc, tmp_path)
        events = [e["event"] for e in logs]
        assert "watch.overflow" in events
        from collections import Counter

        sent = Counter(json.loads(r.content[0]["text"]) for r in fake_vlm.chat_requests)
        assert len(sent) == 300 and set(sent.values()) == {1}


class TestSignals:
    def test_signals_are_handled_on_the_relay_thread_not_in_a_handler(self) -> None:
        """A handler runs between two bytecodes of whatever the main thread does, perhaps holding structlog's
        writer lock: the work a signal asks for is done on the relay's own thread."""
        import threading

        from mmwatchd.daemon import SignalRelay

        seen: list[tuple[int, str]] = []
        done = threading.Event()

        def on_hup(signum: int) -> None:
            seen.append((signum, threading.current_thread().name))
            done.set()

        before = signal.getsignal(signal.SIGHUP)
        with SignalRelay({signal.SIGHUP: on_hup}):
            os.kill(os.getpid(), signal.SIGHUP)
            assert done.wait(10)
        assert seen == [(signal.SIGHUP, "mmwatchd-signals")]
        assert signal.getsignal(signal.SIGHUP) == before

    def test_sigterm_sends_none_of_the_requests_encoded_ahead(self, tmp_path: Path, fake_vlm: FakeVLM) -> None:
        """The service encodes the next files while every slot is on the wire. SIGTERM then: the requests on the
        wire finish and get their sidecars, and the ready ones never leave, although their slots free up."""
        inbox = tmp_path / "inbox"
        _backlog(inbox, 10)
        held = threading.Event()
        for i in range(CONCURRENCY):
            fake_vlm.enqueue(json=chat_completion(f"answer {i}"), hold=held, path="/v1/chat/completions")
        cfg = write_config(tmp_path, base_url=fake_vlm.base_url, endpoint={"concurrency": CONCURRENCY},
                           rescan_interval_s=0)  # fmt: skip
        proc = spawn_run(cfg, tmp_path)
        try:
            fake_vlm.wait_for_requests(1 + CONCURRENCY, timeout=60)  # GET /models, then every slot held
            # Files the service is working on hold a claim: those on the wire, and those encoded and waiting.
            wait_until(lambda: len([n for n in os.listdir(inbox) if n.endswith(LOCK_MARK)]) > CONCURRENCY, timeout=60)
            proc.send_signal(signal.SIGTERM)
            wait_until(lambda: b"daemon.stopping" in (tmp_path / "run.log").read_bytes())
        finally:
            held.set()  # the requests on the wire are answered now, after the stop
        left = exited_leaving(proc, timeout=30)
        proc.wait()
        assert not left and proc.returncode == 0
        assert len(fake_vlm.chat_requests) == CONCURRENCY  # none of the ready requests was sent
        assert _whole_sidecars(inbox) == CONCURRENCY
        assert not [n for n in os.listdir(inbox) if n.endswith(LOCK_MARK)]  # every claim released

    def test_a_second_sigterm_stops_at_once(self, tmp_path: Path, fake_vlm: FakeVLM) -> None:
        inbox = tmp_path / "inbox"
        _backlog(inbox, 10)
        for i in range(10):  # requests that would hold a graceful stop up for a minute
            fake_vlm.enqueue(json=chat_completion(f"answer {i}"), delay_s=60, path="/v1/chat/completions")
        cfg = write_config(tmp_path, base_url=fake_vlm.base_url, endpoint={"timeout_s": 120})
        proc = spawn_run(cfg, tmp_path)
        try:
            fake_vlm.wait_for_requests(3, timeout=60)  # GET /models and two requests in flight
            proc.send_signal(signal.SIGTERM)
            wait_until(lambda: b"daemon.stopping" in (tmp_path / "run.log").read_bytes())
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 128 + signal.SIGTERM
        finally:
            if proc.returncode is None:
                proc.kill()
                proc.wait()
        assert b"daemon.stop_now" in (tmp_path / "run.log").read_bytes()
        assert _whole_sidecars(inbox) == 0
