"""``mmwatchd run`` as systemd runs it: a real child process, real signals, a real notify socket, a startup backlog
against a slow endpoint."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest
from configs import write_config
from fakevlm import FakeVLM, chat_completion
from media import make_jpeg
from running import NotifySocket, log_entries, session_processes, spawn_run, stop_run, wait_until

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
            assert len(fake_vlm.chat_requests) <= early or len(
                [m for m, seen in msgs if m == "WATCHDOG=1" and seen <= early]
            ) >= 3, f"the backlog was {early} requests in and the watchdog had not been pinged 3 times: {msgs}"
            pings = [m for m, seen in msgs if m == "WATCHDOG=1" and seen <= early]
            status = [m for m, seen in msgs if m.startswith("STATUS=") and "endpoint up" in m and seen <= early]
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
        # STATUS= followed the work: some line reports files done.
        done = [int(m.group(1)) for msg, _ in notify.messages() if (m := re.search(r"(\d+) done", msg))]
        assert max(done) > 0
        assert notify.messages()[-1][0] == "STOPPING=1"

    def test_an_idle_stop_ends_every_process_it_started(self, tmp_path: Path, fake_vlm: FakeVLM) -> None:
        make_jpeg(tmp_path / "inbox" / "a.jpg", (32, 24))
        cfg = write_config(tmp_path, base_url=fake_vlm.base_url)
        proc = spawn_run(cfg, tmp_path)
        wait_until(lambda: (tmp_path / "inbox" / "a.jpg.json").exists())
        wait_until(lambda: len(session_processes(proc.pid)) > 1)  # the decoder processes run
        stop_run(proc, tmp_path)
        assert session_processes(proc.pid) == [], "processes outlived the daemon"
