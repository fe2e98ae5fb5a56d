"""mmwatchd: describe new photos and videos with an OpenAI-compatible vision model."""

from __future__ import annotations

from functools import cache

__all__ = ["__version__"]


@cache
def _version() -> str:
    # importlib.metadata costs about 50 ms of start-up: every command (and each decoder's forkserver) would pay for
    # it, while only --version, XMP packets and the metrics' build info need the answer.
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mmwatchd")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0.0.0+unknown"


def __getattr__(name: str) -> str:
    if name == "__version__":
        return _version()
    raise AttributeError(f"module 'mmwatchd' has no attribute {name!r}")
