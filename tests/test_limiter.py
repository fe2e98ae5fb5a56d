"""The concurrency limiter (``concurrency: auto``), driven by a simulated batching server on an injected clock.

The simulation is a closed loop like the daemon's: as many requests as the limiter allows are always waiting to go
(a backlog), the server serves ``capacity`` of them at a time for ``latency`` seconds each and queues the rest in
arrival order, and every answer is released to the limiter with the time it took. No threads and no sleeps: the
clock jumps from one answer to the next.
"""

from __future__ import annotations

import heapq
import random
import threading
from dataclasses import dataclass, field

import pytest

from mmwatchd.limiter import (
    BACKOFF,
    INITIAL_LIMIT,
    MIN_WINDOW,
    AutoLimiter,
    FixedLimit,
    for_endpoint,
    workers,
)
from mmwatchd.model import EndpointConfig
from tests.clock import FakeClock


@dataclass
class BatchingServer:
    """``capacity`` requests at once, each ``latency`` seconds (times 1 +- ``jitter``); the rest wait their turn."""

    capacity: int
    latency: float
    jitter: float = 0.0
    seed: int = 1
    _slots: list[float] = field(default_factory=list)  # when each busy slot frees
    _answers: list[tuple[float, float]] = field(default_factory=list)  # (answered, sent)
    peak_in_flight: int = 0

    def __post_init__(self) -> None:
        self._random = random.Random(self.seed)

    def send(self, now: float) -> None:
        start = now if len(self._slots) < self.capacity else max(now, heapq.heappop(self._slots))
        end = start + self.latency * (1 + self._random.uniform(-self.jitter, self.jitter))
        heapq.heappush(self._slots, end)
        heapq.heappush(self._answers, (end, now))
        self.peak_in_flight = max(self.peak_in_flight, len(self._answers))

    def resize(self, capacity: int) -> None:
        """Serve ``capacity`` at once from now on (the slots that free last are kept)."""
        self.capacity = capacity
        self._slots = heapq.nlargest(capacity, self._slots)
        heapq.heapify(self._slots)

    def next_answer(self) -> tuple[float, float]:
        return heapq.heappop(self._answers)

    @property
    def in_flight(self) -> int:
        return len(self._answers)


@dataclass
class Run:
    limits: list[int]
    latencies: list[float]
    finished: list[float]
    server: BatchingServer

    def steady(self) -> tuple[float, float]:
        """Over the second half of the answers: throughput (answers per second) and p95 latency."""
        half = len(self.finished) // 2
        throughput = (len(self.finished) - half) / (self.finished[-1] - self.finished[half])
        tail = sorted(self.latencies[half:])
        return throughput, tail[int(len(tail) * 0.95)]


def drive(limiter: AutoLimiter, server: BatchingServer, clock: FakeClock, answers: int, *, backlog: int = 10**9) -> Run:
    """Keep the limiter's allowance in flight (at most ``backlog`` at once: the work there is) for ``answers``."""
    run = Run([], [], [], server)
    for _ in range(answers):
        while server.in_flight < backlog and limiter.try_acquire():
            server.send(clock.now)
        answered, sent = server.next_answer()
        clock.now = answered
        limiter.release(answered - sent, "ok")
        run.limits.append(limiter.limit)
        run.latencies.append(answered - sent)
        run.finished.append(answered)
    return run


class TestFindsTheCapacity:
    @pytest.mark.parametrize("jitter", [0.0, 0.1])
    def test_a_16_wide_server_is_kept_full_without_a_long_queue(self, jitter: float) -> None:
        clock = FakeClock()
        server = BatchingServer(16, 0.5, jitter=jitter)
        run = drive(AutoLimiter(32, clock=clock), server, clock, 1500)
        throughput, p95 = run.steady()
        assert throughput >= 0.9 * 16 / 0.5
        assert p95 <= 2 * 0.5 * (1 + jitter) + 1e-9
        assert 16 <= max(run.limits) <= 24

    @pytest.mark.parametrize("jitter", [0.0, 0.1, 0.3])
    @pytest.mark.parametrize("seed", [1, 2, 3])
    def test_a_server_taking_two_at_once_never_sees_more_than_three(self, jitter: float, seed: int) -> None:
        clock = FakeClock()
        server = BatchingServer(2, 0.5, jitter=jitter, seed=seed)
        run = drive(AutoLimiter(32, clock=clock), server, clock, 600)
        assert server.peak_in_flight <= 3
        throughput, _ = run.steady()
        assert throughput >= 0.9 * 2 / 0.5  # and it is kept busy

    def test_answers_a_few_percent_slower_than_the_best_window_still_raise_the_limit(self) -> None:
        """Latency measured at the client wobbles with the machine's own load. A window 2% slower than the best one
        is not a queue: at a limit of 2 or 3, anything short of a gradient of 1 rounded the rise away and held
        the limit there (seen for seconds at the start of a scan against a server taking 16)."""
        limiter = AutoLimiter(32, clock=FakeClock())
        rtts = iter([0.50] * MIN_WINDOW + [0.51] * 200)
        limits = []
        for _ in range(60):
            while limiter.in_flight < limiter.limit:  # always more work than the limit lets through
                limiter.take()
            limiter.release(next(rtts), "ok")
            limits.append(limiter.limit)
        assert max(limits) >= 9  # past 3, and into slow start

    def test_it_starts_low(self) -> None:
        clock = FakeClock()
        server = BatchingServer(64, 0.5)
        run = drive(AutoLimiter(32, clock=clock), server, clock, 1)
        assert run.limits[0] == INITIAL_LIMIT
        assert server.peak_in_flight == INITIAL_LIMIT

    def test_a_server_wider_than_the_maximum_gets_the_maximum(self) -> None:
        clock = FakeClock()
        run = drive(AutoLimiter(12, clock=clock), BatchingServer(64, 0.5), clock, 400)
        assert run.limits[-1] == 12
        assert run.server.peak_in_flight == 12

    def test_a_latency_that_rises_with_the_batch_settles_where_it_starts_to(self) -> None:
        """A GPU whose per-request latency grows with every request past 8 in a batch (no queue at all)."""
        clock = FakeClock()
        limiter = AutoLimiter(32, clock=clock)
        in_flight: list[tuple[float, float]] = []
        limits = []
        for _ in range(1000):
            while limiter.try_acquire():
                batch = len(in_flight) + 1
                latency = 0.5 * max(1.0, batch / 8)
                heapq.heappush(in_flight, (clock.now + latency, clock.now))
            answered, sent = heapq.heappop(in_flight)
            clock.now = answered
            limiter.release(answered - sent, "ok")
            limits.append(limiter.limit)
        late = limits[500:]
        assert max(late) <= 14
        assert sum(n >= 8 for n in late) >= 0.9 * len(late)  # the rest: the probe's window at half the limit


class TestBacksOff:
    def _at(self, capacity: int) -> AutoLimiter:
        """A limiter that has found a server of ``capacity``, with nothing in flight any more."""
        clock = FakeClock()
        limiter = AutoLimiter(32, clock=clock, probe_every_s=1e9)
        server = BatchingServer(capacity, 0.5)
        drive(limiter, server, clock, 300)
        while server.in_flight:
            answered, sent = server.next_answer()
            limiter.release(answered - sent, "ignored")
        return limiter

    def test_a_drop_cuts_the_limit(self) -> None:
        limiter = self._at(16)
        before = limiter.limit
        assert limiter.try_acquire()
        limiter.release(0.1, "dropped")
        assert limiter.limit == int(int(before) * BACKOFF) or limiter.limit <= before * BACKOFF + 1

    def test_drops_of_one_round_cut_once(self) -> None:
        """Every request in flight answered 429 at once: those were sent under the old limit; one cut for them."""
        limiter = self._at(16)
        n = limiter.limit
        taken = 0
        while limiter.try_acquire():
            taken += 1
        assert taken == n
        for _ in range(taken):
            limiter.release(0.1, "dropped")
        assert limiter.limit == max(1, int(n * BACKOFF))

    def test_drops_in_a_row_bring_it_down_to_one(self) -> None:
        limiter = self._at(16)
        for _ in range(20):
            assert limiter.try_acquire()
            limiter.release(0.1, "dropped")
        assert limiter.limit == 1

    def test_it_grows_again_after_the_server_recovers(self) -> None:
        limiter = self._at(16)
        for _ in range(10):
            assert limiter.try_acquire()
            limiter.release(0.1, "dropped")
        assert limiter.limit < 8
        clock = FakeClock()
        limiter.clock = clock
        drive(limiter, BatchingServer(16, 0.5), clock, 300)
        assert limiter.limit >= 16

    def test_ignored_outcomes_change_nothing(self) -> None:
        limiter = self._at(16)
        n = limiter.limit
        for _ in range(50):
            assert limiter.try_acquire()
            limiter.release(0.0, "ignored")
        assert limiter.limit == n


class TestLearnsOnlyFromWork:
    def test_too_little_work_does_not_raise_the_limit(self) -> None:
        """One file at a time (a watched folder that gets a photo now and then): nothing proves more would do."""
        clock = FakeClock()
        limiter = AutoLimiter(32, clock=clock)
        drive(limiter, BatchingServer(1, 0.5), clock, 200, backlog=1)
        assert limiter.limit == INITIAL_LIMIT

    def test_a_slower_model_is_measured_again(self) -> None:
        """The unloaded latency doubles for good (longer answers): the probe measures it afresh, so the limit does
        not stay pinned low by a baseline from the faster days."""
        clock = FakeClock()
        limiter = AutoLimiter(32, clock=clock, probe_every_s=30)
        server = BatchingServer(16, 0.25)
        drive(limiter, server, clock, 400)
        server.latency = 0.5
        run = drive(limiter, server, clock, 1500)
        assert limiter.baseline == pytest.approx(0.5, rel=0.05)
        throughput, p95 = run.steady()
        assert throughput >= 0.9 * 16 / 0.5
        assert p95 <= 2 * 0.5 + 1e-9

    def test_a_faster_model_lowers_the_baseline(self) -> None:
        """The change is seen while requests queue (its averages are above the new unloaded latency); the next
        probe measures the new latency itself."""
        clock = FakeClock()
        limiter = AutoLimiter(32, clock=clock, probe_every_s=5)
        server = BatchingServer(16, 0.5)
        drive(limiter, server, clock, 300)
        server.latency = 0.2
        run = drive(limiter, server, clock, 1500)
        assert limiter.baseline == pytest.approx(0.2, rel=0.05)
        throughput, p95 = run.steady()
        assert throughput >= 0.9 * 16 / 0.2 and p95 <= 2 * 0.2 + 1e-9

    def test_a_narrower_server_brings_the_limit_down(self) -> None:
        """Another server behind the same URL takes 4 at once instead of 16: the queue shows, the limit follows."""
        clock = FakeClock()
        limiter = AutoLimiter(32, clock=clock)
        server = BatchingServer(16, 0.5)
        drive(limiter, server, clock, 300)
        server.resize(4)
        run = drive(limiter, server, clock, 300)
        assert max(run.limits[150:]) <= 7  # halving at most per round trip, each of them 5x as long now
        throughput, p95 = run.steady()
        assert throughput >= 0.9 * 4 / 0.5 and p95 <= 2 * 0.5 + 1e-9


class TestAcquire:
    def test_it_blocks_at_the_limit_until_a_release(self) -> None:
        limiter = AutoLimiter(32, clock=FakeClock())
        stop = threading.Event()
        assert limiter.acquire(stop) and limiter.acquire(stop)
        got = threading.Event()

        def third() -> None:
            if limiter.acquire(stop):
                got.set()

        t = threading.Thread(target=third)
        t.start()
        assert not got.wait(0.2)  # still waiting (a check, not a deadline: it must not get through at all)
        limiter.release(0.5, "ok")
        t.join(10)
        assert got.is_set()
        assert limiter.in_flight == 2

    def test_a_stop_lets_a_waiting_worker_go_without_a_slot(self) -> None:
        limiter = AutoLimiter(1, clock=FakeClock())
        stop = threading.Event()
        assert limiter.acquire(stop)
        result: list[bool] = []
        t = threading.Thread(target=lambda: result.append(limiter.acquire(stop)))
        t.start()
        stop.set()
        t.join(10)
        assert result == [False]
        assert limiter.in_flight == 1


class TestFromConfig:
    def test_a_fixed_concurrency_never_waits(self) -> None:
        limiter = for_endpoint(EndpointConfig(concurrency=3))
        assert isinstance(limiter, FixedLimit) and limiter.limit == 3 and not limiter.auto
        stop = threading.Event()
        assert all(limiter.acquire(stop) for _ in range(10))
        assert workers(EndpointConfig(concurrency=3)) == 3

    def test_auto_runs_max_concurrency_workers(self) -> None:
        assert workers(EndpointConfig(concurrency="auto")) == 32
        ep = EndpointConfig(concurrency="auto", max_concurrency=8)
        limiter = for_endpoint(ep)
        assert isinstance(limiter, AutoLimiter) and limiter.max_limit == 8 and limiter.auto
        assert workers(ep) == 8
