"""XMP sidecars written by the pipeline, read back as photo apps read them.

A folder of JPEG, HEIC, RAW (DNG) and video files, some with an XMP sidecar a person already wrote, goes through
``mmwatchd scan`` twice with different prompts and answers. exiftool's MWG view is what Immich reads, ``exiv2 -px``
what digiKam and darktable read; the person's keywords, rating and description must all survive both runs.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from configs import write_config
from fakevlm import FakeVLM
from media import make_heic, make_jpeg, make_video
from test_raw import make_dng

from mmwatchd.cli import main

EXIFTOOL = shutil.which("exiftool")
EXIV2 = shutil.which("exiv2")
needs_tools = pytest.mark.skipif(
    EXIFTOOL is None or EXIV2 is None, reason="needs exiftool (libimage-exiftool-perl) and exiv2"
)

SCHEMA = {
    "type": "object",
    "properties": {"caption": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}}},
    "required": ["caption", "tags"],
}

#: A sidecar as a person's photo app leaves it: a rating, a label, their own keyword and description.
PERSONS = """<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>
<x:xmpmeta xmlns:x="adobe:ns:meta/">
 <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <rdf:Description rdf:about="" xmlns:xmp="http://ns.adobe.com/xap/1.0/" xmlns:dc="http://purl.org/dc/elements/1.1/"
    xmlns:lr="http://ns.adobe.com/lightroom/1.0/" xmp:Rating="5" xmp:Label="Red">
   <dc:description><rdf:Alt><rdf:li xml:lang="x-default">Grandma's birthday</rdf:li></rdf:Alt></dc:description>
   <dc:subject><rdf:Bag><rdf:li>Family</rdf:li></rdf:Bag></dc:subject>
   <lr:hierarchicalSubject><rdf:Bag><rdf:li>People|Family</rdf:li></rdf:Bag></lr:hierarchicalSubject>
  </rdf:Description>
 </rdf:RDF>
</x:xmpmeta>
<?xpacket end="w"?>
"""


def _config(tmp_path: Path, fake: FakeVLM, prompt: str, **sidecar: Any) -> Path:
    rule = {"name": "all", "match": {"kind": "any"}, "prompt": prompt, "schema": SCHEMA,
            "video": {"frames": 2, "max_side": 64}}  # fmt: skip
    return write_config(tmp_path, base_url=fake.base_url, rule=rule, sidecar={"xmp": {"prefix": "AI/"}, **sidecar})


def _library(inbox: Path) -> dict[str, Path]:
    files = {
        "jpeg": make_jpeg(inbox / "IMG_1.jpg", (64, 48)),
        "heic": make_heic(inbox / "IMG_2.heic", (64, 48)),
        "raw": make_dng(inbox / "IMG_3.dng"),
        "video": make_video(inbox / "clip.mp4", (64, 48), frames=6),
    }
    (inbox / "IMG_1.jpg.xmp").write_text(PERSONS, encoding="utf-8")
    return files


def _scan(cfg: Path) -> int:
    return main(["scan", "-c", str(cfg), "--log-format", "json"])


def _immich(path: Path) -> dict[str, Any]:
    out = subprocess.run([EXIFTOOL or "exiftool", "-use", "MWG", "-j", "-Description", "-Keywords", "-TagsList",
                          "-Rating", "-Label", str(path)], capture_output=True, text=True, check=True)  # fmt: skip
    found: dict[str, Any] = json.loads(out.stdout)[0]
    return found


def _listed(value: Any) -> set[str]:
    if value is None:
        return set()
    return {str(v) for v in value} if isinstance(value, list) else {str(value)}


def _exiv2(path: Path) -> str:
    return subprocess.run([EXIV2 or "exiv2", "-px", str(path)], capture_output=True, text=True, check=False).stdout


@needs_tools
def test_a_library_through_two_runs_keeps_what_the_person_wrote(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    files = _library(inbox)
    with FakeVLM(reply_json={"caption": "A dog on a beach.", "tags": ["dog", "beach"]}) as fake:
        assert _scan(_config(tmp_path, fake, "Describe {name}.")) == 0
    for name, media in files.items():
        seen = _immich(media.with_name(media.name + ".xmp"))
        assert {"AI/dog", "AI/beach"} <= _listed(seen.get("TagsList")), (name, seen)
        assert {"dog", "beach"} <= _listed(seen.get("Keywords")), (name, seen)
        doc = json.loads(media.with_name(media.name + ".json").read_text())
        assert doc["status"] == "ok" and doc["xmp"]["written"], (name, doc.get("xmp"))
    person = inbox / "IMG_1.jpg.xmp"
    first = _immich(person)
    assert first["Description"] == "Grandma's birthday"  # a person's description is theirs
    assert first["Rating"] == 5 and first["Label"] == "Red"
    assert "Family" in _listed(first["Keywords"])
    assert json.loads((inbox / "IMG_1.jpg.json").read_text())["xmp"]["description"] == "kept"
    assert _immich(files["heic"].with_name("IMG_2.heic.xmp"))["Description"] == "A dog on a beach."

    # Another prompt, another answer: our keywords are replaced, the person's stay.
    with FakeVLM(reply_json={"caption": "A cat asleep.", "tags": ["cat"]}) as fake:
        assert _scan(_config(tmp_path, fake, "What is in {name}?")) == 0
        assert len(fake.chat_requests) == len(files)  # the new prompt describes every file again
    second = _immich(person)
    assert second["Description"] == "Grandma's birthday"
    assert second["Rating"] == 5 and second["Label"] == "Red"
    keywords = _listed(second["Keywords"])
    assert "Family" in keywords and "cat" in keywords and "dog" not in keywords and "beach" not in keywords
    exiv2 = _exiv2(person)  # what digiKam and darktable read
    assert "Xmp.digiKam.TagsList" in exiv2 and "AI/cat" in exiv2
    assert "Xmp.lr.hierarchicalSubject" in exiv2 and "AI|cat" in exiv2 and "People|Family" in exiv2
    assert _immich(files["video"].with_name("clip.mp4.xmp"))["Description"] == "A cat asleep."


@needs_tools
def test_turning_xmp_on_later_writes_it_from_the_answers_on_record(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    photo = make_jpeg(inbox / "IMG_1.jpg", (64, 48))
    with FakeVLM(reply_json={"caption": "A red door.", "tags": ["door"]}) as fake:
        cfg = _config(tmp_path, fake, "Describe {name}.")
        doc = yaml.safe_load(cfg.read_text())
        del doc["sidecar"]
        cfg.write_text(yaml.safe_dump(doc))
        assert _scan(cfg) == 0
        assert not photo.with_name("IMG_1.jpg.xmp").exists()
        asked = len(fake.chat_requests)
        assert _scan(_config(tmp_path, fake, "Describe {name}.")) == 0
        assert len(fake.chat_requests) == asked  # nothing is asked again
    assert _immich(photo.with_name("IMG_1.jpg.xmp"))["Description"] == "A red door."
    assert json.loads(photo.with_name("IMG_1.jpg.json").read_text())["xmp"]["written"]


def test_dry_run_shows_the_xmp_it_would_write(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inbox = tmp_path / "inbox"
    photo = make_jpeg(inbox / "IMG_1.jpg", (64, 48))
    (inbox / "IMG_1.jpg.xmp").write_text(PERSONS, encoding="utf-8")
    with FakeVLM() as fake:
        cfg = _config(tmp_path, fake, "Describe {name}.")
        assert main(["once", "-c", str(cfg), "--dry-run", str(photo)]) == 0
        assert fake.chat_requests == []
    plan = json.loads(capsys.readouterr().out)
    shown = plan["files"][0]["xmp"]
    assert shown["path"] == str(inbox / "IMG_1.jpg.xmp") and shown["prefix"] == "AI/"
    assert "dc:description" in json.dumps(shown["properties"])
    assert (inbox / "IMG_1.jpg.xmp").read_text(encoding="utf-8") == PERSONS  # looked at, not touched


def test_status_counts_the_xmp_sidecars(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inbox = tmp_path / "inbox"
    for i in range(3):
        make_jpeg(inbox / f"IMG_{i}.jpg", (64, 48), seed=i)
    with FakeVLM(reply_json={"caption": "A field.", "tags": ["field"]}) as fake:
        cfg = _config(tmp_path, fake, "Describe {name}.")
        assert _scan(cfg) == 0
    (inbox / "IMG_0.jpg.xmp").unlink()
    capsys.readouterr()
    assert main(["status", "-c", str(cfg), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["roots"][str(inbox)]["done"] == 3
    assert report["roots"][str(inbox)]["xmp"] == 2


def test_keywords_come_back_with_the_persons_hierarchy(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    photo = make_jpeg(inbox / "IMG_1.jpg", (64, 48))
    vocabulary = tmp_path / "keywords.txt"
    vocabulary.write_text("Animals/Dog; dog, dogs, puppy\nPlaces/Beach; seaside\n", encoding="utf-8")
    with FakeVLM(reply_json={"caption": "A puppy by the sea.", "tags": ["puppy", "seaside", "kite"]}) as fake:
        cfg = _config(tmp_path, fake, "Describe {name}. Choose keywords from: {vocabulary}")
        doc = yaml.safe_load(cfg.read_text())
        doc["rules"][0]["keywords"] = {"vocabulary": "keywords.txt", "unknown": "drop"}
        cfg.write_text(yaml.safe_dump(doc))
        assert _scan(cfg) == 0
        prompt = fake.chat_requests[0].content[0]["text"]
    assert "Animals" in prompt and "Dog" in prompt  # the vocabulary is offered to the model
    record = json.loads(photo.with_name("IMG_1.jpg.json").read_text())
    assert sorted(record["xmp"]["ours"]) == ["Animals/Dog", "Places/Beach"]  # "kite" is not in it: dropped


def test_a_vocabulary_placeholder_without_a_vocabulary_is_a_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with FakeVLM() as fake:
        cfg = _config(tmp_path, fake, "Tags from {vocabulary}")
    assert main(["check", "-c", str(cfg)]) == 2
    assert "{vocabulary} needs a vocabulary" in capsys.readouterr().err


def test_xmp_sidecars_are_not_taken_for_media(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    make_jpeg(inbox / "IMG_1.jpg", (64, 48))
    (inbox / "IMG_1.xmp").write_text(PERSONS, encoding="utf-8")  # Lightroom's name
    with FakeVLM(reply_json={"caption": "A lake.", "tags": ["lake"]}) as fake:
        assert _scan(_config(tmp_path, fake, "Describe {name}.")) == 0
        assert len(fake.chat_requests) == 1
    assert not (inbox / "IMG_1.xmp.json").exists()
    assert not (inbox / "IMG_1.jpg.xmp").exists()  # the existing IMG_1.xmp was updated instead
    assert "lake" in (inbox / "IMG_1.xmp").read_text(encoding="utf-8")
