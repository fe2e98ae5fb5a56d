"""Prompt and hook templates: ``{name}`` placeholders from a fixed set, checked when the config loads.

Templates are rendered by a restricted formatter: no attribute or index access, no conversions or format specs, so a
template can never reach into Python objects; ``{{`` and ``}}`` are literal braces.
"""

from __future__ import annotations

import string
from collections.abc import Mapping

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


def check_template(template: str, *, extra: tuple[str, ...] = ()) -> str:
    """Validate a template; raises ValueError naming the bad placeholder (pydantic reports it at the key).

    ``extra``: placeholders allowed beyond the prompt's (hooks also get ``{sidecar}`` and ``{status}``).
    """
    for field_name in template_fields(template):
        if field_name not in PLACEHOLDERS and field_name not in extra:
            allowed = ", ".join("{" + p + "}" for p in (*PLACEHOLDERS, *extra))
            raise ValueError(
                f"unknown placeholder {{{field_name}}}; allowed: {allowed} (write {{{{ for a literal brace)"
            )
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


def render(template: str, placeholders: Mapping[str, object]) -> str:
    """Fill a validated template with each placeholder's value, inserted as text and never re-parsed."""
    out: list[str] = []
    for literal, field_name, _spec, _conv in _FORMATTER.parse(template):
        out.append(literal)
        if field_name is not None:
            value = placeholders.get(field_name, "")
            out.append("" if value is None else str(value))
    return "".join(out)
