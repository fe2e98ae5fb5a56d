"""Logging: structlog to stderr, readable on a terminal and JSON lines otherwise (journald, files, pipes)."""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable
from typing import IO, Literal

import structlog

Format = Literal["auto", "console", "json"]


def setup(level: str = "info", *, fmt: Format = "auto", stream: IO[str] | None = None) -> None:
    """Configure structlog once for the process (the CLI calls this; library code only calls ``get_logger``)."""
    out = stream or sys.stderr
    use_console = fmt == "console" or (fmt == "auto" and out.isatty())
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer(colors=out.isatty()) if use_console else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info if not use_console else structlog.dev.set_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.WriteLoggerFactory(_Sink(out)),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )


class _Sink:
    """The log's stream, or while a progress bar is drawn on it, the bar's way of writing a line above itself.

    structlog's WriteLogger hands over each line whole (message and newline in one write), so a line is never
    split around a redraw of the bar.
    """

    def __init__(self, out: IO[str]) -> None:
        self.out = out

    def write(self, text: str) -> None:
        through = _route
        if through is None:
            self.out.write(text)
        else:
            through(text)

    def flush(self) -> None:
        self.out.flush()


_route: Callable[[str], None] | None = None
_route_lock = threading.Lock()


def route(writer: Callable[[str], None] | None) -> None:
    """Send every log line to ``writer`` (a progress bar's), or with None, to the log's stream again."""
    global _route  # noqa: PLW0603 - one route for the whole process, swapped under its lock
    with _route_lock:
        _route = writer


def get_logger(**initial: object) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(**initial)  # type: ignore[no-any-return]
