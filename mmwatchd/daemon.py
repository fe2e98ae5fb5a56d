"""The running service: intake (startup scan, watcher, periodic rescan), a bounded queue, N workers, the endpoint
gate, request limits, retries that survive restarts, reload, systemd notification, shutdown.

Threads, all owned and joined here: the workers (the endpoints' concurrency added up, plus one per decoder process
that encodes the next file while the requests are in flight; routing holds requests to each endpoint's limit),
one feeder and one prober per endpoint. watchdog's own threads are owned by ``Watcher``. The calling thread runs the
service loop (watcher events, watchdog pings, status, reload) and never blocks on the work: the feeder walks the
folders (startup scan, rescans) and feeds the bounded queue, so a backlog of any size leaves the loop free to ping
the watchdog and to stop.

Stopping (SIGTERM, SIGINT: see :class:`SignalRelay`): nothing new starts. Requests already on the wire finish and
their sidecars are written; no request leaves after the stop, neither a new one nor a retry of one in flight (every
HTTP request passes its endpoint's :meth:`~mmwatchd.endpoint.Endpoint.before_request`, the SDK's own retries
included).

The endpoints themselves (their clients, request meters, gates, probers, refusal pauses, and the routing between
several of them) live in :mod:`mmwatchd.endpoint`; how a file's failed tries end is :mod:`mmwatchd.retry`'s
policy. This module is the service loop around them.

Failures are kept apart:

- the endpoint is unreachable: its gate closes, its requests go to another endpoint when there is one, else workers
  hold their jobs, and its prober retries ``GET /models`` with a capped backoff; nothing fails, however long the
  outage;
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
import functools
import heapq
import os
import queue
import signal
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from mmwatchd import endpoint as endpoint_mod, limiter as limiter_mod, live, search, sidecar as sidecar_mod
from mmwatchd.endpoint import Endpoint, EndpointRefuses, Pool, PoolClient
from mmwatchd.errors import (
    ConfigError,
    SidecarError,
    StateError,
    VLMError,
    VLMMisconfigured,
    VLMUnavailable,
)
from mmwatchd.index import DoneIndex
from mmwatchd.isolate import DECODER_PRELOAD, Isolator
from mmwatchd.log import get_logger
from mmwatchd.metrics import Metrics, Unmetered, endpoint_name
from mmwatchd.model import Config, Member, members
from mmwatchd.notify import Notifier
from mmwatchd.pipeline import Outcome, Pipeline
from mmwatchd.progress import Snapshot
from mmwatchd.retry import RetryPolicy
from mmwatchd.rules import rel_to_roots
from mmwatchd.settle import StabilityTracker
from mmwatchd.sidecar import temp_writer as sidecar_temp_writer
from mmwatchd.state import BatchRow, State
from mmwatchd.walk import log_scan_error, wanted

if TYPE_CHECKING:
    from mmwatchd.model import EndpointConfig
    from mmwatchd.vlm import VLMClient
    from mmwatchd.watch import Watcher

log = get_logger()

#: While an endpoint is paused for endpoint-wide refusals: the first trial request after this long (read when the
#: probers start).
TRIAL_FIRST_S = endpoint_mod.TRIAL_FIRST_S
#: Kept here for callers that import it from the daemon.
RateLimiter = endpoint_mod.RateLimiter
#: A sidecar temp file whose writer cannot be seen to be gone is taken as left by a killed process at this age.
STALE_TEMP_S = 60.0
#: When this process started, as file times count (temp files older than this cannot be its own).
_STARTED = time.time()
#: How often STATUS= is refreshed for systemd at least (and at most once a second when it changes).
STATUS_EVERY_S = 5.0
STATUS_MIN_S = 1.0


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
        self.client = client  # the first endpoint's (each endpoint's own is in self.pool)
        self.state = state
        self.notifier = notifier or Notifier({})
        self._reload_config = reload
        self._make_client = make_client
        self.clock = clock
        self.wall_clock = wall_clock
        self.one_shot_attempts = one_shot_attempts
        self.policy = RetryPolicy(one_shot_attempts)
        self.metrics: Metrics | Unmetered = Unmetered()
        self._local = threading.local()  # the path a worker is on, for the refusal check
        self._lock = threading.Lock()
        self._logged: set[tuple[Path | None, str]] = set()
        self._limits_recorded: dict[str, int] = {}  # endpoint → the concurrency: auto limit status last saw
        # Requests in flight at most (with concurrency: auto, max_concurrency: the limiter lets fewer go).
        concurrency = sum(limiter_mod.workers(m.spec) for m in members(config))
        # Decoders (C libraries fed untrusted files) run in their own processes: one that hangs, crashes or
        # balloons costs only its file. Both cores decode while requests are in flight.
        self.isolator = Isolator(
            workers=max(1, min(concurrency, os.cpu_count() or 1, decoders or concurrency)),
            preload=DECODER_PRELOAD,
            **config.limits.decoders,
        )
        self.counts: Counter[str] = Counter()
        self.outcomes: list[Outcome] = []
        self.status_every_s = STATUS_EVERY_S
        self.stopping = threading.Event()
        self.reload_requested = threading.Event()
        #: Set (with ``stopping``) when a one-shot run cannot go on: the daily cap, an endpoint refusing everything.
        self.halted: str | None = None
        self._queue: queue.Queue[tuple[Path, bool, bool] | None] = queue.Queue(maxsize=max(64, 16 * concurrency))
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
        self._threads: list[threading.Thread] = []
        self._fallback: dict[Path, str] = {}  # answered by a lower tier under redo_fallback → its rule
        self._fallback_kept: set[Path] = set()  # those with a row in the state store (until a best-tier answer)
        self._redo: set[Path] = set()  # to describe again although its sidecar is fresh
        self._users: Counter[Pipeline] = Counter()  # jobs running under each processor (config, client)
        self._retired: dict[Pipeline, list[VLMClient]] = {}  # replaced by a reload: closed once no job uses them
        if metrics or config.metrics is not None:
            self.metrics = Metrics(
                endpoint_name(config), queued=self._queue.qsize, limit=lambda: self.pool.endpoints[0].concurrency
            )
        self.pool = Pool(config, self, self.metrics, lambda m: self._client_for(config, m))
        self.processor = self._processor(config)

    def _processor(self, config: Config) -> Pipeline:
        client = PoolClient(self.pool)
        pipeline = Pipeline(config, client, clock=self.clock, isolator=self.isolator)  # type: ignore[arg-type]
        pipeline.batched = self._batched
        return pipeline

    def _client_for(self, config: Config, member: Member) -> VLMClient:
        """The first endpoint uses the client the daemon was given; the others get one made for them."""
        if member.name == members(config)[0].name:
            return self.client
        if self._make_client is None:
            raise ValueError("a daemon with several endpoints needs make_client")
        return self._make_client(replace(config, endpoint=member.spec))

    # -- what the endpoints need from the daemon (see mmwatchd.endpoint.Host) --------------------------------

    def current_path(self) -> Path | None:
        return getattr(self._local, "path", None)

    def waiting_for_a_slot(self, waiting: bool) -> None:
        """This worker's request is ready and waits for a slot (or no longer does). Meanwhile it is not busy: not
        stuck however long an outage lasts, and its time on the job counts again from the end of the wait."""
        name = threading.current_thread().name
        with self._lock:
            if waiting:
                self._busy.pop(name, None)
            elif name in self._jobs:
                self._busy[name] = self.clock()

    # -- lifecycle -------------------------------------------------------------------------------------------

    @property
    def worker_count(self) -> int:
        """One more worker per decoder process than requests may be in flight: while every slot is on the wire,
        those encode the next files, so a slot that frees is taken at once by a request that is ready, not after an
        encode (routing, not the number of workers, holds requests in flight to the endpoints' limits)."""
        return self.pool.workers + self.isolator.workers

    def start(self, *, prober: bool = True) -> None:
        """Start the workers, the feeder, and the prober that opens the gate (without it, call ``check_endpoint``
        first)."""
        self.isolator.prestart()
        self.pool.probing = prober
        for i in range(self.worker_count):
            self._workers.append(self._spawn(self._worker, f"mmwatchd-worker-{i}"))
        self._spawn(self._feeder, "mmwatchd-feeder")
        if prober:
            for endpoint in self.pool:
                suffix = "" if self.pool.single else f"-{endpoint.name}"
                self._spawn(functools.partial(endpoint.run_prober, TRIAL_FIRST_S), f"mmwatchd-prober{suffix}")

    def _spawn(self, target: Callable[[], None], name: str) -> threading.Thread:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)
        return t

    def request_stop(self) -> None:
        """Take no more work: nothing new starts and no request leaves from now on (callable from any thread; the
        owner still calls :meth:`stop`, or leaves :meth:`run`, to wait for what is in flight)."""
        self.stopping.set()
        self.pool.wake()  # wake workers held at the gate, and the probers, so they can leave
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
        self._record_limit()
        # No request leaves after the stop, retries included: one already on the wire ends within timeout_s (plus
        # the SDK's short wait when it was about to retry, and the sidecar write).
        deadline = time.monotonic() + (
            grace_s if grace_s is not None else max(e.spec.timeout_s for e in self.pool) + 15
        )
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        stuck = [t.name for t in self._threads if t.is_alive()]
        self._threads.clear()
        with self._lock:
            retired = [c for clients in self._retired.values() for c in clients]
            self._retired = {}
        with self._search_lock:
            index, self._search = self._search, None
        for client in retired:
            _close(client)
        if self.state is not None and not self.pool.single:
            live.withdraw(self.state.path.parent)
        if index is not None:
            index.close()
        if dropped:
            log.info("daemon.dropped_queue", files=dropped, note="they are picked up again by the next scan")
        if stuck:
            log.warning("daemon.abandoned", threads=stuck, note="in-flight requests abandoned; no partial sidecar")

    def _request_bound(self) -> float:
        """How long one request may take at most, the SDK's quick retries included."""
        return max(e.spec.timeout_s * (e.spec.max_retries + 1) + 10.0 * e.spec.max_retries for e in self.pool)

    def check_endpoint(self) -> None:
        """Probe every endpoint once: open the gates of those that answer; raise VLMError when none does."""
        self._each_endpoint(lambda e: e.check())

    def probe_once(self) -> None:
        """One-shot runs (no prober): probe the endpoints once before work starts; raises (unreachable, a bad key
        or model) when no endpoint can take work, so the command says so at once instead of once per file."""
        self._each_endpoint(lambda e: e.probe_once())

    def _each_endpoint(self, probe: Callable[[Endpoint], None]) -> None:
        failed: VLMError | None = None
        for endpoint in self.pool:
            try:
                probe(endpoint)
            except VLMError as exc:
                endpoint.check_failed()
                if self.pool.single:
                    raise
                failed = failed or exc
                log.warning("endpoint.unreachable", url=endpoint.spec.base_url, reason=exc.message, **endpoint.fields)
        if failed is not None and not any(e.status == "up" for e in self.pool):
            raise failed

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

    def needing_work(self, *, clean: bool = False) -> Generator[Path, None, None]:
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
        rows = self.store("read the done-index", self.state.done_index) if self.state is not None else None
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
            self.store("adopt file identities", self.state.adopt_identities, index.adopted)
        if self.state is not None and not unlisted and not self.stopping.is_set():
            suffix = cfg.sidecar.suffix
            gone = [
                name for name in index.rows.keys() - seen
                if any(wanted(root, Path(name), sidecar_suffix=suffix) for root in cfg.watch)
            ]  # fmt: skip
            if gone:
                self.store("prune the done-index", self.state.forget_done, gone)
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
        walk: Generator[Path, None, None] | None = None  # closed at the end, which runs its cleanup
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
                    with self._lock:
                        redo = path in self._redo
                        self._redo.discard(path)
                    self._put(path, force=redo)
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
            assert isinstance(self.metrics, Metrics)  # made in __init__ whenever config.metrics is set
            self.metrics.serve(self.config)  # first: a port that is taken stops the start with nothing to undo
        watcher = self._watcher(self.config)
        try:
            self._load_fallbacks()
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
                    self._publish_endpoints()
                    self._record_limit()
                    status, last_status = line, now
                self._redo_fallbacks()
        finally:
            self.request_stop()
            self.notifier.stopping()
            watcher.stop()
            self.stop()

    def _watcher(self, config: Config) -> Watcher:
        from mmwatchd.watch import Watcher  # the service's only: once and scan need not import watchdog

        watcher = Watcher(
            config.watch, settle_s=config.settle_s, sidecar_suffix=config.sidecar.suffix, clock=self.clock
        )
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

    def _in_flight(self) -> int:
        """Files whose request is on the wire (called with the lock held): the other workers are encoding, or waiting
        for a slot with their request ready."""
        return min(len(self._busy), sum(e.in_flight for e in self.pool))

    def _status_line(self) -> str:
        with self._lock:
            busy = self._in_flight()
            retrying = len(self._retries)
            waiting = max(0, len(self._pending) - busy - retrying)
            c = dict(self.counts)
            walking = self._walking
        endpoints = ("endpoint " if self.pool.single else "endpoints ") + self.pool.summary()
        line = (
            f"{waiting} queued, {busy} in flight, {c.get('ok', 0)} done, {c.get('error', 0)} failed, "
            f"{retrying} retrying; {endpoints}"
        )
        for e in self.pool:  # the limit concurrency: auto has found so far
            if isinstance(e.limit, limiter_mod.AutoLimiter):
                named = "" if self.pool.single else f" {e.name}"
                line += f"; concurrency{named} {e.concurrency} (auto, at most {e.limit.max_limit})"
        return line + ("; scanning" if walking else "")

    def _record_limit(self) -> None:
        """concurrency: auto: keep the limit found so far where ``mmwatchd status`` reads it (when it changed)."""
        if self.state is None:
            return
        for e in self.pool:
            if not isinstance(e.limit, limiter_mod.AutoLimiter) or e.concurrency == self._limits_recorded.get(e.name):
                continue
            self._limits_recorded[e.name] = limit = e.concurrency
            record = {"limit": limit, "max": e.limit.max_limit, "at": self.wall_clock()}
            self.store("record the concurrency limit", self.state.remember_endpoint, limiter_mod.state_key(e.spec),
                        record)  # fmt: skip

    def progress(self) -> Snapshot:
        """The numbers a progress bar or line shows (see :mod:`mmwatchd.progress`). The total is every file
        finished plus every one still pending, known once no walk is under way."""
        with self._lock:
            done = sum(self.counts.values())
            failed = self.counts["error"] + self.counts["retry"]
            total = None if self._walks or self._scan_wanted is not None else done + len(self._pending)
            in_flight = self._in_flight()
            rate_limited = self.clock() < self._rate_limited_until
        endpoint = self.pool.word()
        if self.pool.rate_waiting() or (rate_limited and endpoint == "up"):
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
        changed = self._new_clients(new)
        if changed is None:
            self.notifier.ready(self._status_line())
            return watcher
        self.isolator.set_limits(**new.limits.decoders)  # decoders under other limits are replaced once idle
        self.config = new
        old_clients = [endpoint.client for endpoint, _, _ in changed]
        for endpoint, spec, client in changed:
            endpoint.use(spec, client)
        self.pool.config = new
        self.client = self.pool.endpoints[0].client
        processor = self._processor(new)
        with self._lock:
            replaced, self.processor = self.processor, processor
            if old_clients:
                self._retired.setdefault(replaced, []).extend(old_clients)  # closed once no job runs under it
            idle = [p for p in self._retired if not self._users[p]]
            to_close = [c for p in idle for c in self._retired.pop(p)]
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
        for endpoint in self.pool:
            endpoint.resume("reload")  # a pause for endpoint-wide refusals: the new config may be the fix
        log.info("config.reloaded", rules=[r.name for r in new.rules], roots=[str(r.path) for r in new.watch])
        self.notifier.ready(self._status_line())
        self.request_scan()  # new rules or prompts may apply to files already there
        return watcher

    # -- answers from a fallback tier ------------------------------------------------------------------------

    def _note_fallback(self, outcome: Outcome) -> None:
        """Remember a file a lower tier than its rule's best answered, when the rule wants it described again."""
        answered = self.pool.answered_by()
        if outcome.status != "ok" or answered is None or self.pool.single:
            return
        rule = next((r for r in self.config.rules if r.name == outcome.rule), None)
        if rule is None or not rule.redo_fallback:
            return
        best = min(e.priority for e in self.pool.allowed(rule.name))
        path = outcome.path
        with self._lock:
            if answered.priority > best:
                self._fallback[path] = rule.name
                self._fallback_kept.add(path)
                keep: bool | None = True
            else:
                self._fallback.pop(path, None)
                keep = False if path in self._fallback_kept else None
                self._fallback_kept.discard(path)
        if self.state is not None and keep is not None:  # in the state store too: the list outlives a restart
            if keep:
                self.store("remember a fallback answer", self.state.remember_fallback, path, rule.name)
            else:
                self.store("forget a fallback answer", self.state.forget_fallback, path)

    def _load_fallbacks(self) -> None:
        """The service's start: the files a fallback tier answered before (this run's or a ``scan``'s) that their
        rule still wants described again at its best tier."""
        if self.state is None or self.pool.single:
            return
        wanted = {r.name for r in self.config.rules if r.redo_fallback}
        for path, rule in self.store("read the fallback answers", self.state.fallbacks) or []:
            if rule in wanted:
                with self._lock:
                    self._fallback.setdefault(path, rule)
                    self._fallback_kept.add(path)
            else:  # the rule is gone, or no longer asks for it: the answer stands
                self.store("forget a fallback answer", self.state.forget_fallback, path)

    def _redo_fallbacks(self) -> None:
        """Once nothing else waits and an endpoint of a remembered file's best tier is up with room, describe the
        file again there (the service loop calls this; answers from a fallback tier stand until then)."""
        with self._lock:
            if not self._fallback or self._intake or self._queue.qsize() or self.stopping.is_set():
                return
            waiting = list(self._fallback.items())
        for path, rule_name in waiting:
            if not self.pool.best_tier_free(rule_name):
                continue
            with self._lock:
                self._fallback.pop(path, None)
                self._redo.add(path)
            if not self.offer(path):
                with self._lock:
                    self._redo.discard(path)
            log.info("job.redo_fallback", path=str(path), rule=rule_name)

    def _publish_endpoints(self) -> None:
        """Each endpoint's state and requests in flight, for ``mmwatchd status`` (another process) to show."""
        if self.state is None or self.pool.single:
            return
        live.publish(self.state.path.parent, self.pool.rows())

    def _new_clients(self, new: Config) -> list[tuple[Endpoint, EndpointConfig, VLMClient]] | None:
        """For each endpoint whose settings the new config changes: the endpoint, its new settings and a client made
        for them. None (logged) when a client cannot be made; the previous config then stays in force."""
        out: list[tuple[Endpoint, EndpointConfig, VLMClient]] = []
        wanted = {m.name: m for m in members(new)}
        if set(wanted) != {e.name for e in self.pool}:
            log.warning(
                "config.restart_needed", key="endpoints", note="added or removed endpoints apply after a restart"
            )
        for endpoint in self.pool:
            member = wanted.get(endpoint.name)
            if member is None:
                continue
            endpoint.priority = member.priority
            if member.spec == endpoint.spec:
                continue
            for name in ("concurrency", "max_concurrency"):  # the worker threads, and the limiter
                if getattr(member.spec, name) != getattr(endpoint.spec, name):
                    key = f"endpoint.{name}" if self.pool.single else f"endpoints[{endpoint.name}].{name}"
                    log.warning("config.restart_needed", key=key, note="applies after a restart")
            if self._make_client is None:
                continue
            try:
                client = self._make_client(replace(new, endpoint=member.spec))
            except ConfigError as exc:  # e.g. an api_key_file others can read
                log.error("config.reload_failed", problems=exc.problems, note="the previous config stays in force")
                for _, _, made in out:
                    _close(made)
                return None
            out.append((endpoint, member.spec, client))
        return out

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
                if not self.pool.pass_gate():
                    return
                with self._lock:
                    self._busy[name] = self.clock()
                self.pool.forget_answer()
                try:
                    outcome = self._run_job(path, explicit=explicit, force=force)
                finally:
                    with self._lock:
                        self._busy.pop(name, None)
                self._note_fallback(outcome)
                if not self.stopping.is_set() or outcome.status != "retry":
                    self.finish(outcome)
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

    def _attempts_so_far(self, path: Path) -> int:
        if self.policy.one_shot:
            with self._lock:
                return self._attempts[path]
        if self.state is None:
            return 0
        return self.store("read a retry count", self.state.attempts, path) or 0

    def _run_job(self, path: Path, *, explicit: bool, force: bool) -> Outcome:
        with self._lock:
            processor = self.processor
            self._users[processor] += 1
        self._local.path = path
        try:
            last = not self.policy.one_shot and self.policy.last_attempt(
                self._attempts_so_far(path), self.config.endpoint.max_attempts
            )
            return processor.process(path, explicit=explicit, force=force, last_attempt=last)
        except Exception as exc:  # the one per-job boundary: a bug must not kill the worker
            log.exception("job.crashed", path=str(path), error=f"{type(exc).__name__}: {exc}")
            return Outcome(path=path, status="retry", reason=f"internal error: {type(exc).__name__}: {exc}")
        finally:
            self._local.path = None
            with self._lock:
                self._users[processor] -= 1
                retired = self._retired.pop(processor, []) if not self._users[processor] else []
                if not self._users[processor]:
                    del self._users[processor]
            for client in retired:
                _close(client)

    def _batched(self, path: Path) -> str | None:
        """Why ``path`` is left to a batch backfill: the open shard that holds it (its answer is on its way there,
        and describing it here would pay for it twice); None when none does (the processor asks, see
        :attr:`Pipeline.batched`)."""
        if self.state is None:
            return None
        shard: BatchRow | None = self.store("look for the file in a batch backfill", self.state.shard_of, path)
        if shard is None:
            return None
        return (
            f"in batch backfill shard {shard.id} ({shard.status}): `mmwatchd backfill` applies its answer; "
            "`mmwatchd backfill --cancel` gives it back to the online path"
        )

    def store(self, what: str, call: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        """A state-store call that must not stop the work: the store is a cache beside the sidecars. A failure
        (disk full, read-only, gone) is logged once per message and the call's result is None."""
        try:
            return call(*args, **kw)
        except StateError as exc:
            if self._first((None, f"state:{exc.message}")):
                log.error("state.failed", action=what, reason=exc.message,
                          note="work goes on; retry counts, history and the done-index are not kept meanwhile")  # fmt: skip
            return None

    def finish(self, outcome: Outcome) -> None:
        """Record an outcome: the workers' and those reached outside them (a batch backfill's answers)."""
        path = outcome.path
        retry_in: float | None = None
        rate_limited = False
        final = True
        root = rel_to_roots(path, [r.path for r in self.config.watch])[0]
        root_key = str(root) if root else None
        error = outcome.error
        if outcome.status == "retry":
            counted = not isinstance(error, VLMUnavailable) or error.counts_against_file
            policy = self.policy
            if policy.one_shot:
                with self._lock:
                    self._attempts[path] += 1
                    attempts = self._attempts[path]
            else:
                attempts = self._attempts_so_far(path)
                if isinstance(error, VLMMisconfigured) and not isinstance(error, EndpointRefuses):
                    self.log_once(None, error.message, "endpoint.misconfigured")
            final = policy.final(attempts, error)
            if error is not None and policy.halts(error):
                self._halt(error.message)
            if not final:
                retry_in = policy.delay(attempts, error, outcome.retry_after)
                rate_limited = isinstance(error, VLMUnavailable) and error.status == 429
                if self.state is not None and counted and policy.records_attempts():
                    self.store(
                        "record a retry", self.state.record_attempt,
                        path, root=root_key, kind=error.kind if error else "internal", message=outcome.reason,
                        retry_at=time.time() + retry_in,
                    )  # fmt: skip
        elif self.state is not None and outcome.status in ("ok", "error"):
            self.store(
                "record a finished file", self.state.record_done,
                path, root=root_key, status=outcome.status,
                message=outcome.reason or None, kind=error.kind if error else "error",
            )  # fmt: skip
        elif self.state is not None and outcome.gone:
            # Its retry row must not stay in `status`, nor pass its attempts on to a new file of that name.
            self.store("forget a file that is gone", self.state.forget, path)
        if (
            self.state is not None
            and outcome.identity
            and outcome.fingerprint
            and outcome.media_kind
            and outcome.answer
        ):
            # Answered (now or before, found by reading its sidecar): the next rescan can skip it from a stat.
            size, mtime_ns, ino, ctime_ns = outcome.identity
            if outcome.moved_to is None:
                self.store("index a finished file", self.state.mark_done, path, size=size, mtime_ns=mtime_ns,
                            ino=ino, ctime_ns=ctime_ns, media_kind=outcome.media_kind, fingerprint=outcome.fingerprint,
                            answer=outcome.answer)  # fmt: skip
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
        if not self.policy.one_shot:
            self.pool.trial_finished()  # while paused, each finished trial schedules the next one

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
            with self._search_lock:  # workers finishing together may both have failed: one warning
                first, self._search_failed = not self._search_failed, True
            if first:
                log.warning(
                    "search.index_failed", reason=exc.message,
                    note="the search index is not kept up to date by this run; the next search reads the sidecars",
                )  # fmt: skip

    def log_once(self, path: Path | None, reason: str, event: str, level: str = "error", **fields: object) -> bool:
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


def _close(client: Any) -> None:
    """Close a VLM client that is no longer used (its connection pool)."""
    close = getattr(client, "close", None)
    if close is not None:
        with contextlib.suppress(Exception):  # closing an idle connection pool cannot fail in a way worth a word
            close()
