"""Real sidecars for the search and gallery tests: files described by ``mmwatchd once`` against the fake VLM."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from configs import write_config
from fakevlm import FakeVLM, chat_completion

from mmwatchd.cli import main

#: The reply schema of the tests' rule: a caption and tags, as a photo-library prompt would ask for.
SCHEMA = {
    "type": "object",
    "properties": {"caption": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}}},
    "required": ["caption", "tags"],
}


def config(folder: Path, fake_vlm: FakeVLM, **changes: Any) -> Path:
    """A config whose rule asks for SCHEMA (its prompt names the file: each reply goes to its own file)."""
    rule = {"match": {"kind": "any"}, "schema": SCHEMA, **changes.pop("rule", {})}
    endpoint = {"concurrency": 1, **changes.pop("endpoint", {})}
    return write_config(folder, base_url=fake_vlm.base_url, rule=rule, endpoint=endpoint, **changes)


def describe(cfg: Path, fake_vlm: FakeVLM, replies: Mapping[Path, tuple[str, Sequence[str]]],
             failing: Sequence[Path] = ()) -> None:  # fmt: skip
    """Describe each file of ``replies`` with its (caption, tags), and the ``failing`` files (which get an error
    sidecar without a request), in one ``mmwatchd once``; then check every sidecar holds its own reply."""
    for path, (caption, tags) in replies.items():
        fake_vlm.enqueue(json=chat_completion(json.dumps({"caption": caption, "tags": list(tags)})),
                         path="/v1/chat/completions", mentions=path.name)  # fmt: skip
    files = [*replies, *failing]
    code = main(["once", "-c", str(cfg), "--log-level", "error", *map(str, files)])
    assert code == (1 if failing else 0)
    for path, (caption, _tags) in replies.items():
        doc = json.loads(path.with_name(path.name + ".json").read_text())
        assert doc["status"] == "ok" and doc["response"]["data"]["caption"] == caption, (path, doc)
    for path in failing:
        assert json.loads(path.with_name(path.name + ".json").read_text())["status"] == "error"
