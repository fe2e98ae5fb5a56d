"""Logging: structlog to stderr, readable on a terminal and JSON lines otherwise (journald, files, pipes)."""

from __future__ import annotations

import logging
import sys
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
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )


def get_logger(**initial: object) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(**initial)  # type: ignore[no-any-return]
