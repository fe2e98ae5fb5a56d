"""The running service: intake (startup scan + watcher), a bounded queue, N workers, the endpoint gate, shutdown.

Threads, all owned and joined here: the workers (``endpoint.concurrency`` of them: requests in flight at most) and
one endpoint prober. watchdog's own threads are owned by ``Watcher``. The calling thread runs intake.

While the endpoint is unreachable the gate is closed: workers hold their jobs instead of failing file after file,
and the prober retries ``GET /models`` with a capped backoff; when it answers, the gate opens and work resumes.
"""

from __future__ import annotations

import heapq
import queue
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

from mmwatchd.config import Config
from mmwatchd.errors import VLMError, VLMUnavailable
from mmwatchd.log import get_logger
from mmwatchd.pipeline import Outcome, Processor
from mmwatchd.vlm import VLMClient
from mmwatchd.watch import Watcher, scan

log = get_logger()

#: Backoff for transient failures of one file, and for probing a down endpoint.
RETRY_BASE_S = 2.0
RETRY_MAX_S = 600.0
PROBE_MAX_S = 30.0


class Daemon:
    def __init__(
        self,
        config: Config,
        client: VLMClient,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_attempts: int | None = None,
    ) -> None:
        """``max_attempts``: give up on a file after that many transient failures (one-shot runs); None = never."""
        self.config = config
        self.client = client
        self.clock = clock
        self.processor = Processor(config, client, clock=clock)
        self.max_attempts = max_attempts
        self.counts: Counter[str] = Counter()
        self.outcomes: list[Outcome] = []
        self._queue: queue.Queue[tuple[Path, bool, bool] | None] = queue.Queue(
            maxsize=max(64, 16 * config.endpoint.concurrency)
        )
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._pending: set[Path] = set()  # queued, in flight, or waiting to retry
        self._attempts: Counter[Path] = Counter()
        self._retries: list[tuple[float, Path]] = []
        self._logged_skips: set[tuple[Path, str]] = set()
        self._stop = threading.Event()
        self._gate = threading.Event()  # set while the endpoint is believed reachable
        self._probe_now = threading.Event()
        self._threads: list[threading.Thread] = []
        self._model_warned = False

    # -- lifecycle -------------------------------------------------------------------------------------------

    def start(self, *, prober: bool = True) -> None:
        """Start the workers, and the prober that opens the gate (without it, call ``check_endpoint`` first)."""
        for i in range(self.config.endpoint.concurrency):
            self._spawn(self._worker, f"mmwatchd-worker-{i}")
        if prober:
            self._spawn(self._prober, "mmwatchd-prober")

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self, grace_s: float | None = None) -> None:
        """Stop taking work; let in-flight requests finish (bounded by the request timeout); join every thread."""
        self._stop.set()
        self._gate.set()  # wake workers held at the gate so they can leave
        self._probe_now.set()
        dropped = 0
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                dropped += 1
        with self._lock:
            self._pending.clear()
            self._retries.clear()
            self._idle.notify_all()
        for _ in self._threads:
            self._queue.put(None)
        deadline = time.monotonic() + (grace_s if grace_s is not None else self.config.endpoint.timeout_s + 5)
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        stuck = [t.name for t in self._threads if t.is_alive()]
        self._threads.clear()
        if dropped:
            log.info("daemon.dropped_queue", files=dropped, note="they are picked up again by the next scan")
        if stuck:
            log.warning("daemon.abandoned", threads=stuck, note="in-flight requests abandoned; no partial sidecar")

    # -- intake ----------------------------------------------------------------------------------------------

    def submit(self, path: Path, *, explicit: bool = False, force: bool = False) -> bool:
        """Queue a file unless it is already queued or in flight. Blocks while the queue is full (backpressure)."""
        with self._lock:
            if path in self._pending or self._stop.is_set():
                return False
            self._pending.add(path)
        while not self._stop.is_set():
            try:
                self._queue.put((path, explicit, force), timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def submit_all(self, paths: Iterable[Path], **kw: bool) -> int:
        return sum(self.submit(p, **kw) for p in paths)

    def scan_roots(self) -> int:
        """Queue every wanted file under the roots (freshness is checked by the worker, against the sidecar)."""
        n = 0
        for root in self.config.watch:
            n += self.submit_all(Path(p) for p in scan(root, sidecar_suffix=self.config.sidecar.suffix))
        return n

    def due_retries(self) -> float | None:
        """Re-queue files whose retry time has come; return seconds until the next one, if any."""
        now = self.clock()
        due: list[Path] = []
        with self._lock:
            while self._retries and self._retries[0][0] <= now:
                due.append(heapq.heappop(self._retries)[1])
            nxt = self._retries[0][0] - now if self._retries else None
            for p in due:
                self._pending.discard(p)
        for p in due:
            self.submit(p)
        return nxt

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until nothing is queued, in flight or waiting to retry (retries are fed from here)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            nxt = self.due_retries()
            with self._lock:
                if not self._pending or self._stop.is_set():
                    return True
                wait = 0.5 if nxt is None else min(0.5, max(0.01, nxt))
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    wait = min(wait, left)
                self._idle.wait(wait)

    def run(self, stop: threading.Event, *, on_ready: Callable[[], None] | None = None) -> None:
        """Watch, scan, and keep going until ``stop`` is set."""
        watcher = Watcher(self.config.watch, settle_s=self.config.settle_s, sidecar_suffix=self.config.sidecar.suffix)
        watcher.start()
        try:
            self.start()
            log.info("daemon.watching", roots=[str(r.path) for r in self.config.watch])
            if on_ready:
                on_ready()
            queued = self.scan_roots()
            log.info("daemon.scanned", queued=queued)
            while not stop.is_set():
                nxt = self.due_retries()
                timeout = 0.5 if nxt is None else max(0.01, min(0.5, nxt))
                for path in watcher.ready(timeout):
                    self.submit(path)
                if watcher.take_overflow():
                    # The kernel dropped events: only a full scan can tell what was missed.
                    log.warning("watch.overflow", note="rescanning every folder")
                    self.scan_roots()
        finally:
            watcher.stop()
            self.stop()

    # -- workers ---------------------------------------------------------------------------------------------

    def _worker(self) -> None:
        while True:
            item = self._queue.get()
            if item is None or self._stop.is_set():
                return
            path, explicit, force = item
            while not self._gate.wait(0.5):
                if self._stop.is_set():
                    return
            if self._stop.is_set():
                return
            outcome = self._run_job(path, explicit=explicit, force=force)
            self._finish(outcome)

    def _run_job(self, path: Path, *, explicit: bool, force: bool) -> Outcome:
        try:
            return self.processor.process(path, explicit=explicit, force=force)
        except Exception as exc:  # the one per-job boundary: a bug must not kill the worker
            log.exception("job.crashed", path=str(path), error=f"{type(exc).__name__}: {exc}")
            return Outcome(path=path, status="retry", reason=f"internal error: {type(exc).__name__}: {exc}")

    def _finish(self, outcome: Outcome) -> None:
        path = outcome.path
        retry_in: float | None = None
        final = True
        if outcome.status == "retry":
            with self._lock:
                self._attempts[path] += 1
                attempts = self._attempts[path]
            if isinstance(outcome.error, VLMUnavailable) and self.max_attempts is None:
                self._endpoint_down(outcome.error)
            if self.max_attempts is None or attempts < self.max_attempts:
                final = False
                backoff = min(RETRY_MAX_S, RETRY_BASE_S * 2 ** (attempts - 1)) * random.uniform(0.8, 1.2)
                retry_in = max(backoff, outcome.retry_after or 0.0)
                if isinstance(outcome.error, VLMUnavailable) and outcome.retry_after is None:
                    retry_in = RETRY_BASE_S  # the gate holds work until the endpoint is back; no need to wait longer
        self._log(outcome, retry_in)
        with self._lock:
            if final:
                self.counts[outcome.status] += 1
                self.outcomes.append(outcome)
                self._attempts.pop(path, None)
                self._pending.discard(path)
            else:
                heapq.heappush(self._retries, (self.clock() + (retry_in or 0.0), path))
            self._idle.notify_all()

    def _log(self, outcome: Outcome, retry_in: float | None) -> None:
        fields: dict[str, object] = {"path": str(outcome.path), "status": outcome.status}
        if outcome.rule:
            fields["rule"] = outcome.rule
        if outcome.request_bytes is not None:
            fields["request_bytes"] = outcome.request_bytes
        if outcome.elapsed_s:
            fields["elapsed_ms"] = round(outcome.elapsed_s * 1000)
        if outcome.reason:
            fields["reason"] = outcome.reason
        if outcome.status == "ok":
            log.info("job.done", **fields)
        elif outcome.status == "error":
            log.warning("job.failed", **fields)
        elif outcome.status == "retry":
            log.warning("job.retry", retry_in_s=None if retry_in is None else round(retry_in, 1), **fields)
        elif outcome.reason == "up to date":
            log.debug("job.skipped", **fields)
        else:
            key = (outcome.path, outcome.reason)
            with self._lock:
                first = key not in self._logged_skips
                self._logged_skips.add(key)
            (log.info if first else log.debug)("job.skipped", **fields)

    # -- the endpoint gate -----------------------------------------------------------------------------------

    def _endpoint_down(self, exc: VLMError) -> None:
        if self._gate.is_set():
            self._gate.clear()
            log.warning("endpoint.down", url=self.config.endpoint.base_url, reason=exc.message)
            self._probe_now.set()

    def check_endpoint(self) -> None:
        """One probe: open the gate when the endpoint answers; raise VLMError when it does not."""
        models = self.client.list_models()
        model = self.config.endpoint.model
        wanted = {r.model for r in self.config.rules if r.model} | {model}
        missing = sorted(m for m in wanted if models and m not in models)
        if missing and not self._model_warned:
            self._model_warned = True
            log.warning(
                "endpoint.model_not_listed",
                models=missing,
                available=models[:20],
                hint="check endpoint.model (for Ollama: ollama pull <model>)",
            )
        if not self._gate.is_set():
            self._gate.set()
            log.info("endpoint.up", url=self.config.endpoint.base_url, models=len(models))

    def _prober(self) -> None:
        delay = 1.0
        self._probe_now.set()
        while not self._stop.is_set():
            self._probe_now.wait()
            if self._stop.is_set():
                return
            try:
                self.check_endpoint()
            except VLMUnavailable as exc:
                if delay == 1.0:
                    log.error("endpoint.unreachable", url=self.config.endpoint.base_url, reason=exc.message)
                self._stop.wait(delay * random.uniform(0.8, 1.2))
                delay = min(PROBE_MAX_S, delay * 2)
                continue
            except VLMError as exc:
                # It answered, so it is up; some gateways simply have no /models. Requests will tell.
                log.warning("endpoint.models_refused", url=self.config.endpoint.base_url, reason=exc.message)
                self._gate.set()
            delay = 1.0
            self._probe_now.clear()
