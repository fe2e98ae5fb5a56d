"""Config files for tests: a real YAML file on disk, loaded the way the CLI loads it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from mmwatchd import config
from mmwatchd.model import Config


def write_config(folder: Path, *, base_url: str, inbox: Path | None = None, **changes: Any) -> Path:
    """Write ``folder/config.yaml`` pointing at ``base_url`` and watching ``inbox`` (default ``folder/inbox``).

    ``changes`` are top-level keys; a dict for ``endpoint`` or ``rule`` (the single rule) is merged into the
    defaults, so tests state only what they are about.
    """
    inbox = inbox or folder / "inbox"
    inbox.mkdir(parents=True, exist_ok=True)
    rule = {"name": "photos", "match": {"kind": "image"}, "prompt": "Describe {name} ({width}x{height})."}
    rule.update(changes.pop("rule", {}))
    doc: dict[str, Any] = {
        "endpoint": {
            "base_url": base_url,
            "model": "fake-vlm",
            "api_key_env": "MMWATCHD_TEST_KEY",
            "concurrency": 2,
            "timeout_s": 10,
            "max_retries": 0,
        },
        "watch": [{"path": str(inbox), "recursive": True}],
        "settle_s": 0.3,
        "rules": [rule],
        "state_dir": str(folder / "state"),
    }
    doc["endpoint"].update(changes.pop("endpoint", {}))
    if "endpoints" in changes:  # several named endpoints instead of the one
        del doc["endpoint"]
    doc.update(changes)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def load_config(folder: Path, **kw: Any) -> Config:
    return config.load(write_config(folder, **kw))
