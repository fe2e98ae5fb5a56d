"""Prometheus metrics: ``/metrics`` of a real ``mmwatchd run`` child and the textfile of ``scan``, parsed by
prometheus_client's own parser and checked against what the fake server saw."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from configs import write_config
from fakevlm import FakeVLM, chat_completion
from media import make_jpeg
from prometheus_client.parser import text_string_to_metric_families
from running import REPO, spawn_run, stop_run, wait_until

from mmwatchd import __version__
from mmwatchd.cli import main

RUN_ENV = {"MMWATCHD_TEST_KEY": "sk-metrics"}
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    """``main`` configures structlog for the process; later tests capture logs with the defaults."""
    yield
    structlog.reset_defaults()


def samples(text: str) -> Samples:
    """Every sample by (name, labels); the parser raises on anything that is not valid exposition format."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


def total(found: Samples, name: str, **labels: str) -> float:
    """The sum over every sample of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in found.items() if n == name and want <= ls)


def promtool_accepts(text: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        return  # not installed here: the parser above is the check
    run = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return str(resp.read().decode())


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def test_run_serves_metrics_that_match_what_the_server_saw(tmp_path: Path, fake_vlm: FakeVLM) -> None:
    port = free_port()
    cfg = write_config(tmp_path, base_url=fake_vlm.base_url, metrics={"listen": f"127.0.0.1:{port}"})
    inbox = tmp_path / "inbox"
    for i in range(3):
        answer = chat_completion(f"photo {i}", usage=usage(100 * (i + 1), i + 7))
        fake_vlm.enqueue(json=answer, path="/v1/chat/completions")
        make_jpeg(inbox / f"p{i}.jpg", (64, 48), seed=i)
    proc = spawn_run(cfg, tmp_path, env=RUN_ENV)
    try:
        found: Samples = {}

        def three_done() -> bool:
            nonlocal found
            try:
                found = samples(scrape(port))
            except OSError:
                return False  # not listening yet
            return value(found, "mmwatchd_files_total", outcome="ok", kind="image", rule="photos") == 3

        wait_until(three_done)
        text = scrape(port)
    finally:
        stop_run(proc, tmp_path)
    found = samples(text)
    chats = fake_vlm.chat_requests
    assert len(chats) == 3
    assert value(found, "mmwatchd_requests_total", endpoint="default", code="200") == 3
    assert total(found, "mmwatchd_requests_total") == 3
    assert value(found, "mmwatchd_request_bytes_total", endpoint="default") == sum(len(r.body) for r in chats)
    assert value(found, "mmwatchd_request_duration_seconds_count", endpoint="default") == 3
    assert value(found, "mmwatchd_request_duration_seconds_bucket", endpoint="default", le="+Inf") == 3
    assert value(found, "mmwatchd_request_duration_seconds_bucket", endpoint="default", le="300.0") == 3
    tokens = {"endpoint": "default", "model": "fake-vlm"}
    assert value(found, "mmwatchd_tokens_total", **tokens, type="prompt") == 100 + 200 + 300
    assert value(found, "mmwatchd_tokens_total", **tokens, type="completion") == 7 + 8 + 9
    assert value(found, "mmwatchd_endpoint_up", endpoint="default") == 1
    assert value(found, "mmwatchd_concurrency_limit", endpoint="default") == 2
    assert value(found, "mmwatchd_in_flight_requests", endpoint="default") == 0
    assert value(found, "mmwatchd_queue_files") == 0
    assert value(found, "mmwatchd_build_info", version=__version__) == 1
    assert str(inbox) not in text and "p0.jpg" not in text  # no file paths in labels
    promtool_accepts(text)


def test_scan_writes_a_textfile_counting_a_dropped_connection(tmp_path: Path, fake_vlm: FakeVLM) -> None:
    cfg = write_config(tmp_path, base_url=fake_vlm.base_url, endpoint={"max_retries": 1})
    make_jpeg(tmp_path / "inbox" / "a.jpg", (64, 48))
    make_jpeg(tmp_path / "inbox" / "b.jpg", (64, 48), seed=2)
    fake_vlm.enqueue(disconnect=True, path="/v1/chat/completions")  # the SDK sends it again: one file, two requests
    out = tmp_path / "textfiles" / "mmwatchd.prom"
    out.parent.mkdir()
    assert main(["scan", "-c", str(cfg), "--metrics-textfile", str(out)]) == 0
    text = out.read_text()
    found = samples(text)
    assert value(found, "mmwatchd_files_total", outcome="ok", kind="image", rule="photos") == 2
    assert value(found, "mmwatchd_requests_total", endpoint="default", code="200") == 2
    assert value(found, "mmwatchd_requests_total", endpoint="default", code="none") == 1
    assert len(fake_vlm.chat_requests) == 3
    assert value(found, "mmwatchd_tokens_total", endpoint="default", model="fake-vlm", type="completion") == 10
    assert [p.name for p in out.parent.iterdir()] == ["mmwatchd.prom"]  # written aside, then renamed
    promtool_accepts(text)


def test_scan_textfile_that_cannot_be_written_is_a_one_line_error(
    tmp_path: Path, fake_vlm: FakeVLM, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path, base_url=fake_vlm.base_url)
    assert main(["scan", "-c", str(cfg), "--metrics-textfile", str(tmp_path / "missing" / "m.prom")]) == 1
    err = capsys.readouterr().err
    assert "cannot write --metrics-textfile" in err and "No such file or directory" in err


def run_exit(cfg: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mmwatchd", "run", "-c", str(cfg)],
        cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), **RUN_ENV},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_port_in_use_is_a_one_line_error_at_start(tmp_path: Path, fake_vlm: FakeVLM) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = write_config(tmp_path, base_url=fake_vlm.base_url, metrics={"listen": f"127.0.0.1:{port}"})
        run = run_exit(cfg, tmp_path)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    lines = [line for line in run.stderr.splitlines() if "metrics" in line]
    assert len(lines) == 1 and "metrics.listen" in lines[0] and "cannot serve metrics" in lines[0], run.stderr
    assert "Address already in use" in lines[0]
    assert fake_vlm.chat_requests == []


@pytest.mark.parametrize(
    ("listen", "words"),
    [
        ("9464", "is not host:port"),
        ("127.0.0.1:99999", "port must be a number from 1 to 65535"),
        ("::1:9464", "IPv6 address in brackets"),
        ("192.0.2.1:9464", "cannot serve metrics on 192.0.2.1:9464"),  # TEST-NET: not an address of this host
    ],
)
def test_bad_listen_is_a_one_line_error(tmp_path: Path, fake_vlm: FakeVLM, listen: str, words: str) -> None:
    cfg = write_config(tmp_path, base_url=fake_vlm.base_url, metrics={"listen": listen})
    run = run_exit(cfg, tmp_path)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr and words in run.stderr, run.stderr
    assert "metrics.listen" in run.stderr
