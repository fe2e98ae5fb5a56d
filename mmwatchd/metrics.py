"""Prometheus metrics: what the service serves on ``/metrics`` and ``scan --metrics-textfile`` writes.

One :class:`Metrics` per daemon, on its own :class:`~prometheus_client.CollectorRegistry` (never the global one: a
test or an embedding program may run several daemons). The daemon calls it where it already counts things: a file
finished, every HTTP request sent and answered, the endpoint gate opening and closing. Gauges that are a view of the
daemon's state (queue depth, the concurrency limit) are read when scraped rather than kept in step.

Labels never carry file paths (unbounded, and private): files are counted by outcome, kind and rule name.
"""

from __future__ import annotations

import contextlib
import copy
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmwatchd import __version__
from mmwatchd.errors import ConfigError
from mmwatchd.model import members, split_listen

if TYPE_CHECKING:
    from mmwatchd.model import Config, Reply
    from mmwatchd.pipeline import Outcome

#: Request latency buckets, in seconds: a cached small photo answers in a fraction of a second, a long video on a
#: busy local GPU in minutes (the request timeout's default is 300 s).
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 180.0, 300.0, 600.0)

#: The ``code`` label of a request that got no HTTP answer (connection refused or reset, timeout).
NO_ANSWER = "none"


def endpoint_name(config: Config) -> str:
    """The ``endpoint`` label of the first endpoint: the single ``endpoint:`` is "default", named ``endpoints:``
    go by their names (each endpoint reports under its own through :meth:`Metrics.for_endpoint`)."""
    return members(config)[0].name


class Metrics:
    """Counters, gauges and the latency histogram of one daemon, and the HTTP server that serves them."""

    def __init__(self, endpoint: str, *, queued: Callable[[], int], limit: Callable[[], int]) -> None:
        """``queued``: files waiting for a worker; ``limit``: the endpoint's concurrency limit (read per scrape)."""
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.endpoint = endpoint
        self.registry = r = CollectorRegistry()
        self._files = Counter(
            "mmwatchd_files", "Files finished, by outcome, kind and rule.", ["outcome", "kind", "rule"], registry=r
        )
        self._requests = Counter(
            "mmwatchd_requests",
            f'HTTP requests sent to the model endpoint, by status code ("{NO_ANSWER}": no answer).',
            ["endpoint", "code"],
            registry=r,
        )
        self._duration = Histogram(
            "mmwatchd_request_duration_seconds",
            "Time from sending a request to its answer's status line.",
            ["endpoint"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self._bytes = Counter("mmwatchd_request_bytes", "Request bodies sent.", ["endpoint"], registry=r)
        self._tokens = Counter(
            "mmwatchd_tokens",
            "Tokens the endpoint reported, by model and type.",
            ["endpoint", "model", "type"],
            registry=r,
        )
        Gauge("mmwatchd_queue_files", "Files queued for a worker.", registry=r).set_function(queued)
        self._in_flight = Gauge(
            "mmwatchd_in_flight_requests", "Files whose request is under way.", ["endpoint"], registry=r
        )
        self._limit = Gauge("mmwatchd_concurrency_limit", "Files described at once at most.", ["endpoint"], registry=r)
        self._limit.labels(endpoint).set_function(limit)
        self._up = Gauge("mmwatchd_endpoint_up", "1 while the endpoint is believed up.", ["endpoint"], registry=r)
        self._up.labels(endpoint).set(0)
        Gauge("mmwatchd_build_info", "The mmwatchd version.", ["version"], registry=r).labels(__version__).set(1)
        # Children made up front, so a scrape before the first request shows them at zero.
        self._in_flight.labels(endpoint)
        self._bytes.labels(endpoint)
        self._duration.labels(endpoint)
        self._local = threading.local()  # per worker: when its request left, while no answer has come
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def for_endpoint(self, name: str, limit: Callable[[], int]) -> Metrics:
        """The same metrics, reported under another endpoint's label (one per endpoint of a pool)."""
        if name == self.endpoint:
            return self
        view = copy.copy(self)  # shares the registry, the series and the per-thread request state
        view.endpoint = name
        self._limit.labels(name).set_function(limit)
        self._up.labels(name).set(0)
        self._in_flight.labels(name)
        self._bytes.labels(name)
        self._duration.labels(name)
        return view

    # -- what the daemon reports ---------------------------------------------------------------------------

    def finished(self, outcome: Outcome) -> None:
        self._files.labels(outcome.status, outcome.media_kind or "none", outcome.rule or "none").inc()

    def endpoint_up(self, up: bool) -> None:
        self._up.labels(self.endpoint).set(1 if up else 0)

    @contextlib.contextmanager
    def describing(self) -> Iterator[None]:
        """Around one file's describe call: in flight meanwhile; a request still unanswered at the end got none."""
        gauge = self._in_flight.labels(self.endpoint)
        gauge.inc()
        try:
            yield
        finally:
            gauge.dec()
            self._unanswered()

    def replied(self, reply: Reply) -> None:
        usage: Mapping[str, Any] = reply.usage or {}
        for kind in ("prompt", "completion"):
            n = usage.get(f"{kind}_tokens")
            if isinstance(n, int) and not isinstance(n, bool) and n > 0:
                self._tokens.labels(self.endpoint, reply.model or "unknown", kind).inc(n)

    # The VLM client's request observer: called on the sending thread for every HTTP request (SDK retries too).

    def sent(self, nbytes: int) -> None:
        self._unanswered()  # the SDK retries a connection error on the same thread without an answer between
        self._bytes.labels(self.endpoint).inc(max(0, nbytes))
        self._local.sent = time.perf_counter()

    def answered(self, status: int) -> None:
        sent = getattr(self._local, "sent", None)
        self._local.sent = None
        self._requests.labels(self.endpoint, str(status)).inc()
        if sent is not None:
            self._duration.labels(self.endpoint).observe(time.perf_counter() - sent)

    def _unanswered(self) -> None:
        if getattr(self._local, "sent", None) is not None:
            self._local.sent = None
            self._requests.labels(self.endpoint, NO_ANSWER).inc()

    # -- serving and writing -------------------------------------------------------------------------------

    def serve(self, config: Config) -> None:
        """Serve ``/metrics`` on ``config.metrics.listen`` from a thread of our own; :meth:`close` stops it. A port
        that is taken or an address this host does not have is a :class:`ConfigError` naming the key."""
        assert config.metrics is not None
        listen = config.metrics.listen
        host, port = split_listen(listen)
        from prometheus_client import start_http_server

        try:
            self._server, self._thread = start_http_server(port, host, registry=self.registry)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise ConfigError(
                f"{config.where(('metrics', 'listen'))}: cannot serve metrics on {listen}: {reason}; "
                "choose a free port on an address of this host"
            ) from None

    def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def write_textfile(self, path: Path) -> None:
        """The same metrics as a node_exporter textfile, replaced atomically (written aside, then renamed)."""
        from prometheus_client import write_to_textfile

        write_to_textfile(str(path), self.registry)


class Unmetered:
    """What a daemon without metrics reports to: nothing is kept, and prometheus_client (about 80 ms of start-up) is
    never imported. Same calls as :class:`Metrics`."""

    def for_endpoint(self, name: str, limit: Callable[[], int]) -> Unmetered:
        return self

    def finished(self, outcome: Outcome) -> None:
        pass

    def endpoint_up(self, up: bool) -> None:
        pass

    def describing(self) -> contextlib.nullcontext[None]:
        return contextlib.nullcontext()

    def replied(self, reply: Reply) -> None:
        pass

    def sent(self, nbytes: int) -> None:
        pass

    def answered(self, status: int) -> None:
        pass

    def close(self) -> None:
        pass
