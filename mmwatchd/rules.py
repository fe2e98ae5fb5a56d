"""Pure rule logic: which rule a file gets, the prompt it renders to, and the fingerprint of what was asked.

Prompts use ``{name}`` placeholders from a fixed set. They are rendered by a restricted formatter: no attribute or
index access, no conversions or format specs, so a prompt can never reach into Python objects; ``{{`` and ``}}`` are
literal braces.
"""

from __future__ import annotations

import hashlib
import json
import string
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from mmwatchd.globs import any_match
from mmwatchd.model import ImageSpec, VideoSpec

if TYPE_CHECKING:
    from mmwatchd.config import Rule
    from mmwatchd.model import EndpointConfig

#: Every placeholder a prompt may use, with what it holds.
PLACEHOLDERS: Mapping[str, str] = {
    "name": "file name with extension (IMG_1.jpg)",
    "stem": "file name without extension (IMG_1)",
    "ext": "extension without the dot, lower case (jpg)",
    "folder": "name of the folder holding the file",
    "path": "full path of the file",
    "relpath": "path relative to its watch root (or the name, outside any root)",
    "size_bytes": "file size in bytes",
    "kind": "image or video",
    "width": "width as displayed, in pixels",
    "height": "height as displayed, in pixels",
    "taken": "EXIF DateTimeOriginal as YYYY-MM-DD HH:MM:SS, or empty",
    "duration_s": "video length in seconds (empty for images)",
    "fps": "video frame rate (empty for images)",
    "frames": "number of video frames sent (empty for images)",
    "vocabulary": "the rule's keyword vocabulary (rules[].keywords), compact, for the model to choose from",
}

_FORMATTER = string.Formatter()

#: Bumped whenever the way a request is built changes in a way that changes answers.
REQUEST_FORMAT = 1


def check_template(template: str, *, extra: tuple[str, ...] = ()) -> str:
    """Validate a template; raises ValueError naming the bad placeholder (pydantic reports it at the key).

    ``extra``: placeholders allowed beyond the prompt's (hooks also get ``{sidecar}`` and ``{status}``).
    """
    for field_name in template_fields(template):
        if field_name not in PLACEHOLDERS and field_name not in extra:
            allowed = ", ".join("{" + p + "}" for p in (*PLACEHOLDERS, *extra))
            raise ValueError(f"unknown placeholder {{{field_name}}}; allowed: {allowed} (write {{{{ for a literal brace)")
    return template


def template_fields(template: str) -> list[str]:
    out: list[str] = []
    try:
        parsed = list(_FORMATTER.parse(template))
    except ValueError as exc:
        raise ValueError(f"{exc} (write {{{{ and }}}} for literal braces)") from None
    for _literal, field_name, spec, conversion in parsed:
        if field_name is None:
            continue
        if field_name == "" or not field_name.isidentifier():
            raise ValueError(
                f"placeholder {{{field_name}}} is not allowed: use a plain name like {{name}} "
                "(no positions, attributes or indexes)"
            )
        if spec or conversion:
            raise ValueError(f"placeholder {{{field_name}}} may not have a format spec or conversion")
        out.append(field_name)
    return out


def render(template: str, values: Mapping[str, object]) -> str:
    """Fill a validated template. Values are inserted as text and never re-parsed."""
    out: list[str] = []
    for literal, field_name, _spec, _conv in _FORMATTER.parse(template):
        out.append(literal)
        if field_name is not None:
            value = values.get(field_name, "")
            out.append("" if value is None else str(value))
    return "".join(out)


def rel_to_roots(path: Path, roots: Sequence[Path]) -> tuple[Path | None, str]:
    """The watch root holding ``path`` (deepest first) and the ``/``-separated path relative to it."""
    for root in sorted(roots, key=lambda r: len(r.parts), reverse=True):
        try:
            return root, path.relative_to(root).as_posix()
        except ValueError:
            continue
    return None, path.name


def match(rel_path: str, kind: str, rules: Sequence[Rule]) -> Rule | None:
    """The first rule whose kind and globs accept the file, or None."""
    for rule in rules:
        if rule.match.kind not in ("any", kind):
            continue
        if any_match(rel_path, rule.match.glob):
            return rule
    return None


def _file_identity(path: Path) -> list[object]:
    try:
        st = path.stat()
    except OSError:
        return [str(path), None, None]
    return [str(path), st.st_size, st.st_mtime_ns]


def fingerprint(rule: Rule, endpoint: EndpointConfig, kind: str = "image") -> str:
    """Hash of everything that would change the answer: prompt, system, schema, model, tokens, encoder settings.

    Video settings count for videos (and for images only when the rule sets them, since an animated image is then
    sent as a video), so tuning them does not send every photo again.
    """
    video = rule.video if kind == "image" else (rule.video or VideoSpec())
    cap = endpoint.max_video_frames
    material = {
        "format": REQUEST_FORMAT,
        "prompt": rule.prompt,
        "system": rule.system,
        "schema": rule.schema,
        "model": rule.model or endpoint.model,
        "max_tokens": rule.max_tokens or endpoint.max_tokens,
        "temperature": rule.temperature if rule.temperature is not None else endpoint.temperature,
        "image": _image_material(rule.image),
        "video": asdict(video) if video else None,
        # Only when the server's frame limit changes what is sent (frames over it).
        **({"max_video_frames": cap} if video and cap is not None and video.frames > cap else {}),
        # A reference image that is edited or replaced changes the answer too.
        "references": [_file_identity(p) for p in rule.reference_images],
        # Only rules that map keywords: an edited vocabulary changes what the model is offered and what is kept.
        **({"keywords": [_file_identity(rule.keywords.vocabulary), rule.keywords.unknown]} if rule.keywords else {}),
    }
    blob = json.dumps(material, sort_keys=True, separators=(",", ":"), default=str)
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()[:32]


def _image_material(spec: ImageSpec) -> dict[str, object]:
    """The image settings for the fingerprint. Settings added since fingerprints were first written (``raw``,
    ``keep_metadata``) count only when they are not the default, so an upgrade does not change every existing
    fingerprint and send every photo again."""
    material = asdict(spec)
    if material["raw"] == "preview":
        del material["raw"]
    if not material["keep_metadata"]:
        del material["keep_metadata"]
    return material

