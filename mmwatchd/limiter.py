"""How many requests may be in flight: ``concurrency: N`` (fixed), or ``concurrency: auto`` (found by measuring).

A batching model server (vLLM, TGI, Ollama with ``OLLAMA_NUM_PARALLEL``) answers about as fast with a few requests at
once as with one, up to the batch it has room for; past that, requests wait in its queue: throughput stops rising
and latency starts to. :class:`AutoLimiter` looks for that point the way TCP Vegas and Netflix's concurrency-limits
do, from the latency alone:

- Samples come in windows of about one round trip (``limit`` answers, at least :data:`MIN_WINDOW`). Answers to
  requests sent before the last change of the limit are not counted: they say nothing about the new one.
- The baseline is the lowest window average seen: the latency without queueing. ``gradient = baseline / average``
  (clamped to [0.5, 1]) is 1 while nothing queues and falls as the server's queue grows; an average within
  :data:`TOLERANCE` of the baseline counts as 1 (the client's own timing wobbles by a few percent).
- Each window the limit becomes ``limit x gradient + allowance`` (the allowance is ``max(1, int(sqrt(limit)))``).
  While nothing queues that is a rise by the allowance; once requests queue it settles where about ``allowance``
  requests wait at the server (``limit x (1 - gradient) = allowance``): the server is kept full, and a request
  waits at most a fraction of one answer's time. At a limit of 2 or 3 the allowance is 1, so a server that takes
  two at once sees three in flight at most. Until the first window that shows a queue, a limit of 4 or more grows
  by half each window instead (slow start), so a wide server is found in a few round trips.
- A window in which the limit was never reached (not enough work) does not raise it: it proves nothing about more.
- A request dropped by the server (429, 5xx, a timeout, a reset connection) cuts the limit by :data:`BACKOFF`, once
  per round trip (drops of requests sent before the cut do not cut again).
- The baseline can only fall by itself; when the unloaded latency rises for good (longer answers, a slower model),
  a baseline that old would keep the limit too low, and one that simply followed the averages would climb with the
  queue. So every :data:`PROBE_EVERY_S` one window runs at half the limit, below where anything queues, and its
  average becomes the new baseline (BBR's ProbeRTT).

The limiter gates only the HTTP request: files are read and encoded by every worker in parallel, and wait here with
their request body ready.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal, Protocol

from mmwatchd.errors import safe_url

if TYPE_CHECKING:
    from mmwatchd.model import EndpointConfig

#: How a request ended, as far as the server's load goes: ``ok`` (its latency is a sample), ``dropped`` (the server
#: was overloaded: 429, 5xx, a timeout or a reset connection), ``ignored`` (nothing learned: a 4xx refusal, an
#: unusable reply, never sent).
RequestOutcome = Literal["ok", "dropped", "ignored"]

#: ``concurrency: auto``: the most requests in flight unless ``max_concurrency`` says otherwise.
DEFAULT_MAX_CONCURRENCY = 32
#: Where ``auto`` starts: low enough that a server taking one or two at once is never swamped while it learns.
INITIAL_LIMIT = 2
#: A window whose average is this close to the baseline counts as no queue (gradient 1): latency measured at the
#: client varies by a few percent with the machine's own load, and at a limit of 3 anything short of 1 keeps it at 3
#: (3 x 0.99 + 1 rounds down), which held a scan at 3 in flight for seconds while the server took 16.
TOLERANCE = 1.05
#: Fewest answers per window: one or two answers are too few to average.
MIN_WINDOW = 4
#: The limit is multiplied by this on a dropped request.
BACKOFF = 0.75
#: Slow start (growing by half each window) from this limit on, while the gradient stays above this.
SLOW_START_FROM = 4
SLOW_START_GRADIENT = 0.9
#: How often one window runs at half the limit to measure the unloaded latency afresh.
PROBE_EVERY_S = 60.0
#: Waiting workers look at the stop event this often.
_POLL_S = 0.5


class Limiter(Protocol):
    """What the daemon asks before and tells after each request."""

    @property
    def limit(self) -> int: ...

    @property
    def auto(self) -> bool: ...

    def acquire(self, stop: threading.Event) -> bool: ...

    def take(self) -> None: ...

    def release(self, rtt: float, outcome: RequestOutcome) -> None: ...


class FixedLimit:
    """``concurrency: N``: N workers are the limit, so nothing waits here (the behaviour from before ``auto``)."""

    auto = False

    def __init__(self, limit: int) -> None:
        self._limit = limit

    @property
    def limit(self) -> int:
        return self._limit

    def acquire(self, stop: threading.Event) -> bool:
        return True

    def take(self) -> None:
        """Routing sent a request here, having checked :attr:`limit` itself."""

    def release(self, rtt: float, outcome: RequestOutcome) -> None:
        pass


class AutoLimiter:
    """``concurrency: auto``: the limit found by the latency gradient (see the module doc). Thread-safe.

    ``clock`` only tells when the baseline was last measured (the probe); the caller times each request and passes
    its latency to :meth:`release`, so a test drives the limiter with synthetic latencies and no sleeps.
    """

    auto = True

    def __init__(
        self,
        max_limit: int = DEFAULT_MAX_CONCURRENCY,
        *,
        initial: int = INITIAL_LIMIT,
        min_limit: int = 1,
        clock: Callable[[], float] = time.monotonic,
        probe_every_s: float = PROBE_EVERY_S,
    ) -> None:
        self.max_limit = max_limit
        self.min_limit = min(min_limit, max_limit)
        self.clock = clock
        self.probe_every_s = probe_every_s
        self._limit = float(max(self.min_limit, min(initial, max_limit)))
        self._cond = threading.Condition()
        self.in_flight = 0
        #: The lowest window average: the latency while nothing queues (None until the first window).
        self.baseline: float | None = None
        self._baseline_at = clock()
        self._probing = False
        self._slow_start = True  # until the first sign of queueing: grow by half each window
        self._stale = 0  # answers still to come to requests sent before the last change: not samples
        self._sum = 0.0
        self._count = 0
        self._peak = 0  # the most in flight during this window

    @property
    def limit(self) -> int:
        """Requests allowed in flight now."""
        with self._cond:
            return self._effective()

    def _effective(self) -> int:
        n = max(self.min_limit, int(self._limit))
        return max(self.min_limit, n // 2) if self._probing else n

    def try_acquire(self) -> bool:
        """Take a slot if one is free now."""
        with self._cond:
            return self._take()

    def _take(self) -> bool:
        if self.in_flight >= self._effective():
            return False
        self.in_flight += 1
        self._peak = max(self._peak, self.in_flight)
        return True

    def take(self) -> None:
        """Routing sent a request here, having checked :attr:`limit` itself (under its own lock, which sees every
        request to this endpoint): counted as :meth:`acquire` counts it."""
        with self._cond:
            self.in_flight += 1
            self._peak = max(self._peak, self.in_flight)

    def acquire(self, stop: threading.Event) -> bool:
        """Wait while ``limit`` requests are in flight; False when ``stop`` was set first (nothing was taken)."""
        with self._cond:
            while not stop.is_set():
                if self._take():
                    return True
                self._cond.wait(_POLL_S)
        return False

    def release(self, rtt: float, outcome: RequestOutcome) -> None:
        """A request taken with :meth:`acquire` has ended after ``rtt`` seconds (the time on the wire)."""
        with self._cond:
            self.in_flight = max(0, self.in_flight - 1)
            self._cond.notify()
            if self._stale > 0:
                self._stale -= 1
                return
            if outcome == "dropped":
                self._set(self._limit * BACKOFF)
            elif outcome == "ok" and math.isfinite(rtt) and rtt >= 0:
                self._sum += rtt
                self._count += 1
                if self._count >= max(MIN_WINDOW, self._effective()):
                    self._close_window()

    def _close_window(self) -> None:
        average = self._sum / self._count
        n = self._effective()
        reached = self._peak >= n
        now = self.clock()
        if self._probing:
            self._probing = False
            self.baseline, self._baseline_at = average, now
            self._set(self._limit)  # back to the limit from before the probe
            return
        if self.baseline is None or average < self.baseline:
            self.baseline, self._baseline_at = average, now
        raw = self.baseline / average if average > 0 else 1.0
        gradient = min(1.0, max(0.5, TOLERANCE * raw))
        new = n * gradient + max(1, math.isqrt(n))
        if self._slow_start and n >= SLOW_START_FROM and raw >= SLOW_START_GRADIENT:
            new = max(new, n * 1.5)
        elif n >= SLOW_START_FROM:
            self._slow_start = False
        if not reached:
            new = min(new, self._limit)  # not enough work to fill the limit: no evidence that more would do
        if now - self._baseline_at >= self.probe_every_s:
            self._probing = True
        self._set(new)

    def _set(self, limit: float) -> None:
        """Change the limit and start a new window; answers to requests already sent belong to the old one."""
        before = self._effective()
        self._limit = min(float(self.max_limit), max(float(self.min_limit), limit))
        self._stale = self.in_flight
        self._sum, self._count, self._peak = 0.0, 0, self.in_flight
        if self._effective() > before:
            self._cond.notify_all()


def workers(endpoint: EndpointConfig) -> int:
    """Worker threads for an endpoint: the fixed concurrency, or ``max_concurrency`` for ``auto``."""
    if endpoint.concurrency == "auto":
        return endpoint.max_concurrency or DEFAULT_MAX_CONCURRENCY
    return endpoint.concurrency


def state_key(endpoint: EndpointConfig) -> str:
    """Where the service keeps the limit it found, for ``mmwatchd status`` (the state database's endpoint table)."""
    return "concurrency " + safe_url(endpoint.base_url)


def for_endpoint(endpoint: EndpointConfig, *, clock: Callable[[], float] = time.monotonic) -> FixedLimit | AutoLimiter:
    """The limiter ``endpoint.concurrency`` asks for."""
    if endpoint.concurrency == "auto":
        return AutoLimiter(workers(endpoint), clock=clock)
    return FixedLimit(endpoint.concurrency)
