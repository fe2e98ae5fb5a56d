"""Frozen values: the whole config (every spec the YAML fills in) and what passes between stages.

Payload bytes never appear in a repr. config.py reads the YAML into these classes and reports what is wrong with it.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from annotated_types import Ge, Gt, Le, MinLen

from mmwatchd.globs import compile_glob
from mmwatchd.templates import check_template

MediaKind = Literal["image", "video"]
ImageFormat = Literal["jpeg", "png", "webp"]

# Config values are validated by pydantic straight from these dataclasses (see config.py): the constraints below are
# the only place they are stated, and an unknown key is an error, never silently ignored. They are annotated_types
# markers, which pydantic reads, so that importing this module does not import pydantic.
_STRICT = {"extra": "forbid"}
Positive = Annotated[int, Gt(0)]
PositiveFloat = Annotated[float, Gt(0)]
Byte = Annotated[int, Ge(0), Le(255)]


@dataclass(frozen=True, slots=True)
class _Before:
    """``Annotated`` marker: pydantic runs ``fn`` on the raw value before its own validation (pydantic's
    ``BeforeValidator``, without importing pydantic here)."""

    fn: Callable[[Any], Any]

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> Any:
        from pydantic_core import core_schema

        return core_schema.no_info_before_validator_function(self.fn, handler(source))


@dataclass(frozen=True, slots=True)
class _After:
    """``Annotated`` marker: pydantic runs ``fn`` on the validated value; a ValueError is reported at the key
    (pydantic's ``AfterValidator``, without importing pydantic here)."""

    fn: Callable[[Any], Any]

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> Any:
        from pydantic_core import core_schema

        return core_schema.no_info_after_validator_function(self.fn, handler(source))


@dataclass(frozen=True, slots=True)
class _Pattern:
    """``Annotated[str, _Pattern(regex)]``: the whole string must match (pydantic's ``Field(pattern=...)``)."""

    regex: str

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> Any:
        schema = handler(source)
        if schema.get("type") != "str":
            raise TypeError(f"_Pattern applies to str fields, not {schema.get('type')}")
        return {**schema, "pattern": self.regex}


def _http_url(value: str) -> str:
    if not value.startswith(("http://", "https://")) or len(value) < 10:
        raise ValueError("must be an http:// or https:// URL, like http://127.0.0.1:11434/v1")
    return value.rstrip("/")


class HttpUrl:
    """``Annotated[str, HttpUrl]``: an http(s) URL, trailing slashes dropped, checked when pydantic validates.

    pydantic finds the hook below by name; pydantic itself is imported only by the config loader, not by every process
    that uses these types (the decoder processes never validate a config).
    """

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> Any:
        from pydantic_core import core_schema

        return core_schema.no_info_after_validator_function(_http_url, handler(source))


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

    __pydantic_config__ = _STRICT

    max_side: Annotated[int, Ge(16)] = 1536
    max_pixels: Annotated[int, Ge(256)] = 2_500_000
    format: ImageFormat = "jpeg"
    quality: Annotated[int, Ge(1), Le(100)] = 85
    #: The budget search never goes below this JPEG/WebP quality before it scales down instead.
    min_quality: Annotated[int, Ge(1), Le(100)] = 50
    #: Send the original bytes when they are already small enough and in a format the endpoint takes.
    passthrough: bool = True
    #: Passthrough images keep their EXIF/XMP/GPS/comments (off: those segments are cut out losslessly before
    #: sending; the pixels' coded bytes are untouched). Re-encoded images never carry metadata.
    keep_metadata: bool = False
    #: Colour transparent areas are flattened onto for formats without alpha.
    background: tuple[Byte, Byte, Byte] = (255, 255, 255)
    #: Camera RAW files: "preview" decodes the camera's embedded JPEG when it is large enough (fast, the camera's
    #: colours), "demosaic" always develops the raw sensor data (half size) with the camera's white balance.
    raw: Literal["preview", "demosaic"] = "preview"


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Hard limits that keep a hostile file from exhausting the machine."""

    __pydantic_config__ = _STRICT

    max_pixels: Positive = 200_000_000
    max_file_bytes: Positive = 2_000_000_000
    #: Longer videos are refused (None: any length).
    max_duration_s: PositiveFloat | None = None
    #: Decoding runs in a separate process; one that takes longer than this is stopped and the file fails.
    decode_timeout_s: PositiveFloat = 120.0
    #: Memory (heap) a decoding process may use before the file fails as too large.
    decode_memory_mb: Annotated[int, Ge(64)] = 2048

    @property
    def decoders(self) -> dict[str, Any]:
        """The decoder processes' limits, as :class:`mmwatchd.isolate.Isolator` and its ``set_limits`` take them."""
        return {"timeout_s": self.decode_timeout_s, "memory_bytes": self.decode_memory_mb * 2**20}


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


def _concurrency(value: object) -> object:
    """``concurrency``: a number of requests, or ``auto`` (one message, where a union would give two)."""
    if value == "auto":
        return value
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(
            f"must be a whole number of requests in flight, or auto, got {value!r}"
        )  # pydantic reports ValueErrors
    if not 1 <= value <= 256:
        bound = "greater than or equal to 1" if value < 1 else "less than or equal to 256"
        raise ValueError(f"must be {bound}, got {value} (or auto, to find the server's capacity)")
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class EndpointConfig:
    """Where and how to call the model."""

    __pydantic_config__ = _STRICT

    base_url: Annotated[str, HttpUrl] = "http://127.0.0.1:11434/v1"
    model: str = "qwen2.5vl:7b"
    #: Name of the environment variable holding the API key (the key itself never sits in the config). None by
    #: default: a key that happens to be in the shell (``OPENAI_API_KEY``) must not go to whatever ``base_url`` says,
    #: a LAN server over plain HTTP included, unless the config names it.
    api_key_env: str | None = None
    #: Or a file holding the key; it must not be readable by other users (chmod 600).
    api_key_file: Path | None = None
    #: Requests in flight at most, or ``auto``: found by measuring the server's latency (mmwatchd.limiter).
    concurrency: Annotated[int | Literal["auto"], _Before(_concurrency)] = 4
    #: With ``concurrency: auto``: the most it may find (and the worker threads); None: 32.
    max_concurrency: Annotated[int, Ge(1), Le(256)] | None = None
    timeout_s: PositiveFloat = 120.0
    #: Cap on the whole HTTP request body, JSON included.
    max_request_bytes: Annotated[int, Ge(1024)] = 20_000_000
    max_tokens: Positive = 512
    temperature: Annotated[float, Ge(0), Le(2)] | None = None
    #: Retries the openai SDK makes itself for connection errors, 408/409/429 and 5xx.
    max_retries: Annotated[int, Ge(0), Le(10)] = 2
    #: Requests started per minute at most (None: no limit). Paid APIs and shared servers want this.
    requests_per_minute: Annotated[int, Ge(1)] | None = None
    #: Requests per calendar day at most (local time); work pauses until midnight once reached.
    max_requests_per_day: Annotated[int, Ge(1)] | None = None
    #: A file whose requests the server answered with 408/409/5xx (or that timed out) this many times gets an
    #: error sidecar instead of another try. Unreachable endpoints and 429s never count: they pause work instead.
    max_attempts: Annotated[int, Ge(1), Le(1000)] = 8
    #: Frames the server looks at in one ``video_url`` at most (vLLM's default keeps the first 32 and drops the
    #: rest); frames are spread over the whole clip within it. None: the server has no such limit.
    max_video_frames: Annotated[int, Ge(1), Le(512)] | None = 32


@dataclass(frozen=True, slots=True, kw_only=True)
class NamedEndpoint(EndpointConfig):
    """One of several endpoints (``endpoints:``): the settings of ``endpoint:``, a name, and a priority tier."""

    __pydantic_config__ = _STRICT

    #: What rules, status, metrics and sidecars call it.
    name: Annotated[str, MinLen(1), _Pattern(r"^[\w.-]+$")]
    #: Lower is better: an endpoint of a higher number takes requests only while every endpoint of the better tiers
    #: (that the file's rule may use) is down, paused, out of today's requests or saturated.
    priority: Annotated[int, Ge(0), Le(1000)] = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class WatchRoot:
    """One watched folder."""

    __pydantic_config__ = _STRICT

    path: Path
    recursive: bool = True
    include: tuple[str, ...] = ("**/*",)
    exclude: tuple[str, ...] = ()
    #: Use the polling observer (NFS/SMB/container mounts deliver no inotify events).
    polling: bool = False
    poll_interval_s: PositiveFloat = 5.0
    #: Create the folder when it is missing (off by default: a missing mount point should be an error, not a new
    #: empty folder on the root filesystem).
    create: bool = False
    #: Follow symlinks that point outside this folder (off: a link may only point at a file inside it, so a link
    #: dropped into the folder can never make mmwatchd read and send a private file from elsewhere).
    follow_symlinks: bool = False


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
    #: The rule it is for (which endpoints may take it), and whether the rule names its model (else each endpoint
    #: of a pool is asked with its own). Neither is sent.
    rule: str | None = None
    rule_model: bool = False


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
    #: Which of several endpoints answered (None with a single ``endpoint:``).
    endpoint: str | None = None


#: ``auto``: ``video_url`` for endpoints that take it, ``images`` for the rest (see :mod:`mmwatchd.servers`).
VideoMode = Literal["auto", "video_url", "images", "file"]
SentVideoMode = Literal["video_url", "images", "file"]


@dataclass(frozen=True, slots=True, kw_only=True)
class VideoSpec:
    """How a rule wants videos (and, when it says so, animated images) sampled and sent."""

    __pydantic_config__ = _STRICT

    #: Frames to send at most; fewer for very short clips.
    frames: Annotated[int, Ge(1), Le(512)] = 16
    #: Sample at this rate instead of spreading ``frames`` over the clip; still capped by ``frames``.
    fps: PositiveFloat | None = None
    max_side: Annotated[int, Ge(16)] = 768
    #: Optional per-frame pixel cap (Qwen2.5-VL: 768*28*28 = 602112).
    max_pixels: Annotated[int, Ge(256)] | None = None
    mode: VideoMode = "auto"
    frame_format: Literal["jpeg", "png"] = "jpeg"
    quality: Annotated[int, Ge(1), Le(100)] = 80
    min_quality: Annotated[int, Ge(1), Le(100)] = 40
    #: Frame sides are rounded to multiples of this (28 for Qwen2/2.5-VL, which also wants an even frame count).
    align: Annotated[int, Ge(1), Le(256)] = 1
    #: Decode keyframes only: much faster on long clips, at the cost of exact timestamps.
    keyframes_only: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class VideoFacts:
    """What the container says about a clip (no full decode)."""

    container: str  # "mp4", "mov", "mkv", "webm", "avi", "gif", ...
    codec: str
    width: int  # as displayed, i.e. after rotation
    height: int
    rotation: int = 0  # degrees clockwise applied to reach the displayed orientation
    duration_s: float | None = None
    fps: float | None = None
    frame_count: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class SampledFrame:
    t: float  # seconds from the start of the clip
    width: int
    height: int
    bytes: int


@dataclass(frozen=True, slots=True, kw_only=True)
class EncodedVideo:
    """A clip ready to send: its parts, the frames they hold, the mode used and what was given up to fit."""

    parts: tuple[Part, ...]
    frames: tuple[SampledFrame, ...]
    mode: SentVideoMode
    facts: VideoFacts
    #: Human-readable, in the order applied, e.g. "quality 80 -> 52", "frame size 768 -> 512 px", "frames 16 -> 8".
    degradations: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class ActionSpec:
    """What to do with a file (and its sidecar) once it is done: drop-folder automation."""

    __pydantic_config__ = _STRICT

    #: Move the file and its sidecar into this folder (relative subfolders of recursive roots are kept).
    move_to: Path | None = None
    #: Run this program (argv list, no shell); placeholders as in prompts plus {sidecar} and {status}.
    exec: tuple[Annotated[str, MinLen(1)], ...] | None = None
    exec_timeout_s: PositiveFloat = 60.0


@dataclass(frozen=True, slots=True)
class LinearBudget:
    """Data-URL bytes available for a clip sent as ``n`` parts: each further part costs its JSON wrapper."""

    first: int
    per_part: int

    def __call__(self, n: int) -> int:
        return self.first - self.per_part * (n - 1)


# ---------------------------------------------------------------------------------------------------------------
# Rules and the whole config


def _as_tuple(value: object) -> object:
    return (value,) if isinstance(value, str) else value


def check_globs(patterns: tuple[str, ...]) -> tuple[str, ...]:
    for p in patterns:
        compile_glob(p)  # ValueError becomes a config error at this key
    return patterns


def _valid_schema(schema: dict[str, Any]) -> dict[str, Any]:
    import jsonschema  # only the config loader validates schemas; decoder processes never need it

    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.exceptions.SchemaError as exc:
        raise ValueError(f"not a valid JSON schema: at {exc.json_path}: {exc.message}") from None
    return schema


Globs = Annotated[tuple[str, ...], _Before(_as_tuple), _After(check_globs)]


@dataclass(frozen=True, slots=True, kw_only=True)
class MatchSpec:
    __pydantic_config__ = _STRICT

    kind: Literal["image", "video", "any"] = "any"
    #: Patterns relative to the watch root (see globs.py); a file outside every root is matched by its name.
    glob: Globs = ("**/*",)


def _xmp_prefix(value: str) -> str:
    from mmwatchd.vocabulary import split_prefix

    levels = split_prefix(value)  # ValueError: reported at the key
    return "/".join(levels) + "/" if levels else ""


def _vocabulary_file(value: Path) -> Path:
    """The file must parse: its problems are config problems, reported when the config is checked, not per photo."""
    from mmwatchd.errors import ConfigError
    from mmwatchd.vocabulary import load

    try:
        load(value)
    except ConfigError as exc:
        raise ValueError("; ".join(exc.problems)) from None
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class XmpSpec:
    """``sidecar.xmp``: also write an XMP sidecar that photo apps read (the JSON sidecar stays the record)."""

    __pydantic_config__ = _STRICT

    #: Key of the reply object that holds the caption (rules with a schema); a rule without a schema gives its whole
    #: reply text. None: never write a description.
    description: Annotated[str, MinLen(1)] | None = "caption"
    #: Key of the reply object that holds the keywords: a list of strings, or one comma-separated string. None: no
    #: keywords.
    keywords: Annotated[str, MinLen(1)] | None = "tags"
    #: Put the model's own keywords under this hierarchy ("AI/" → AI|dog, AI/dog), to tell them from a person's.
    #: Keywords found in a rule's vocabulary keep the vocabulary's hierarchy instead.
    prefix: Annotated[str, _After(_xmp_prefix)] = ""
    #: "name": IMG_1.jpg.xmp (Immich, digiKam, darktable), or IMG_1.xmp when only that one exists (Lightroom);
    #: "stem": always IMG_1.xmp.
    naming: Literal["name", "stem"] = "name"


@dataclass(frozen=True, slots=True, kw_only=True)
class KeywordsSpec:
    """``rules[].keywords``: map the model's keywords onto the tags a person already uses."""

    __pydantic_config__ = _STRICT

    #: Text file, one keyword a line, hierarchy with '/', synonyms after ';' (Animals/Dog; dog, dogs, puppy).
    #: Offered to the model through the {vocabulary} prompt placeholder.
    vocabulary: Annotated[Path, _After(_vocabulary_file)]
    #: What becomes of keywords the vocabulary does not have: kept (under sidecar.xmp.prefix) or dropped.
    unknown: Literal["keep", "drop"] = "keep"


def split_listen(value: str) -> tuple[str, int]:
    """``host:port`` (``[::1]:9464`` for IPv6) as (host, port); ValueError says what is wrong."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port:
        raise ValueError(f"{value!r} is not host:port (for example 127.0.0.1:9464)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{value!r}: write an IPv6 address in brackets, as [::1]:9464")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r}: the port must be a number from 1 to 65535")
    if not host or any(c.isspace() for c in host):
        raise ValueError(f"{value!r}: the host is empty or has spaces")
    return host, int(port)


def _listen(value: str) -> str:
    split_listen(value)
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchSpec:
    """How ``mmwatchd backfill --batch`` cuts a backlog into Batch API shards and waits for them. OpenAI takes at
    most 50,000 requests and 200 MB per input file; base64 photos fill the bytes long before the lines."""

    __pydantic_config__ = _STRICT

    #: A shard's JSONL is at most this many bytes.
    max_file_bytes: Positive = 190_000_000
    #: ... and at most this many requests.
    max_requests: Annotated[int, Gt(0), Le(50_000)] = 50_000
    #: How often a running batch is asked how it is doing.
    poll_interval_s: PositiveFloat = 60.0


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricsSpec:
    """Where the service serves Prometheus ``/metrics``. Bound to loopback by default: the page says which rules
    and models are in use, which is nobody else's business."""

    __pydantic_config__ = _STRICT

    #: ``host:port`` to serve ``/metrics`` on (9464 is the port Prometheus' default-port list gives exporters).
    listen: Annotated[str, _After(_listen)] = "127.0.0.1:9464"


@dataclass(frozen=True, slots=True, kw_only=True)
class Rule:
    """What to ask about the files a rule matches; the first matching rule wins."""

    __pydantic_config__ = _STRICT

    name: Annotated[str, MinLen(1), _Pattern(r"^[\w.-]+$")]
    prompt: Annotated[str, MinLen(1), _After(check_template)]
    match: MatchSpec = MatchSpec()
    system: Annotated[str, _After(check_template)] | None = None
    #: JSON schema the reply must follow; sent as ``response_format`` (json_schema).
    schema: Annotated[dict[str, Any], _After(_valid_schema)] | None = None
    #: Overrides of the endpoint's defaults for this rule.
    model: Annotated[str, MinLen(1)] | None = None
    max_tokens: Annotated[int, Gt(0)] | None = None
    temperature: Annotated[float, Ge(0), Le(2)] | None = None
    image: ImageSpec = ImageSpec()
    #: How videos are sampled and sent. Animated GIF/WebP are sent as videos only when a rule sets this.
    video: VideoSpec | None = None
    #: Images sent before the file's own parts, in this order, with every request of this rule.
    reference_images: tuple[Path, ...] = ()
    #: What to do with the file and its sidecar once described, or once it failed for good.
    on_success: ActionSpec | None = None
    on_error: ActionSpec | None = None
    #: Map the model's keywords onto a person's own tags (and offer them through {vocabulary}).
    keywords: KeywordsSpec | None = None
    #: The ``endpoints:`` this rule may use, by name (none: every one).
    endpoints: tuple[Annotated[str, MinLen(1)], ...] = ()
    #: Describe again, once one of them is back, the files a lower priority tier than the best this rule may use
    #: answered (off: a fallback's answer counts as done).
    redo_fallback: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class SidecarConfig:
    __pydantic_config__ = _STRICT

    #: Appended to the media file's full name: IMG_1.jpg → IMG_1.jpg.json
    suffix: Annotated[str, _Pattern(r"^\.[A-Za-z0-9._-]+$")] = ".json"
    #: Write sidecars into this folder, under each media file's full path, instead of beside the media (for
    #: read-only photo folders): /srv/photos/a.jpg → <dir>/srv/photos/a.jpg.json. Files outside every watched
    #: folder go to its top level.
    dir: Path | None = None
    #: Also write an XMP sidecar beside the media, for photo apps (off unless set; ``xmp: {}`` for the defaults).
    xmp: XmpSpec | None = None


#: Where a value sits in the config: keys and list indexes from the top.
KeyPath = tuple[str | int, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    __pydantic_config__ = _STRICT

    #: The model endpoint. With ``endpoints:`` it is derived (see config.py): the first endpoint listed, with the
    #: smallest ``max_request_bytes`` and ``max_video_frames`` of them all, which is what files are encoded for.
    endpoint: EndpointConfig = EndpointConfig()
    #: Several endpoints, instead of ``endpoint:`` (see README, "Several endpoints").
    endpoints: tuple[NamedEndpoint, ...] = ()
    watch: tuple[WatchRoot, ...] = ()
    #: Quiet time before a file counts as complete.
    settle_s: Annotated[float, Ge(0), Le(3600)] = 2.0
    rules: Annotated[tuple[Rule, ...], MinLen(1)]
    sidecar: SidecarConfig = SidecarConfig()
    limits: Limits = Limits()
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    #: Full rescan of every watched folder this often, as a safety net for missed events (0: never).
    rescan_interval_s: Annotated[float, Ge(0)] = 600.0
    #: Where no terminal shows a progress bar (journald, CI, a pipe): a progress log line this often during a scan,
    #: ``once`` with several files, and the service's startup backlog (0: none).
    progress_interval_s: Annotated[float, Ge(0)] = 30.0
    #: Serve Prometheus /metrics (the service; ``scan --metrics-textfile`` writes the same to a file). Off unless set.
    metrics: MetricsSpec | None = None
    #: ``mmwatchd backfill --batch``: shard sizes and polling.
    batch: BatchSpec = BatchSpec()
    #: Where retry counters and history are kept (default: $STATE_DIRECTORY, else $XDG_STATE_HOME/mmwatchd).
    state_dir: Path | None = None
    #: Where the config came from, and where each key sits in it (for messages about values found later).
    source: Path | None = field(default=None, compare=False)
    positions: Mapping[KeyPath, tuple[int, int]] = field(default_factory=dict, compare=False, repr=False)

    def where(self, path: KeyPath) -> str:
        """``file:line:col: key.path`` for a key, as config errors print it."""
        return locate(self.source, self.positions, path)


#: The name of the single ``endpoint:`` (in metrics, status, logs, and what a rule's ``endpoints:`` may name).
DEFAULT_NAME = "default"


@dataclass(frozen=True, slots=True)
class Member:
    """One endpoint of the config: its name, its settings and its priority tier (lower is better)."""

    name: str
    spec: EndpointConfig
    priority: int = 0


def members(config: Config) -> tuple[Member, ...]:
    """The config's endpoints: the named ``endpoints:``, or the single ``endpoint:`` as one named "default"."""
    named = getattr(config, "endpoints", ())
    if not named:
        return (Member(DEFAULT_NAME, config.endpoint),)
    return tuple(Member(e.name, e, e.priority) for e in named)


def dotted(path: KeyPath) -> str:
    """``rules[0].prompt`` for ``("rules", 0, "prompt")``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def locate(source: Path | None, positions: Mapping[KeyPath, tuple[int, int]], path: KeyPath) -> str:
    """``file:line:col: key.path``, at the nearest enclosing key whose position is known."""
    name = str(source) if source else "<config>"
    for n in range(len(path), -1, -1):
        if path[:n] in positions:
            line, col = positions[path[:n]]
            return f"{name}:{line}:{col}: {dotted(path)}"
    return f"{name}: {dotted(path)}"
