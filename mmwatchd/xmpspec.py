"""Config values for XMP sidecars and controlled vocabularies (issue 12), ready to hook into the config.

``SidecarConfig.xmp: XmpSpec | None = None`` (off unless set; ``xmp: {}`` turns it on with the defaults) and
``Rule.keywords: KeywordsSpec | None = None``. Validated by pydantic straight from these dataclasses, like those in
:mod:`mmwatchd.model`: an unknown key is an error, and a bad vocabulary file is reported at its key with the file's
own ``file:line``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from annotated_types import MinLen
from pydantic import AfterValidator

from mmwatchd.model import _STRICT


def _prefix(value: str) -> str:
    from mmwatchd.xmp import split_prefix

    levels = split_prefix(value)  # ValueError: reported at the key
    return "/".join(levels) + "/" if levels else ""


def _vocabulary(value: Path) -> Path:
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
    prefix: Annotated[str, AfterValidator(_prefix)] = ""
    #: "name": IMG_1.jpg.xmp (Immich, digiKam, darktable), or IMG_1.xmp when only that one exists (Lightroom);
    #: "stem": always IMG_1.xmp.
    naming: Literal["name", "stem"] = "name"


@dataclass(frozen=True, slots=True, kw_only=True)
class KeywordsSpec:
    """``rules[].keywords``: map the model's keywords onto the tags a person already uses."""

    __pydantic_config__ = _STRICT

    #: Text file, one keyword a line, hierarchy with '/', synonyms after ';' (Animals/Dog; dog, dogs, puppy).
    #: Offered to the model through the {vocabulary} prompt placeholder.
    vocabulary: Annotated[Path, AfterValidator(_vocabulary)]
    #: What becomes of keywords the vocabulary does not have: kept (under sidecar.xmp.prefix) or dropped.
    unknown: Literal["keep", "drop"] = "keep"
