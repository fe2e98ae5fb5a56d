"""The model call: the HTTP call, error translation, reply parsing (the body itself is built in :mod:`mmwatchd.wire`).

The only module that imports ``openai``. Everything the SDK raises is translated here, once:

    openai.APITimeoutError, APIConnectionError  → VLMUnavailable   (retry_after None)
    APIStatusError 408 / 409 / 429 / 5xx         → VLMUnavailable   (retry_after from Retry-After)
    APIStatusError other 4xx                     → VLMRejected      (401/403, 404 and 413 say what to change)
    200 that is not a chat completion            → VLMBadReply
    reply not JSON / not matching the schema     → asked once more, then VLMBadReply

Every ``VLMUnavailable`` raised here carries ``retry_after: float | None`` (seconds the server asked us to wait).
Messages name the endpoint and what to do; they never contain the API key or base64 payloads.
"""

from __future__ import annotations

import email.utils
import json
import math
import re
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

import openai

from .errors import VLMBadReply, VLMMisconfigured, VLMRejected, VLMUnavailable, clip, safe_url
from .model import EndpointConfig, Reply, VLMRequest
from .servers import EndpointKnowledge, KnowledgeStore, endpoint_knowledge, root_url
from .wire import build_body, plain, redact_text, request_bytes

__all__ = ["NO_KEY", "VLMClient"]

T = TypeVar("T")

#: Sent as the bearer token when no key is configured: the SDK insists on one, local servers ignore it.
NO_KEY = "sk-no-key-needed"

_SERVER_MESSAGE_CHARS = 300
_REPLY_SNIPPET_CHARS = 200

# ---------------------------------------------------------------------------------------------------------------
# Reply parsing (pure)


def _schema_problem(data: Any, schema: Mapping[str, Any]) -> str | None:
    # Imported here: jsonschema (with referencing and attrs) costs 75-100 ms at start-up, next to the SDK's import,
    # and only rules with a schema need it.
    import jsonschema

    schema = plain(schema)
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    error = jsonschema.exceptions.best_match(cls(schema).iter_errors(data))
    if error is None:
        return None
    return f"the reply does not match the schema: at {error.json_path}: {clip(error.message, _REPLY_SNIPPET_CHARS)}"


_THINK = re.compile(r"\A\s*<think>.*?</think>", re.S)
_WHOLE_FENCE = re.compile(r"\A```[\w-]*[ \t]*\n?(.*?)\n?```\Z", re.S)
_ANY_FENCE = re.compile(r"```[\w-]*[ \t]*\n(.*?)\n?```", re.S)


def _judge(text: str, schema: Mapping[str, Any] | None) -> tuple[Any, str | None]:
    """(parsed data or None, None) for a usable reply; (None, what is wrong) otherwise."""
    if not schema:
        return None, None if text.strip() else "the reply is empty"
    data, problem = _parse_json(text)
    if problem is None:
        problem = _schema_problem(data, schema)
    return data, problem


def _parse_json(text: str) -> tuple[Any, str | None]:
    """(data, None), or (None, what is wrong). Accepts ```/```json fences and a leading <think> block."""
    stripped = _THINK.sub("", text, count=1).strip()
    whole = _WHOLE_FENCE.match(stripped)
    try:
        return json.loads(whole.group(1) if whole else stripped), None
    except json.JSONDecodeError as exc:
        detail = f"{exc.msg} at line {exc.lineno} column {exc.colno}"
    except (ValueError, RecursionError) as exc:  # ints over sys.get_int_max_str_digits(), absurd nesting
        detail = str(exc) or type(exc).__name__
    embedded = None if whole else _ANY_FENCE.search(stripped)  # prose around one fenced block
    if embedded is not None:
        try:
            return json.loads(embedded.group(1)), None
        except (ValueError, RecursionError):
            pass
    return None, f"the reply is not valid JSON ({detail})"


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds from ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date), or None."""
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) / scale
        except ValueError:
            continue
        if math.isfinite(seconds):
            return max(0.0, seconds)
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


# ---------------------------------------------------------------------------------------------------------------
# The client


class RequestObserver(Protocol):
    """What :attr:`VLMClient.observer` is told about each HTTP request (see :class:`mmwatchd.metrics.Metrics`)."""

    def sent(self, nbytes: int) -> None: ...

    def answered(self, status: int) -> None: ...


class VLMClient:
    """One shared synchronous ``openai.OpenAI`` client (thread-safe) and the translation around it."""

    def __init__(
        self,
        endpoint: EndpointConfig,
        *,
        api_key: str | None,
        openai_client: openai.OpenAI | None = None,
        store: KnowledgeStore | None = None,
        knowledge: EndpointKnowledge | None = None,
    ) -> None:
        """``store``: where what the endpoint takes is remembered across restarts (the state database);
        ``knowledge``: what it takes, when it was made before the client (see :func:`endpoint_knowledge`)."""
        self.endpoint = endpoint
        self._api_key = api_key or None
        self._url = safe_url(endpoint.base_url)
        #: Called before every POST the SDK sends: each of its own retries and the JSON re-ask too, which is what a
        #: request cap must count. What it raises (an MmwatchdError) stops that request from leaving and comes out of
        #: :meth:`describe` as is. Only for a client made here: an injected SDK client has its own HTTP client.
        self.before_request: Callable[[], None] | None = None
        #: Told of every POST that leaves (``sent(body_bytes)``, after ``before_request`` let it) and of every
        #: answer's status line (``answered(status)``), on the sending thread: the metrics.
        self.observer: RequestObserver | None = None
        # An injected client belongs to the caller, who closes it.
        self._owns_client = openai_client is None
        self.counts_every_request = self._owns_client
        self._client = openai_client or openai.OpenAI(
            base_url=endpoint.base_url,
            # Never None: the SDK would fall back to $OPENAI_API_KEY and send that key to whatever server this is.
            api_key=api_key or NO_KEY,
            timeout=endpoint.timeout_s,
            max_retries=endpoint.max_retries,
            http_client=openai.DefaultHttpxClient(
                event_hooks={"request": [self._on_request], "response": [self._on_response]}
            ),
        )
        #: What this endpoint takes (``video.mode: auto``, passthrough types), asked for and learned.
        self.knowledge = knowledge or endpoint_knowledge(endpoint, identify=self.identify, store=store)

    def __repr__(self) -> str:
        return f"VLMClient({self._url!r}, model={self.endpoint.model!r})"

    def __enter__(self) -> VLMClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._owns_client:
            self._client.close()

    def _on_request(self, request: Any) -> None:
        # An httpx event hook: runs on the sending thread just before each request goes out.
        if request.method == "POST" and self.before_request is not None:
            self.before_request()
        if request.method == "POST" and self.observer is not None:
            self.observer.sent(int(request.headers.get("content-length") or 0))

    def _on_response(self, response: Any) -> None:
        # Runs once the status line and headers are in (the body is read after).
        if response.request.method == "POST" and self.observer is not None:
            self.observer.answered(response.status_code)

    def list_models(self) -> list[str]:
        """The model ids the endpoint serves (``GET /models``)."""
        try:
            raw = self._client.models.with_raw_response.list()
        except openai.APIStatusError as exc:
            raise self._status_error(exc, None) from exc
        except openai.APIConnectionError as exc:
            raise self._connection_error(exc) from exc
        data = self._read_json(raw, "/models")
        items = data.get("data") if isinstance(data, dict) else None
        if not isinstance(items, list):
            raise VLMBadReply(f"{self._url}/models answered without a model list: {self._snippet(json.dumps(data))}")
        return [str(item["id"]) for item in items if isinstance(item, dict) and "id" in item]

    def identify(self) -> tuple[str, str]:
        """(server kind, version) from what the server says about itself at its root: Ollama answers
        ``GET /api/version``, vLLM ``GET /version``, LM Studio ``GET /api/v0/models``; ("unknown", "") otherwise.

        Three short GETs without retries; a server that answers none of them is simply unknown (its answers to
        requests then tell what it takes)."""
        root = root_url(self.endpoint.base_url)
        version = self._get_json(f"{root}/api/version")
        if isinstance(version, dict) and isinstance(version.get("version"), str):
            return "ollama", version["version"]
        version = self._get_json(f"{root}/version")
        if isinstance(version, dict) and isinstance(version.get("version"), str):
            return "vllm", version["version"]
        models = self._get_json(f"{root}/api/v0/models")
        if isinstance(models, dict) and isinstance(models.get("data"), list):
            return "lmstudio", ""
        return "unknown", ""

    def _get_json(self, url: str) -> Any:
        try:
            content = self._client.get(
                url,
                cast_to=bytes,
                options={"max_retries": 0, "timeout": min(10.0, self.endpoint.timeout_s)},
            )
            return json.loads(content)
        except (openai.APIError, ValueError, RecursionError):
            return None

    def describe(self, req: VLMRequest) -> Reply:
        """Send ``req``; an unusable reply (empty, not JSON, not matching the schema) is asked for once more.

        ``latency_s`` covers every attempt.
        """
        body = build_body(req)  # built once: a second attempt reuses the base64
        started = time.monotonic()
        problem, text = "", ""
        for attempt in (1, 2):
            completion = self._create(body, req)
            text, source, finish_reason = self._answer(completion)
            data, wrong = _judge(text, req.schema)
            if wrong is None:
                usage = completion.get("usage")
                return Reply(
                    text=text,
                    data=data,
                    model=str(completion.get("model") or req.model),
                    finish_reason=finish_reason,
                    usage=dict(usage) if isinstance(usage, Mapping) else None,
                    latency_s=time.monotonic() - started,
                    source=source,
                    attempts=attempt,
                )
            problem = wrong
            if finish_reason == "length":
                problem += "; it was cut off at max_tokens (finish_reason=length): raise endpoint.max_tokens"
        raise VLMBadReply(
            f"model {req.model!r} at {self._url} gave an unusable reply twice: {problem}; "
            f"the reply began: {self._snippet(text)}"
        )

    # -- batches (the OpenAI Batch API; mmwatchd.backfill) ----------------------------------------------------------

    def reply_from(self, completion: Any, *, model: str, schema: Mapping[str, Any] | None) -> Reply:
        """A batch output line's chat completion as :meth:`describe` would have returned it. An unusable reply is
        VLMBadReply at once: there is no second ask inside a batch (the caller sends the file the online way)."""
        if not isinstance(completion, dict):
            raise VLMBadReply(f"a batch answered {self._snippet(json.dumps(completion))}, not a chat completion")
        text, source, finish_reason = self._answer(completion)
        data, wrong = _judge(text, schema)
        if wrong is not None:
            raise VLMBadReply(f"model {model!r} at {self._url} gave an unusable reply in a batch: {wrong}")
        usage = completion.get("usage")
        return Reply(
            text=text, data=data, model=str(completion.get("model") or model), finish_reason=finish_reason,
            usage=dict(usage) if isinstance(usage, Mapping) else None, latency_s=0.0, source=source, attempts=1,
        )  # fmt: skip

    def error_from(self, status: int, body: Any) -> VLMUnavailable | VLMRejected:
        """A batch line's HTTP error (``status`` and the error object of its body) translated exactly as the same
        answer to an online request is (:meth:`_status_error`)."""
        error = body.get("error", body) if isinstance(body, Mapping) else body  # unwrapped, as the SDK does
        code = error.get("code") if isinstance(error, Mapping) else None
        said = self._server_message(error, "")
        return self._http_error(status, said, {}, code if isinstance(code, str) else None, None)

    def upload_batch(self, path: Path) -> str:
        """Upload a JSONL shard (``purpose: batch``); its file id."""
        with open(path, "rb") as f:
            uploaded = self._call(lambda: self._client.files.create(file=(path.name, f), purpose="batch"))
        return str(uploaded.id)

    def create_batch(self, file_id: str, *, metadata: Mapping[str, str]) -> dict[str, Any]:
        """Start a batch of chat completions over an uploaded shard, to be done within 24 hours."""
        batch = self._call(lambda: self._client.batches.create(
            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h", metadata=dict(metadata),
        ))  # fmt: skip
        return dict(batch.model_dump())

    def get_batch(self, batch_id: str) -> dict[str, Any]:
        return dict(self._call(lambda: self._client.batches.retrieve(batch_id)).model_dump())

    def cancel_batch(self, batch_id: str) -> dict[str, Any]:
        return dict(self._call(lambda: self._client.batches.cancel(batch_id)).model_dump())

    def file_content(self, file_id: str) -> bytes:
        """A file's bytes (a batch's output or error file)."""
        return bytes(self._call(lambda: self._client.files.content(file_id)).content)

    def _call(self, call: Callable[[], T]) -> T:
        try:
            return call()
        except openai.APIStatusError as exc:
            if exc.status_code in (404, 405):  # Ollama, LM Studio, a plain vLLM server: chat only
                refused = VLMRejected(self._scrub(
                    f"{self._url} has no Batch API (HTTP {exc.status_code} at {exc.request.url.path}): send the "
                    "backlog with mmwatchd scan, or export it for vllm run-batch (mmwatchd backfill --export DIR)"
                ))  # fmt: skip
                refused.status = exc.status_code
                raise refused from exc
            raise self._status_error(exc, None) from exc
        except openai.APIConnectionError as exc:
            raise self._connection_error(exc) from exc

    # -- one call ------------------------------------------------------------------------------------------------

    def _create(self, body: dict[str, Any], req: VLMRequest) -> dict[str, Any]:
        try:
            raw = self._client.chat.completions.with_raw_response.create(**body)
        except openai.APIStatusError as exc:
            raise self._status_error(exc, req) from exc
        except openai.APIConnectionError as exc:
            raise self._connection_error(exc) from exc
        data = self._read_json(raw, "/chat/completions")
        if not isinstance(data, dict):
            raise VLMBadReply(
                f"{self._url}/chat/completions answered {self._snippet(json.dumps(data))}, not a chat completion"
            )
        return data

    def _read_json(self, raw: Any, path: str) -> Any:
        # Parsed here rather than by the SDK, which returns a 200 that is not JSON as a plain str.
        response = raw.http_response
        try:
            return json.loads(response.content)
        except (ValueError, RecursionError) as exc:
            content_type = response.headers.get("content-type", "no content type")
            raise VLMBadReply(
                f"{self._url}{path} answered HTTP {response.status_code} with a body that is not JSON "
                f"({content_type}): {self._snippet(response.text)}. "
                "Is endpoint.base_url an OpenAI-compatible API (it usually ends in /v1)?"
            ) from exc

    def _answer(self, completion: dict[str, Any]) -> tuple[str, str, str | None]:
        """(text, where it came from, finish_reason) of the first choice."""
        choices = completion.get("choices")
        choice: Any = choices[0] if isinstance(choices, list) and choices else None
        message = choice.get("message") if isinstance(choice, dict) else None
        if not isinstance(message, dict):
            raise VLMBadReply(
                f"{self._url}/chat/completions answered without a message: {self._snippet(json.dumps(completion))}"
            )
        finish_reason = choice.get("finish_reason")
        finish_reason = str(finish_reason) if finish_reason is not None else None
        content = message.get("content")
        if isinstance(content, list):  # some servers answer with content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if isinstance(content, str) and content.strip():
            return content, "content", finish_reason
        # Reasoning models behind vLLM/DeepSeek (reasoning_content) or Ollama/OpenRouter (reasoning) may leave the
        # content empty and put everything in the reasoning field.
        for key in ("reasoning_content", "reasoning"):
            value = message.get(key)
            if isinstance(value, str) and value.strip():
                return value, key, finish_reason
        return content if isinstance(content, str) else "", "content", finish_reason

    # -- translation ---------------------------------------------------------------------------------------------

    def _connection_error(self, exc: openai.APIConnectionError) -> VLMUnavailable:
        if isinstance(exc, openai.APITimeoutError):
            message = (
                f"no answer from {self._url} within endpoint.timeout_s={self.endpoint.timeout_s:g} s: "
                "the model may be loading or overloaded; raise endpoint.timeout_s if it is just slow"
            )
        else:
            cause = f" ({exc.__cause__})" if exc.__cause__ is not None else ""
            message = (
                f"cannot reach the model endpoint {self._url}{cause}: "
                "start Ollama/vLLM (or whatever serves it) or set endpoint.base_url"
            )
        return self._unavailable(message, None)

    def _status_error(self, exc: openai.APIStatusError, req: VLMRequest | None) -> VLMUnavailable | VLMRejected:
        said = self._server_message(exc.body, exc.response.reason_phrase)
        return self._http_error(exc.status_code, said, exc.response.headers, exc.code, req)

    def _http_error(
        self, status: int, said: str, headers: Mapping[str, str], code: str | None, req: VLMRequest | None
    ) -> VLMUnavailable | VLMRejected:
        """An HTTP error answer (``said``: the server's words, ``code``: its error code), online or in a batch."""
        if status in (408, 409, 429) or status >= 500:
            retry_after = _retry_after(headers)
            wait = f"; the server asks to retry after {retry_after:g} s" if retry_after is not None else ""
            busy = f"endpoint {self._url} cannot take the request now (HTTP {status}): {said}{wait}"
            return self._unavailable(busy, retry_after, status)
        refused = f"endpoint {self._url} refused the request (HTTP {status}): {said}"
        return self._with_status(self._refusal(code, req, status, said, refused), status, said)

    @staticmethod
    def _with_status(error: VLMRejected | VLMMisconfigured, status: int, said: str) -> VLMRejected | VLMMisconfigured:
        if isinstance(error, VLMRejected):
            error.status = status
            error.server_message = said
        return error

    def _refusal(
        self, code: str | None, req: VLMRequest | None, status: int, said: str, refused: str
    ) -> VLMRejected | VLMMisconfigured:
        if status == 413:
            size = f" of about {request_bytes(req)} bytes" if req is not None else ""
            return VLMRejected(
                self._scrub(
                    f"{refused}. The request{size} is over the server's or a gateway's size limit: lower "
                    f"endpoint.max_request_bytes (now {self.endpoint.max_request_bytes}) below that limit"
                )
            )
        if status in (401, 403):
            env = self.endpoint.api_key_env
            if env is None:
                hint = "Set endpoint.api_key_env to the environment variable holding the key"
            elif self._api_key is None:
                hint = f"${env} is not set: put the key there"
            else:
                hint = f"Check the key in ${env}"
            return self._misconfigured(f"{refused}. {hint}", status)
        if status == 404 and req is not None and ("model" in said.lower() or code == "model_not_found"):
            return self._misconfigured(
                f"model {req.model!r} not found at {self._url} (HTTP 404): {said}. Pull it "
                f"(`ollama pull {req.model}`) or check endpoint.model / the rule's model",
                status,
            )
        if status == 404 and req is not None:
            return self._misconfigured(f"{refused}. Check endpoint.base_url (it usually ends in /v1)", status)
        if status == 404:  # some gateways have no /models: the server is up, requests will tell
            return VLMRejected(self._scrub(f"{refused}. Check endpoint.base_url (it usually ends in /v1)"))
        return VLMRejected(self._scrub(refused))

    def _unavailable(self, message: str, retry_after: float | None, status: int | None = None) -> VLMUnavailable:
        error = VLMUnavailable(self._scrub(message))
        error.retry_after = retry_after
        error.status = status
        return error

    def _misconfigured(self, message: str, status: int) -> VLMMisconfigured:
        error = VLMMisconfigured(self._scrub(message))
        error.status = status
        return error

    def _server_message(self, body: object, reason_phrase: str) -> str:
        """The server's own words: the error body's message, clipped, without payloads or the key. ``body`` as the
        SDK gives it: OpenAI's {"error": {...}} already unwrapped."""
        said: str | None = None
        if isinstance(body, Mapping):
            for key in ("message", "detail", "error", "msg"):
                value = body.get(key)
                if isinstance(value, str) and value.strip():
                    said = value
                    break
                if value:  # FastAPI's validation list, a nested object
                    said = json.dumps(value)
                    break
            else:
                said = json.dumps(body)
        elif isinstance(body, str) and body.strip():
            said = re.sub(r"<[^>]*>", " ", body) if body.lstrip().startswith("<") else body
        if not said:
            said = reason_phrase or "no message"
        return self._snippet(said, limit=_SERVER_MESSAGE_CHARS, quote=False)

    def _snippet(self, text: str, *, limit: int = _REPLY_SNIPPET_CHARS, quote: bool = True) -> str:
        # Redact before clipping, so a clipped data URL cannot escape the pattern.
        clipped = clip(self._scrub(" ".join(redact_text(text).split())), limit)
        return repr(clipped) if quote else clipped

    def _scrub(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text
