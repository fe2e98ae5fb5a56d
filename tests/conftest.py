from __future__ import annotations

import fcntl
import gc
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import fuzzseed
import pytest
import structlog
from fakevlm import FakeVLM

from mmwatchd import log as log_mod

# The test workers (pytest-xdist) start after this runs, so they inherit the seed the header prints.
os.environ.setdefault(fuzzseed.ENV, str(fuzzseed.SEED))

# Threads may take a moment to end after their owner stopped them (an HTTP handler finishing its last write,
# a pool closed by the garbage collector): the guard waits this long for strays before it fails the test.
THREAD_GRACE_S = 2.0


def pytest_report_header(config: pytest.Config) -> str:
    return f"fuzz seed: {fuzzseed.SEED} (repeat with: {fuzzseed.repeat_hint()})"


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    """``main`` and ``log.setup`` configure structlog for the whole process, writing to the stream of the moment (a
    test's captured stderr, closed after it): every test leaves the defaults, which later tests capture logs with,
    and a later daemon in the same worker does not die logging to a closed file."""
    yield
    log_mod.route(None)
    structlog.reset_defaults()


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves a thread running that it started.

    Compares thread identities, not just ``threading.active_count()``, so a thread that ended cannot hide one that
    leaked. Autouse fixtures are set up before, and torn down after, the fixtures a test asks for.
    """
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + THREAD_GRACE_S
    collected = False
    while True:
        leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not leaked:
            return
        if not collected:
            gc.collect()  # closes what only the garbage collector still owns (watchdog does the same)
            collected = True
            continue
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            names = ", ".join(sorted(t.name for t in leaked))
            pytest.fail(f"{len(leaked)} thread(s) still running after the test: {names}", pytrace=False)
        leaked[0].join(timeout=min(remaining, 0.1))


@pytest.fixture
def fake_vlm() -> Iterator[FakeVLM]:
    """A running fake OpenAI-compatible server; ``fake_vlm.base_url`` ends in ``/v1``."""
    server = FakeVLM().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def made_once(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, Callable[[Path], None]], Path]:
    """``made_once(name, make)``: a file that costs seconds of CPU to make and is the same for every test that uses
    it, made by ``make(path)`` once per run and shared by all test workers (copy it: do not change or link it)."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if base.name.startswith("popen-gw") else base  # one folder for the run, above each worker's
    folder = root / "made-once"
    folder.mkdir(exist_ok=True)

    def get(name: str, make: Callable[[Path], None]) -> Path:
        path = folder / name
        with open(folder / f".{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another worker may be making it: wait for it
            if not path.exists():
                part = folder / f".{name}.part"
                make(part)
                part.rename(path)
        return path

    return get
