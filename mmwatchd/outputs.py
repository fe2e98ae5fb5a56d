"""What is written for a file from its answer: the outputs, one small interface for all of them.

The JSON sidecar is the first output and the record: it is claimed, reserved and committed by the pipeline (see
:mod:`mmwatchd.sidecar`), and every other output is judged from it (``fresh``). The others are written from the answer
before the record is committed, so one write records how each of them went. A new output is one new class that
implements :class:`Output`, made by :func:`configured` from its config; the pipeline writes, refreshes, previews and
moves every configured output, and the done-index and ``status`` ask each whether it is there.

The XMP sidecar (:class:`mmwatchd.xmp.XmpOutput`) is loaded only when configured: lxml stays out of the daemon
otherwise. The search index (:mod:`mmwatchd.search`) is not an output of an answer but an index of the JSON records:
it needs the record as written (it is keyed by the sidecar's size and mtime) and where an action moved it, so the
daemon adds each record once it is written, and every search refreshes the index from the records first.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from mmwatchd.done import Answer
from mmwatchd.model import Config
from mmwatchd.sidecar import locate

if TYPE_CHECKING:
    from mmwatchd.vocabulary import Vocabulary


class Output(Protocol):
    """One thing written for a file from its answer."""

    #: Its key in the JSON record, in ``once --dry-run`` and in ``status`` counts.
    name: str

    def where(self, media: Path) -> Path:
        """Where ``media``'s output goes."""
        ...

    def wants(self, answer: Answer) -> bool:
        """Whether a file with this answer gets this output (an error sidecar has no caption to write)."""
        ...

    def present(self, media: Path) -> bool:
        """Whether it is there: a look at the folder, nothing read (the done-index and ``status``, per file)."""
        ...

    def fresh(self, record: Mapping[str, Any]) -> bool:
        """Whether the JSON ``record`` says it was written for this answer and needs no new try."""
        ...

    def write(self, media: Path, record: dict[str, Any]) -> None:
        """Write it atomically from the answer in ``record``, and note in ``record`` how that went. Never raises for
        a problem of its own: the JSON record must still be written."""
        ...

    def preview(self, media: Path) -> dict[str, Any]:
        """What ``once --dry-run`` shows of it: where, what is there now, what a write would set."""
        ...

    def follow(self, old: Path, new: Path) -> tuple[str, ...]:
        """Move it along when ``move_to`` moved its file from ``old`` to ``new``; the problems, for the outcome."""
        ...


class JsonSidecar:
    """The JSON sidecar: the record. Written through a claim and a reservation by the pipeline, moved by the
    actions, and judged by :func:`mmwatchd.done.is_done`; this is where it goes and whether it is there."""

    name = "json"

    def __init__(self, config: Config) -> None:
        self.suffix = config.sidecar.suffix
        self.mirror = config.sidecar.dir
        self.roots = [r.path for r in config.watch]

    def where(self, media: Path) -> Path:
        return locate(media, suffix=self.suffix, mirror=self.mirror, roots=self.roots)

    def wants(self, answer: Answer) -> bool:
        return True

    def present(self, media: Path) -> bool:
        return self.where(media).exists()

    def fresh(self, record: Mapping[str, Any]) -> bool:
        return True  # it is the record

    def write(self, media: Path, record: dict[str, Any]) -> None:
        from mmwatchd.sidecar import write

        write(self.where(media), record)

    def preview(self, media: Path) -> dict[str, Any]:
        return {"path": str(self.where(media))}

    def follow(self, old: Path, new: Path) -> tuple[str, ...]:
        return ()  # the actions move it with its file (mmwatchd.actions)


def configured(config: Config, vocabularies: Mapping[str, Vocabulary] | None = None) -> tuple[Output, ...]:
    """The outputs written from the answer besides the JSON record, as ``config`` asks for them. ``vocabularies``
    (rule name → its keyword vocabulary) only matter for writing."""
    found: list[Output] = []
    if config.sidecar.xmp is not None:
        from mmwatchd.xmp import XmpOutput

        found.append(XmpOutput(config.sidecar.xmp, config.rules, vocabularies or {}))
    return tuple(found)
