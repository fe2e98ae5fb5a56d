"""``concurrency: auto`` in the daemon: the real openai client against the loopback fake server made to batch like a
GPU server (``FakeVLM(capacity=...)``); what the server counts is the evidence, never how long anything took."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from configs import write_config
from fakevlm import FakeVLM, chat_completion, error_body
from media import make_jpeg
from prometheus_client.parser import text_string_to_metric_families
from running import wait_until
from test_daemon import Runner

from mmwatchd import config
from mmwatchd.cli import main
from mmwatchd.daemon import Daemon
from mmwatchd.limiter import INITIAL_LIMIT
from mmwatchd.notify import Notifier
from mmwatchd.state import State
from mmwatchd.vlm import VLMClient

AUTO = {"concurrency": "auto", "max_concurrency": 32}


def test_scan_sends_a_server_that_takes_two_at_once_three_at_most(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """32 workers, and a server that serves two requests at a time and queues the rest: the limiter lets a third
    go (that is how it learns there is a queue) and never a fourth; the limit it found is in the metrics and in
    ``mmwatchd status``."""
    # 0.25 s answers: a busy machine adds to every latency the limiter measures, and must not look like the queue.
    with FakeVLM(latency_s=0.25, capacity=2).start() as fake:
        cfg = write_config(tmp_path, base_url=fake.base_url, endpoint=AUTO)
        for i in range(40):
            make_jpeg(tmp_path / "inbox" / f"{i}.jpg", (64, 48), seed=i)
        prom = tmp_path / "mmwatchd.prom"
        assert main(["scan", "-c", str(cfg), "--log-level", "error", "--metrics-textfile", str(prom)]) == 0
        assert len(fake.chat_requests) == 40
        assert 2 <= fake.peak_in_flight <= 3
    gauges = {
        s.name: s.value for f in text_string_to_metric_families(prom.read_text()) for s in f.samples
    }  # fmt: skip
    assert 1 <= gauges["mmwatchd_concurrency_limit"] <= 3
    capsys.readouterr()
    assert main(["status", "-c", str(cfg), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    conc = report["concurrency"]
    assert conc["auto"] and conc["max"] == 32 and conc["limit"] == gauges["mmwatchd_concurrency_limit"]
    assert main(["status", "-c", str(cfg)]) == 0
    assert f"concurrency: auto (at most 32): {conc['limit']} in flight, as of " in capsys.readouterr().out


def test_a_fixed_concurrency_shows_no_found_limit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path, base_url="http://127.0.0.1:9/v1", endpoint={"concurrency": 3})
    assert main(["status", "-c", str(cfg), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["concurrency"] == 3
    assert main(["status", "-c", str(cfg)]) == 0
    assert "concurrency:" not in capsys.readouterr().out


class TestService:
    @pytest.fixture
    def daemon(self, tmp_path: Path, fake_vlm: FakeVLM) -> Iterator[tuple[Daemon, list[str]]]:
        """The service in a thread (as ``run`` runs it), with auto, the SDK retrying once, and what it notifies."""
        cfg = config.load(write_config(tmp_path, base_url=fake_vlm.base_url, endpoint={**AUTO, "max_retries": 1}))
        sent: list[str] = []
        notifier = Notifier({})
        notifier.status = sent.append  # type: ignore[method-assign]
        notifier.ready = sent.append  # type: ignore[method-assign]
        client = VLMClient(cfg.endpoint, api_key=None)
        state = State(tmp_path / "state" / "state.sqlite3")
        daemon = Daemon(cfg, client, state=state, notifier=notifier)
        stop = threading.Event()
        ready = threading.Event()
        thread = threading.Thread(target=daemon.run, args=(stop,), kwargs={"on_ready": ready.set})
        thread.start()
        try:
            assert ready.wait(10)
            yield daemon, sent
        finally:
            stop.set()
            thread.join(30)
            client.close()
            state.close()

    def test_status_line_shows_the_limit(self, daemon: tuple[Daemon, list[str]]) -> None:
        _, sent = daemon
        assert f"concurrency {INITIAL_LIMIT} (auto, at most 32)" in sent[0]

    def test_a_429_the_sdk_retried_into_a_success_still_cuts_the_limit(
        self, daemon: tuple[Daemon, list[str]], fake_vlm: FakeVLM, tmp_path: Path
    ) -> None:
        d, _ = daemon
        fake_vlm.enqueue(status=429, json=error_body("slow down"), headers={"retry-after-ms": "10"},
                         path="/v1/chat/completions")  # fmt: skip
        fake_vlm.enqueue(json=chat_completion("a photo"), path="/v1/chat/completions")
        photo = make_jpeg(tmp_path / "inbox" / "a.jpg", (64, 48))
        side = photo.with_name("a.jpg.json")
        wait_until(side.exists)
        assert json.loads(side.read_text())["status"] == "ok"
        assert len(fake_vlm.chat_requests) == 2
        assert d.pool.endpoints[0].concurrency == 1  # released before the sidecar was written

    def test_a_refusal_says_nothing_about_the_load(
        self, daemon: tuple[Daemon, list[str]], fake_vlm: FakeVLM, tmp_path: Path
    ) -> None:
        d, _ = daemon
        fake_vlm.enqueue(status=400, json=error_body("bad image"), path="/v1/chat/completions")
        photo = make_jpeg(tmp_path / "inbox" / "a.jpg", (64, 48))
        side = photo.with_name("a.jpg.json")
        wait_until(side.exists)
        assert json.loads(side.read_text())["status"] == "error"
        assert d.pool.endpoints[0].concurrency == INITIAL_LIMIT

    def test_in_flight_counts_requests_on_the_wire_not_workers_waiting_for_the_limit(
        self, daemon: tuple[Daemon, list[str]], fake_vlm: FakeVLM, tmp_path: Path
    ) -> None:
        """Five files, 32 workers, a limit of 2: two requests are held at the server, three files wait."""
        d, _ = daemon
        hold = threading.Event()
        for _ in range(5):
            fake_vlm.enqueue(json=chat_completion("a photo"), hold=hold, path="/v1/chat/completions")
        photos = [make_jpeg(tmp_path / "inbox" / f"{i}.jpg", (64, 48), seed=i) for i in range(5)]
        try:
            wait_until(lambda: fake_vlm.in_flight == INITIAL_LIMIT and d.progress().total == 5)
            assert d.progress().in_flight == INITIAL_LIMIT
            assert d._status_line().startswith(f"3 queued, {INITIAL_LIMIT} in flight, 0 done")
        finally:
            hold.set()
        for p in photos:
            wait_until(p.with_name(p.name + ".json").exists)
        assert fake_vlm.peak_in_flight == INITIAL_LIMIT


def test_a_reload_that_changes_max_concurrency_says_it_needs_a_restart(tmp_path: Path, fake_vlm: FakeVLM) -> None:
    runner = Runner(tmp_path, fake_vlm)
    try:
        d = runner.start(endpoint={"concurrency": "auto", "max_concurrency": 8})
        write_config(tmp_path, base_url=fake_vlm.base_url, endpoint={"concurrency": "auto", "max_concurrency": 16})
        with structlog.testing.capture_logs() as logs:
            d.reload_requested.set()
            wait_until(lambda: any(e["event"] == "config.reloaded" for e in logs))
        needed = [e["key"] for e in logs if e["event"] == "config.restart_needed"]
        assert needed == ["endpoint.max_concurrency"]
        assert d.config.endpoint.max_concurrency == 16
        assert "(auto, at most 8)" in d._status_line()  # the running limiter and workers are the old ones
        assert len(d._workers) == 8 + d.isolator.workers  # the old limit's workers, and those encoding ahead
    finally:
        runner.close()
