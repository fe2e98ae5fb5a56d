from __future__ import annotations

import gc
import os
import threading
import time
from collections.abc import Iterator

import pytest

import fuzzseed
from fakevlm import FakeVLM

# The test workers (pytest-xdist) start after this runs, so they inherit the seed the header prints.
os.environ.setdefault(fuzzseed.ENV, str(fuzzseed.SEED))

# Threads may take a moment to end after their owner stopped them (an HTTP handler finishing its last write,
# a pool closed by the garbage collector): the guard waits this long for strays before it fails the test.
THREAD_GRACE_S = 2.0


def pytest_report_header(config: pytest.Config) -> str:
    return f"fuzz seed: {fuzzseed.SEED} (repeat with: {fuzzseed.repeat_hint()})"


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
