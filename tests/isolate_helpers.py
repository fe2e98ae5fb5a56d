"""Functions for :class:`mmwatchd.isolate.Isolator` workers to run in tests.

They live in their own small module, not in the test module, so a worker imports only this (and what it imports),
not pytest and the test's fixtures. Workers find it because the parent's ``sys.path`` (which pytest extends with
``tests/``) is handed to every process the forkserver starts.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from mmwatchd.errors import DecodeError, MmwatchdError


def echo(*args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return args, kwargs


def square(x: int) -> int:
    return x * x


def pid() -> int:
    return os.getpid()


def blob(n: int) -> bytes:
    return b"x" * n


def raise_error(error: BaseException) -> None:
    raise error


def raise_decode_error(message: str) -> None:
    raise DecodeError(message)


def raise_value_error(message: str) -> None:
    raise ValueError(message)


def hang(marker: Path | None = None) -> None:
    if marker is not None:
        marker.touch()
    time.sleep(60)


def kill_self(signum: int) -> None:
    os.kill(os.getpid(), signum)
    time.sleep(10)  # signal delivery is asynchronous for some signals; never return normally


def abort() -> None:
    os.abort()


def exit_with(code: int) -> None:
    os._exit(code)


# bytes(n) is calloc'd: the pages are mapped but never touched, so these are quick. The memory limit (RLIMIT_DATA)
# counts mapped private memory, touched or not.


def allocate(n_bytes: int) -> int:
    return len(bytes(n_bytes))


def allocate_in_chunks(n_bytes: int, chunk: int) -> int:
    held = [bytes(chunk) for _ in range(n_bytes // chunk)]
    return sum(map(len, held))


def tracked(folder: Path, value: int, hold_s: float) -> tuple[int, int, int]:
    """``value²``, this worker's pid, and how many tracked calls were running meanwhile (this one included)."""
    mine = folder / f"{os.getpid()}-{value}"
    mine.touch()
    try:
        time.sleep(hold_s)
        running = len(list(folder.iterdir()))
    finally:
        mine.unlink()
    return value * value, os.getpid(), running


def sigterm_self() -> int:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.1)
    return os.getpid()


class TwoPartError(MmwatchdError):
    """An error whose ``__init__`` takes other arguments than its ``args``: it pickles but does not unpickle."""

    def __init__(self, name: str, why: str) -> None:
        super().__init__(f"{name}: {why}")
        self.why = why


def raise_two_part_error() -> None:
    raise TwoPartError("IMG_2.jpg", "the header lies")


def loaded_modules() -> set[str]:
    """Names of the modules this worker has imported."""
    import sys

    return set(sys.modules)


def memory_limit() -> int:
    """This worker's RLIMIT_DATA soft limit."""
    import resource

    return resource.getrlimit(resource.RLIMIT_DATA)[0]


def parent_maps(fragment: str) -> bool:
    """Whether this worker's parent (the forkserver) has a file mapped whose path contains ``fragment``."""
    import os

    with open(f"/proc/{os.getppid()}/maps") as maps:
        return any(fragment in line for line in maps)


def loaded(*modules: str) -> list[str]:
    """Which of ``modules`` this worker has imported (before its first call: inherited from the forkserver)."""
    import sys

    return [m for m in modules if m in sys.modules]
