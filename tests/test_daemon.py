"""The daemon in-process: real watcher, real workers, real state store, real sd_notify socket, the real openai
client against a loopback server."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from configs import write_config
from fakevlm import FakeVLM, chat_completion, error_body
from media import make_jpeg
from running import wait_until

from mmwatchd import config
from mmwatchd.daemon import Daemon, RateLimiter
from mmwatchd.notify import Notifier
from mmwatchd.state import State
from mmwatchd.vlm import VLMClient


@pytest.fixture
def running(tmp_path: Path, fake_vlm: FakeVLM) -> Iterator[Runner]:
    r = Runner(tmp_path, fake_vlm)
    try:
        yield r
    finally:
        r.close()


class Runner:
    """A daemon running ``run()`` in a thread, as the CLI runs it in the main thread, with a notify socket."""

    def __init__(self, tmp_path: Path, fake: FakeVLM) -> None:
        self.tmp, self.fake = tmp_path, fake
        self.inbox = tmp_path / "inbox"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._clients: list[VLMClient] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(tmp_path / "notify.sock"))
        self.sock.settimeout(0.05)
        self._received: list[str] = []
        self._reader = threading.Thread(target=self._read, name="notify-reader")
        self._reading = True
        self._reader.start()
        self.notify_env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock")}
        self.state: State | None = None
        self.daemon: Daemon | None = None

    def client(self, cfg: config.Config) -> VLMClient:
        c = VLMClient(cfg.endpoint, api_key=None)
        self._clients.append(c)
        return c

    def start(self, watchdog_usec: int | None = None, *, clock: Any = time.monotonic, **changes: Any) -> Daemon:
        self.config_path = write_config(self.tmp, base_url=self.fake.base_url, **changes)
        cfg = config.load(self.config_path)
        env = dict(self.notify_env)
        if watchdog_usec:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        self.state = State(self.tmp / "state" / "state.sqlite3")
        self.notifier = Notifier(env)
        self.daemon = Daemon(
            cfg, self.client(cfg), state=self.state, notifier=self.notifier,
            reload=lambda: config.load(self.config_path), make_client=self.client, clock=clock,
        )  # fmt: skip
        ready = threading.Event()
        self._thread = threading.Thread(target=self.daemon.run, args=(self._stop,), kwargs={"on_ready": ready.set})
        self._thread.start()
        assert ready.wait(10)
        return self.daemon

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(30)
            assert not self._thread.is_alive()
            self._thread = None

    def restart(self, **changes: Any) -> Daemon:
        """Stop the service and start it again on the same state database, as systemd would."""
        self.stop()
        if self.state:
            self.state.close()
            self.notifier.close()
        self._stop = threading.Event()
        return self.start(**changes)

    def close(self) -> None:
        self.stop()
        for c in self._clients:
            c.close()
        if self.state:
            self.state.close()
            self.notifier.close()
        self._reading = False
        self._reader.join()
        self.sock.close()

    def _read(self) -> None:
        # Like systemd, read datagrams as they come: the socket's queue is short (often 10).
        while self._reading:
            try:
                self._received.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue

    def messages(self) -> list[str]:
        """Datagrams received since the last call."""
        time.sleep(0.1)
        out, self._received = self._received, []
        return out

    def wait_sidecar(self, path: Path, timeout: float = 15) -> dict:
        side = path.with_name(path.name + ".json")
        deadline = time.monotonic() + timeout
        while not side.exists():
            assert time.monotonic() < deadline, f"no sidecar for {path.name}"
            time.sleep(0.02)
        return json.loads(side.read_text())


def test_requests_in_flight_never_exceed_concurrency(running: Runner) -> None:
    for i in range(6):
        running.fake.enqueue(json=chat_completion(f"answer {i}"), delay_s=0.4, path="/v1/chat/completions")
    photos = [make_jpeg(running.inbox / f"{i}.jpg", (64, 48), seed=i) for i in range(6)]
    running.start(endpoint={"concurrency": 2})
    for p in photos:
        assert running.wait_sidecar(p)["status"] == "ok"
    assert running.fake.peak_in_flight == 2


def test_the_next_request_is_ready_before_a_slot_frees(running: Runner) -> None:
    """One more worker per decoder process than slots: while the only request allowed is held on the wire, the next
    file is encoded and its request waits, ready, for the slot (and never goes beside the held one)."""
    hold = threading.Event()
    running.fake.enqueue(json=chat_completion("first"), hold=hold, path="/v1/chat/completions")
    running.fake.enqueue(json=chat_completion("second"), path="/v1/chat/completions")
    photos = [make_jpeg(running.inbox / f"{i}.jpg", (64, 48), seed=i) for i in range(2)]
    daemon = running.start(endpoint={"concurrency": 1})
    try:
        deadline = time.monotonic() + 20
        while daemon.pool.ready < 1 or not running.fake.chat_requests:
            assert time.monotonic() < deadline, "the second file's request was never ready while the first was held"
            time.sleep(0.01)
        assert len(running.fake.chat_requests) == 1  # ready, not sent: the slot is the held request's
        with daemon._lock:  # the waiting worker is not busy: never 'stuck', however long it waits
            assert len(daemon._busy) == 1
        assert daemon._status_line().startswith("1 queued, 1 in flight")  # the ready one is not on the wire yet
    finally:
        hold.set()
    for p in photos:
        assert running.wait_sidecar(p)["status"] == "ok"
    assert running.fake.peak_in_flight == 1


class FakeClock:
    """Monotonic time that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


def test_slow_copy_is_sent_once_and_whole(running: Runner) -> None:
    """A copy that pauses between chunks for less than settle_s is sent once it is done, whole. Time is a fake
    clock: however long the machine takes to deliver each event, settle_s has not passed until the test says so."""
    clock = FakeClock()
    running.start(clock=clock, settle_s=2)
    src = make_jpeg(running.tmp / "src.jpg", (800, 600))
    data = src.read_bytes()
    dst = running.inbox / "copy.jpg"
    step = len(data) // 5 + 1
    with open(dst, "wb") as fh:
        for i in range(0, len(data), step):
            fh.write(data[i : i + step])
            fh.flush()
            time.sleep(0.05)  # let the watcher see it (how soon does not matter)
            clock.advance(1.0)  # half of settle_s: never long enough while the copy goes on
            assert running.fake.chat_requests == []
    side = dst.with_name(dst.name + ".json")
    deadline = time.monotonic() + 30
    while not side.exists():  # the copy is done: time may pass now (the last events may still be on their way)
        assert time.monotonic() < deadline, "no sidecar"
        clock.advance(0.5)
        time.sleep(0.05)
    doc = running.wait_sidecar(dst)
    assert doc["status"] == "ok" and doc["source"]["size"] == len(data)
    clock.advance(5)
    time.sleep(0.5)  # nothing else may come of it: no second request, no self-trigger from the sidecar
    assert len(running.fake.chat_requests) == 1


class TestScanSettle:
    """Files a scan finds that changed within settle_s go through the stability tracker (injected clocks)."""

    def _daemon(self, tmp_path: Path, fake: FakeVLM, clock: FakeClock, wall: FakeClock) -> Daemon:
        cfg = config.load(write_config(tmp_path, base_url=fake.base_url, settle_s=2))
        return Daemon(cfg, VLMClient(cfg.endpoint, api_key=None), clock=clock, wall_clock=wall)

    def test_a_recent_file_settles_first_and_an_old_one_is_queued_at_once(
        self, tmp_path: Path, fake_vlm: FakeVLM
    ) -> None:
        clock, wall = FakeClock(), FakeClock()
        old = make_jpeg(tmp_path / "inbox" / "old.jpg", (64, 48))
        new = make_jpeg(tmp_path / "inbox" / "new.jpg", (64, 48), seed=2)
        wall.now = new.stat().st_mtime + 1.0  # written a second ago
        os.utime(old, (wall.now - 60, wall.now - 60))
        daemon = self._daemon(tmp_path, fake_vlm, clock, wall)
        try:
            assert daemon.submit(old, scanned=True) and daemon.submit(new, scanned=True)
            assert daemon._queue.get_nowait()[0] == old and daemon._queue.empty()
            daemon._feed_due()
            assert not daemon._intake  # 2 s have not passed
            clock.advance(2.1)
            daemon._feed_due()
            assert list(daemon._intake) == [new]
        finally:
            daemon.close()
            daemon.client.close()

    def test_a_file_that_grows_while_settling_waits_and_one_that_vanishes_is_released(
        self, tmp_path: Path, fake_vlm: FakeVLM
    ) -> None:
        clock, wall = FakeClock(), FakeClock()
        grows = make_jpeg(tmp_path / "inbox" / "grows.jpg", (64, 48))
        gone = make_jpeg(tmp_path / "inbox" / "gone.jpg", (64, 48), seed=2)
        wall.now = grows.stat().st_mtime
        daemon = self._daemon(tmp_path, fake_vlm, clock, wall)
        try:
            assert daemon.submit(grows, scanned=True) and daemon.submit(gone, scanned=True)
            with open(grows, "ab") as fh:
                fh.write(b"more")
            gone.unlink()
            clock.advance(2.1)
            daemon._feed_due()
            assert not daemon._intake and daemon._pending == {grows}  # changed: looked at again later
            clock.advance(2.1)
            daemon._feed_due()
            assert list(daemon._intake) == [grows]
        finally:
            daemon.close()
            daemon.client.close()

    def test_a_pending_file_that_changes_again_is_looked_at_again(self, tmp_path: Path, fake_vlm: FakeVLM) -> None:
        clock, wall = FakeClock(), FakeClock()
        photo = make_jpeg(tmp_path / "inbox" / "a.jpg", (64, 48))
        daemon = self._daemon(tmp_path, fake_vlm, clock, wall)
        try:
            assert daemon.offer(photo)
            assert not daemon.offer(photo)  # changed again while pending
            from mmwatchd.pipeline import Outcome

            daemon.finish(Outcome(path=photo, status="ok"))
            assert list(daemon._intake) == [photo, photo] and photo in daemon._pending
        finally:
            daemon.close()
            daemon.client.close()


class TestSystemd:
    def test_ready_status_watchdog_and_stopping(self, running: Runner) -> None:
        running.start(watchdog_usec=400_000).status_every_s = 0.1  # ping every 0.2 s
        make_jpeg(running.inbox / "a.jpg", (64, 48))
        running.wait_sidecar(running.inbox / "a.jpg")
        time.sleep(0.7)
        running.stop()
        msgs = running.messages()
        assert msgs[0].startswith("READY=1\nSTATUS=") and "endpoint" in msgs[0]
        assert msgs.count("WATCHDOG=1") >= 2
        assert "STATUS=0 queued, 0 in flight, 1 done, 0 failed, 0 retrying; endpoint up" in msgs
        assert msgs[-1] == "STOPPING=1"

    def test_a_stuck_worker_stops_the_watchdog_pings(self, running: Runner) -> None:
        daemon = running.start(watchdog_usec=200_000, endpoint={"timeout_s": 0.05, "max_retries": 0})
        time.sleep(0.4)
        assert "WATCHDOG=1" in running.messages()
        with daemon._lock:  # a worker that has been on one job for an hour
            daemon._busy["mmwatchd-worker-0"] = daemon.clock() - 3600
        time.sleep(0.3)
        running.messages()  # drain what was sent before the check noticed
        time.sleep(0.5)
        assert "WATCHDOG=1" not in running.messages()

    def test_a_stopping_daemon_stops_pulling_from_a_walk(self, running: Runner) -> None:
        daemon = running.start()
        pulled: list[int] = []

        def walk() -> Iterator[Path]:
            for i in range(1000):
                pulled.append(i)
                yield running.inbox / f"{i}.jpg"

        daemon.stopping.set()  # SIGTERM during a rescan of a large tree: the rest of the walk is not waited for
        assert daemon.submit_all(walk()) == 0
        assert len(pulled) <= 1

    def test_reload_applies_a_new_prompt_and_keeps_the_old_config_when_broken(self, running: Runner) -> None:
        daemon = running.start()
        a = make_jpeg(running.inbox / "a.jpg", (64, 48))
        running.wait_sidecar(a)
        write_config(running.tmp, base_url=running.fake.base_url, rule={"prompt": "New words for {name}."},
                     limits={"decode_timeout_s": 33, "decode_memory_mb": 512})  # fmt: skip
        daemon.reload_requested.set()
        # The changed prompt changes the fingerprint: the reload's rescan describes a.jpg again.
        deadline = time.monotonic() + 30
        while len(running.fake.chat_requests) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert running.fake.chat_requests[-1].content[0]["text"] == 'New words for "a.jpg".'
        assert (daemon.isolator.timeout_s, daemon.isolator.memory_bytes) == (33, 512 * 2**20)
        msgs = running.messages()
        reloading = [m for m in msgs if m.startswith("RELOADING=1\nMONOTONIC_USEC=")]
        assert reloading and msgs[msgs.index(reloading[0]) + 1].startswith("READY=1")

        running.config_path.write_text("rules: [\n")  # broken
        with structlog.testing.capture_logs() as logs:
            daemon.reload_requested.set()
            deadline = time.monotonic() + 30
            while not any(e["event"] == "config.reload_failed" for e in logs):
                assert time.monotonic() < deadline
                time.sleep(0.02)
            b = make_jpeg(running.inbox / "b.jpg", (64, 48), seed=3)
            running.wait_sidecar(b)
        assert running.fake.chat_requests[-1].content[0]["text"] == 'New words for "b.jpg".'


class TestFailures:
    def test_429_waits_for_retry_after_and_does_not_use_up_attempts(self, running: Runner) -> None:
        running.fake.enqueue(status=429, json=error_body("slow down"), headers={"Retry-After": "1"},
                             path="/v1/chat/completions")  # fmt: skip
        photo = make_jpeg(running.inbox / "a.jpg", (64, 48))
        t0 = time.monotonic()
        running.start(endpoint={"max_attempts": 1})
        assert running.wait_sidecar(photo)["status"] == "ok"
        assert time.monotonic() - t0 >= 1.0
        assert running.state is not None and running.state.retrying() == []

    def test_repeated_5xx_for_one_file_ends_in_an_error_sidecar(self, running: Runner) -> None:
        for _ in range(3):
            running.fake.enqueue(status=500, json=error_body("the model crashed on this image"),
                                 headers={"Retry-After": "0"}, path="/v1/chat/completions")  # fmt: skip
        photo = make_jpeg(running.inbox / "a.jpg", (64, 48))
        running.start(endpoint={"max_attempts": 2})
        doc = running.wait_sidecar(photo, timeout=30)
        assert doc["status"] == "error" and doc["error"]["kind"] == "unavailable"
        assert doc["error"]["message"].startswith("gave up after repeated failures:")
        assert len(running.fake.chat_requests) == 2  # exactly max_attempts paid requests, never more
        # The state store is written just after the sidecar: wait for it rather than race it.
        wait_until(lambda: bool(running.state.last_errors()))  # type: ignore[union-attr]
        assert running.state.last_errors()[0].path == photo  # type: ignore[union-attr]

    def test_a_hang_past_the_timeout_is_retried(self, running: Runner) -> None:
        running.fake.enqueue(json=chat_completion("too late"), delay_s=5, path="/v1/chat/completions")
        photo = make_jpeg(running.inbox / "a.jpg", (64, 48))
        running.start(endpoint={"timeout_s": 0.5, "max_attempts": 1})
        doc = running.wait_sidecar(photo, timeout=30)
        assert doc["status"] == "ok" and doc["response"]["text"] != "too late"

    def test_unknown_model_fails_no_file(self, running: Runner) -> None:
        running.fake.models = ["fake-vlm"]
        make_jpeg(running.inbox / "a.jpg", (64, 48))
        with structlog.testing.capture_logs() as logs:
            running.start(rule={"model": "not-pulled"})
            deadline = time.monotonic() + 10
            while not any(e["event"] == "endpoint.misconfigured" for e in logs):
                assert time.monotonic() < deadline
                time.sleep(0.02)
        assert [e["models"] for e in logs if e["event"] == "endpoint.model_not_listed"] == [["not-pulled"]]
        misconfigured = [e for e in logs if e["event"] == "endpoint.misconfigured"]
        assert len(misconfigured) == 1 and "ollama pull not-pulled" in misconfigured[0]["reason"]
        assert not (running.inbox / "a.jpg.json").exists()

    def test_daily_cap_pauses_work(self, running: Runner) -> None:
        photos = [make_jpeg(running.inbox / f"{i}.jpg", (64, 48), seed=i) for i in range(3)]
        with structlog.testing.capture_logs() as logs:
            running.start(endpoint={"max_requests_per_day": 2, "concurrency": 1})
            running.wait_sidecar(photos[0])
            running.wait_sidecar(photos[1])
            time.sleep(0.5)
        assert len(running.fake.chat_requests) == 2
        assert not (running.inbox / "2.jpg.json").exists()
        assert any("max_requests_per_day (2) reached" in e.get("reason", "") for e in logs)


class TestIntake:
    def test_periodic_rescan_finds_what_the_watcher_missed(self, running: Runner) -> None:
        # Polling every minute: only the rescan can find the new file in time.
        running.start(watch=[{"path": str(running.inbox), "polling": True, "poll_interval_s": 60}],
                      rescan_interval_s=0.5)  # fmt: skip
        photo = make_jpeg(running.inbox / "late.jpg", (64, 48))
        assert running.wait_sidecar(photo)["status"] == "ok"

    def test_on_success_moves_file_and_sidecar_and_a_failing_hook_loses_nothing(self, running: Runner) -> None:
        done = running.tmp / "done"
        with structlog.testing.capture_logs() as logs:
            running.start(rule={"on_success": {"move_to": str(done), "exec": ["/bin/false", "{path}"]}})
            make_jpeg(running.inbox / "sub" / "a.jpg", (64, 48))
            moved = done / "sub" / "a.jpg"
            running.wait_sidecar(moved)
            deadline = time.monotonic() + 5  # the job's log line follows its actions
            while not any(e["event"] == "job.done" for e in logs):
                assert time.monotonic() < deadline
                time.sleep(0.02)
        assert not (running.inbox / "sub" / "a.jpg").exists()
        job = next(e for e in logs if e["event"] == "job.done")
        assert job["moved_to"] == str(moved) and job["action_problems"]


def test_rate_limiter_allows_n_per_minute() -> None:
    now = [0.0]
    limiter = RateLimiter(2, clock=lambda: now[0])
    stop = threading.Event()
    assert limiter.acquire(stop) and limiter.acquire(stop)
    stop.set()
    assert not limiter.acquire(stop)  # a third within the minute has to wait
    now[0] = 60.1
    assert limiter.acquire(stop)


def test_stop_leaves_no_temp_files(running: Runner) -> None:
    photos = [make_jpeg(running.inbox / f"{i}.jpg", (64, 48), seed=i) for i in range(20)]
    for _ in photos:
        running.fake.enqueue(json=chat_completion("x"), delay_s=0.05, path="/v1/chat/completions")
    running.start()
    running.wait_sidecar(photos[0])
    running.stop()
    names = os.listdir(running.inbox)
    assert not [n for n in names if "mmwatchd-tmp" in n]
    for n in names:
        if n.endswith(".json"):
            json.loads((running.inbox / n).read_text())  # whole JSON, never torn


def test_a_dropped_video_is_described(running: Runner) -> None:
    from media import make_numbered_video

    running.start(rule={"match": {"kind": "any"}, "video": {"frames": 4, "max_side": 96}})
    clip = make_numbered_video(running.tmp / "staging" / "clip.mp4", (160, 120), frames=20, fps=10)
    os.rename(clip, running.inbox / "clip.mp4")
    doc = running.wait_sidecar(running.inbox / "clip.mp4")
    assert doc["status"] == "ok" and doc["media"]["kind"] == "video" and len(doc["media"]["frames"]) == 4
    (req,) = running.fake.chat_requests
    assert req.content[1]["type"] == "video_url"


class TestEndpointWideRefusals:
    WORDS = "response_format json_schema is not supported by this model"

    def _refuse(self, fake: FakeVLM, n: int) -> None:
        for _ in range(n):
            fake.enqueue(status=400, json=error_body(self.WORDS), path="/v1/chat/completions")

    def test_the_same_refusal_for_different_files_pauses_without_error_sidecars_until_a_reload(
        self, running: Runner
    ) -> None:
        self._refuse(running.fake, 6)
        photos = [make_jpeg(running.inbox / f"{i}.jpg", (64, 48), seed=i) for i in range(6)]
        hook = running.tmp / "on_error.log"
        with structlog.testing.capture_logs() as logs:
            daemon = running.start(endpoint={"concurrency": 1}, settle_s=0,
                                   rule={"on_error": {"exec": ["/bin/sh", "-c", f"echo x >> {hook}"]}})  # fmt: skip
            deadline = time.monotonic() + 30
            while not any(e["event"] == "endpoint.refusing" for e in logs):
                assert time.monotonic() < deadline, "work was never paused"
                time.sleep(0.02)
            time.sleep(0.5)  # nothing more may be sent or written while paused
            sent = len(running.fake.chat_requests)
            errors = [p for p in photos if p.with_name(p.name + ".json").exists()]
            # The first two got the refusal as any refused file does; from the third on, it is the endpoint.
            assert sent == 3 and len(errors) == 2
            assert hook.read_text().count("x") == 2
            refusing = [e for e in logs if e["event"] == "endpoint.refusing"]
            assert len(refusing) == 1 and self.WORDS in refusing[0]["reason"]
            assert "endpoint paused" in daemon._status_line()
            # The config is fixed (here the server is), and a reload resumes the work.
            running.fake._script.clear()
            daemon.reload_requested.set()
            for p in photos:
                if p not in errors:
                    assert running.wait_sidecar(p)["status"] == "ok"
        assert any(e["event"] == "endpoint.resumed" for e in logs)
        assert hook.read_text().count("x") == 2

    def test_a_trial_request_that_goes_through_resumes_the_work(
        self, running: Runner, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        import mmwatchd.daemon as daemon_mod

        monkeypatch.setattr(daemon_mod, "TRIAL_FIRST_S", 0.2)  # the first trial after 30 s in real life
        self._refuse(running.fake, 4)  # the server is fixed after the fourth refusal: the first trial gets one
        photos = [make_jpeg(running.inbox / f"{i}.jpg", (64, 48), seed=i) for i in range(6)]
        with structlog.testing.capture_logs() as logs:
            running.start(endpoint={"concurrency": 1}, settle_s=0)
            deadline = time.monotonic() + 60
            while sum(p.with_name(p.name + ".json").exists() for p in photos) < 6:
                assert time.monotonic() < deadline, "work did not resume"
                time.sleep(0.05)
        events = [e["event"] for e in logs]
        assert events.count("endpoint.refusing") == 1 and "endpoint.resumed" in events
        statuses = sorted(json.loads(p.with_name(p.name + ".json").read_text())["status"] for p in photos)
        assert statuses == ["error", "error", "ok", "ok", "ok", "ok"]
        assert len(running.fake.chat_requests) == 8  # 3 refused, 1 refused trial, 4 answered

    def test_refusals_of_one_file_or_different_words_do_not_pause(self, running: Runner) -> None:
        for i in range(4):
            running.fake.enqueue(status=400, json=error_body(f"image {i} is invalid"), path="/v1/chat/completions")
        photos = [make_jpeg(running.inbox / f"{i}.jpg", (64, 48), seed=i) for i in range(4)]
        with structlog.testing.capture_logs() as logs:
            running.start(endpoint={"concurrency": 1}, settle_s=0)
            for p in photos:
                assert running.wait_sidecar(p)["status"] == "error"
        assert not any(e["event"] == "endpoint.refusing" for e in logs)

    def test_a_scan_against_an_endpoint_that_refuses_everything_stops_with_exit_1(
        self, tmp_path: Path, fake_vlm: FakeVLM, capsys: pytest.CaptureFixture[str]
    ) -> None:
        from mmwatchd.cli import main

        self._refuse(fake_vlm, 20)
        for i in range(8):
            make_jpeg(tmp_path / "inbox" / f"{i}.jpg", (64, 48), seed=i)
        cfg = write_config(tmp_path, base_url=fake_vlm.base_url, endpoint={"concurrency": 1}, settle_s=0)
        try:
            assert main(["scan", "-c", str(cfg)]) == 1
        finally:
            structlog.reset_defaults()
        err = capsys.readouterr().err
        assert "refuses every request" in err and self.WORDS in err
        assert len(fake_vlm.chat_requests) == 3
        assert len(list((tmp_path / "inbox").glob("*.json"))) == 2


class TestWorkerHealth:
    def test_a_dead_worker_stops_the_watchdog_pings(self, running: Runner) -> None:
        daemon = running.start(watchdog_usec=200_000, endpoint={"concurrency": 1})
        time.sleep(0.4)
        assert "WATCHDOG=1" in running.messages()

        def broken(outcome: object) -> None:
            raise RuntimeError("a bug past the per-job boundary")

        daemon.finish = broken  # type: ignore[method-assign]
        make_jpeg(running.inbox / "a.jpg", (64, 48))
        deadline = time.monotonic() + 20
        while all(t.is_alive() for t in daemon._workers):  # whichever worker took the file
            assert time.monotonic() < deadline
            time.sleep(0.02)
        running.messages()  # drain what was sent before the check noticed
        time.sleep(0.5)
        assert "WATCHDOG=1" not in running.messages()

    def test_once_does_not_wait_for_a_path_a_dead_worker_held(self, tmp_path: Path, fake_vlm: FakeVLM) -> None:
        cfg = config.load(write_config(tmp_path, base_url=fake_vlm.base_url, endpoint={"concurrency": 1}))
        with VLMClient(cfg.endpoint, api_key=None) as client:
            daemon = Daemon(cfg, client, one_shot_attempts=3)

            def broken(outcome: object) -> None:
                raise RuntimeError("a bug past the per-job boundary")

            daemon.finish = broken  # type: ignore[method-assign]
            daemon.probe_once()
            daemon.start(prober=False)
            try:
                daemon.submit(make_jpeg(tmp_path / "inbox" / "a.jpg", (64, 48)), explicit=True)
                assert daemon.wait_idle(timeout=30)
            finally:
                daemon.close()


class TestReload:
    def test_a_reload_closes_the_old_client_once_no_job_uses_it(self, running: Runner) -> None:
        daemon = running.start()
        first = daemon.client
        running.wait_sidecar(make_jpeg(running.inbox / "a.jpg", (64, 48)))
        write_config(running.tmp, base_url=running.fake.base_url, endpoint={"max_tokens": 99})
        daemon.reload_requested.set()
        deadline = time.monotonic() + 30
        while daemon.client is first:
            assert time.monotonic() < deadline, "the reload made no new client"
            time.sleep(0.02)
        running.wait_sidecar(make_jpeg(running.inbox / "b.jpg", (64, 48), seed=2))
        assert first._client.is_closed()  # type: ignore[attr-defined]
        assert not daemon.client._client.is_closed()  # type: ignore[attr-defined]


def test_a_rescan_prunes_only_index_entries_under_the_folders_it_walked(tmp_path: Path, fake_vlm: FakeVLM) -> None:
    """Two configs (two folders) share one state directory: a scan under one keeps the other's index entries."""
    from mmwatchd.cli import main

    a, b = tmp_path / "a", tmp_path / "b"
    make_jpeg(a / "inbox" / "1.jpg", (64, 48))
    make_jpeg(b / "inbox" / "2.jpg", (64, 48), seed=2)
    state = str(tmp_path / "state")
    cfg_a = write_config(a, base_url=fake_vlm.base_url, state_dir=state, settle_s=0)
    cfg_b = write_config(b, base_url=fake_vlm.base_url, state_dir=state, settle_s=0)
    try:
        assert main(["scan", "-c", str(cfg_a)]) == 0
        assert main(["scan", "-c", str(cfg_b)]) == 0
        assert main(["scan", "-c", str(cfg_a)]) == 0
    finally:
        structlog.reset_defaults()
    with State(tmp_path / "state" / "state.sqlite3") as st:
        assert set(st.done_index()) == {str(a / "inbox" / "1.jpg"), str(b / "inbox" / "2.jpg")}
