"""What the running service publishes about its endpoints for ``mmwatchd status``, which runs in another process:
each endpoint's state and requests in flight, in a small JSON file in the state directory, replaced every few
seconds while the service runs. A view, not a record: nothing else reads it."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

#: The file, in the state directory.
LIVE_FILE = "endpoints.json"


def publish(folder: Path, rows: list[dict[str, object]]) -> None:
    """Write the endpoints' state (aside, then renamed). A failure is not worth a word: the next refresh tries
    again, and the service's work does not depend on it."""
    path = folder / LIVE_FILE
    tmp = folder / f".{LIVE_FILE}.{os.getpid()}"
    try:
        tmp.write_text(json.dumps({"pid": os.getpid(), "at": time.time(), "endpoints": rows}))
        os.replace(tmp, path)
    except OSError:
        pass


def withdraw(folder: Path) -> None:
    """The service stops: what it published is no longer true."""
    try:
        doc = json.loads((folder / LIVE_FILE).read_text())
        if doc.get("pid") == os.getpid():
            (folder / LIVE_FILE).unlink()
    except (OSError, ValueError, AttributeError):
        pass


def published(folder: Path) -> list[dict[str, Any]] | None:
    """What a running service published; None when none runs (no file, or the process that wrote it is gone)."""
    try:
        doc = json.loads((folder / LIVE_FILE).read_text())
        pid = int(doc["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        os.kill(pid, 0)
    except PermissionError:
        pass  # it runs, under another user
    except OSError:
        return None
    rows = doc.get("endpoints")
    return rows if isinstance(rows, list) else None
