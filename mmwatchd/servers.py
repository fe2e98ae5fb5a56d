"""What each kind of server takes, and what this endpoint has shown it takes (``video.mode: auto``, passthrough).

OpenAI-compatible servers differ in what a chat request may hold:

    server     video_url parts                     passthrough image data URLs        how it is known
    vLLM       yes (keeps the first 32 frames)     any Pillow opens                   GET /version at the root
    Ollama     no: 400 "invalid message format"    jpeg/jpg/png/webp, else 400         GET /api/version at the root
                                                   "invalid image input"
    LM Studio  no                                  jpeg/png/webp                       GET /api/v0/models at the root
    OpenAI     no: 400 invalid content part type   jpeg/png/webp, non-animated gif     its URL, api.openai.com
    other      learned: a video_url refused as a format error is sent again as images, and remembered;
               passthrough sends JPEG and PNG only (llama.cpp's server reads no WebP)

(Ollama: ``openai/openai.go``, ``FromChatRequest``, accepts only ``text`` and ``image_url`` parts and the data-URL
types above.) What is known is kept per endpoint (base URL and model) in memory and, when a store is given, in the
state database, so the one refused request it may take to learn is paid once, not once per start.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, Literal, Protocol
from urllib.parse import urlsplit

from mmwatchd.errors import StateError, safe_url
from mmwatchd.log import get_logger

if TYPE_CHECKING:
    from mmwatchd.model import EndpointConfig

__all__ = [
    "Capabilities",
    "EndpointKnowledge",
    "KnowledgeStore",
    "VideoDecision",
    "endpoint_knowledge",
    "image_mimes_for",
    "is_image_refusal",
    "is_video_format_refusal",
    "server_from_url",
]

log = get_logger()
ServerKind = Literal["ollama", "vllm", "lmstudio", "openai", "unknown"]

#: Passthrough data-URL types every vision server takes (llama.cpp's server, behind many "unknown" endpoints,
#: decodes with stb_image, which has no WebP).
COMMON_IMAGE_MIMES: frozenset[str] = frozenset({"image/jpeg", "image/png"})
_WEBP = COMMON_IMAGE_MIMES | {"image/webp"}
_IMAGE_MIMES: dict[str, frozenset[str]] = {
    "ollama": _WEBP,  # anything else: 400 "invalid image input"
    "lmstudio": _WEBP,
    "openai": _WEBP | {"image/gif"},  # non-animated GIF (passthrough never sends animated ones)
    "vllm": _WEBP | {"image/gif"},  # decoded by Pillow
}
#: What each identified server does with a ``video_url`` part (None: not known from its kind alone).
_TAKES_VIDEO_URL: dict[str, bool | None] = {"ollama": False, "lmstudio": False, "openai": False, "vllm": True}
_NAMES = {"ollama": "Ollama", "vllm": "vLLM", "lmstudio": "LM Studio", "openai": "OpenAI", "unknown": "unknown server"}


def server_from_url(base_url: str) -> ServerKind | None:
    """The servers that are known from their address alone."""
    host = (urlsplit(base_url).hostname or "").lower()
    if host == "api.openai.com":
        return "openai"
    return None


def image_mimes_for(server: str | None) -> frozenset[str]:
    return _IMAGE_MIMES.get(server or "", COMMON_IMAGE_MIMES)


# A refusal of the request's shape rather than of the file: what Ollama ("invalid message format"), OpenAI
# ("Invalid value: 'video_url'. Supported values are: 'text', 'image_url', ..."), LM Studio and gateways say when a
# content part's type is not theirs, and what vLLM says for a model that takes no video.
_FORMAT_WORDS = re.compile(
    r"video|message format|content part|content type|part type|'type'|\btype\b.*(?:supported|allowed|expected|invalid)"
    r"|(?:invalid|unsupported|unknown|unexpected)[^.]{0,40}(?:content|part|type)|modality",
    re.I,
)


def is_video_format_refusal(status: int | None, message: str) -> bool:
    """True when a request with a ``video_url`` part was refused for its shape (so images may go through)."""
    return status in (400, 415, 422) and bool(_FORMAT_WORDS.search(message))


# Ollama: "invalid image input"; OpenAI: "You uploaded an unsupported image", "Invalid image format"; llama.cpp:
# "failed to load image"; others: "image format not supported", "cannot identify image file".
# Not every 400 that names an image: "image too small" would be refused again once encoded.
_IMAGE_WORDS = re.compile(
    r"invalid image|unsupported image|image (?:input|format|type|data)|image/\w+|(?:load|decode|identify) (?:the )?image",
    re.I,
)


def is_image_refusal(status: int | None, message: str) -> bool:
    """True when a request was refused over an image's data (so the same image re-encoded may go through)."""
    return status in (400, 415, 422) and bool(_IMAGE_WORDS.search(message))


def root_url(base_url: str) -> str:
    """The server root: ``http://host:11434/v1`` → ``http://host:11434`` (servers answer /version etc. there)."""
    base = base_url.rstrip("/")
    return base[: -len("/v1")] if base.endswith("/v1") else base


@dataclass(frozen=True, slots=True, kw_only=True)
class Capabilities:
    """What an endpoint takes, and why that is believed."""

    server: str = "unknown"
    version: str = ""
    #: None until the server says so (by its kind) or answers a ``video_url`` request.
    video_url: bool | None = None
    #: Why ``video_url`` is what it is, as the sidecar's ``mode_reason`` says it.
    reason: str = ""
    #: Set when the server was asked what it is (so that is not asked again).
    identified: bool = False
    #: Image types the endpoint refused when passed through (they are encoded from then on).
    refused_mimes: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        name = _NAMES.get(self.server, self.server)
        return f"{name} {self.version}".strip()

    @property
    def image_mimes(self) -> frozenset[str]:
        return image_mimes_for(self.server) - set(self.refused_mimes)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> Capabilities | None:
        if not isinstance(data, dict):
            return None
        try:
            return cls(
                server=str(data.get("server") or "unknown"),
                version=str(data.get("version") or ""),
                video_url=data.get("video_url") if isinstance(data.get("video_url"), bool) else None,
                reason=str(data.get("reason") or ""),
                identified=bool(data.get("identified")),
                refused_mimes=tuple(str(m) for m in data.get("refused_mimes") or () if isinstance(m, str)),
            )
        except (TypeError, ValueError):
            return None


@dataclass(frozen=True, slots=True, kw_only=True)
class VideoDecision:
    """How to send a clip under ``mode: auto``; ``probe``: this request decides it (settle() it afterwards)."""

    mode: Literal["video_url", "images"]
    reason: str
    probe: bool = False


class KnowledgeStore(Protocol):
    """Where learned capabilities survive a restart (the state database)."""

    def endpoint_capabilities(self, key: str) -> dict[str, Any] | None: ...

    def remember_endpoint(self, key: str, capabilities: dict[str, Any]) -> None: ...


Identify = Callable[[], tuple[str, str]]


class EndpointKnowledge:
    """What one base URL's models take. Thread-safe; while it learns, one video request at a time asks.

    ``identify`` asks the server what it is (HTTP; called at most once per process, and not at all once the store
    knows); ``store`` keeps what is learned.
    """

    def __init__(
        self,
        base_url: str,
        *,
        identify: Identify | None = None,
        store: KnowledgeStore | None = None,
        wait_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.base_url = base_url
        self._identify = identify
        self.store = store
        self._wait_s = wait_s
        self._clock = clock
        self._cond = threading.Condition()
        self._known: dict[str, Capabilities] = {}
        self._probing: set[str] = set()
        self._identity: Capabilities | None = None

    def key(self, model: str) -> str:
        return f"{self.base_url} {model}"

    # -- reading -------------------------------------------------------------------------------------------------

    def known(self, model: str) -> Capabilities:
        """What is known now, without asking the server anything."""
        with self._cond:
            return self._lookup(model) or self._identity or self._from_url() or Capabilities()

    def asking(self, model: str) -> bool:
        """True while a request that decides whether ``model`` takes ``video_url`` is out (others wait for it)."""
        with self._cond:
            return self.key(model) in self._probing

    def image_mimes(self, model: str) -> frozenset[str]:
        """The image types passthrough may send to ``model``, from what is known: the server is not asked for a
        photo (a WebP goes encoded until a clip or ``check --endpoint`` has found out what the server is)."""
        return self.known(model).image_mimes

    def video_mode(self, model: str) -> VideoDecision:
        """How to send a clip to ``model`` now. Asks the server what it is once; while it is still unknown whether
        ``video_url`` is taken, one caller at a time gets ``probe=True`` and the others wait for its answer."""
        deadline = self._clock() + self._wait_s
        with self._cond:
            while True:
                caps = self._lookup(model)
                if caps is None or (caps.video_url is None and not caps.identified):
                    caps = self._identified(model)
                if caps.video_url is True:
                    return VideoDecision(mode="video_url", reason=caps.reason)
                if caps.video_url is False:
                    return VideoDecision(mode="images", reason=caps.reason)
                key = self.key(model)
                if key not in self._probing or self._clock() >= deadline:
                    self._probing.add(key)
                    return VideoDecision(
                        mode="video_url",
                        reason=f"{caps.label or 'the server'} did not say whether it takes video_url: tried it",
                        probe=True,
                    )
                self._cond.wait(timeout=min(1.0, max(0.01, deadline - self._clock())))

    # -- learning ------------------------------------------------------------------------------------------------

    def settle(self, model: str, decision: VideoDecision, *, accepted: bool | None, refusal: str = "") -> str:
        """Record the answer to a ``video_url`` request: ``accepted`` True (taken), False (refused for its format,
        ``refusal`` being the server's words), None (no verdict: busy, unreachable). Returns the reason to record."""
        with self._cond:
            key = self.key(model)
            self._probing.discard(key)
            base = self._lookup(model) or self._identity or self._from_url() or Capabilities()
            reason = decision.reason
            if accepted is True and base.video_url is not True:
                reason = "endpoint accepted video_url; learned"
                self._put(model, replace(base, video_url=True, reason=reason))
            elif accepted is False:
                reason = f"endpoint refused video_url ({refusal}); learned"
                self._put(model, replace(base, video_url=False, reason=reason))
            self._cond.notify_all()
            return reason

    def refuse_image(self, model: str, mime: str) -> None:
        """The endpoint refused a passed-through ``mime`` image: encode that type from now on."""
        with self._cond:
            base = self._lookup(model) or self._identity or self._from_url() or Capabilities()
            if mime not in base.refused_mimes:
                self._put(model, replace(base, refused_mimes=(*base.refused_mimes, mime)))

    def record(self, model: str, caps: Capabilities) -> None:
        """Store what a check found (``mmwatchd check --endpoint``)."""
        with self._cond:
            self._put(model, caps)
            self._cond.notify_all()

    # -- inside the lock -----------------------------------------------------------------------------------------

    def _lookup(self, model: str) -> Capabilities | None:
        key = self.key(model)
        caps = self._known.get(key)
        if caps is None and self.store is not None:
            try:
                caps = Capabilities.from_json(self.store.endpoint_capabilities(key))
            except StateError as exc:  # the state is a cache: without it, the endpoint is asked again
                log.warning("endpoint.state_unreadable", error=exc.message)
                caps = None
            if caps is not None:
                self._known[key] = caps
        return caps

    def _put(self, model: str, caps: Capabilities) -> None:
        key = self.key(model)
        self._known[key] = caps
        if self.store is not None:
            try:
                self.store.remember_endpoint(key, caps.to_json())
            except StateError as exc:  # kept in memory; the next start may have to learn it again
                log.warning("endpoint.state_unwritable", error=exc.message)

    def _from_url(self) -> Capabilities | None:
        server = server_from_url(self.base_url)
        if server is None:
            return None
        return Capabilities(
            server=server, video_url=_TAKES_VIDEO_URL.get(server), identified=True,
            reason=f"{_NAMES[server]} (known from its URL) does not take video_url",
        )  # fmt: skip

    def _identified(self, model: str) -> Capabilities:
        """Ask the server what it is (once per process), and keep the answer for ``model``."""
        if self._identity is None:
            self._identity = self._from_url()
        if self._identity is None:
            server, version = ("unknown", "")
            if self._identify is not None:
                server, version = self._identify()
            takes = _TAKES_VIDEO_URL.get(server)
            name = f"{_NAMES.get(server, server)} {version}".strip()
            if takes is None:
                reason = ""
            else:
                reason = f"{name} takes video_url" if takes else f"{name} does not take video_url"
            self._identity = Capabilities(
                server=server, version=version, video_url=takes, reason=reason, identified=True
            )
        previous = self._lookup(model)
        caps = self._identity
        if previous is not None and previous.video_url is not None:  # learned beats identified
            caps = replace(caps, video_url=previous.video_url, reason=previous.reason)
        self._put(model, caps)
        return caps


def endpoint_knowledge(
    endpoint: EndpointConfig, *, identify: Identify | None, store: KnowledgeStore | None
) -> EndpointKnowledge:
    """What ``endpoint`` takes, for its client: a request waiting for another's ``video_url`` probe waits as long as
    that request may take (each of its retries) and half a minute more. Cheap: nothing is asked until a clip is."""
    return EndpointKnowledge(
        safe_url(endpoint.base_url),
        identify=identify,
        store=store,
        wait_s=endpoint.timeout_s * (endpoint.max_retries + 1) + 30,
    )
