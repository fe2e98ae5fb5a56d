"""The running service: intake (startup scan, watcher, periodic rescan), a bounded queue, N workers, the endpoint
gate, request limits, retries that survive restarts, reload, systemd notification, shutdown.

Threads, all owned and joined here: the workers (``endpoint.concurrency`` of them: requests in flight at most), one
feeder and one endpoint prober. watchdog's own threads are owned by ``Watcher``. The calling thread runs the service
loop (watcher events, watchdog pings, status, reload) and never blocks on the work: the feeder walks the folders
(startup scan, rescans) and feeds the bounded queue, so a backlog of any size leaves the loop free to ping the
watchdog and to stop.

Stopping (SIGTERM, SIGINT: see :class:`SignalRelay`): nothing new starts. Requests already on the wire finish and
their sidecars are written; no request leaves after the stop, neither a new one nor a retry of one in flight (every
HTTP request passes :meth:`Daemon._before_request`, the SDK's own retries included).

Failures are kept apart:

- the endpoint is unreachable: the gate closes, workers hold their jobs, and the prober retries ``GET /models`` with
  a capped backoff; nothing fails, however long the outage;
- the server answered 408/409/5xx for a file: the file is retried with exponential backoff and jitter (honouring
  ``Retry-After``); after ``endpoint.max_attempts`` such answers it gets an error sidecar, so no file can make the
  daemon pay for requests forever;
- 429s and quota limits never count against a file: they only delay it;
- a bad key or unknown model (``VLMMisconfigured``): files wait, the log says what to fix;
- the server refuses :data:`REFUSALS_TO_PAUSE` different files in a row with the same words (an unsupported
  ``response_format``, a ``max_tokens`` the model does not take): that is the endpoint's configuration, not the
  files; work pauses without writing error sidecars until a trial request or a reload gets through;
- permanent problems (bad media, a 4xx refusal, an unusable reply) got their error sidecar in the pipeline already;
- the state store failing (a full or read-only disk) is logged and work carries on: it is a cache beside the
  sidecars. A worker that dies all the same stops the watchdog pings, and ``once``/``scan`` do not wait for it.
"""

from __future__ import annotations

import contextlib
import heapq
import os
import queue
import random
import signal
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import date, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from mmwatchd import search
from mmwatchd import sidecar as sidecar_mod
from mmwatchd.model import Config
from mmwatchd.errors import (
    ConfigError,
    SidecarError,
    StateError,
    VLMError,
    VLMMisconfigured,
    VLMRejected,
    VLMUnavailable,
)
from mmwatchd.index import DoneIndex
from mmwatchd.isolate import Isolator
from mmwatchd.log import get_logger
from mmwatchd.metrics import Metrics, Unmetered, endpoint_name
from mmwatchd.model import Reply, VLMRequest
from mmwatchd.notify import Notifier
from mmwatchd.pipeline import Outcome, Processor
from mmwatchd.progress import Snapshot
from mmwatchd.rules import rel_to_roots
from mmwatchd.sidecar import temp_writer as sidecar_temp_writer
from mmwatchd.state import State
from mmwatchd.settle import StabilityTracker
from mmwatchd.walk import log_scan_error, wanted
from mmwatchd.watch import Watcher

if TYPE_CHECKING:
    from mmwatchd.vlm import VLMClient
    from mmwatchd.servers import EndpointKnowledge

log = get_logger()

#: Backoff for transient failures of one file, and for probing a down endpoint.
RETRY_BASE_S = 2.0
RETRY_MAX_S = 600.0
PROBE_MAX_S = 30.0
#: While paused for endpoint-wide refusals: the first trial request after this long, then doubling up to the max.
TRIAL_FIRST_S = 30.0
TRIAL_MAX_S = 900.0
#: This many different files refused in a row with the same status and message pause work (see the module doc).
REFUSALS_TO_PAUSE = 3
#: A sidecar temp file whose writer cannot be seen to be gone is taken as left by a killed process at this age.
STALE_TEMP_S = 60.0
#: When this process started, as file times count (temp files older than this cannot be its own).
_STARTED = time.time()
#: How often STATUS= is refreshed for systemd at least (and at most once a second when it changes).
STATUS_EVERY_S = 5.0
STATUS_MIN_S = 1.0


class QuotaReached(VLMUnavailable):
    """endpoint.max_requests_per_day is used up: work waits for the next day."""

    kind = "quota"

    @property
    def counts_against_file(self) -> bool:
        return False


class Stopping(VLMUnavailable):
    """The daemon is stopping: the request was not sent (the file is picked up again by the next start)."""

    kind = "stopping"

    @property
    def counts_against_file(self) -> bool:
        return False


class EndpointRefuses(VLMMisconfigured):
    """Different files refused in a row with the same words: the endpoint's configuration, not the files."""

    kind = "endpoint_refuses"


class RateLimiter:
    """At most ``per_minute`` request starts in any 60 s window (a sliding log: exact, and small at these rates)."""

    def __init__(self, per_minute: int | None, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self.clock = clock
        self._starts: list[float] = []
        self._lock = threading.Lock()
        #: Workers waiting for a slot right now (progress shows "rate-limited" meanwhile).
        self.waiting = 0

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
                self.waiting += 1
            try:
                if stop.wait(max(0.01, wait)):
                    return False
            finally:
                with self._lock:
                    self.waiting -= 1


class _MeteredClient:
    """The VLM client as workers see it: every HTTP request it sends passes :meth:`Daemon._before_request` (limits,
    the daily count, the stop), and refusals are judged for being endpoint-wide."""

    def __init__(self, client: VLMClient, daemon: Daemon) -> None:
        self.client = client
        self.daemon = daemon
        # A client that cannot report each HTTP request (an injected SDK client) is metered once per describe.
        self._per_describe = not getattr(client, "counts_every_request", False)
        if not self._per_describe:
            client.before_request = daemon._before_request
            client.observer = daemon.metrics

    @property
    def knowledge(self) -> EndpointKnowledge | None:
        """What the endpoint takes (video.mode: auto), shared with the client."""
        return getattr(self.client, "knowledge", None)

    def describe(self, req: VLMRequest) -> Reply:
        d = self.daemon
        if self._per_describe:
            d._before_request()
        try:
            with d.metrics.describing():
                reply = self.client.describe(req)
        except VLMRejected as exc:
            d._refused(exc)  # raises EndpointRefuses instead once the refusals are endpoint-wide
            raise
        d.metrics.replied(reply)
        d._accepted()
        return reply


class SignalRelay:
    """Turns signals into calls on an ordinary thread.

    A Python signal handler runs on the main thread between two bytecodes, possibly while that thread holds a lock
    the handler would need: structlog's writer lock (not re-entrant) when it logs, an Event's condition lock when it
    sets one. So the handlers here do nothing at all; the C-level handler writes the signal number to a wakeup pipe
    (``signal.set_wakeup_fd``) and the relay thread reads it and calls ``handlers[signum]``, where logging and locks
    are safe. Use it as a context manager on the main thread.
    """

    def __init__(self, handlers: Mapping[int, Callable[[int], None]]) -> None:
        self.handlers = dict(handlers)
        self._old: dict[int, Any] = {}
        self._old_fd = -1
        self._r = self._w = -1
        self._thread: threading.Thread | None = None
        self._closing = False

    def __enter__(self) -> SignalRelay:
        self._r, self._w = os.pipe()
        os.set_blocking(self._w, False)  # the C handler must never block
        self._old_fd = signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
        for signum in self.handlers:
            self._old[signum] = signal.signal(signum, _nothing)
        self._thread = threading.Thread(target=self._relay, name="mmwatchd-signals", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, old in self._old.items():
            signal.signal(signum, old)
        signal.set_wakeup_fd(self._old_fd)
        self._closing = True
        os.write(self._w, b"\0")  # 0 is no signal: it wakes the relay to leave
        if self._thread is not None:
            self._thread.join()
        os.close(self._r)
        os.close(self._w)

    def _relay(self) -> None:
        while True:
            try:
                data = os.read(self._r, 64)
            except InterruptedError:
                continue
            for signum in data:
                if signum == 0 and self._closing:
                    return
                handler = self.handlers.get(signum)
                if handler is not None:
                    handler(signum)


def _nothing(signum: int, frame: FrameType | None) -> None:
    """The Python-level handler: the work is done by :class:`SignalRelay`'s thread."""


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
        wall_clock: Callable[[], float] = time.time,
        one_shot_attempts: int | None = None,
        metrics: bool = False,
        decoders: int | None = None,
    ) -> None:
        """``one_shot_attempts``: give up on a file after that many transient failures of any kind (``once`` and
        ``scan``, which must end); None for the service. ``reload`` loads the config again on SIGHUP. ``wall_clock``
        is what file mtimes are compared with (is a file found by a scan still being written?). ``metrics``: keep
        Prometheus metrics even without ``metrics.listen`` (``scan --metrics-textfile``). ``decoders``: at most this
        many decoder processes (``once`` on fewer files than cores need no more than one each)."""
        self.config = config
        self.client = client
        self.state = state
        self.notifier = notifier or Notifier({})
        self._reload_config = reload
        self._make_client = make_client
        self.clock = clock
        self.wall_clock = wall_clock
        self.one_shot_attempts = one_shot_attempts
        self.limiter = RateLimiter(config.endpoint.requests_per_minute, clock=clock)
        # Decoders (C libraries fed untrusted files) run in their own processes: one that hangs, crashes or
        # balloons costs only its file. Both cores decode while requests are in flight.
        self.isolator = Isolator(
            workers=max(1, min(config.endpoint.concurrency, os.cpu_count() or 1, decoders or config.endpoint.concurrency)),
            preload=("mmwatchd.encode",),
            **_decoder_limits(config),
        )
        self.counts: Counter[str] = Counter()
        self.outcomes: list[Outcome] = []
        self.status_every_s = STATUS_EVERY_S
        self.stopping = threading.Event()
        self.reload_requested = threading.Event()
        #: Set (with ``stopping``) when a one-shot run cannot go on: the daily cap, an endpoint refusing everything.
        self.halted: str | None = None
        self._queue: queue.Queue[tuple[Path, bool, bool] | None] = queue.Queue(
            maxsize=max(64, 16 * config.endpoint.concurrency)
        )
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._wake = threading.Condition(self._lock)  # the feeder waits here for intake, scans, retries, stops
        self._pending: set[Path] = set()  # settling, queued, in flight, or waiting to retry
        self._intake: deque[Path] = deque()  # pending paths for the feeder to queue (events, retries, settled)
        self._dirty: set[Path] = set()  # changed again while pending: looked at again once finished
        self._settle_lock = threading.Lock()
        self._settle_dropped: list[Path] = []
        self._settling = StabilityTracker(  # files a scan found mid-write
            settle_s=config.settle_s, clock=clock, on_drop=lambda path: self._settle_dropped.append(path)
        )
        self._scan_wanted: bool | None = None  # a walk to start (its value: clean stale temp files first)
        self._walking = False
        self.walks_finished = 0
        self._walks = 0  # walks under way (the feeder's, or a one-shot command's on its own thread)
        self._rate_limited_until = float("-inf")  # the last 429's Retry-After, on self.clock
        self._search: search.SearchIndex | None = None  # opened when the first sidecar is written
        self._search_failed = False
        self._search_lock = threading.Lock()
        self._attempts: Counter[Path] = Counter()  # one-shot runs only; the service keeps them in the state db
        self._retries: list[tuple[float, Path]] = []
        self._busy: dict[str, float] = {}  # worker name → when its current job started
        self._jobs: dict[str, Path] = {}  # worker name → its current path
        self._workers: list[threading.Thread] = []
        self._logged: set[tuple[Path | None, str]] = set()
        self._gate = threading.Event()  # set while the endpoint is believed reachable (and not paused)
        self._endpoint = "checking"  # for STATUS=: checking, up, unreachable, paused
        self._probe_now = threading.Event()
        self._threads: list[threading.Thread] = []
        self._model_warned = False
        self._local = threading.local()  # the path a worker is on, for the refusal check
        self._refusal: tuple[str, set[Path]] | None = None  # the last refusal's words, and the files it came for
        self._paused: str | None = None  # the server's words while paused for endpoint-wide refusals
        self._trial = False  # while paused: one job may go through as a trial
        self._count_lock = threading.Lock()
        self._fallback_counts: Counter[date] = Counter()  # requests per day while the state store cannot count
        self._users: Counter[Processor] = Counter()  # jobs running under each processor (config, client)
        self._retired: dict[Processor, VLMClient] = {}  # replaced by a reload: closed once no job uses them
        self.metrics: Metrics | Unmetered = Unmetered()
        if metrics or config.metrics is not None:
            self.metrics = Metrics(
                endpoint_name(config), queued=self._queue.qsize, limit=lambda: self.config.endpoint.concurrency
            )
        self.processor = self._processor(config)

    def _processor(self, config: Config) -> Processor:
        return Processor(
            config, _MeteredClient(self.client, self), clock=self.clock, isolator=self.isolator  # type: ignore[arg-type]
        )

    # -- lifecycle -------------------------------------------------------------------------------------------

    def start(self, *, prober: bool = True) -> None:
        """Start the workers, the feeder, and the prober that opens the gate (without it, call ``check_endpoint``
        first)."""
        self.isolator.prestart()
        for i in range(self.config.endpoint.concurrency):
            self._workers.append(self._spawn(self._worker, f"mmwatchd-worker-{i}"))
        self._spawn(self._feeder, "mmwatchd-feeder")
        if prober:
            self._spawn(self._prober, "mmwatchd-prober")

    def _spawn(self, target: Callable[[], None], name: str) -> threading.Thread:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)
        return t

    def request_stop(self) -> None:
        """Take no more work: nothing new starts and no request leaves from now on (callable from any thread; the
        owner still calls :meth:`stop`, or leaves :meth:`run`, to wait for what is in flight)."""
        self.stopping.set()
        self._gate.set()  # wake workers held at the gate so they can leave
        self._probe_now.set()
        with self._lock:
            self._wake.notify_all()
            self._idle.notify_all()

    def _halt(self, reason: str) -> None:
        """A one-shot run cannot go on (the daily cap, an endpoint refusing everything): stop, and say why."""
        with self._lock:
            first = self.halted is None
            if first:
                self.halted = reason
        if first:
            log.error("daemon.halted", reason=reason)
        self.request_stop()

    def stop(self, grace_s: float | None = None) -> None:
        """Stop taking work; let in-flight requests finish (bounded by the request timeout); join every thread."""
        self.request_stop()
        dropped = 0
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                dropped += 1
        with self._lock:
            dropped += len(self._intake)
            self._intake.clear()
            self._pending.clear()
            self._retries.clear()
            self._idle.notify_all()
        for _ in self._threads:
            with contextlib.suppress(queue.Full):
                self._queue.put_nowait(None)
        # Decodes under way are for requests that will not be sent now: stop them rather than wait (the file is
        # not at fault and is picked up again by the next start). Requests on the wire need no decoder any more.
        self.isolator.close()
        self.metrics.close()
        # No request leaves after the stop, retries included: one already on the wire ends within timeout_s (plus
        # the SDK's short wait when it was about to retry, and the sidecar write).
        deadline = time.monotonic() + (grace_s if grace_s is not None else self.config.endpoint.timeout_s + 15)
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        stuck = [t.name for t in self._threads if t.is_alive()]
        self._threads.clear()
        with self._lock:
            retired, self._retired = list(self._retired.values()), {}
        with self._search_lock:
            index, self._search = self._search, None
        for client in retired:
            _close(client)
        if index is not None:
            index.close()
        if dropped:
            log.info("daemon.dropped_queue", files=dropped, note="they are picked up again by the next scan")
        if stuck:
            log.warning("daemon.abandoned", threads=stuck, note="in-flight requests abandoned; no partial sidecar")

    def _request_bound(self) -> float:
        """How long one request may take at most, the SDK's quick retries included."""
        ep = self.config.endpoint
        return ep.timeout_s * (ep.max_retries + 1) + 10.0 * ep.max_retries

    def close(self) -> None:
        """Stop, and close the state store (one-shot runs own theirs)."""
        self.stop()
        if self.state is not None:
            self.state.close()

    # -- intake ----------------------------------------------------------------------------------------------

    def submit(self, path: Path, *, explicit: bool = False, force: bool = False, scanned: bool = False) -> bool:
        """Queue a file unless it is already pending. Blocks while the queue is full (backpressure), so only a
        thread that may wait calls this (the feeder, a one-shot command); the service loop uses :meth:`offer`.

        ``scanned``: found by a walk rather than reported ready by the watcher, so it may still be being written:
        a file changed within ``settle_s`` goes to the stability tracker first.
        """
        with self._lock:
            if path in self._pending or self.stopping.is_set():
                return False
            self._pending.add(path)
        if scanned and self._recent(path):
            with self._settle_lock:
                self._settling.touch(path, link=os.path.islink(path))
                tracked = path in self._settling
            if tracked:
                with self._lock:
                    self._wake.notify_all()
                return True
        return self._put(path, explicit, force)

    def _put(self, path: Path, explicit: bool = False, force: bool = False) -> bool:
        while not self.stopping.is_set():
            try:
                self._queue.put((path, explicit, force), timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _recent(self, path: Path) -> bool:
        """Changed within ``settle_s``: perhaps still being copied."""
        try:
            st = os.stat(path)
        except OSError:
            return False  # the worker will see what became of it
        return self.wall_clock() - st.st_mtime < self.config.settle_s

    def offer(self, path: Path) -> bool:
        """Hand a ready file (a watcher event) to the feeder without blocking. A file already pending is looked at
        again once its current round ends (it changed meanwhile); one still settling after a scan found it is
        ready now."""
        with self._lock:
            if self.stopping.is_set():
                return False
            if path in self._pending:
                with self._settle_lock:
                    settling = path in self._settling
                    if settling:
                        self._settling.forget(path)
                if settling:
                    self._intake.append(path)
                    self._wake.notify_all()
                    return True
                self._dirty.add(path)
                return False
            self._pending.add(path)
            self._intake.append(path)
            self._wake.notify_all()
        return True

    def submit_all(self, paths: Iterable[Path], **kw: bool) -> int:
        """Submit each of ``paths``; stop taking them (a walk of a large tree, say) once the daemon is stopping."""
        n = 0
        for path in paths:
            if self.stopping.is_set():
                break
            n += self.submit(path, **kw)
        return n

    def scan_roots(self, *, clean: bool = False) -> int:
        """Queue every file :meth:`needing_work` finds, on the calling thread; return how many were queued."""
        return self.submit_all(self.needing_work(clean=clean), scanned=True)

    def request_scan(self, *, clean: bool = False) -> None:
        """Have the feeder walk every folder (again, once a walk under way has ended); returns at once."""
        with self._lock:
            self._scan_wanted = clean or bool(self._scan_wanted)
            self._wake.notify_all()

    def needing_work(self, *, clean: bool = False) -> Iterator[Path]:
        """Every wanted file under the roots that may need work, as the walk finds it.

        A file whose size, mtime and rule fingerprint match the done-index, and whose sidecar is still there, is
        skipped from a stat alone; anything else goes to a worker, which checks the sidecar itself (and so rebuilds
        the index when it was lost). A walk that lists every folder also drops the index entries of files it no
        longer finds, so the index does not grow with years of deleted and moved-away files; only entries the walk
        would have found count (another config may share the state directory with other folders). ``clean``: also
        delete sidecar temp files left by a killed process (at startup; see :func:`_remove_stale` for how they are
        told from ones another process is still writing).
        """
        with self.finding():
            yield from self._needing_work(clean=clean)

    @contextlib.contextmanager
    def finding(self) -> Iterator[None]:
        """While files are still being found and submitted (a walk, or ``once``'s list going into the bounded
        queue), the total of :meth:`progress` is unknown."""
        with self._lock:
            self._walks += 1
        try:
            yield
        finally:
            with self._lock:
                self._walks -= 1
                self.walks_finished += 1

    def _needing_work(self, *, clean: bool) -> Iterator[Path]:
        cfg = self.config
        rows = self._store("read the done-index", self.state.done_index) if self.state is not None else None
        index = DoneIndex(cfg, rows or {})
        on_temp = _remove_stale if clean else None
        seen: set[str] = set()
        unlisted = rows is None

        def on_error(path: Path, exc: OSError) -> None:
            nonlocal unlisted
            unlisted = True  # its files are not gone, only unseen (a share not mounted): keep their entries
            log_scan_error(path, exc)

        for root in cfg.watch:
            for name, done in index.walk(root, on_error=on_error, on_temp=on_temp):
                seen.add(name)
                if done is None:
                    yield Path(name)
        if self.state is not None and index.adopted:
            self._store("adopt file identities", self.state.adopt_identities, index.adopted)
        if self.state is not None and not unlisted and not self.stopping.is_set():
            suffix = cfg.sidecar.suffix
            gone = [
                name for name in index.rows.keys() - seen
                if any(wanted(root, Path(name), sidecar_suffix=suffix) for root in cfg.watch)
            ]  # fmt: skip
            if gone:
                self._store("prune the done-index", self.state.forget_done, gone)
                log.info("index.pruned", entries=len(gone))

    def due_retries(self) -> float | None:
        """Hand files whose retry time has come (and scanned files that have settled) to the feeder; return seconds
        until the next retry, if any. The feeder does this by itself; this is for callers that want it now."""
        self._feed_due()
        with self._lock:
            return self._retries[0][0] - self.clock() if self._retries else None

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until nothing is settling, queued, in flight or waiting to retry, or the daemon stops; also when
        every worker has died (nothing could finish what is left)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while True:
                if not self._pending or self.stopping.is_set():
                    return True
                if self._workers and not any(t.is_alive() for t in self._workers):
                    return True
                wait = 0.5
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    wait = min(wait, left)
                self._idle.wait(wait)

    # -- the feeder ------------------------------------------------------------------------------------------

    def _feeder(self) -> None:
        """Feed the bounded queue: ready files first (events, due retries, settled files), then the walk under way.

        Blocking on a full queue here is backpressure on the walk; the service loop is never held up by it.
        """
        walk: Iterator[Path] | None = None
        walked = 0
        try:
            while not self.stopping.is_set():
                self._feed_due()
                with self._lock:
                    path = self._intake.popleft() if self._intake else None
                    # A scan asked for during a walk (events lost in folders it has passed) waits for it to end.
                    if walk is None and self._scan_wanted is not None:
                        clean, self._scan_wanted = self._scan_wanted, None
                        walk, walked = self.needing_work(clean=clean), 0
                        self._walking = True
                    if path is None and walk is None:
                        self._wake.wait(self._feed_wait())
                        continue
                if path is not None:
                    self._put(path)
                    continue
                assert walk is not None
                item = next(walk, None)
                if item is None:
                    with self._lock:
                        self._walking = False
                    walk = None
                    log.info("daemon.scanned", queued=walked)
                    continue
                walked += self.submit(item, scanned=True)
        finally:
            if walk is not None:
                walk.close()
            with self._lock:
                self._walking = False

    def _feed_due(self) -> None:
        """Move retries whose time has come, and scanned files that have settled, to the intake."""
        now = self.clock()
        with self._settle_lock:
            settled = self._settling.due() if len(self._settling) else []
            dropped, self._settle_dropped = self._settle_dropped, []
        with self._lock:
            while self._retries and self._retries[0][0] <= now:
                self._intake.append(heapq.heappop(self._retries)[1])
            for path in settled:
                if path in self._pending:
                    self._intake.append(path)
            for path in dropped:  # vanished, or no longer a regular file, while it settled: nothing to do
                self._pending.discard(path)
            if dropped:
                self._idle.notify_all()

    def _feed_wait(self) -> float:
        """How long the feeder may sleep (called with the lock held)."""
        wait = 0.5
        if self._retries:
            wait = min(wait, max(0.01, self._retries[0][0] - self.clock()))
        with self._settle_lock:
            nxt = self._settling.next_deadline()
        if nxt is not None:
            wait = min(wait, max(0.01, nxt - self.clock() + 0.002))
        return wait

    # -- the service loop ------------------------------------------------------------------------------------

    def run(self, stop: threading.Event, *, on_ready: Callable[[], None] | None = None) -> None:
        """Watch, scan, and keep going until ``stop`` is set (or :meth:`request_stop` is called).

        This loop never waits on the work: the walk runs on the feeder, so watchdog pings and STATUS= go on through
        a backlog of any size, and a stop is seen within half a second.
        """
        if self.config.metrics is not None:
            self.metrics.serve(self.config)  # first: a port that is taken stops the start with nothing to undo
        watcher = self._watcher(self.config)
        try:
            self.start()
            log.info("daemon.watching", roots=[str(r.path) for r in self.config.watch])
            self.notifier.ready(self._status_line())
            if on_ready:
                on_ready()
            self.request_scan(clean=True)
            ping_every = self.notifier.watchdog_interval()
            next_ping = last_scan = last_status = self.clock()
            status = ""
            while not stop.is_set() and not self.stopping.is_set():
                for path in watcher.ready(min(0.5, ping_every or 0.5)):
                    self.offer(path)
                now = self.clock()
                if watcher.take_overflow():
                    # The kernel dropped events: only a full scan can tell what was missed.
                    log.warning("watch.overflow", note="rescanning every folder")
                    self.request_scan()
                    last_scan = now
                elif self.config.rescan_interval_s and now - last_scan >= self.config.rescan_interval_s:
                    if not self._walking:
                        self.request_scan()
                    last_scan = now
                if self.reload_requested.is_set():
                    self.reload_requested.clear()
                    watcher = self._reload(watcher)
                if ping_every is not None and now >= next_ping and self._healthy(now):
                    self.notifier.watchdog()
                    next_ping = now + ping_every
                line = self._status_line()
                if (line != status and now - last_status >= STATUS_MIN_S) or now - last_status >= self.status_every_s:
                    self.notifier.status(line)
                    status, last_status = line, now
        finally:
            self.request_stop()
            self.notifier.stopping()
            watcher.stop()
            self.stop()

    def _watcher(self, config: Config) -> Watcher:
        watcher = Watcher(config.watch, settle_s=config.settle_s, sidecar_suffix=config.sidecar.suffix, clock=self.clock)
        watcher.start()
        return watcher

    def _healthy(self, now: float) -> bool:
        """False when a worker has been on one job far longer than any request may take, or has died: systemd then
        restarts us."""
        limit = 2 * self._request_bound() + 300.0
        with self._lock:
            stuck = [name for name, since in self._busy.items() if now - since > limit]
        dead = [t.name for t in self._workers if not t.is_alive()]
        if stuck and self._first((None, "stuck")):
            log.error("daemon.stuck", workers=stuck, limit_s=limit, note="watchdog pings stopped")
        if dead and self._first((None, "dead")):
            log.error("daemon.worker_died", workers=dead, note="watchdog pings stopped")
        return not stuck and not dead

    def _first(self, key: tuple[Path | None, str]) -> bool:
        with self._lock:
            first = key not in self._logged
            self._logged.add(key)
        return first

    def _status_line(self) -> str:
        with self._lock:
            busy = len(self._busy)
            retrying = len(self._retries)
            waiting = max(0, len(self._pending) - busy - retrying)
            c = dict(self.counts)
            endpoint = self._endpoint
            walking = self._walking
        line = (
            f"{waiting} queued, {busy} in flight, {c.get('ok', 0)} done, {c.get('error', 0)} failed, "
            f"{retrying} retrying; endpoint {endpoint}"
        )
        return line + ("; scanning" if walking else "")

    def progress(self) -> Snapshot:
        """The numbers a progress bar or line shows (see :mod:`mmwatchd.progress`). The total is every file
        finished plus every one still pending, known once no walk is under way."""
        with self._lock:
            done = sum(self.counts.values())
            failed = self.counts["error"] + self.counts["retry"]
            total = None if self._walks or self._scan_wanted is not None else done + len(self._pending)
            in_flight = len(self._busy)
            endpoint = self._endpoint
            rate_limited = self.clock() < self._rate_limited_until
        if self.limiter.waiting or (rate_limited and endpoint == "up"):
            endpoint = "rate-limited"
        elif endpoint == "unreachable":
            endpoint = "waiting for the endpoint"
        elif endpoint.startswith("paused"):
            endpoint = "paused"
        return Snapshot(done=done, failed=failed, in_flight=in_flight, total=total, endpoint=endpoint)

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
        old_client = self.client
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
        processor = self._processor(new)
        with self._lock:
            replaced, self.processor = self.processor, processor
            if self.client is not old_client:
                self._retired[replaced] = old_client  # closed once no job runs under it
            idle = [p for p in self._retired if not self._users[p]]
            to_close = [self._retired.pop(p) for p in idle]
        for client in to_close:
            _close(client)
        with self._settle_lock:
            self._settling.settle_s = new.settle_s
        if new.watch != old.watch or new.settle_s != old.settle_s or new.sidecar != old.sidecar:
            try:
                replacement = self._watcher(new)
            except ConfigError as exc:
                log.error("config.reload_watch_failed", problems=exc.problems, note="still watching the old folders")
            else:
                watcher.stop()
                watcher = replacement
        self._resume("reload")  # a pause for endpoint-wide refusals: the new config may be the fix
        log.info("config.reloaded", rules=[r.name for r in new.rules], roots=[str(r.path) for r in new.watch])
        self.notifier.ready(self._status_line())
        self.request_scan()  # new rules or prompts may apply to files already there
        return watcher

    # -- workers ---------------------------------------------------------------------------------------------

    def _worker(self) -> None:
        name = threading.current_thread().name
        try:
            while True:
                try:
                    item = self._queue.get(timeout=0.5)
                except queue.Empty:
                    if self.stopping.is_set():
                        return
                    continue
                if item is None or self.stopping.is_set():
                    return
                path, explicit, force = item
                with self._lock:
                    self._jobs[name] = path
                if not self._pass_gate():
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
                with self._lock:
                    self._jobs.pop(name, None)
        except BaseException as exc:
            # Past the per-job boundary: a bug here, or the state store failing in a way _finish did not expect.
            log.exception("daemon.worker_died", worker=name, error=f"{type(exc).__name__}: {exc}")
        finally:
            with self._lock:
                lost = self._jobs.pop(name, None)
                if lost is not None:
                    self._pending.discard(lost)  # once/scan must not wait for it; the next scan finds it
                self._idle.notify_all()

    def _pass_gate(self) -> bool:
        """Wait until the endpoint is believed up and work is not paused (while paused, one job at a time goes
        through as a trial); False when stopping."""
        while True:
            while not self._gate.wait(0.5):
                if self.stopping.is_set():
                    return False
            if self.stopping.is_set():
                return False
            with self._lock:
                if self._paused is None:
                    return True
                if self._trial:
                    self._trial = False
                    return True
                self._gate.clear()

    def _attempts_so_far(self, path: Path) -> int:
        if self.one_shot_attempts is not None:
            with self._lock:
                return self._attempts[path]
        if self.state is None:
            return 0
        return self._store("read a retry count", self.state.attempts, path) or 0

    def _run_job(self, path: Path, *, explicit: bool, force: bool) -> Outcome:
        with self._lock:
            processor = self.processor
            self._users[processor] += 1
        self._local.path = path
        try:
            last = (
                self.one_shot_attempts is None
                and self._attempts_so_far(path) + 1 >= self.config.endpoint.max_attempts
            )
            return processor.process(path, explicit=explicit, force=force, last_attempt=last)
        except Exception as exc:  # the one per-job boundary: a bug must not kill the worker
            log.exception("job.crashed", path=str(path), error=f"{type(exc).__name__}: {exc}")
            return Outcome(path=path, status="retry", reason=f"internal error: {type(exc).__name__}: {exc}")
        finally:
            self._local.path = None
            with self._lock:
                self._users[processor] -= 1
                retired = self._retired.pop(processor, None) if not self._users[processor] else None
                if not self._users[processor]:
                    del self._users[processor]
            if retired is not None:
                _close(retired)

    def _store(self, what: str, call: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        """A state-store call that must not stop the work: the store is a cache beside the sidecars. A failure
        (disk full, read-only, gone) is logged once per message and the call's result is None."""
        try:
            return call(*args, **kw)
        except StateError as exc:
            if self._first((None, f"state:{exc.message}")):
                log.error("state.failed", action=what, reason=exc.message,
                          note="work goes on; retry counts, history and the done-index are not kept meanwhile")  # fmt: skip
            return None

    def _finish(self, outcome: Outcome) -> None:
        path = outcome.path
        retry_in: float | None = None
        rate_limited = False
        final = True
        root = rel_to_roots(path, [r.path for r in self.config.watch])[0]
        root_key = str(root) if root else None
        error = outcome.error
        if outcome.status == "retry":
            counted = not isinstance(error, VLMUnavailable) or error.counts_against_file
            if isinstance(error, EndpointRefuses):
                self._pause(error)
            if self.one_shot_attempts is not None:
                with self._lock:
                    self._attempts[path] += 1
                    attempts = self._attempts[path]
                # A folder that cannot take sidecars will not take them a few seconds later either: say so now.
                final = attempts >= self.one_shot_attempts or isinstance(error, (VLMMisconfigured, SidecarError))
                if isinstance(error, QuotaReached | EndpointRefuses):
                    self._halt(error.message)
            else:
                final = False
                attempts = self._attempts_so_far(path)
                unreachable = isinstance(error, VLMUnavailable) and error.status is None
                if unreachable and not isinstance(error, QuotaReached | Stopping | VLMMisconfigured):
                    self._endpoint_down(error)  # type: ignore[arg-type]
                if isinstance(error, VLMMisconfigured) and not isinstance(error, EndpointRefuses):
                    self._log_once(None, error.message, "endpoint.misconfigured")
            if not final:
                backoff = min(RETRY_MAX_S, RETRY_BASE_S * 2 ** max(0, attempts - 1)) * random.uniform(0.8, 1.2)
                retry_in = max(backoff, outcome.retry_after or 0.0)
                rate_limited = isinstance(error, VLMUnavailable) and error.status == 429
                if isinstance(error, VLMUnavailable) and error.status is None and outcome.retry_after is None:
                    retry_in = RETRY_BASE_S  # the gate holds work until the endpoint is back; no need to wait longer
                if self.state is not None and counted and self.one_shot_attempts is None:
                    self._store(
                        "record a retry", self.state.record_attempt,
                        path, root=root_key, kind=error.kind if error else "internal", message=outcome.reason,
                        retry_at=time.time() + retry_in,
                    )  # fmt: skip
        elif self.state is not None and outcome.status in ("ok", "error"):
            self._store(
                "record a finished file", self.state.record_done,
                path, root=root_key, status=outcome.status,
                message=outcome.reason or None, kind=error.kind if error else "error",
            )  # fmt: skip
        elif self.state is not None and outcome.gone:
            # Its retry row must not stay in `status`, nor pass its attempts on to a new file of that name.
            self._store("forget a file that is gone", self.state.forget, path)
        if self.state is not None and outcome.identity and outcome.fingerprint and outcome.kind and outcome.answer:
            # Answered (now or before, found by reading its sidecar): the next rescan can skip it from a stat.
            size, mtime_ns, ino, ctime_ns = outcome.identity
            if outcome.moved_to is None:
                self._store("index a finished file", self.state.mark_done, path, size=size, mtime_ns=mtime_ns,
                            ino=ino, ctime_ns=ctime_ns, kind=outcome.kind, fingerprint=outcome.fingerprint,
                            status=outcome.answer)  # fmt: skip
        if self.state is not None and outcome.status in ("ok", "error"):
            self._index_for_search(outcome)  # after the state store: what `status` reads is there first
        self._log(outcome, retry_in)
        with self._lock:
            if final:
                self.counts[outcome.status] += 1
                self.metrics.finished(outcome)
                self.outcomes.append(outcome)
                self._attempts.pop(path, None)
                self._pending.discard(path)
                if path in self._dirty and not self.stopping.is_set():
                    # It changed again while it was pending: look at it once more (a fresh sidecar makes that a
                    # stat and a read).
                    self._dirty.discard(path)
                    self._pending.add(path)
                    self._intake.append(path)
                    self._wake.notify_all()
            else:
                self._dirty.discard(path)  # it is looked at again anyway
                due = self.clock() + (retry_in or 0.0)
                heapq.heappush(self._retries, (due, path))
                if rate_limited:  # under the same lock as the retry: progress() never sees one without the other
                    self._rate_limited_until = max(self._rate_limited_until, due)
                self._wake.notify_all()
            self._idle.notify_all()
        if self._paused is not None and self.one_shot_attempts is None:
            self._probe_now.set()  # while paused, each finished trial schedules the next one

    def _index_for_search(self, outcome: Outcome) -> None:
        """Put the sidecar just written into the search index (``<state dir>/search.sqlite3``), so ``mmwatchd
        search`` finds it without a refresh. The index is a cache of the sidecars: when it cannot be written, a
        warning says so once and the next search reads the sidecars it missed."""
        if self._search_failed or self.state is None:
            return
        cfg = self.config
        media = outcome.moved_to or outcome.path  # an action may have moved the file, and its sidecar with it
        side = sidecar_mod.locate(media, suffix=cfg.sidecar.suffix, mirror=cfg.sidecar.dir,
                                  roots=[r.path for r in cfg.watch])  # fmt: skip
        try:
            doc = sidecar_mod.read(side)
        except (SidecarError, OSError):
            return  # replaced or made unreadable meanwhile: the next search looks at it as it is then
        if doc is None:
            return  # moved or removed by an action, or by someone else, in the meantime
        try:
            with self._search_lock:
                if self._search is None:
                    self._search = search.SearchIndex(self.state.path.parent / search.FILENAME)
                index = self._search
            index.index_sidecar(side, doc, suffix=cfg.sidecar.suffix, mirror=cfg.sidecar.dir)
        except FileNotFoundError:
            return  # the sidecar went between the read and the stat
        except StateError as exc:
            self._search_failed = True
            log.warning(
                "search.index_failed", reason=exc.message,
                note="the search index is not kept up to date by this run; the next search reads the sidecars",
            )  # fmt: skip

    def _log_once(self, path: Path | None, reason: str, event: str, level: str = "error", **fields: object) -> bool:
        first = self._first((path, reason))
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
        if self._gate.is_set() and self._paused is None:
            self._gate.clear()
            self.metrics.endpoint_up(False)
            with self._lock:
                self._endpoint = "unreachable"
            log.warning("endpoint.down", url=self.config.endpoint.base_url, reason=exc.message)
            self._probe_now.set()

    def check_endpoint(self) -> None:
        """One probe: open the gate when the endpoint answers; raise VLMError when it does not."""
        models = self.client.list_models()
        model = self.config.endpoint.model
        wanted_models = {r.model for r in self.config.rules if r.model} | {model}
        missing = sorted(m for m in wanted_models if models and m not in models)
        if missing and not self._model_warned:
            self._model_warned = True
            log.warning(
                "endpoint.model_not_listed",
                models=missing,
                available=models[:20],
                hint="check endpoint.model (for Ollama: ollama pull <model>)",
            )
        self._up(models=len(models))

    def _up(self, **fields: object) -> None:
        with self._lock:
            if self._paused is not None:
                return
            was = self._endpoint
            self._endpoint = "up"
        self.metrics.endpoint_up(True)
        if not self._gate.is_set() or was != "up":
            self._gate.set()
            log.info("endpoint.up", url=self.config.endpoint.base_url, **fields)

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
        self._up()

    def _prober(self) -> None:
        delay = 1.0
        trial_delay = TRIAL_FIRST_S
        self._probe_now.set()
        while not self.stopping.is_set():
            self._probe_now.wait()
            if self.stopping.is_set():
                return
            self._probe_now.clear()
            if self._paused is not None:
                # Paused for endpoint-wide refusals: /models answers all the same, so the test is one real request.
                if self.stopping.wait(trial_delay * random.uniform(0.8, 1.2)):
                    return
                trial_delay = min(TRIAL_MAX_S, trial_delay * 2)
                with self._lock:
                    if self._paused is None:
                        continue
                    self._trial = True
                self._gate.set()
                continue
            trial_delay = TRIAL_FIRST_S
            try:
                self.check_endpoint()
            except VLMMisconfigured as exc:
                self._log_once(None, exc.message, "endpoint.misconfigured")
                self.stopping.wait(min(PROBE_MAX_S, delay * 4))
                self._probe_now.set()
                continue
            except VLMUnavailable as exc:
                with self._lock:
                    self._endpoint = "unreachable"
                if delay == 1.0:
                    log.error("endpoint.unreachable", url=self.config.endpoint.base_url, reason=exc.message)
                self.stopping.wait(delay * random.uniform(0.8, 1.2))
                delay = min(PROBE_MAX_S, delay * 2)
                self._probe_now.set()
                continue
            except VLMError as exc:
                self._models_refused(exc)
            delay = 1.0

    # -- every HTTP request ----------------------------------------------------------------------------------

    def _before_request(self) -> None:
        """Runs on a worker just before each chat request leaves (SDK retries and the JSON re-ask included):
        nothing leaves once stopping; the rate limit applies; the daily cap is reserved, atomically."""
        if self.stopping.is_set() or not self.limiter.acquire(self.stopping):
            raise Stopping("mmwatchd is stopping: the request was not sent")
        cap = self.config.endpoint.max_requests_per_day
        with self._count_lock:  # threads of this process; count_request's transaction covers other processes
            total = self._count(1)
            if cap is not None and total > cap:
                self._count(-1)
                error = QuotaReached(
                    f"endpoint.max_requests_per_day ({cap}) reached for today; "
                    "work resumes after midnight (local time), or raise the cap"
                )
                error.retry_after = _seconds_to_midnight()
                raise error

    def _count(self, n: int) -> int:
        """Add ``n`` to today's request count and return the new total (from memory while the store fails)."""
        if self.state is not None:
            total = self._store("count a request", self.state.count_request, n)
            if total is not None:
                return int(total)
        today = date.fromtimestamp(self.wall_clock())
        self._fallback_counts[today] += n
        return self._fallback_counts[today]

    # -- endpoint-wide refusals ------------------------------------------------------------------------------

    def _refused(self, exc: VLMRejected) -> None:
        """The server refused a request (a 4xx that is not about the key, model or size). The same words for
        :data:`REFUSALS_TO_PAUSE` different files in a row, or again while paused, mean every request would be
        refused: raise :class:`EndpointRefuses`, which leaves no error sidecar and pauses the work."""
        path = getattr(self._local, "path", None)
        with self._lock:
            if self._refusal is None or self._refusal[0] != exc.message:
                self._refusal = (exc.message, set())
            if path is not None:
                self._refusal[1].add(path)
            endpoint_wide = self._paused is not None or len(self._refusal[1]) >= REFUSALS_TO_PAUSE
        if endpoint_wide:
            raise EndpointRefuses(
                f"the endpoint refuses every request the same way ({REFUSALS_TO_PAUSE} different files in a row): "
                f"{exc.message}. Fix the endpoint or the config (a rule's schema, max_tokens, the model), then "
                "reload (systemctl reload mmwatchd)"
            ) from exc

    def _accepted(self) -> None:
        with self._lock:
            self._refusal = None
        if self._paused is not None:
            self._resume("a request went through")

    def _pause(self, error: EndpointRefuses) -> None:
        with self._lock:
            first = self._paused is None
            self._paused = error.message
            self._endpoint = "paused (it refuses every request; see the log)"
            self._gate.clear()
        if first:
            log.error("endpoint.refusing", reason=error.message,
                      note="work is paused: no error sidecars meanwhile; a trial request is sent now and then")  # fmt: skip
            self._probe_now.set()

    def _resume(self, why: str) -> None:
        with self._lock:
            if self._paused is None:
                return
            self._paused = None
            self._trial = False
            self._endpoint = "up"
        log.info("endpoint.resumed", why=why)
        self._gate.set()
        self._probe_now.set()


def _close(client: Any) -> None:
    """Close a VLM client that is no longer used (its connection pool)."""
    close = getattr(client, "close", None)
    if close is not None:
        with contextlib.suppress(Exception):  # closing an idle connection pool cannot fail in a way worth a word
            close()
