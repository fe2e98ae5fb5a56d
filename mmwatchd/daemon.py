"""The running service: intake (startup scan, watcher, periodic rescan), a bounded queue, N workers, the endpoint
gate, request limits, retries that survive restarts, reload, systemd notification, shutdown.

Threads, all owned and joined here: the workers (``endpoint.concurrency`` of them: requests in flight at most) and
one endpoint prober. watchdog's own threads are owned by ``Watcher``. The calling thread runs intake and the
service loop (watchdog pings, status, reload, rescans).

Failures are kept apart:

- the endpoint is unreachable: the gate closes, workers hold their jobs, and the prober retries ``GET /models`` with
  a capped backoff; nothing fails, however long the outage;
- the server answered 408/409/5xx for a file: the file is retried with exponential backoff and jitter (honouring
  ``Retry-After``); after ``endpoint.max_attempts`` such answers it gets an error sidecar, so no file can make the
  daemon pay for requests forever;
- 429s and quota limits never count against a file: they only delay it;
- a bad key or unknown model (``VLMMisconfigured``): files wait, the log says what to fix;
- permanent problems (bad media, a 4xx refusal, an unusable reply) got their error sidecar in the pipeline already.
"""

from __future__ import annotations

import heapq
import os
import queue
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmwatchd.config import Config
from mmwatchd.errors import ConfigError, VLMError, VLMMisconfigured, VLMUnavailable
from mmwatchd.index import DoneIndex
from mmwatchd.isolate import Isolator
from mmwatchd.log import get_logger
from mmwatchd.model import Reply, VLMRequest
from mmwatchd.notify import Notifier
from mmwatchd.pipeline import Outcome, Processor
from mmwatchd.rules import rel_to_roots
from mmwatchd.sidecar import temp_writer as sidecar_temp_writer
from mmwatchd.state import State
from mmwatchd.watch import Watcher, log_scan_error

if TYPE_CHECKING:
    from mmwatchd.vlm import VLMClient
    from mmwatchd.servers import EndpointKnowledge

log = get_logger()

#: Backoff for transient failures of one file, and for probing a down endpoint.
RETRY_BASE_S = 2.0
RETRY_MAX_S = 600.0
PROBE_MAX_S = 30.0
#: A sidecar temp file whose writer cannot be seen to be gone is taken as left by a killed process at this age.
STALE_TEMP_S = 60.0
#: When this process started, as file times count (temp files older than this cannot be its own).
_STARTED = time.time()
#: How often STATUS= is refreshed for systemd.
STATUS_EVERY_S = 5.0


class QuotaReached(VLMUnavailable):
    """endpoint.max_requests_per_day is used up: work waits for the next day."""

    kind = "quota"

    @property
    def counts_against_file(self) -> bool:
        return False


class RateLimiter:
    """At most ``per_minute`` request starts in any 60 s window (a sliding log: exact, and small at these rates)."""

    def __init__(self, per_minute: int | None, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self.clock = clock
        self._starts: list[float] = []
        self._lock = threading.Lock()

    def acquire(self, stop: threading.Event) -> bool:
        """Wait for a slot; False when ``stop`` was set first."""
        if self.per_minute is None:
            return True
        while True:
            with self._lock:
                now = self.clock()
                self._starts = [t for t in self._starts if t > now - 60.0]
                if len(self._starts) < self.per_minute:
                    self._starts.append(now)
                    return True
                wait = self._starts[0] + 60.0 - now
            if stop.wait(max(0.01, wait)):
                return False


class _MeteredClient:
    """The VLM client as workers see it: request limits applied and every request counted for the day."""

    def __init__(self, client: VLMClient, daemon: Daemon) -> None:
        self.client = client
        self.daemon = daemon

    @property
    def knowledge(self) -> EndpointKnowledge | None:
        """What the endpoint takes (video.mode: auto), shared with the client."""
        return getattr(self.client, "knowledge", None)

    def describe(self, req: VLMRequest) -> Reply:
        d = self.daemon
        cap = d.config.endpoint.max_requests_per_day
        if cap is not None and d.state is not None and d.state.requests_today() >= cap:
            error = QuotaReached(
                f"endpoint.max_requests_per_day ({cap}) reached; work resumes after midnight (local time)"
            )
            error.retry_after = _seconds_to_midnight()
            raise error
        if not d.limiter.acquire(d.stopping):
            raise VLMUnavailable("stopping")
        try:
            reply = self.client.describe(req)
        except VLMError as exc:
            if d.state is not None and getattr(exc, "status", 0) is not None:
                d.state.count_request()  # the server saw it (and may bill it)
            raise
        if d.state is not None:
            d.state.count_request(reply.attempts)
        return reply


def _remove_stale(path: Path) -> None:
    """Remove a sidecar temp file left by a writer that was killed: at once when that process no longer exists on
    this machine and the file predates this process, else once it is older than ``STALE_TEMP_S`` (its writer may be
    another mmwatchd, here or on another machine sharing the folder, still at work)."""
    try:
        st = path.stat()
        writer = sidecar_temp_writer(path.name)
        orphan = writer is not None and not _running(writer) and st.st_mtime < _STARTED
        if orphan or time.time() - st.st_mtime > STALE_TEMP_S:
            path.unlink()
            log.info("daemon.removed_stale_temp", path=str(path))
    except OSError:
        pass  # gone already, or not ours to remove: harmless either way


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _decoder_limits(config: Config) -> dict[str, Any]:
    return {"timeout_s": config.limits.decode_timeout_s, "memory_bytes": config.limits.decode_memory_mb * 2**20}


def _seconds_to_midnight() -> float:
    now = datetime.now()
    midnight = datetime.combine(now.date() + timedelta(days=1), datetime.min.time())
    return (midnight - now).total_seconds() + 1


class Daemon:
    def __init__(
        self,
        config: Config,
        client: VLMClient,
        *,
        state: State | None = None,
        notifier: Notifier | None = None,
        reload: Callable[[], Config] | None = None,
        make_client: Callable[[Config], VLMClient] | None = None,
        clock: Callable[[], float] = time.monotonic,
        one_shot_attempts: int | None = None,
    ) -> None:
        """``one_shot_attempts``: give up on a file after that many transient failures of any kind (``once`` and
        ``scan``, which must end); None for the service. ``reload`` loads the config again on SIGHUP."""
        self.config = config
        self.client = client
        self.state = state
        self.notifier = notifier or Notifier({})
        self._reload_config = reload
        self._make_client = make_client
        self.clock = clock
        self.one_shot_attempts = one_shot_attempts
        self.limiter = RateLimiter(config.endpoint.requests_per_minute, clock=clock)
        # Decoders (C libraries fed untrusted files) run in their own processes: one that hangs, crashes or
        # balloons costs only its file. Both cores decode while requests are in flight.
        self.isolator = Isolator(
            workers=max(1, min(config.endpoint.concurrency, os.cpu_count() or 1)),
            preload=("mmwatchd.encode",),
            **_decoder_limits(config),
        )
        self.processor = self._processor(config)
        self.counts: Counter[str] = Counter()
        self.outcomes: list[Outcome] = []
        self.status_every_s = STATUS_EVERY_S
        self.stopping = threading.Event()
        self.reload_requested = threading.Event()
        self._queue: queue.Queue[tuple[Path, bool, bool] | None] = queue.Queue(
            maxsize=max(64, 16 * config.endpoint.concurrency)
        )
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._pending: set[Path] = set()  # queued, in flight, or waiting to retry
        self._attempts: Counter[Path] = Counter()  # one-shot runs only; the service keeps them in the state db
        self._retries: list[tuple[float, Path]] = []
        self._busy: dict[str, float] = {}  # worker name → when its current job started
        self._logged: set[tuple[Path | None, str]] = set()
        self._gate = threading.Event()  # set while the endpoint is believed reachable
        self._probe_now = threading.Event()
        self._threads: list[threading.Thread] = []
        self._model_warned = False

    def _processor(self, config: Config) -> Processor:
        return Processor(
            config, _MeteredClient(self.client, self), clock=self.clock, isolator=self.isolator  # type: ignore[arg-type]
        )

    # -- lifecycle -------------------------------------------------------------------------------------------

    def start(self, *, prober: bool = True) -> None:
        """Start the workers, and the prober that opens the gate (without it, call ``check_endpoint`` first)."""
        self.isolator.prestart()
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
        self.stopping.set()
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
        self.isolator.close()
        if dropped:
            log.info("daemon.dropped_queue", files=dropped, note="they are picked up again by the next scan")
        if stuck:
            log.warning("daemon.abandoned", threads=stuck, note="in-flight requests abandoned; no partial sidecar")

    def close(self) -> None:
        """Stop, and close the state store (one-shot runs own theirs)."""
        self.stop()
        if self.state is not None:
            self.state.close()

    # -- intake ----------------------------------------------------------------------------------------------

    def submit(self, path: Path, *, explicit: bool = False, force: bool = False) -> bool:
        """Queue a file unless it is already queued or in flight. Blocks while the queue is full (backpressure)."""
        with self._lock:
            if path in self._pending or self.stopping.is_set():
                return False
            self._pending.add(path)
        while not self.stopping.is_set():
            try:
                self._queue.put((path, explicit, force), timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def submit_all(self, paths: Iterable[Path], **kw: bool) -> int:
        """Submit each of ``paths``; stop taking them (a walk of a large tree, say) once the daemon is stopping."""
        n = 0
        for path in paths:
            if self.stopping.is_set():
                break
            n += self.submit(path, **kw)
        return n

    def scan_roots(self, *, clean: bool = False) -> int:
        """Queue every file :meth:`needing_work` finds; return how many were queued."""
        return self.submit_all(self.needing_work(clean=clean))

    def needing_work(self, *, clean: bool = False) -> Iterator[Path]:
        """Every wanted file under the roots that may need work, as the walk finds it.

        A file whose size, mtime and rule fingerprint match the done-index, and whose sidecar is still there, is
        skipped from a stat alone; anything else goes to a worker, which checks the sidecar itself (and so rebuilds
        the index when it was lost). A walk that lists every folder also drops the index entries of files it no
        longer finds, so the index does not grow with years of deleted and moved-away files. ``clean``: also delete
        sidecar temp files left by a killed process (at startup; see :func:`_remove_stale` for how they are told
        from ones another process is still writing).
        """
        cfg = self.config
        index = DoneIndex(cfg, self.state.done_index() if self.state is not None else {})
        on_temp = _remove_stale if clean else None
        seen: set[str] = set()
        unlisted = False

        def on_error(path: Path, exc: OSError) -> None:
            nonlocal unlisted
            unlisted = True  # its files are not gone, only unseen (a share not mounted): keep their entries
            log_scan_error(path, exc)

        for root in cfg.watch:
            for name, done in index.walk(root, on_error=on_error, on_temp=on_temp):
                seen.add(name)
                if done is None:
                    yield Path(name)
        if self.state is not None and not unlisted and not self.stopping.is_set():
            gone = index.rows.keys() - seen
            if gone:
                self.state.forget_done(gone)
                log.info("index.pruned", entries=len(gone))

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
                if not self._pending or self.stopping.is_set():
                    return True
                wait = 0.5 if nxt is None else min(0.5, max(0.01, nxt))
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    wait = min(wait, left)
                self._idle.wait(wait)

    # -- the service loop ------------------------------------------------------------------------------------

    def run(self, stop: threading.Event, *, on_ready: Callable[[], None] | None = None) -> None:
        """Watch, scan, and keep going until ``stop`` is set."""
        watcher = self._watcher(self.config)
        try:
            self.start()
            log.info("daemon.watching", roots=[str(r.path) for r in self.config.watch])
            self.notifier.ready(self._status_line())
            if on_ready:
                on_ready()
            log.info("daemon.scanned", queued=self.scan_roots(clean=True))
            ping_every = self.notifier.watchdog_interval()
            next_ping = next_status = last_scan = self.clock()
            while not stop.is_set():
                nxt = self.due_retries()
                timeout = min(0.5, ping_every or 0.5, nxt if nxt is not None else 0.5)
                for path in watcher.ready(max(0.01, timeout)):
                    self.submit(path)
                now = self.clock()
                if watcher.take_overflow():
                    # The kernel dropped events: only a full scan can tell what was missed.
                    log.warning("watch.overflow", note="rescanning every folder")
                    self.scan_roots()
                    last_scan = now
                elif self.config.rescan_interval_s and now - last_scan >= self.config.rescan_interval_s:
                    log.info("daemon.rescanned", queued=self.scan_roots())
                    last_scan = now
                if self.reload_requested.is_set():
                    self.reload_requested.clear()
                    watcher = self._reload(watcher)
                if ping_every is not None and now >= next_ping and self._healthy(now):
                    self.notifier.watchdog()
                    next_ping = now + ping_every
                if now >= next_status:
                    self.notifier.status(self._status_line())
                    next_status = now + self.status_every_s
        finally:
            self.notifier.stopping()
            watcher.stop()
            self.stop()

    def _watcher(self, config: Config) -> Watcher:
        watcher = Watcher(config.watch, settle_s=config.settle_s, sidecar_suffix=config.sidecar.suffix)
        watcher.start()
        return watcher

    def _healthy(self, now: float) -> bool:
        """False when a worker has been on one job far longer than any request may take: systemd then restarts us."""
        ep = self.config.endpoint
        limit = 2 * ep.timeout_s * (ep.max_retries + 1) + 300.0
        with self._lock:
            stuck = [name for name, since in self._busy.items() if now - since > limit]
        if stuck:
            key = (None, "stuck")
            if key not in self._logged:
                self._logged.add(key)
                log.error("daemon.stuck", workers=stuck, limit_s=limit, note="watchdog pings stopped")
        return not stuck

    def _status_line(self) -> str:
        with self._lock:
            queued = self._queue.qsize()
            busy = len(self._busy)
            retrying = len(self._retries)
            c = dict(self.counts)
        endpoint = "up" if self._gate.is_set() else "unreachable"
        return (
            f"{queued} queued, {busy} in flight, {c.get('ok', 0)} done, {c.get('error', 0)} failed, "
            f"{retrying} retrying; endpoint {endpoint}"
        )

    def _reload(self, watcher: Watcher) -> Watcher:
        """Apply a new config to files not yet started; an invalid one is logged and the old one stays."""
        if self._reload_config is None:
            return watcher
        self.notifier.reloading()
        try:
            new = self._reload_config()
        except ConfigError as exc:
            log.error("config.reload_failed", problems=exc.problems, note="the previous config stays in force")
            self.notifier.ready(self._status_line())
            return watcher
        old = self.config
        if new.endpoint != old.endpoint and self._make_client is not None:
            try:
                self.client = self._make_client(new)
            except ConfigError as exc:  # e.g. an api_key_file others can read
                log.error("config.reload_failed", problems=exc.problems, note="the previous config stays in force")
                self.notifier.ready(self._status_line())
                return watcher
            self.limiter = RateLimiter(new.endpoint.requests_per_minute, clock=self.clock)
            if new.endpoint.concurrency != old.endpoint.concurrency:
                log.warning("config.restart_needed", key="endpoint.concurrency", note="applies after a restart")
        self.isolator.set_limits(**_decoder_limits(new))  # decoders under other limits are replaced once idle
        self.config = new
        self.processor = self._processor(new)
        if new.watch != old.watch or new.settle_s != old.settle_s or new.sidecar != old.sidecar:
            try:
                replacement = self._watcher(new)
            except ConfigError as exc:
                log.error("config.reload_watch_failed", problems=exc.problems, note="still watching the old folders")
            else:
                watcher.stop()
                watcher = replacement
        log.info("config.reloaded", rules=[r.name for r in new.rules], roots=[str(r.path) for r in new.watch])
        self.notifier.ready(self._status_line())
        self.scan_roots()  # new rules or prompts may apply to files already there
        return watcher

    # -- workers ---------------------------------------------------------------------------------------------

    def _worker(self) -> None:
        name = threading.current_thread().name
        while True:
            item = self._queue.get()
            if item is None or self.stopping.is_set():
                return
            path, explicit, force = item
            while not self._gate.wait(0.5):
                if self.stopping.is_set():
                    return
            if self.stopping.is_set():
                return
            with self._lock:
                self._busy[name] = self.clock()
            try:
                outcome = self._run_job(path, explicit=explicit, force=force)
            finally:
                with self._lock:
                    self._busy.pop(name, None)
            if not self.stopping.is_set() or outcome.status != "retry":
                self._finish(outcome)

    def _attempts_so_far(self, path: Path) -> int:
        if self.one_shot_attempts is not None:
            with self._lock:
                return self._attempts[path]
        return self.state.attempts(path) if self.state is not None else 0

    def _run_job(self, path: Path, *, explicit: bool, force: bool) -> Outcome:
        last = self.one_shot_attempts is None and self._attempts_so_far(path) + 1 >= self.config.endpoint.max_attempts
        try:
            return self.processor.process(path, explicit=explicit, force=force, last_attempt=last)
        except Exception as exc:  # the one per-job boundary: a bug must not kill the worker
            log.exception("job.crashed", path=str(path), error=f"{type(exc).__name__}: {exc}")
            return Outcome(path=path, status="retry", reason=f"internal error: {type(exc).__name__}: {exc}")

    def _finish(self, outcome: Outcome) -> None:
        path = outcome.path
        retry_in: float | None = None
        final = True
        root = rel_to_roots(path, [r.path for r in self.config.watch])[0]
        root_key = str(root) if root else None
        error = outcome.error
        if outcome.status == "retry":
            counted = not isinstance(error, VLMUnavailable) or error.counts_against_file
            if self.one_shot_attempts is not None:
                with self._lock:
                    self._attempts[path] += 1
                    attempts = self._attempts[path]
                final = attempts >= self.one_shot_attempts or isinstance(error, VLMMisconfigured)
            else:
                final = False
                attempts = self._attempts_so_far(path)
                if isinstance(error, VLMUnavailable) and error.status is None and not isinstance(error, QuotaReached):
                    self._endpoint_down(error)
                if isinstance(error, VLMMisconfigured):
                    self._log_once(None, error.message, "endpoint.misconfigured")
            if not final:
                backoff = min(RETRY_MAX_S, RETRY_BASE_S * 2 ** max(0, attempts - 1)) * random.uniform(0.8, 1.2)
                retry_in = max(backoff, outcome.retry_after or 0.0)
                if isinstance(error, VLMUnavailable) and error.status is None and outcome.retry_after is None:
                    retry_in = RETRY_BASE_S  # the gate holds work until the endpoint is back; no need to wait longer
                if self.state is not None and counted and self.one_shot_attempts is None:
                    self.state.record_attempt(
                        path, root=root_key, kind=error.kind if error else "internal", message=outcome.reason,
                        retry_at=time.time() + retry_in,
                    )  # fmt: skip
        elif self.state is not None and outcome.status in ("ok", "error"):
            self.state.record_done(
                path, root=root_key, status=outcome.status,  # type: ignore[arg-type]
                message=outcome.reason or None, kind=error.kind if error else "error",
            )  # fmt: skip
        if self.state is not None and outcome.version and outcome.fingerprint and outcome.kind and outcome.answer:
            # Answered (now or before, found by reading its sidecar): the next rescan can skip it from a stat.
            size, mtime_ns = outcome.version
            if outcome.moved_to is None:
                self.state.mark_done(path, size=size, mtime_ns=mtime_ns, kind=outcome.kind,
                                     fingerprint=outcome.fingerprint, status=outcome.answer)  # fmt: skip
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

    def _log_once(self, path: Path | None, reason: str, event: str, level: str = "error", **fields: object) -> bool:
        key = (path, reason)
        with self._lock:
            first = key not in self._logged
            self._logged.add(key)
        if first:
            getattr(log, level)(event, **({"path": str(path)} if path else {}), reason=reason, **fields)
        return first

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
        if outcome.moved_to:
            fields["moved_to"] = str(outcome.moved_to)
        if outcome.action_problems:
            fields["action_problems"] = list(outcome.action_problems)
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
                first = key not in self._logged
                self._logged.add(key)
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

    def probe_once(self) -> None:
        """One-shot runs (no prober): probe the endpoint once before work starts.

        Unreachable, or a bad key or model: raises, so the command says so at once instead of once per file. An
        endpoint that answers ``/models`` with some other error is up: the work goes ahead.
        """
        try:
            self.check_endpoint()
        except VLMError as exc:
            if exc.retryable:
                raise
            self._models_refused(exc)

    def _models_refused(self, exc: VLMError) -> None:
        # It answered, so it is up; some gateways simply have no /models. Requests will tell.
        self._log_once(None, exc.message, "endpoint.models_refused", level="warning")
        self._gate.set()

    def _prober(self) -> None:
        delay = 1.0
        self._probe_now.set()
        while not self.stopping.is_set():
            self._probe_now.wait()
            if self.stopping.is_set():
                return
            try:
                self.check_endpoint()
            except VLMMisconfigured as exc:
                self._log_once(None, exc.message, "endpoint.misconfigured")
                self.stopping.wait(min(PROBE_MAX_S, delay * 4))
                continue
            except VLMUnavailable as exc:
                if delay == 1.0:
                    log.error("endpoint.unreachable", url=self.config.endpoint.base_url, reason=exc.message)
                self.stopping.wait(delay * random.uniform(0.8, 1.2))
                delay = min(PROBE_MAX_S, delay * 2)
                continue
            except VLMError as exc:
                self._models_refused(exc)
            delay = 1.0
            self._probe_now.clear()
