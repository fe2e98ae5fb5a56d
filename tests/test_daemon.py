"""The daemon in-process: real watcher, real workers, the real openai client against a loopback server."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from configs import load_config
from fakevlm import FakeVLM, chat_completion
from media import make_jpeg

from mmwatchd.daemon import Daemon
from mmwatchd.vlm import VLMClient


@pytest.fixture
def running(tmp_path: Path, fake_vlm: FakeVLM) -> Iterator[Runner]:
    r = Runner(tmp_path, fake_vlm)
    try:
        yield r
    finally:
        r.stop()


class Runner:
    """A daemon running ``run()`` in a thread, as the CLI runs it in the main thread."""

    def __init__(self, tmp_path: Path, fake: FakeVLM) -> None:
        self.tmp, self.fake = tmp_path, fake
        self.inbox = tmp_path / "inbox"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.client: VLMClient | None = None

    def start(self, **changes: object) -> Daemon:
        cfg = load_config(self.tmp, base_url=self.fake.base_url, **changes)
        self.client = VLMClient(cfg.endpoint, api_key=None)
        self.daemon = Daemon(cfg, self.client)
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
        if self.client:
            self.client.close()

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


def test_slow_copy_is_sent_once_and_whole(running: Runner) -> None:
    running.start()
    src = make_jpeg(running.tmp / "src.jpg", (800, 600))
    data = src.read_bytes()
    dst = running.inbox / "copy.jpg"
    with open(dst, "wb") as fh:
        for i in range(0, len(data), len(data) // 5 + 1):
            fh.write(data[i : i + len(data) // 5 + 1])
            fh.flush()
            time.sleep(0.15)  # a slow network copy, quieter than settle_s between chunks
    doc = running.wait_sidecar(dst)
    assert doc["status"] == "ok" and doc["source"]["size"] == len(data)
    time.sleep(0.8)  # nothing else may come of it: no second request, no self-trigger from the sidecar
    assert len(running.fake.chat_requests) == 1


def test_model_missing_from_the_server_is_warned_once(running: Runner) -> None:
    with structlog.testing.capture_logs() as logs:
        running.start(endpoint={"model": "qwen2.5vl:7b"}, rule={"model": "not-pulled"})
        photo = make_jpeg(running.inbox / "a.jpg", (64, 48))
        running.wait_sidecar(photo)
    warnings = [e for e in logs if e["event"] == "endpoint.model_not_listed"]
    assert len(warnings) == 1 and warnings[0]["models"] == ["not-pulled"]


def test_transient_failure_is_retried_and_then_succeeds(running: Runner) -> None:
    running.fake.enqueue(status=503, json={"error": {"message": "loading model"}}, path="/v1/chat/completions")
    photo = make_jpeg(running.inbox / "a.jpg", (64, 48))
    running.start()
    assert running.wait_sidecar(photo, timeout=30)["status"] == "ok"
    assert len(running.fake.chat_requests) == 2


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
