"""Frozen values passed between stages. Payload bytes never appear in a repr."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

MediaKind = Literal["image", "video"]
ImageFormat = Literal["jpeg", "png", "webp"]

MIME_BY_FORMAT: dict[str, str] = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}


def b64_len(n_bytes: int) -> int:
    """Length of the base64 text for ``n_bytes`` of data (padded, no newlines)."""
    return 4 * ((n_bytes + 2) // 3)


def data_url_prefix(mime: str) -> str:
    return f"data:{mime};base64,"


def data_url_len(mime: str, n_bytes: int) -> int:
    """Exact length of ``data:<mime>;base64,<...>`` for ``n_bytes`` of payload."""
    return len(data_url_prefix(mime)) + b64_len(n_bytes)


@dataclass(frozen=True, slots=True, kw_only=True)
class ImageSpec:
    """How a rule wants images encoded."""

    max_side: int = 1536
    max_pixels: int = 2_500_000
    format: ImageFormat = "jpeg"
    quality: int = 85
    #: The budget search never goes below this JPEG/WebP quality before it scales down instead.
    min_quality: int = 50
    #: Send the original bytes when they are already small enough and in a format every server takes.
    passthrough: bool = True
    #: Colour transparent areas are flattened onto for formats without alpha.
    background: tuple[int, int, int] = (255, 255, 255)


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Hard limits that keep a hostile file from exhausting the machine."""

    max_pixels: int = 200_000_000
    max_file_bytes: int = 2_000_000_000


@dataclass(frozen=True, slots=True, kw_only=True)
class Part:
    """One content part of a request: an image, or (``video_url``) several frames in one data URL."""

    type: Literal["image_url", "video_url"] = "image_url"
    mime: str
    #: One payload for an image; the frames, in order, for a ``video_url`` part.
    chunks: tuple[bytes, ...] = field(repr=False)
    width: int
    height: int
    #: Where the payload came from: "original" (sent untouched), "encoded", or "reference".
    origin: str = "encoded"
    #: Encoder quality used, when it applies.
    quality: int | None = None

    @property
    def bytes(self) -> int:
        return sum(len(c) for c in self.chunks)

    @property
    def url_len(self) -> int:
        """Exact length of :meth:`url` without building it."""
        n = len(data_url_prefix(self.mime)) + sum(b64_len(len(c)) for c in self.chunks)
        return n + max(0, len(self.chunks) - 1)  # commas between frames

    def url(self) -> str:
        return data_url_prefix(self.mime) + ",".join(base64.b64encode(c).decode("ascii") for c in self.chunks)

    def describe(self) -> dict[str, object]:
        """What the sidecar and ``--dry-run`` record about this part."""
        return {
            "type": self.type,
            "mime": self.mime,
            "width": self.width,
            "height": self.height,
            "bytes": self.bytes,
            "url_bytes": self.url_len,
            "origin": self.origin,
            **({"quality": self.quality} if self.quality is not None else {}),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class ImageFacts:
    """What a cheap look at an image (header only, no pixel decode) tells."""

    format: str  # Pillow's format name: "JPEG", "PNG", "HEIF", ...
    width: int  # as displayed, i.e. after EXIF orientation
    height: int
    taken: str = ""  # EXIF DateTimeOriginal as "YYYY-MM-DD HH:MM:SS", or ""
    frames: int = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class EndpointConfig:
    """Where and how to call the model."""

    base_url: str = "http://127.0.0.1:11434/v1"
    model: str = "qwen2.5vl:7b"
    #: Name of the environment variable holding the API key (the key itself never sits in the config).
    api_key_env: str | None = "OPENAI_API_KEY"
    concurrency: int = 4
    timeout_s: float = 120.0
    #: Cap on the whole HTTP request body, JSON included.
    max_request_bytes: int = 20_000_000
    max_tokens: int = 512
    temperature: float | None = None
    #: Retries the openai SDK makes itself for connection errors, 408/409/429 and 5xx.
    max_retries: int = 2


@dataclass(frozen=True, slots=True, kw_only=True)
class WatchRoot:
    """One watched folder."""

    path: Path
    recursive: bool = True
    include: tuple[str, ...] = ("**/*",)
    exclude: tuple[str, ...] = ()
    #: Use the polling observer (NFS/SMB/container mounts deliver no inotify events).
    polling: bool = False
    poll_interval_s: float = 5.0


@dataclass(frozen=True, slots=True, kw_only=True)
class VLMRequest:
    """Everything one chat-completions call needs."""

    model: str
    system: str | None
    prompt: str
    parts: tuple[Part, ...]
    max_tokens: int
    temperature: float | None = None
    #: JSON schema for the reply; sent as ``response_format`` and used to validate the answer.
    schema: Mapping[str, Any] | None = None
    schema_name: str = "description"


@dataclass(frozen=True, slots=True, kw_only=True)
class Reply:
    """What came back."""

    text: str
    data: Any = None  # parsed JSON when the request had a schema
    model: str
    finish_reason: str | None = None
    usage: Mapping[str, Any] | None = None
    latency_s: float = 0.0
    #: "content", or "reasoning_content" when the server put the answer only there.
    source: str = "content"
    #: How many calls it took (a reply that was not valid JSON is asked for once more).
    attempts: int = 1
