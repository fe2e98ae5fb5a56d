"""The model endpoints as the daemon uses them: one :class:`Endpoint` per configured endpoint, and the
:class:`Pool` that routes each request to one of them.

An endpoint owns everything that is about that server and nothing else: its client, its request meter (the rate
limit and the daily cap, checked before every HTTP request, the SDK's own retries included), its concurrency, its
gate (is it believed up?), its prober, the judgement that it refuses every request the same way (and the pause and
trials that follow), and how many requests are on their way to it. So a slow or dead server holds up only its own
requests: the others' gates, probes and limits are their own.

The pool picks where a request goes: the endpoints the file's rule may use, best priority tier first (a lower tier
only while every endpoint of the better tiers is down, paused, out of today's requests or saturated), and within a
tier the one with the fewest requests outstanding. A request that dies with its server (refused or reset
connection, a timeout, a 502/503/504) is sent to another endpoint at once, and counts nothing against the file;
with nowhere else to go, the error is the file's as it would be with one endpoint.

:attr:`Endpoint.concurrency` is the one in-flight limit routing reads, and :meth:`Endpoint.describe` is where each
of a file's requests is sent to that endpoint: a limit that adapts to the server belongs on the endpoint, there.

Threads: none are started here; the daemon runs each endpoint's :meth:`Endpoint.run_prober` on a thread it owns.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from mmwatchd import limiter as limiter_mod
from mmwatchd.errors import VLMBadReply, VLMError, VLMMisconfigured, VLMRejected, VLMUnavailable
from mmwatchd.log import get_logger
from mmwatchd.model import Member, members

if TYPE_CHECKING:
    from mmwatchd.metrics import Metrics, Unmetered
    from mmwatchd.model import Config, EndpointConfig, Reply, VLMRequest
    from mmwatchd.servers import EndpointKnowledge
    from mmwatchd.state import State
    from mmwatchd.vlm import VLMClient

log = get_logger()

#: Backoff for probing a down endpoint.
PROBE_MAX_S = 30.0
#: While paused for endpoint-wide refusals: the first trial request after this long, then doubling up to the max.
TRIAL_FIRST_S = 30.0
TRIAL_MAX_S = 900.0
#: This many different files refused in a row with the same status and message pause the endpoint.
REFUSALS_TO_PAUSE = 3
#: Answers of a server that is going away (a proxy in front of a dead replica, a server shutting down): the request
#: goes to another endpoint when there is one.
DYING_STATUSES = frozenset({502, 503, 504})
#: A file none of whose endpoints is up tries again after this long (the gates open as soon as a prober sees one).
NO_ENDPOINT_WAIT_S = 10.0


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


class NoEndpoint(VLMUnavailable):
    """None of the endpoints the file's rule may use is up: the file waits, nothing counts against it."""

    kind = "unavailable"

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


class Host(Protocol):
    """What endpoints need from the daemon that runs them."""

    stopping: threading.Event
    clock: Callable[[], float]
    wall_clock: Callable[[], float]
    state: State | None

    def store(self, what: str, call: Callable[..., Any], *args: Any, **kw: Any) -> Any: ...

    def log_once(self, path: Path | None, reason: str, event: str, level: str = ..., **fields: object) -> bool: ...

    def current_path(self) -> Path | None: ...

    def waiting_for_a_slot(self, waiting: bool) -> None: ...


def rule_uses(rule: Any, name: str) -> bool:
    """May ``rule`` send to the endpoint called ``name``? Every endpoint, unless the rule names its own."""
    names: Sequence[str] = getattr(rule, "endpoints", ()) or ()
    return not names or name in names


def _seconds_to_midnight() -> float:
    now = datetime.now()
    midnight = datetime.combine(now.date() + timedelta(days=1), datetime.min.time())
    return (midnight - now).total_seconds() + 1


class WireTimes:
    """An endpoint client's request observer: passes every request on to the metrics, and keeps, per worker, what
    ``concurrency: auto`` learns from it: the time from sending the last request to its answer (the SDK's retries
    and backoff waits, and a wait for the rate limit, are not in it), and whether any answer said the server is
    overloaded (429, 5xx), which the SDK may have retried into a success."""

    def __init__(self, metrics: Metrics | Unmetered, clock: Callable[[], float]) -> None:
        self.metrics = metrics
        self.clock = clock
        self._local = threading.local()

    def start(self) -> None:
        self._local.sent = self._local.rtt = None
        self._local.overloaded = False

    def rtt(self) -> float:
        rtt = getattr(self._local, "rtt", None)
        return float("nan") if rtt is None else float(rtt)  # no answer: no sample

    def overloaded(self) -> bool:
        return bool(getattr(self._local, "overloaded", False))

    def sent(self, nbytes: int) -> None:
        self._local.sent = self.clock()
        self.metrics.sent(nbytes)

    def answered(self, status: int) -> None:
        sent = getattr(self._local, "sent", None)
        if sent is not None:
            self._local.rtt = self.clock() - sent
        if status == 429 or status >= 500:
            self._local.overloaded = True
        self.metrics.answered(status)


class Endpoint:
    """One model endpoint: its client, meter, gate, prober state and requests in flight (see the module doc).

    Its state (``status``, ``in_flight``, the pause) is guarded by the pool's lock, so routing sees it whole.
    """

    def __init__(self, member: Member, client: VLMClient, pool: Pool, *, single: bool) -> None:
        self.name = member.name
        self.spec = member.spec
        self.priority = member.priority
        self.pool = pool
        self.host = pool.host
        self.client = client
        self.limiter = RateLimiter(member.spec.requests_per_minute, clock=pool.host.clock)
        #: Requests in flight here at most: fixed, or found by measuring (concurrency: auto, mmwatchd.limiter).
        self.limit = limiter_mod.for_endpoint(member.spec, clock=pool.host.clock)
        self.metrics: Metrics | Unmetered = pool.metrics.for_endpoint(member.name, lambda: self.concurrency)
        self._wire = WireTimes(self.metrics, pool.host.clock)
        #: Fields every log line about this endpoint carries (none while it is the only one: logs stay as they were).
        self.fields: dict[str, object] = {} if single else {"endpoint": member.name}
        #: checking, up, unreachable, or paused (it refuses every request; see the log).
        self.status = "checking"
        #: Requests routed here and not yet answered.
        self.in_flight = 0
        self.probe_now = threading.Event()
        self._paused: str | None = None  # the server's words while paused for endpoint-wide refusals
        self._trial = False  # while paused: the prober lets one job through as a trial
        self._granted = False  # that trial was taken by a worker at the gate; routing lets it here
        self._refusal: tuple[str, set[Path]] | None = None  # the last refusal's words, and the files it came for
        self._model_warned = False
        self._exhausted_until = float("-inf")  # today's requests are used up until then (on the host's clock)
        self._quota = ""  # and what was said when they ran out
        self._count_lock = threading.Lock()
        self._fallback_counts: Counter[date] = Counter()  # requests per day while the state store cannot count
        self._meter(client)

    def _meter(self, client: VLMClient) -> None:
        # A client that cannot report each HTTP request (an injected SDK client) is metered once per describe.
        self._per_describe = not getattr(client, "counts_every_request", False)
        if not self._per_describe:
            client.before_request = self.before_request
            client.observer = self._wire

    def use(self, spec: EndpointConfig, client: VLMClient) -> None:
        """A reload changed this endpoint's settings: requests from now on go through ``client`` and new limits."""
        self.spec = spec
        self.client = client
        self.limiter = RateLimiter(spec.requests_per_minute, clock=self.host.clock)
        self._meter(client)

    @property
    def concurrency(self) -> int:
        """Requests in flight here at most: the fixed number, or the limit ``concurrency: auto`` has found so far."""
        return self.limit.limit

    @property
    def workers(self) -> int:
        """Worker threads this endpoint's requests may need: the fixed number, or ``max_concurrency``."""
        return limiter_mod.workers(self.spec)

    @property
    def knowledge(self) -> EndpointKnowledge | None:
        """What the endpoint takes (video.mode: auto), shared with the client."""
        return getattr(self.client, "knowledge", None)

    @property
    def paused(self) -> bool:
        return self._paused is not None

    def usable(self) -> bool:
        """May take a request now (called with the pool's lock held)."""
        if self.host.clock() < self._exhausted_until:
            return False
        return self.status == "up" or (self._paused is not None and self._granted)

    def take_trial(self) -> bool:
        """Take the trial a paused endpoint's prober offers, when it offers one (called with the pool's lock held):
        routing then lets one request through to it."""
        if self._paused is None or not self._trial:
            return False
        self._trial = False
        self._granted = True
        return True

    def comes_back(self) -> bool:
        """Not usable now, but its prober (or a paused endpoint's trial) will make it so: worth waiting for
        (called with the pool's lock held). Not when today's requests are used up: that may take hours."""
        return self.host.clock() >= self._exhausted_until and (self.status != "up" or self._paused is not None)

    # -- one request ---------------------------------------------------------------------------------------

    def describe(self, req: VLMRequest) -> Reply:
        """Send one file's request here (routing has taken a slot of :attr:`limit` for it): metered, its refusals
        judged for being endpoint-wide, and what it says about the server's load given back to the limit."""
        self._wire.start()
        started = self.host.clock()
        load: limiter_mod.RequestOutcome = "ignored"
        try:
            if self._per_describe:
                self.before_request()
            try:
                with self.metrics.describing():
                    reply = self.client.describe(req)
                load = "ok"
            except VLMBadReply:
                load = "ok"  # answered in the usual time: a sample all the same
                raise
            except VLMUnavailable as exc:
                load = "ignored" if isinstance(exc, QuotaReached | Stopping) else "dropped"
                raise
        except VLMRejected as exc:
            self.refused(exc)  # raises EndpointRefuses instead once the refusals are endpoint-wide
            raise
        finally:
            rtt = self.host.clock() - started if self._per_describe else self._wire.rtt()
            self.limit.release(rtt, "dropped" if self._wire.overloaded() else load)
        self.metrics.replied(reply)
        self.accepted()
        return reply

    def before_request(self) -> None:
        """Runs on a worker just before each chat request leaves (SDK retries and the JSON re-ask included):
        nothing leaves once stopping; the rate limit applies; the daily cap is reserved, atomically."""
        stopping = self.host.stopping
        if stopping.is_set() or not self.limiter.acquire(stopping):
            raise Stopping("mmwatchd is stopping: the request was not sent")
        cap = self.spec.max_requests_per_day
        with self._count_lock:  # threads of this process; count_request's transaction covers other processes
            total = self.count(1)
            if cap is not None and total > cap:
                self.count(-1)
                key = f"endpoints[{self.name}]" if self.fields else "endpoint"
                error = QuotaReached(
                    f"{key}.max_requests_per_day ({cap}) reached for today; "
                    "work resumes after midnight (local time), or raise the cap"
                )
                error.retry_after = _seconds_to_midnight()
                raise error

    def count(self, n: int) -> int:
        """Add ``n`` to today's request count and return the new total (from memory while the store fails)."""
        state = self.host.state
        if state is not None:
            key = None if not self.fields else self.name
            total = self.host.store("count a request", state.count_request, n, **({"endpoint": key} if key else {}))
            if total is not None:
                return int(total)
        today = date.fromtimestamp(self.host.wall_clock())
        self._fallback_counts[today] += n
        return self._fallback_counts[today]

    def exhausted(self, error: QuotaReached) -> None:
        """Today's requests are used up: route elsewhere until the cap resets."""
        with self.pool.cond:
            self._exhausted_until = self.host.clock() + (error.retry_after or 60.0)
            self._quota = error.message

    def quota_left_in(self) -> float | None:
        """Seconds until today's requests are no longer used up; None when they are not."""
        left = self._exhausted_until - self.host.clock()
        return left if left > 0 else None

    # -- the gate ------------------------------------------------------------------------------------------

    def down(self, exc: VLMError) -> None:
        """A request got no answer: close the gate and probe until the endpoint answers again. Without probers (a
        one-shot run) the gate stays open, since nothing would open it again: a request that dies there goes to
        another endpoint all the same, and the file's tries run out as with one endpoint."""
        with self.pool.cond:
            if self.status != "up" or not self.pool.probing:
                return
            self.status = "unreachable"
        self.metrics.endpoint_up(False)
        log.warning("endpoint.down", url=self.spec.base_url, reason=exc.message, **self.fields)
        self.probe_now.set()

    def check(self) -> None:
        """One probe: open the gate when the endpoint answers; raise VLMError when it does not."""
        models = self.client.list_models()
        model = self.spec.model
        wanted_models = {r.model for r in self.pool.config.rules if r.model and self.pool.serves(r, self)} | {model}
        missing = sorted(m for m in wanted_models if models and m not in models)
        if missing and not self._model_warned:
            self._model_warned = True
            key = "endpoint.model" if not self.fields else f"endpoints[{self.name}].model"
            log.warning(
                "endpoint.model_not_listed",
                models=missing,
                available=models[:20],
                hint=f"check {key} (for Ollama: ollama pull <model>)",
                **self.fields,
            )
        self.up(models=len(models))

    def check_failed(self) -> None:
        """A first check found the endpoint unreachable, or its key or model bad: it is no longer being checked, so
        no ready request waits for that check (with probers, they then wait for the endpoint to come back)."""
        with self.pool.cond:
            if self.status == "checking":
                self.status = "unreachable"
            self.pool.cond.notify_all()

    def up(self, **fields: object) -> None:
        with self.pool.cond:
            if self._paused is not None:
                return
            was = self.status
            self.status = "up"
            self.pool.cond.notify_all()
        self.metrics.endpoint_up(True)
        if was != "up":
            log.info("endpoint.up", url=self.spec.base_url, **fields, **self.fields)

    def probe_once(self) -> None:
        """One-shot runs (no prober): probe the endpoint once before work starts.

        Unreachable, or a bad key or model: raises, so the command says so at once instead of once per file. An
        endpoint that answers ``/models`` with some other error is up: the work goes ahead.
        """
        try:
            self.check()
        except VLMError as exc:
            if exc.retryable:
                raise
            self.models_refused(exc)

    def models_refused(self, exc: VLMError) -> None:
        # It answered, so it is up; some gateways simply have no /models. Requests will tell.
        self.host.log_once(None, exc.message, "endpoint.models_refused", "warning", **self.fields)
        self.up()

    def run_prober(self, trial_first_s: float = TRIAL_FIRST_S) -> None:
        """The prober thread: keep the gate open while the endpoint answers, and send trials while paused."""
        stopping = self.host.stopping
        delay = 1.0
        trial_delay = trial_first_s
        self.probe_now.set()
        while not stopping.is_set():
            self.probe_now.wait()
            if stopping.is_set():
                return
            self.probe_now.clear()
            if self._paused is not None:
                # Paused for endpoint-wide refusals: /models answers all the same, so the test is one real request.
                if stopping.wait(trial_delay * random.uniform(0.8, 1.2)):
                    return
                trial_delay = min(TRIAL_MAX_S, trial_delay * 2)
                with self.pool.cond:
                    if self._paused is None:
                        continue
                    self._trial = True
                    self.pool.cond.notify_all()
                continue
            trial_delay = trial_first_s
            try:
                self.check()
            except VLMMisconfigured as exc:
                self.host.log_once(None, exc.message, "endpoint.misconfigured", "error", **self.fields)
                stopping.wait(min(PROBE_MAX_S, delay * 4))
                self.probe_now.set()
                continue
            except VLMUnavailable as exc:
                with self.pool.cond:
                    self.status = "unreachable"
                if delay == 1.0:
                    log.error("endpoint.unreachable", url=self.spec.base_url, reason=exc.message, **self.fields)
                stopping.wait(delay * random.uniform(0.8, 1.2))
                delay = min(PROBE_MAX_S, delay * 2)
                self.probe_now.set()
                continue
            except VLMError as exc:
                self.models_refused(exc)
            delay = 1.0

    # -- endpoint-wide refusals ----------------------------------------------------------------------------

    def refused(self, exc: VLMRejected) -> None:
        """The server refused a request (a 4xx that is not about the key, model or size). The same words for
        :data:`REFUSALS_TO_PAUSE` different files in a row, or again while paused, mean every request would be
        refused: pause this endpoint and raise :class:`EndpointRefuses`, which leaves no error sidecar."""
        path = self.host.current_path()
        with self.pool.cond:
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

    def accepted(self) -> None:
        with self.pool.cond:
            self._refusal = None
        if self._paused is not None:
            self.resume("a request went through")

    def pause(self, error: EndpointRefuses) -> None:
        with self.pool.cond:
            first = self._paused is None
            self._paused = error.message
            self.status = "paused (it refuses every request; see the log)"
        if first:
            log.error("endpoint.refusing", reason=error.message,
                      note="work is paused: no error sidecars meanwhile; a trial request is sent now and then",
                      **self.fields)  # fmt: skip
            self.probe_now.set()

    def resume(self, why: str) -> None:
        with self.pool.cond:
            if self._paused is None:
                return
            self._paused = None
            self._trial = self._granted = False
            self.status = "up"
            self.pool.cond.notify_all()
        log.info("endpoint.resumed", why=why, **self.fields)
        self.probe_now.set()


class Pool:
    """The endpoints of one daemon and the routing between them (see the module doc). ``cond`` guards every
    endpoint's state; it is notified whenever an endpoint may have become usable."""

    def __init__(
        self,
        config: Config,
        host: Host,
        metrics: Metrics | Unmetered,
        make_client: Callable[[Member], VLMClient],
    ) -> None:
        self.config = config
        self.host = host
        self.metrics = metrics
        self.cond = threading.Condition()
        self._local = threading.local()  # per worker: the endpoint that answered its last request
        ms = members(config)
        #: Probers run (the service): an endpoint that stops answering is closed until its prober sees it back.
        self.probing = True
        #: Workers whose request is ready, waiting for a slot (the daemon runs more workers than slots, so that one
        #: is ready when a slot frees).
        self.ready = 0
        self.endpoints: list[Endpoint] = [Endpoint(m, make_client(m), self, single=len(ms) == 1) for m in ms]

    def __iter__(self) -> Iterator[Endpoint]:
        return iter(self.endpoints)

    @property
    def single(self) -> bool:
        return len(self.endpoints) == 1

    @property
    def workers(self) -> int:
        """How many workers the daemon runs: every endpoint's fixed concurrency, or its ``max_concurrency`` for
        ``auto``, added up."""
        return sum(e.workers for e in self.endpoints)

    def get(self, name: str) -> Endpoint | None:
        return next((e for e in self.endpoints if e.name == name), None)

    def serves(self, rule: Any, endpoint: Endpoint) -> bool:
        """May ``rule`` use ``endpoint``? (see :func:`rule_uses`)"""
        return rule_uses(rule, endpoint.name)

    def allowed(self, rule_name: str | None) -> list[Endpoint]:
        rule = next((r for r in self.config.rules if r.name == rule_name), None)
        return [e for e in self.endpoints if rule is None or self.serves(rule, e)]

    def best_tier_free(self, rule_name: str | None) -> bool:
        """Is an endpoint of the best tier ``rule_name`` may use up, with room for one more request?"""
        allowed = self.allowed(rule_name)
        best = min(e.priority for e in allowed)
        with self.cond:
            return any(e.priority == best and e.usable() and e.in_flight < e.concurrency for e in allowed)

    def wake(self) -> None:
        with self.cond:
            self.cond.notify_all()
        for e in self.endpoints:
            e.probe_now.set()

    # -- the gate workers pass before they take a file ------------------------------------------------------

    def pass_gate(self) -> bool:
        """Wait until some endpoint is believed up and not paused (a paused one lets one job through as a trial
        now and then); False when stopping."""
        stopping = self.host.stopping
        with self.cond:
            while True:
                if stopping.is_set():
                    return False
                # Also while the first check is under way: the file is read and encoded meanwhile, and its request
                # waits in routing for the check's answer.
                if any(e.status in ("up", "checking") and e._paused is None for e in self.endpoints):
                    return True
                if any(e.take_trial() for e in self.endpoints):
                    return True
                self.cond.wait(0.5)

    def trial_finished(self) -> None:
        """A job finished: a paused endpoint schedules its next trial."""
        for e in self.endpoints:
            if e._paused is not None:
                e.probe_now.set()

    # -- routing -------------------------------------------------------------------------------------------

    def acquire(self, candidates: Sequence[Endpoint]) -> Endpoint | None:
        """The endpoint for the next request among ``candidates``: best tier first, fewest outstanding within it;
        waits while every usable one is saturated, and (the service) while those that are not usable are down or
        paused, as a worker at the gate would: the request is ready, and its file keeps its place. None when none
        is usable and none will be by waiting here: out of requests for the day, or no prober to bring one back.

        While it waits, the daemon is told (:meth:`Host.waiting_for_a_slot`): a worker waiting for a slot is not
        stuck on its job, however long an outage lasts."""
        waited = False
        try:
            while True:
                with self.cond:
                    chosen, wait = self._choose(candidates)
                    if not wait:
                        return chosen
                    if waited:
                        self.cond.wait(0.5)
                        continue
                    self.ready += 1
                waited = True
                self.host.waiting_for_a_slot(True)  # outside the lock: the daemon takes its own
        finally:
            if waited:
                with self.cond:
                    self.ready -= 1
                self.host.waiting_for_a_slot(False)

    def _choose(self, candidates: Sequence[Endpoint]) -> tuple[Endpoint | None, bool]:
        """One look, with ``cond`` held: the endpoint taken (or None), and whether to wait for one instead."""
        if self.host.stopping.is_set():
            raise Stopping("mmwatchd is stopping: the request was not sent")
        for e in candidates:  # a paused endpoint's trial may go to a request that is ready
            e.take_trial()
        usable = [e for e in candidates if e.usable()]
        if not usable:
            return None, any(e.status == "checking" for e in candidates) or (
                self.probing and any(e.comes_back() for e in candidates)
            )
        for tier in sorted({e.priority for e in usable}):
            free = [e for e in usable if e.priority == tier and e.in_flight < e.concurrency]
            if free:
                best = min(free, key=lambda e: e.in_flight)
                best.limit.take()
                best.in_flight += 1
                best._granted = False
                return best, False
        return None, True

    def release(self, endpoint: Endpoint) -> None:
        with self.cond:
            endpoint.in_flight -= 1
            self.cond.notify_all()

    def answered_by(self) -> Endpoint | None:
        """The endpoint that answered this thread's last request (None before any)."""
        return getattr(self._local, "endpoint", None)

    def forget_answer(self) -> None:
        self._local.endpoint = None

    def answered(self, endpoint: Endpoint) -> None:
        self._local.endpoint = endpoint

    # -- what status shows ---------------------------------------------------------------------------------

    def summary(self) -> str:
        """``up`` (one endpoint, as it always read) or ``gpu1 up 2/4, cloud unreachable 0/8``."""
        with self.cond:
            if self.single:
                return self.endpoints[0].status
            return ", ".join(
                f"{e.name} {e.status.split(' (')[0]} {e.in_flight}/{e.concurrency}" for e in self.endpoints
            )

    def word(self) -> str:
        """One word for the whole pool: up when any endpoint is, else the first endpoint's state."""
        with self.cond:
            if any(e.status == "up" for e in self.endpoints):
                return "up"
            return self.endpoints[0].status

    def rate_waiting(self) -> int:
        return sum(e.limiter.waiting for e in self.endpoints)

    def rows(self) -> list[dict[str, object]]:
        """Per endpoint: name, status, in flight, concurrency, priority (``status`` and STATUS=)."""
        with self.cond:
            return [
                {"name": e.name, "status": e.status, "in_flight": e.in_flight, "concurrency": e.concurrency,
                 "priority": e.priority}
                for e in self.endpoints
            ]  # fmt: skip


class PoolClient:
    """The VLM client as the pipeline sees it: each describe is routed by the pool, and a request that dies with
    its server is sent to another endpoint without the file seeing it."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    @property
    def knowledge(self) -> EndpointKnowledge | None:
        """What the first endpoint takes (``video.mode: auto`` and passthrough are planned for it)."""
        return self.pool.endpoints[0].knowledge

    def describe(self, req: VLMRequest) -> Reply:
        pool = self.pool
        pool.forget_answer()
        candidates = pool.allowed(req.rule)
        last: VLMError | None = None
        while True:
            failed: VLMError | None = None
            endpoint = pool.acquire(candidates)
            if endpoint is None:
                if last is not None:
                    raise last
                raise self._nowhere(candidates)
            try:
                reply = endpoint.describe(self._for(endpoint, req))
            except (QuotaReached, EndpointRefuses) as exc:
                if isinstance(exc, QuotaReached):
                    endpoint.exhausted(exc)
                else:
                    endpoint.pause(exc)
                failed = exc
            except Stopping:
                raise
            except VLMUnavailable as exc:
                if exc.status is None and not isinstance(exc, VLMMisconfigured):
                    endpoint.down(exc)
                elif exc.status not in DYING_STATUSES:
                    raise
                failed = exc
            finally:
                pool.release(endpoint)
            if failed is None:
                pool.answered(endpoint)
                return reply if pool.single else replace(reply, endpoint=endpoint.name)
            last = failed
            candidates = [e for e in candidates if e is not endpoint]
            if not candidates:
                raise last
            log.info("endpoint.failover", endpoint=endpoint.name, reason=last.message)

    @staticmethod
    def _nowhere(candidates: Sequence[Endpoint]) -> VLMUnavailable:
        """Why no endpoint can take the request: today's requests are used up everywhere (wait for the first
        to reset), or none is up (wait a little: the probers open the gates)."""
        waits = [e.quota_left_in() for e in candidates]
        if waits and all(w is not None for w in waits):
            first = min(waits, key=lambda w: w or 0.0)
            error: VLMUnavailable = QuotaReached(next(e._quota for e in candidates if e.quota_left_in() == first))
            error.retry_after = first
            return error
        names = ", ".join(e.name for e in candidates)
        error = NoEndpoint(f"no endpoint this file's rule may use is up ({names}): the file waits for one")
        error.retry_after = NO_ENDPOINT_WAIT_S
        return error

    def _for(self, endpoint: Endpoint, req: VLMRequest) -> VLMRequest:
        """The request as this endpoint takes it: its own model unless the rule names one."""
        if self.pool.single or req.rule_model or req.model == endpoint.spec.model:
            return req
        return replace(req, model=endpoint.spec.model)

    def list_models(self) -> list[str]:
        return self.pool.endpoints[0].client.list_models()
