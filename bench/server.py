"""A loopback OpenAI-compatible server that answers every chat request after a fixed delay, and records arrivals.

    GET  /v1/models             one model, ``bench-vlm``
    POST /v1/chat/completions   a short valid completion, sent ``delay_s`` after the request body has arrived

HTTP/1.1 with keep-alive (as vLLM and Ollama speak it), one thread per connection, so any number of concurrent
requests are served in parallel. The delay is measured from the arrival of the body, so the server's own work (it
only reads the body and looks for the file name in the prompt) is inside the delay, not added to it.

Each chat request is recorded as a :class:`Hit`: arrival time (``time.time()``, comparable with another process on
the same machine), body size, and the file name taken from the prompt (``Describe <name> (``...).
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

MODEL = "bench-vlm"
#: What the bench configs' prompts start with; the name follows (quoted or not, as the prompt renders it).
_NAME = re.compile(rb'"Describe (?:\\")?([^"\\]+?)(?:\\")? \(')
_REPLY = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 0,
        "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "A photo."}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13},
    }
).encode()
_MODELS = json.dumps(
    {"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "bench"}]}
).encode()


@dataclass(frozen=True, slots=True)
class Hit:
    """One chat request: when its first byte and its whole body had arrived, when it was answered, its size."""

    started: float
    arrived: float
    answered: float
    body_bytes: int
    name: str


class FixedLatencyServer:
    """``with FixedLatencyServer(0.2) as srv:`` ... ``srv.base_url``, ``srv.hits``, ``srv.reset()``."""

    def __init__(self, delay_s: float = 0.2) -> None:
        self.delay_s = delay_s
        self._lock = threading.Condition()
        self._hits: list[Hit] = []
        self.models_requests = 0
        self.in_flight = 0
        self.peak_in_flight = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Self:
        server = _Server(("127.0.0.1", 0), _Handler)
        server.owner = self
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    @property
    def base_url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    @property
    def hits(self) -> list[Hit]:
        with self._lock:
            return list(self._hits)

    def reset(self) -> None:
        with self._lock:
            self._hits.clear()
            self.models_requests = 0
            self.peak_in_flight = 0

    def wait_for(self, name: str, timeout: float) -> Hit | None:
        """The first request for ``name``, waiting up to ``timeout`` seconds for it."""
        end = time.monotonic() + timeout
        with self._lock:
            while True:
                for hit in self._hits:
                    if hit.name == name:
                        return hit
                left = end - time.monotonic()
                if left <= 0:
                    return None
                self._lock.wait(left)

    def _record(self, hit: Hit) -> None:
        with self._lock:
            self._hits.append(hit)
            self._lock.notify_all()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 64
    owner: FixedLatencyServer


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    # Headers and body go out in one write, without Nagle: otherwise a small reply waits for the client's delayed
    # ACK (40 ms on Linux), which would be latency the server adds.
    disable_nagle_algorithm = True

    def do_GET(self) -> None:
        if self.path.rstrip("/").endswith("/models"):
            with self.server.owner._lock:
                self.server.owner.models_requests += 1
            self._send(200, _MODELS)
        else:
            self._send(404, b'{"error": {"message": "not found"}}')

    def do_POST(self) -> None:
        started = time.time()
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        arrived = time.time()
        owner = self.server.owner
        with owner._lock:
            owner.in_flight += 1
            owner.peak_in_flight = max(owner.peak_in_flight, owner.in_flight)
        try:
            match = _NAME.search(body, 0, 8192)
            name = match.group(1).decode("utf-8", "replace") if match else ""
            wait = arrived + owner.delay_s - time.time()
            if wait > 0:
                time.sleep(wait)
            self._send(200, _REPLY)
        finally:
            with owner._lock:
                owner.in_flight -= 1
        owner._record(Hit(started=started, arrived=arrived, answered=time.time(), body_bytes=len(body), name=name))

    def _send(self, status: int, payload: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self._headers_buffer.append(b"\r\n" + payload)
        self.flush_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def self_check(server: FixedLatencyServer, concurrency: int, rounds: int = 4) -> tuple[float, int]:
    """``concurrency`` keep-alive clients send ``rounds`` small requests each, all at once: the median time a request
    took beyond the server's delay, and the most requests the server held at once (``concurrency`` when it serves
    them all in parallel)."""
    import http.client
    from urllib.parse import urlsplit

    url = urlsplit(server.base_url)
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Describe check ("}]}).encode()
    extra: list[float] = []
    barrier = threading.Barrier(concurrency)

    def client() -> None:
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
        conn.connect()
        for _ in range(rounds):
            barrier.wait()
            t0 = time.perf_counter()
            conn.request("POST", url.path + "/chat/completions", body, {"Content-Type": "application/json"})
            conn.getresponse().read()
            extra.append(time.perf_counter() - t0 - server.delay_s)
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # A client has its reply a moment before the server records the hit: wait for the last ones, so that none of
    # them lands after the caller's reset() and is counted as part of the run measured next.
    deadline = time.monotonic() + 10
    while len(server.hits) < concurrency * rounds and time.monotonic() < deadline:
        time.sleep(0.005)
    extra.sort()
    return extra[len(extra) // 2], server.peak_in_flight
