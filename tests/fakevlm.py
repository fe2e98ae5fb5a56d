"""A real OpenAI-compatible HTTP server on loopback, for tests.

It speaks just enough of the chat-completions API for the real ``openai`` client to talk to it:

    GET  /v1/models             the configured model list
    POST /v1/chat/completions   a scripted response, else one that describes the request

Every request is recorded (headers, raw body, parsed JSON, Content-Length). Scripted responses are served in FIFO
order; with none queued, the default responder answers a valid completion ("saw 2 images and 0 videos"), or, when the
request asks for ``response_format: json_schema``, JSON that fits simple schemas (``reply_json`` overrides it).

Responses are HTTP/1.0 (one request per connection), so no handler thread waits on an idle keep-alive connection and
``stop()`` joins every thread it started.

``shape`` makes the server behave like a real one, from that server's own code and documents:

    generic   takes everything (the default)
    ollama    openai/openai.go FromChatRequest: only "text" and "image_url" parts (else 400 "invalid message
              format"); an image data URL must be data:image/{jpeg,jpg,png,webp};base64 (else 400 "invalid image
              input"); GET /api/version at the server root
    openai    every request body validated against OpenAI's own request schema (../shared/openai-spec), so a
              video_url part is refused as OpenAI refuses it (400 invalid_value on messages[i].content[j].type);
              data URLs png/jpeg/webp/gif only
    vllm      takes video_url (frames split on the commas) and keeps the first 32 frames, padding an odd count as
              Qwen2-VL does; GET /version at the root; usage.prompt_tokens counts the frames it kept
    lmstudio  images only (400 for other part types); GET /api/v0/models at the root
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "DEFAULT_MODELS",
    "SHAPES",
    "VLLM_MAX_FRAMES",
    "FakeVLM",
    "Recorded",
    "Scripted",
    "chat_completion",
    "error_body",
]

#: Served by default; the second is EndpointConfig's default model, so a default config works against the fake.
DEFAULT_MODELS = ("fake-vlm", "qwen2.5vl:7b")
Shape = Literal["generic", "ollama", "openai", "vllm", "lmstudio"]
SHAPES: tuple[Shape, ...] = ("ollama", "lmstudio", "openai", "vllm")
#: vLLM's default: frames of a video_url past this are dropped (num_frames=32 in its video loader).
VLLM_MAX_FRAMES = 32
#: Tokens a fake server "spends" on each image or kept video frame, so usage shows what the model saw.
TOKENS_PER_IMAGE = 64
OPENAI_SPEC = Path(__file__).resolve().parents[2] / "shared" / "openai-spec" / "chat-completions-request.schema.json"


@dataclass(frozen=True, slots=True)
class Recorded:
    """One request as the server received it."""

    method: str
    path: str
    #: Header names lower-cased.
    headers: dict[str, str]
    body: bytes = field(repr=False)
    #: The body parsed as JSON, or None when it is not JSON.
    json: Any = field(repr=False)
    content_length: int | None

    @property
    def content(self) -> list[dict[str, Any]]:
        """Content parts of the last user message of a chat request."""
        user = [m for m in self.json["messages"] if m["role"] == "user"][-1]
        return user["content"]

    @property
    def prompt(self) -> str:
        """The text of a chat request's messages ("" for any other request)."""
        messages = self.json.get("messages") if isinstance(self.json, dict) else None
        if not isinstance(messages, list):
            return ""
        texts: list[str] = []
        for m in messages:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, str):
                texts.append(content)
            elif isinstance(content, list):
                texts += [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
        return "\n".join(texts)


@dataclass(frozen=True, slots=True, kw_only=True)
class Scripted:
    """One queued response. ``json`` and ``text`` are exclusive; ``disconnect`` closes without answering."""

    status: int = 200
    json: Any = None
    text: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    content_type: str | None = None
    delay_s: float = 0.0
    disconnect: bool = False
    #: Only a request to this path (e.g. "/v1/models") takes this response; None matches any path.
    path: str | None = None
    #: Only a chat request whose prompt contains this text (a file's name) takes this response; None: any request.
    #: For replies meant for one file, whatever order the daemon's workers send the files in.
    mentions: str | None = None
    #: Hold the response until this event is set (a request kept in flight for as long as a test needs).
    hold: threading.Event | None = None
    #: Called when the request has arrived, before anything is answered (the client is mid-request), and when the
    #: response has been written (the client is reading it, or writing what it learned): a test's trigger at an
    #: exact moment of the client's work, where a sleep would only guess it.
    on_received: Callable[[], None] | None = None
    on_answered: Callable[[], None] | None = None


def chat_completion(
    content: str | None,
    *,
    reasoning_content: str | None = None,
    reasoning: str | None = None,
    finish_reason: str | None = "stop",
    model: str = "fake-vlm",
    usage: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """A chat.completion body as vLLM/Ollama send it (extra reasoning fields only when given)."""
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if reasoning_content is not None:
        message["reasoning_content"] = reasoning_content
    if reasoning is not None:
        message["reasoning"] = reasoning
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}],
        "usage": dict(usage or {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}),
    }


def error_body(message: str, *, type_: str = "invalid_request_error", code: int | str | None = None) -> dict[str, Any]:
    """An error body in OpenAI's shape (Ollama's OpenAI layer uses it too)."""
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


class FakeVLM:
    """The server: ``start()``/``stop()`` (or a ``with`` block), ``enqueue()`` responses, read ``requests``."""

    def __init__(
        self,
        *,
        models: Iterable[str] = DEFAULT_MODELS,
        reply_json: Any = None,
        max_body_bytes: int | None = None,
        shape: Shape = "generic",
        latency_s: float = 0.0,
        capacity: int | None = None,
    ) -> None:
        #: Every chat answer not scripted takes this long, like a model at work (a long scan, a progress bar).
        self.latency_s = latency_s
        #: Like a batching GPU server: at most this many answers are worked on at once (each for its delay); the rest
        #: wait their turn, so latency is flat up to the capacity and grows past it. None: no limit.
        self.capacity = capacity
        self._slots = threading.Semaphore(capacity or 1)
        #: Listed by GET /v1/models; a chat request for another model gets Ollama's 404 (an empty list accepts any).
        self.models = list(models)
        #: Answer to every json_schema request while no scripted response is queued (None: derived from the schema).
        self.reply_json = reply_json
        #: Answer 413 when a request body is larger, like a gateway's cap.
        self.max_body_bytes = max_body_bytes
        #: Which real server this one behaves like (see the module docstring).
        self.shape: Shape = shape
        #: vllm: frames of each video_url the model kept, in arrival order.
        self.frames_seen: list[int] = []
        self._cond = threading.Condition()
        #: POST requests being answered right now, and the most there ever were at once.
        self.in_flight = 0
        self.peak_in_flight = 0
        #: Chat answers written out in full (a request dropped by ``stop()`` mid-answer is not one).
        self.answered = 0
        self._requests: list[Recorded] = []
        self._script: deque[Scripted] = deque()
        self._refused: list[Recorded] = []
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._port = 0

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def start(self) -> FakeVLM:
        if self._server is None:
            self._listen()
        return self

    def stop(self) -> None:
        """Stop serving; returns after every server thread has ended. Delayed responses are dropped unanswered."""
        self._close()

    def pause(self) -> None:
        """Close the listening socket (connections are refused) until ``resume()``; like ``stop()`` otherwise."""
        self._close()

    def resume(self) -> None:
        """Listen again on the same port."""
        if self._server is None:
            self._listen()

    def __enter__(self) -> FakeVLM:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _listen(self) -> None:
        server = _Server(("127.0.0.1", self._port), _Handler)
        server.fake = self
        self._port = server.server_address[1]
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, name="fakevlm")
        thread.daemon = True
        thread.start()
        self._server, self._thread = server, thread

    def _close(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None or thread is None:
            return
        server.closing.set()
        server.shutdown()
        server.server_close()  # joins the handler threads (block_on_close)
        thread.join()

    # -- what tests use ----------------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._port}/v1"

    @property
    def requests(self) -> list[Recorded]:
        with self._cond:
            return list(self._requests)

    @property
    def chat_requests(self) -> list[Recorded]:
        return [r for r in self.requests if r.method == "POST" and r.path.endswith("/chat/completions")]

    def enqueue(
        self,
        *,
        status: int = 200,
        json: Any = None,
        text: str | None = None,
        headers: Mapping[str, str] | None = None,
        content_type: str | None = None,
        delay_s: float = 0.0,
        disconnect: bool = False,
        path: str | None = None,
        mentions: str | None = None,
        hold: threading.Event | None = None,
        on_received: Callable[[], None] | None = None,
        on_answered: Callable[[], None] | None = None,
    ) -> None:
        """Queue one response for the next request (to ``path``, when given)."""
        if json is not None and text is not None:
            raise ValueError("give json or text, not both")
        item = Scripted(
            status=status,
            json=json,
            text=text,
            headers=dict(headers or {}),
            content_type=content_type,
            delay_s=delay_s,
            disconnect=disconnect,
            path=path,
            mentions=mentions,
            hold=hold,
            on_received=on_received,
            on_answered=on_answered,
        )
        with self._cond:
            self._script.append(item)

    def clear_script(self) -> None:
        """Drop the queued responses no request has taken."""
        with self._cond:
            self._script.clear()

    def wait_for_requests(self, n: int, timeout: float = 5.0) -> list[Recorded]:
        """Block until at least ``n`` requests have arrived; TimeoutError after ``timeout`` seconds."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._requests) >= n, timeout=timeout):
                raise TimeoutError(f"{len(self._requests)} of {n} requests arrived within {timeout} s")
            return list(self._requests)

    # -- used by the handler -----------------------------------------------------------------------------------

    def _record(self, request: Recorded) -> Scripted | None:
        with self._cond:
            self._requests.append(request)
            self._cond.notify_all()
            for i, item in enumerate(self._script):
                if (item.path is None or item.path == request.path) and (
                    item.mentions is None or item.mentions in request.prompt
                ):
                    del self._script[i]
                    return item
            return None

    @property
    def refused(self) -> list[Recorded]:
        """Chat requests answered 400 by the server's shape."""
        with self._cond:
            return list(self._refused)

    def _default(self, request: Recorded) -> Scripted:
        if request.method == "GET" and request.path == "/v1/models":
            data = [{"id": m, "object": "model", "created": 0, "owned_by": "fakevlm"} for m in self.models]
            return Scripted(json={"object": "list", "data": data})
        if request.method == "GET" and (answer := _ROOT_ROUTES.get((self.shape, request.path))) is not None:
            return Scripted(json=answer(self))
        if request.method != "POST" or request.path != "/v1/chat/completions":
            return Scripted(status=404, json=error_body(f"no route for {request.method} {request.path}"))
        body = request.json
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return Scripted(status=400, json=error_body("body must be a JSON object with messages"))
        model = body.get("model")
        if self.models and model not in self.models:
            return Scripted(status=404, json=error_body(f"model {model!r} not found, try pulling it first"))
        refusal = _SHAPE_CHECKS[self.shape](body) if self.shape in _SHAPE_CHECKS else None
        if refusal is not None:
            with self._cond:
                self._refused.append(request)
            return refusal
        summary = _summary(body["messages"])
        usage = None
        if self.shape != "generic":
            images, frames = _media_counts(body["messages"])
            if self.shape == "vllm":
                kept = [min(n, VLLM_MAX_FRAMES) for n in frames]
                kept = [n + n % 2 for n in kept]  # Qwen2-VL pairs frames: an odd count is padded with the last
                with self._cond:
                    self.frames_seen.extend(kept)
                frames = kept
            tokens = 10 + TOKENS_PER_IMAGE * (images + sum(frames))
            usage = {"prompt_tokens": tokens, "completion_tokens": 5, "total_tokens": tokens + 5}
        fmt = body.get("response_format") or {}
        if fmt.get("type") == "json_schema":
            data = self.reply_json
            if data is None:
                data = _example(fmt["json_schema"].get("schema") or {}, summary)
            content = json.dumps(data)
        else:
            content = summary
        return Scripted(json=chat_completion(content, model=str(model), usage=usage), delay_s=self.latency_s)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = True  # server_close() joins the handler threads
    allow_reuse_address = True  # resume() rebinds the port while old connections sit in TIME_WAIT
    fake: FakeVLM

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(address, handler)
        #: Set when the server closes: a delayed response stops waiting and is dropped.
        self.closing = threading.Event()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.0"
    # A safety net: no handler thread outlives a stuck socket by more than this.
    timeout = 10

    def do_GET(self) -> None:
        self._serve(b"")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        fake = self.server.fake
        with fake._cond:
            fake.in_flight += 1
            fake.peak_in_flight = max(fake.peak_in_flight, fake.in_flight)
        self._counted = True
        try:
            self._serve(body)
        finally:
            self._answered()

    def _answered(self) -> None:
        """The request leaves ``in_flight`` as its answer starts to go out: the client may send its next request the
        moment it has read this one's, before this handler has returned, and that is not one more in flight."""
        if getattr(self, "_counted", False):
            self._counted = False
            with self.server.fake._cond:
                self.server.fake.in_flight -= 1

    def _serve(self, body: bytes) -> None:
        fake = self.server.fake
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = None
        length = self.headers.get("Content-Length")
        request = Recorded(
            method=self.command,
            path=self.path,
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
            json=parsed,
            content_length=int(length) if length is not None else None,
        )
        item = fake._record(request)
        if item is None:
            if fake.max_body_bytes is not None and len(body) > fake.max_body_bytes:
                item = Scripted(
                    status=413,
                    text="<html><body><h1>413 Request Entity Too Large</h1></body></html>",
                    content_type="text/html",
                )
            else:
                item = fake._default(request)
        if item.on_received is not None:
            item.on_received()
        while item.hold is not None and not item.hold.wait(0.02):
            if self.server.closing.is_set():
                self.close_connection = True
                return  # closed while held: drop the connection without answering
        batched = item.delay_s and fake.capacity is not None and self.command == "POST"
        while batched and not fake._slots.acquire(timeout=0.02):
            if self.server.closing.is_set():
                self.close_connection = True
                return  # closed while queued: drop the connection without answering
        try:
            if item.delay_s and self.server.closing.wait(item.delay_s):
                self.close_connection = True
                return  # closed while waiting: drop the connection without answering
        finally:
            if batched:
                fake._slots.release()
        if item.disconnect:
            self.close_connection = True
            return
        if item.text is not None:
            payload = item.text.encode()
            content_type = item.content_type or "text/plain; charset=utf-8"
        else:
            payload = json.dumps(item.json).encode() if item.json is not None else b""
            content_type = item.content_type or "application/json"
        self._answered()
        self.send_response(item.status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Connection", "close")
        for name, value in item.headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)
        if self.command == "POST" and self.path == "/v1/chat/completions" and item.status == 200:
            with fake._cond:
                fake.answered += 1
        if item.on_answered is not None:
            self.wfile.flush()
            item.on_answered()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output clean


def _summary(messages: list[dict[str, Any]]) -> str:
    images = videos = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            images += sum(1 for p in content if p.get("type") == "image_url")
            videos += sum(1 for p in content if p.get("type") == "video_url")
    return f"saw {images} images and {videos} videos"


def _example(schema: Mapping[str, Any], summary: str, *, name: str = "") -> Any:
    """A value that fits a simple schema: first enum value, the summary for strings, one item for arrays."""
    if "enum" in schema:
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    type_ = schema.get("type", "object")
    if isinstance(type_, list):
        type_ = next((t for t in type_ if t != "null"), "null")
    if type_ == "object":
        props = schema.get("properties", {})
        return {key: _example(sub, summary, name=key) for key, sub in props.items()}
    if type_ == "array":
        return [_example(schema.get("items", {"type": "string"}), summary, name=name)]
    if type_ == "string":
        return summary if name in ("caption", "description", "summary") else f"{name or 'value'}-1"
    if type_ == "integer":
        return 1
    if type_ == "number":
        return 0.5
    if type_ == "boolean":
        return True
    return None


# ---------------------------------------------------------------------------------------------------------------
# Server shapes


def _user_parts(messages: list[Any]) -> list[Any]:
    parts: list[Any] = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            parts.extend(content)
    return parts


def _media_counts(messages: list[Any]) -> tuple[int, list[int]]:
    """(image parts, frames in each video_url part)."""
    images, frames = 0, []
    for part in _user_parts(messages):
        if not isinstance(part, dict):
            continue
        if part.get("type") == "image_url":
            images += 1
        elif part.get("type") == "video_url":
            url = (part.get("video_url") or {}).get("url", "")
            frames.append(len(url.partition(";base64,")[2].split(",")))
    return images, frames


def _ollama_error(message: str) -> Scripted:
    # middleware/openai.go: c.AbortWithStatusJSON(http.StatusBadRequest, NewError(http.StatusBadRequest, err.Error()))
    return Scripted(status=400, json=error_body(message))


_OLLAMA_IMAGE_TYPES = ("jpeg", "jpg", "png", "webp")


def _check_ollama(body: dict[str, Any]) -> Scripted | None:
    """ollama/ollama openai/openai.go, FromChatRequest: the content parts it accepts and its decodeImageURL."""
    for message in body["messages"]:
        content = message.get("content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, list):
            return _ollama_error("invalid message content type")
        for part in content:
            if not isinstance(part, dict):
                return _ollama_error("invalid message format")
            kind = part.get("type")
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    return _ollama_error("invalid message format")
            elif kind == "image_url":
                image = part.get("image_url")
                url = image.get("url") if isinstance(image, dict) else image
                if not isinstance(url, str):
                    return _ollama_error("invalid message format")
                if url.startswith(("http://", "https://")):
                    continue
                prefix = next((f"data:image/{t};base64," for t in _OLLAMA_IMAGE_TYPES
                               if url.startswith(f"data:image/{t};base64,")), None)  # fmt: skip
                if prefix is None:
                    return _ollama_error("invalid image input")
                try:
                    base64.b64decode(url[len(prefix) :], validate=True)
                except binascii.Error:
                    return _ollama_error("invalid image input")
            else:
                return _ollama_error("invalid message format")
    return None


@functools.cache
def _openai_validator() -> Any:
    """OpenAI's request schema, or None where ../shared/openai-spec is not there (a checkout on its own): the
    shape's own checks above still apply, and the tests that are about the schema skip."""
    import jsonschema
    import referencing

    if not OPENAI_SPEC.is_file():
        return None
    spec = json.loads(OPENAI_SPEC.read_text())
    uri = "urn:openai-spec"
    registry = referencing.Registry().with_resource(
        uri, referencing.Resource.from_contents(spec, default_specification=referencing.jsonschema.DRAFT202012)
    )
    schema = {"$ref": f"{uri}#/components/schemas/CreateChatCompletionRequest"}
    return jsonschema.Draft202012Validator(schema, registry=registry)


_OPENAI_IMAGE = re.compile(r"data:image/(png|jpeg|webp|gif);base64,")


def _check_openai(body: dict[str, Any]) -> Scripted | None:
    """OpenAI's request schema decides; its error names the first bad content part as OpenAI's does."""
    for i, message in enumerate(body["messages"]):
        content = message.get("content") if isinstance(message, dict) else None
        for j, part in enumerate(content if isinstance(content, list) else ()):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in ("text", "image_url", "input_audio", "file", "refusal"):
                refused = error_body(
                    f"Invalid value: {kind!r}. Supported values are: 'text', 'image_url', 'input_audio', "
                    "'refusal', 'audio', and 'file'.", code="invalid_value",
                )  # fmt: skip
                refused["error"]["param"] = f"messages[{i}].content[{j}].type"
                return Scripted(status=400, json=refused)
            if kind == "image_url":
                url = (part.get("image_url") or {}).get("url", "")
                if url.startswith("data:") and not _OPENAI_IMAGE.match(url):
                    return Scripted(status=400, json=error_body(
                        "You uploaded an unsupported image. Please make sure your image has of one the following "
                        "formats: ['png', 'jpeg', 'gif', 'webp'].", code="invalid_image_format"))  # fmt: skip
    validator = _openai_validator()
    errors = [] if validator is None else sorted(validator.iter_errors(body), key=lambda e: list(e.absolute_path))
    if errors:
        where = ".".join(str(p) for p in errors[0].absolute_path) or "body"
        return Scripted(status=400, json=error_body(f"Invalid request at {where}: {errors[0].message[:200]}"))
    return None


def _check_lmstudio(body: dict[str, Any]) -> Scripted | None:
    """LM Studio takes text and images (jpeg/png/webp data URLs); it answers {"error": "<words>"}."""
    for part in _user_parts(body["messages"]):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("text", "image_url"):
            return Scripted(status=400, json={"error": "Invalid 'content': 'content' objects must have a 'type' "
                                                       "field that is either 'text' or 'image_url'."})  # fmt: skip
        if kind == "image_url" and not re.match(r"data:image/(jpeg|png|webp);base64,", part["image_url"]["url"]):
            return Scripted(status=400, json={"error": "Invalid image: expected a base64 JPEG, PNG or WebP data URL"})
    return None


_SHAPE_CHECKS = {"ollama": _check_ollama, "openai": _check_openai, "lmstudio": _check_lmstudio}
_ROOT_ROUTES = {
    ("ollama", "/api/version"): lambda fake: {"version": "0.12.6"},
    ("vllm", "/version"): lambda fake: {"version": "0.11.0"},
    ("lmstudio", "/api/v0/models"): lambda fake: {
        "object": "list",
        "data": [{"id": m, "object": "model", "type": "vlm", "state": "loaded"} for m in fake.models],
    },
}
