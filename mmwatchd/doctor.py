"""``mmwatchd check --endpoint``: what the configured endpoint takes, asked with a few tiny requests.

Rows, in order (each later row needs the ones before it to have worked):

    reachable         GET /models answers
    model listed      endpoint.model is among the models it lists
    server            what the server says it is (Ollama, vLLM, LM Studio; OpenAI by its URL)
    takes an image    one 56x56 JPEG
    takes video_url   4 frames; then 2 and max_video_frames + 2 frames, whose prompt tokens tell how many it kept
    json_schema       response_format: json_schema with a one-field schema
    largest request   endpoint.max_request_bytes first (a tiny PNG padded with a private chunk, which every PNG
                      decoder skips, so the model sees 16x16 pixels); on a refusal, halving towards the largest
                      accepted size, at most 6 requests in all

What it finds about video_url is stored as ``video.mode: auto`` would learn it. Exit codes: 0 everything the config
uses works, 1 something it uses does not (the row says what to change), 2 a config problem.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from mmwatchd.errors import VLMBadReply, VLMError, VLMRejected
from mmwatchd.model import Config, Part, Rule, VLMRequest, data_url_len
from mmwatchd.servers import Capabilities, is_video_format_refusal, server_from_url
from mmwatchd.wire import request_bytes

__all__ = ["Row", "check_endpoint", "render"]

#: Requests the size search may send at most.
MAX_SIZE_PROBES = 6
_PROMPT = "Reply with one word: the colour of the image."


@dataclass(frozen=True, slots=True)
class Row:
    name: str
    ok: bool | None  # None: not applicable / not tried
    result: str
    #: A failure here stops the config from working (exit 1).
    needed: bool = True


def _png(total: int) -> bytes:
    """A 16x16 grey PNG of exactly ``total`` bytes (at least its minimum size), padded with a private chunk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    head = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 16, 16, 8, 0, 0, 0, 0))
    tail = chunk(b"IDAT", zlib.compress((b"\x00" + b"\x80" * 16) * 16)) + chunk(b"IEND", b"")
    pad = max(0, total - len(head) - len(tail) - 12)
    return head + (chunk(b"mmWp", b"\x00" * pad) if pad else b"") + tail


def check_endpoint(
    cfg: Config, client: Any, *, pictures: Callable[[int], list[bytes]], rules: Sequence[Rule] | None = None
) -> list[Row]:
    """The rows of the check of ``cfg.endpoint``; ``client`` is a :class:`~mmwatchd.vlm.VLMClient`, ``pictures(n)``
    makes n JPEGs. ``rules``: those that send to this endpoint (all of the config's by default): what they use
    (video_url, a schema) is what a failure here matters for."""
    rules = cfg.rules if rules is None else rules
    endpoint = cfg.endpoint
    model = endpoint.model
    rows: list[Row] = []
    try:
        models = client.list_models()
    except VLMRejected as exc:  # a gateway without /models: requests will tell
        models = None
        rows.append(Row("reachable", True, f"yes, but GET /models is refused: {exc.message}", needed=False))
    except VLMError as exc:
        return [Row("reachable", False, f"no: {exc.message}")]
    else:
        rows.append(Row("reachable", True, f"yes (GET /models lists {len(models)} model(s))"))
    if models is not None:
        listed = model in models
        shown = ", ".join(models[:5]) + (", ..." if len(models) > 5 else "")
        rows.append(Row("model listed", listed, "yes" if listed else f"no: {model!r} is not among {shown or 'none'}"))
    server, version = ("openai", "") if server_from_url(endpoint.base_url) else client.identify()
    caps = Capabilities(server=server, version=version)
    rows.append(Row("server", None, caps.label if server != "unknown" else "did not say what it is", needed=False))

    frames = pictures(4)
    one = Part(mime="image/jpeg", chunks=(frames[0],), width=56, height=56)
    base = VLMRequest(model=model, system=None, prompt=_PROMPT, parts=(one,), max_tokens=16)

    def ask(req: VLMRequest) -> tuple[Any, VLMError | None]:
        try:
            return client.describe(req), None
        except VLMError as exc:
            return None, exc

    reply, error = ask(base)
    if error is not None:
        rows.append(Row("takes an image", False, f"no: {error.message}"))
        return rows
    rows.append(Row("takes an image", True, "yes"))

    # video_url
    explicit_video = any(r.video is not None and r.video.mode == "video_url" for r in rules)
    clip = Part(type="video_url", mime="video/jpeg", chunks=tuple(frames), width=56, height=56)
    reply, error = ask(replace(base, parts=(clip,)))
    knowledge = getattr(client, "knowledge", None)
    if error is None:
        seen = _frames_kept(ask, base, frames, reply, endpoint.max_video_frames, pictures)
        rows.append(Row("takes video_url", True, f"yes{seen}", needed=explicit_video))
        if knowledge is not None:
            knowledge.record(model, replace(caps, video_url=True, identified=True,
                                            reason="mmwatchd check --endpoint: takes video_url"))  # fmt: skip
    else:
        refused = isinstance(error, VLMRejected) and is_video_format_refusal(error.status, error.server_message)
        words = error.server_message if isinstance(error, VLMRejected) and error.server_message else error.message
        note = " (video.mode: auto sends frames as images)" if refused else ""
        rows.append(Row("takes video_url", False, f"no: {words}{note}", needed=explicit_video))
        if knowledge is not None and refused and isinstance(error, VLMRejected):
            knowledge.record(model, replace(caps, video_url=False, identified=True,
                                            reason=f"mmwatchd check --endpoint: refused video_url ({error.status} {words})"))  # fmt: skip

    # json_schema
    schema = {"type": "object", "properties": {"colour": {"type": "string"}}, "required": ["colour"]}
    uses_schema = any(r.schema for r in rules)
    reply, error = ask(replace(base, schema=schema, schema_name="check", max_tokens=64))
    if error is None:
        rows.append(Row("json_schema", True, "yes", needed=uses_schema))
    elif isinstance(error, VLMBadReply):
        rows.append(Row("json_schema", False, f"accepted, but the reply is not JSON that fits: {error.message}",
                        needed=uses_schema))  # fmt: skip
    else:
        rows.append(Row("json_schema", False, f"no: {error.message}", needed=uses_schema))

    rows.append(_largest(ask, base, endpoint.max_request_bytes))
    return rows


def _frames_kept(
    ask: Callable[[VLMRequest], tuple[Any, VLMError | None]],
    base: VLMRequest,
    frames: list[bytes],
    four: Any,
    limit: int | None,
    pictures: Callable[[int], list[bytes]],
) -> str:
    """``" (4 frames)"``, or how many of many frames the model kept, from the prompt tokens of 2, 4 and many."""

    def tokens(reply: Any) -> int | None:
        usage = getattr(reply, "usage", None) or {}
        value = usage.get("prompt_tokens")
        return value if isinstance(value, int) else None

    t4 = tokens(four)
    two, error = ask(replace(base, parts=(Part(type="video_url", mime="video/jpeg", chunks=tuple(frames[:2]),
                                                width=56, height=56),)))  # fmt: skip
    t2 = tokens(two) if error is None else None
    if t4 is None or t2 is None or t4 <= t2:
        return " (4 frames; the server does not report prompt tokens, so how many it keeps is unknown)"
    per_frame = (t4 - t2) / 2
    many = (limit or 32) + 2
    reply, error = ask(replace(base, parts=(Part(type="video_url", mime="video/jpeg", chunks=tuple(pictures(many)),
                                                  width=56, height=56),)))  # fmt: skip
    tm = tokens(reply) if error is None else None
    if tm is None:
        return f" (4 frames; {many} frames: {error.message if error else 'no token count'})"
    kept = round(2 + (tm - t2) / per_frame)
    if kept >= many:
        return f" (all {many} frames of {many} reach the model)"
    hint = "" if limit is not None and kept >= limit else f"; set endpoint.max_video_frames: {kept}"
    return f" (keeps {kept} of {many} frames{hint})"


def _largest(ask: Callable[[VLMRequest], tuple[Any, VLMError | None]], base: VLMRequest, cap: int) -> Row:
    """Send a request of exactly ``cap`` bytes; on a refusal, halve towards the largest size that is accepted."""
    empty = replace(base, parts=(Part(mime="image/png", chunks=(b"",), width=16, height=16),))
    overhead = request_bytes(empty) - data_url_len("image/png", 0)

    def at(total: int) -> tuple[bool, str]:
        payload = max(0, (total - overhead - len("data:image/png;base64,")) // 4 * 3)
        part = Part(mime="image/png", chunks=(_png(payload),), width=16, height=16)
        _, error = ask(replace(base, parts=(part,)))  # any refusal at this size (413, a reset connection) is a no
        if error is None:
            return True, ""
        said = error.server_message if isinstance(error, VLMRejected) and error.server_message else error.message
        status = getattr(error, "status", None)  # VLMUnavailable and VLMRejected carry one, when the server answered
        return False, f"HTTP {status}: {said}" if status else said

    ok, said = at(cap)
    if ok:
        return Row("largest request", True, f"{cap} bytes accepted (endpoint.max_request_bytes)")
    good, bad = 0, cap
    probes = 1
    while probes < MAX_SIZE_PROBES and bad - good > 1024:
        middle = (good + bad) // 2 if good else bad // 2
        ok, _ = at(middle)
        probes += 1
        if ok:
            good = middle
        else:
            bad = middle
    if good:
        return Row("largest request", False, f"{good} bytes accepted, {bad} refused ({said}): set "
                                              f"endpoint.max_request_bytes to at most {good}")  # fmt: skip
    return Row("largest request", False, f"{cap} bytes refused and {bad} too: {said}")


def render(base_url: str, model: str, rows: list[Row], *, name: str | None = None) -> str:
    """The check's table; ``name``: the endpoint's, in a config with several."""
    width = max(len(r.name) for r in rows)
    lines = [f"endpoint {name + ' ' if name else ''}{base_url}   model {model}"]
    for r in rows:
        mark = {True: "ok  ", False: "FAIL" if r.needed else "no  ", None: "    "}[r.ok]
        lines.append(f"{mark}  {r.name.ljust(width)}  {r.result}")
    return "\n".join(lines)
