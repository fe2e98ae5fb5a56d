"""Outputs as a family: a new output is one class implementing :class:`mmwatchd.outputs.Output`, and the pipeline,
the done-index and ``status`` take it up with no edit of their own."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from configs import write_config
from fakevlm import FakeVLM
from media import make_jpeg

from mmwatchd import outputs
from mmwatchd.cli import main
from mmwatchd.config import load as load_config
from mmwatchd.sidecar import locate
from mmwatchd.xmp import XmpOutput


class TextFile:
    """A caption beside the photo, ``IMG_1.jpg.txt``: the smallest output there is."""

    name = "txt"

    def __init__(self) -> None:
        self.written: list[Path] = []

    def where(self, media: Path) -> Path:
        return media.with_name(media.name + ".txt")

    def wants(self, answer: str) -> bool:
        return answer == "ok"

    def present(self, media: Path) -> bool:
        return self.where(media).exists()

    def fresh(self, record: Mapping[str, Any]) -> bool:
        return "txt" in record

    def write(self, media: Path, record: dict[str, Any]) -> None:
        self.where(media).write_text(record["response"]["text"], encoding="utf-8")
        self.written.append(media)
        record["txt"] = {"path": str(self.where(media))}

    def preview(self, media: Path) -> dict[str, Any]:
        return {"path": str(self.where(media))}

    def follow(self, old: Path, new: Path) -> tuple[str, ...]:
        self.where(old).rename(self.where(new))
        return ()


def test_the_outputs_implement_the_interface(tmp_path: Path) -> None:
    cfg_path = write_config(tmp_path, base_url="http://127.0.0.1:9/v1", sidecar={"xmp": {}, "dir": str(tmp_path / "m")})
    cfg = load_config(cfg_path)
    found: tuple[outputs.Output, ...] = outputs.configured(cfg)
    assert [type(o) for o in found] == [XmpOutput]
    media = tmp_path / "inbox" / "IMG_1.jpg"
    record: outputs.Output = outputs.JsonSidecar(cfg)
    assert record.where(media) == locate(media, suffix=".json", mirror=tmp_path / "m", roots=[tmp_path / "inbox"])
    assert found[0].where(media) == media.with_name("IMG_1.jpg.xmp")
    assert not found[0].wants("error") and found[0].wants("ok")


def test_a_new_output_needs_no_edit_of_the_pipeline_index_or_status(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    txt = TextFile()
    with FakeVLM() as fake:
        cfg = write_config(tmp_path, base_url=fake.base_url)
        photo = make_jpeg(tmp_path / "inbox" / "IMG_1.jpg", (64, 48))
        assert main(["scan", "-c", str(cfg)]) == 0
        assert not txt.where(photo).exists()

        # Turned on later: the done-index no longer vouches for the file, and the pipeline writes the new output from
        # the answer on record, without a request.
        monkeypatch.setattr(outputs, "configured", lambda config, vocabularies=None: (txt,))
        assert main(["scan", "-c", str(cfg)]) == 0
        record = json.loads(photo.with_name("IMG_1.jpg.json").read_text())
        assert txt.where(photo).read_text(encoding="utf-8") == record["response"]["text"]
        assert record["txt"] == {"path": str(txt.where(photo))}
        assert len(fake.chat_requests) == 1 and txt.written == [photo]

        capsys.readouterr()
        assert main(["status", "-c", str(cfg), "--json"]) == 0
        counts = json.loads(capsys.readouterr().out)["roots"][str(tmp_path / "inbox")]
        assert (counts["done"], counts["txt"]) == (1, 1)
        assert main(["scan", "-c", str(cfg)]) == 0
        assert txt.written == [photo]  # up to date
