"""The request body, exactly as it goes on the wire, and how long it is; redaction of data URLs for logs.

Pure functions of a :class:`~mmwatchd.model.VLMRequest`, free of the HTTP client: the pipeline sizes and plans
requests with them without loading the openai SDK (:mod:`mmwatchd.vlm` sends them).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from .model import VLMRequest

__all__ = [
    "PartType",
    "budget_for_parts",
    "build_body",
    "build_messages",
    "plain",
    "redact",
    "redact_text",
    "request_bytes",
]

PartType = Literal["image_url", "video_url"]

# ---------------------------------------------------------------------------------------------------------------
# Request building (pure)


def build_messages(req: VLMRequest, *, with_payload: bool = True) -> list[dict[str, Any]]:
    """The chat messages: an optional system message, then one user message: the prompt, then the parts in order.

    ``with_payload=False`` puts ``""`` for every URL (for size arithmetic and logs).
    """
    content: list[dict[str, Any]] = [{"type": "text", "text": _clean_text(req.prompt)}]
    for part in req.parts:
        content.append({"type": part.type, part.type: {"url": part.url() if with_payload else ""}})
    messages: list[dict[str, Any]] = []
    if req.system:
        messages.append({"role": "system", "content": _clean_text(req.system)})
    messages.append({"role": "user", "content": content})
    return messages


def build_body(req: VLMRequest, *, with_payload: bool = True) -> dict[str, Any]:
    """Exactly the JSON body sent to ``/chat/completions``."""
    body: dict[str, Any] = {
        "model": req.model,
        "messages": build_messages(req, with_payload=with_payload),
        "max_tokens": req.max_tokens,
    }
    if req.temperature is not None:
        body["temperature"] = req.temperature
    if req.schema:
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": req.schema_name, "schema": plain(req.schema)},
        }
    return body


# Why this is an upper bound of the Content-Length the SDK sends (openai 3.57, httpx2 2.16):
# `_base_client._build_request` serialises the body with `_utils._json.openapi_dumps`, i.e.
# `json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()` (UTF-8), and httpx2 sends
# those bytes as they are, with a Content-Length (request bodies are not compressed). The SDK's `maybe_transform`
# drops only omitted arguments, so the dict it serialises equals `build_body(req)` (tests/test_vlm.py checks the
# received JSON). Compare that with default `json.dumps` (ensure_ascii=True, separators ", " and ": ") token by token:
#   - keys, numbers, literals and structure are identical; every separator is one byte longer here;
#   - ASCII characters are escaped identically in both modes (`\"`, `\\`, `\n`, `\u00XX` for controls);
#   - a non-ASCII code point is 2-4 bytes of UTF-8 there, but 6 bytes (`\uXXXX`) or, outside the BMP, 12 bytes
#     (a surrogate pair) here; lone surrogates never reach either (`_clean_text`), as UTF-8 cannot encode them;
#   - each URL is "" here and its exact length is added instead: a data URL is ASCII (`data:<mime>;base64,`, the
#     base64 alphabet, commas between frames) and JSON escapes none of it (Python does not escape "/").
# So request_bytes() >= the real length, and the excess is one byte per separator plus a few bytes per non-ASCII
# character: noise next to the image payloads the budget is about.


def request_bytes(req: VLMRequest) -> int:
    """An upper bound of the HTTP body length for ``req``, without building any base64."""
    return _json_len(build_body(req, with_payload=False)) + sum(part.url_len for part in req.parts)


def budget_for_parts(
    req: VLMRequest,
    max_request_bytes: int,
    *,
    pending: Sequence[PartType] = ("image_url",),
) -> int:
    """How many data-URL bytes the ``pending`` parts (not yet encoded) may use in total.

    ``req.parts`` are the parts already fixed (e.g. a rule's reference images); ``pending`` names the types of the
    parts still to come, in order, so their JSON wrappers are counted. The result may be negative: the request is
    already over ``max_request_bytes`` by that much without them.
    """
    body = build_body(req, with_payload=False)
    user = body["messages"][-1]["content"]
    user.extend({"type": kind, kind: {"url": ""}} for kind in pending)
    return max_request_bytes - _json_len(body) - sum(part.url_len for part in req.parts)


def _json_len(obj: Any) -> int:
    # Default separators and ensure_ascii on purpose: see the note above request_bytes().
    return len(json.dumps(obj).encode())


_SURROGATE = re.compile("[\ud800-\udfff]")


def _clean_text(text: str) -> str:
    # A file name that is not valid UTF-8 reaches a prompt as lone surrogates (surrogateescape); the SDK's UTF-8
    # body encoding would fail on them, so each becomes U+FFFD.
    return _SURROGATE.sub("\ufffd", text)


def plain(obj: Any) -> Any:
    """Plain dicts/lists/cleaned strings: the SDK's json.dumps cannot serialise a MappingProxyType or frozen mapping."""
    if isinstance(obj, Mapping):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [plain(v) for v in obj]
    if isinstance(obj, str):
        return _clean_text(obj)
    return obj


# ---------------------------------------------------------------------------------------------------------------
# Redaction

_DATA_URL = re.compile(r"data:([\w.+-]+/[\w.+-]+);base64,([A-Za-z0-9+/=,]*)")


def redact_text(text: str) -> str:
    return _DATA_URL.sub(lambda m: f"data:{m[1]};base64,…({len(m[2])} bytes)", text)


def redact(obj: Any) -> Any:
    """A deep copy with every ``data:<mime>;base64,<payload>`` replaced by ``data:<mime>;base64,…(<N> bytes)``.

    N is the length of the payload text as sent. Data URLs inside longer strings (error messages) are caught too.
    """
    if isinstance(obj, str):
        return redact_text(obj)
    if isinstance(obj, Mapping):
        return {k: redact(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(redact(v) for v in obj)
    return copy.deepcopy(obj)
