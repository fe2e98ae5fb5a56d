"""Pure rule logic: which rule a file gets, which watch root holds it, and the fingerprint of what was asked.

Prompts are rendered by :mod:`mmwatchd.templates`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from mmwatchd.globs import any_match
from mmwatchd.model import EndpointConfig, ImageSpec, Rule, VideoSpec
from mmwatchd.templates import render as render  # pipeline renders prompts as ``rules.render``

#: Bumped whenever the way a request is built changes in a way that changes answers.
REQUEST_FORMAT = 1


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
