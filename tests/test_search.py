"""``mmwatchd search``: real sidecars written by ``mmwatchd once`` against the fake VLM, searched through the CLI."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from described import config, describe
from fakevlm import FakeVLM, chat_completion
from media import make_jpeg, make_truncated

from mmwatchd import search
from mmwatchd.cli import main
from mmwatchd.config import load


@pytest.fixture
def library(tmp_path: Path, fake_vlm: FakeVLM) -> Path:
    """Four described photos (one named after a beach it does not show), one that failed; returns the config."""
    return make_library(tmp_path, fake_vlm)


def make_library(folder: Path, fake_vlm: FakeVLM) -> Path:
    cfg = config(folder, fake_vlm)
    inbox = folder / "inbox"
    photos = {
        make_jpeg(inbox / "IMG_0001.jpg", seed=1): ("A brown dog runs along the beach at sunset.", ["dog", "sea"]),
        make_jpeg(inbox / "trip" / "IMG_0002.jpg", seed=2): ("A cat asleep on a red sofa.", ["cat", "indoor"]),
        make_jpeg(inbox / "beach-house.jpg", seed=3): ("Two cups of coffee on a wooden table.", ["coffee"]),
        make_jpeg(inbox / "IMG_0004.jpg", seed=4): ("Mountains under snow.", ["winter", "sunset glow"]),
    }
    broken = make_truncated(make_jpeg(folder / "whole.jpg", (256, 256), seed=5), inbox / "broken.jpg")
    describe(cfg, fake_vlm, photos, failing=[broken])
    return cfg


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()  # what describing printed
    code = main(["search", *args])
    out, err = capsys.readouterr()
    return code, out, err


def matches(capsys: pytest.CaptureFixture[str], cfg: Path, query: str) -> list[str]:
    code, out, err = run(capsys, query, "-c", str(cfg), "--json")
    assert code in (0, 1) and "Traceback" not in err, err
    return [Path(m["path"]).name for m in json.loads(out)["matches"]]


class TestSearch:
    """Read-only tests: they share one library."""

    @pytest.fixture(scope="class")
    @classmethod
    def library(cls, tmp_path_factory: pytest.TempPathFactory) -> Path:
        with FakeVLM() as fake_vlm:
            return make_library(tmp_path_factory.mktemp("library"), fake_vlm)

    def test_finds_files_by_words_of_their_captions(self, library: Path, capsys: pytest.CaptureFixture[str]) -> None:
        code, out, err = run(capsys, "dog on a beach", "-c", str(library))
        assert code == 0, err
        lines = out.splitlines()
        assert lines[0] == f"{library.parent / 'inbox' / 'IMG_0001.jpg'}  (ok, photos)"
        assert lines[1] == "    A brown [dog] runs along the [beach] at sunset."  # plain markers: not a terminal
        assert len(lines) == 2  # "beach-house.jpg" has "beach" but no dog
        assert "\x1b" not in out

    def test_caption_and_tags_rank_above_the_path(self, library: Path, capsys: pytest.CaptureFixture[str]) -> None:
        assert matches(capsys, library, "beach") == ["IMG_0001.jpg", "beach-house.jpg"]
        assert matches(capsys, library, "sunset") == ["IMG_0001.jpg", "IMG_0004.jpg"]  # caption, then a tag

    def test_tags_paths_and_stems(self, library: Path, capsys: pytest.CaptureFixture[str]) -> None:
        assert matches(capsys, library, "indoor") == ["IMG_0002.jpg"]  # a tag only
        assert matches(capsys, library, "trip") == ["IMG_0002.jpg"]  # a folder name
        assert matches(capsys, library, "dogs running") == ["IMG_0001.jpg"]  # stemmed
        assert matches(capsys, library, "sofas") == ["IMG_0002.jpg"]
        assert matches(capsys, library, "IMG_0004.jpg") == ["IMG_0004.jpg"]

    def test_json_output(self, library: Path, capsys: pytest.CaptureFixture[str]) -> None:
        code, out, _ = run(capsys, "cat", "-c", str(library), "--json", "--limit", "5")
        assert code == 0
        report = json.loads(out)
        assert report["query"] == "cat" and report["every_word"] is True
        [hit] = report["matches"]
        inbox = library.parent / "inbox"
        assert hit["path"] == str(inbox / "trip" / "IMG_0002.jpg")
        assert hit["sidecar"] == str(inbox / "trip" / "IMG_0002.jpg.json")
        assert (hit["status"], hit["rule"], hit["model"]) == ("ok", "photos", "fake-vlm")
        assert hit["snippet"] == "A [cat] asleep on a red sofa." and hit["score"] > 0

    def test_limit_and_some_words(self, library: Path, capsys: pytest.CaptureFixture[str]) -> None:
        code, out, _ = run(capsys, "jpg", "-c", str(library), "--json", "--limit", "2")
        assert code == 0 and len(json.loads(out)["matches"]) == 2
        code, out, err = run(capsys, "cat zebra", "-c", str(library), "--json")
        assert code == 0 and "no file matches every word" in err
        assert json.loads(out)["every_word"] is False
        assert [Path(m["path"]).name for m in json.loads(out)["matches"]] == ["IMG_0002.jpg"]

    def test_nothing_found(self, library: Path, capsys: pytest.CaptureFixture[str]) -> None:
        code, out, err = run(capsys, "zebra", "-c", str(library))
        assert (code, out) == (1, "") and err == "mmwatchd: nothing matches 'zebra'\n"

    @pytest.mark.parametrize(
        "query",
        [
            '"dog beach"',
            "dog-beach",
            "dog:",
            "caption:dog",
            "dog*",
            "NEAR(dog",
            "dog AND",
            "^dog",
            'dog"',
            "(dog)",
            "dog OR NOT",
            "{dog}",
            "dog's",
            "dog + beach",
        ],
    )
    def test_user_text_is_never_query_syntax(self, library: Path, capsys: pytest.CaptureFixture[str],
                                             query: str) -> None:  # fmt: skip
        code, out, err = run(capsys, query, "-c", str(library), "--json")
        assert code in (0, 1) and "Traceback" not in err and "syntax" not in err, err
        names = [Path(m["path"]).name for m in json.loads(out)["matches"]]
        assert names in ([], ["IMG_0001.jpg"]), names

    def test_a_quoted_phrase_must_appear_as_written(self, library: Path, capsys: pytest.CaptureFixture[str]) -> None:
        assert matches(capsys, library, '"red sofa"') == ["IMG_0002.jpg"]
        assert matches(capsys, library, '"sofa red"') == []

    @pytest.mark.parametrize("query", ["*", "- : *", '""', "  "])
    def test_no_words_is_a_usage_error(self, library: Path, capsys: pytest.CaptureFixture[str], query: str) -> None:
        code, out, err = run(capsys, query, "-c", str(library))
        assert (code, out) == (2, "") and err == f"mmwatchd: search: {query!r} has no words to look for\n"

    def test_bad_limit(self, library: Path, capsys: pytest.CaptureFixture[str]) -> None:
        with pytest.raises(SystemExit) as exc:
            main(["search", "dog", "-c", str(library), "--limit", "0"])
        assert exc.value.code == 2 and "must be at least 1, got 0" in capsys.readouterr().err


class TestIndex:
    def test_the_index_follows_the_sidecars(self, library: Path, fake_vlm: FakeVLM,
                                            capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
        index = library.parent / "state" / "search.sqlite3"
        for suffix in ("", "-wal", "-shm"):  # the scan that described the library indexed it as it went
            Path(f"{index}{suffix}").unlink(missing_ok=True)
        assert matches(capsys, library, "cat") == ["IMG_0002.jpg"]  # built on first use
        assert index.exists()
        inbox = library.parent / "inbox"
        # new: a file described after the index was built
        describe(library, fake_vlm, {make_jpeg(inbox / "new.jpg", seed=9): ("A zebra at the zoo.", ["zoo"])})
        assert matches(capsys, library, "zebra") == ["new.jpg"]
        # changed: the file described again with another answer
        make_jpeg(inbox / "new.jpg", seed=10)
        describe(library, fake_vlm, {inbox / "new.jpg": ("A giraffe at the zoo.", ["zoo"])})
        assert matches(capsys, library, "zebra") == []
        assert matches(capsys, library, "giraffe") == ["new.jpg"]
        # deleted: the sidecar is gone, so is the match
        (inbox / "trip" / "IMG_0002.jpg.json").unlink()
        assert matches(capsys, library, "cat") == []

    def test_reindex_and_a_damaged_index(self, library: Path, capsys: pytest.CaptureFixture[str]) -> None:
        assert matches(capsys, library, "cat") == ["IMG_0002.jpg"]
        index = library.parent / "state" / "search.sqlite3"
        with sqlite3.connect(index) as conn:  # an entry the sidecars do not back (as if edited by hand)
            conn.execute("UPDATE fts SET caption = 'a unicorn' WHERE caption LIKE '%cat%'")
        assert matches(capsys, library, "unicorn") == ["IMG_0002.jpg"]  # size and mtime unchanged: trusted
        code, _out, _ = run(capsys, "unicorn", "-c", str(library), "--reindex")
        assert code == 1
        assert matches(capsys, library, "cat") == ["IMG_0002.jpg"]
        for suffix in ("-wal", "-shm"):
            Path(f"{index}{suffix}").unlink(missing_ok=True)
        index.write_bytes(b"this is not a database" * 100)
        assert matches(capsys, library, "cat") == ["IMG_0002.jpg"]

    def test_a_locked_index_is_an_error_not_a_reason_to_start_over(
        self, library: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        assert matches(capsys, library, "cat") == ["IMG_0002.jpg"]
        index = library.parent / "state" / "search.sqlite3"
        monkeypatch.setattr(search, "BUSY_TIMEOUT_S", 0.05)
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(index)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)  # fmt: skip
        try:
            assert writer.stdout.readline() == "writing\n"  # holds the write lock now
            code, out, err = run(capsys, "cat", "-c", str(library))
            assert (code, out) == (1, "")
            assert err == f"mmwatchd: {index}: cannot open the search index: database is locked\n"
            writer.communicate("go\n", timeout=30)
        finally:
            writer.kill()
            writer.wait()
        with sqlite3.connect(index) as conn:
            assert conn.execute("SELECT count(*) FROM docs").fetchone()[0] == 5  # nothing was thrown away
        assert matches(capsys, library, "cat") == ["IMG_0002.jpg"]

    def test_an_index_of_another_version_is_rebuilt(self, library: Path, capsys: pytest.CaptureFixture[str]) -> None:
        assert matches(capsys, library, "cat") == ["IMG_0002.jpg"]
        index = library.parent / "state" / "search.sqlite3"
        with sqlite3.connect(index) as conn:
            conn.execute("UPDATE meta SET value = '999' WHERE key = 'schema'")
        assert matches(capsys, library, "cat") == ["IMG_0002.jpg"]

    def test_foreign_json_and_temp_files_are_not_indexed(self, library: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
        inbox = library.parent / "inbox"
        (inbox / "notes.json").write_text(json.dumps({"caption": "a dog on the beach"}))
        (inbox / ".IMG_9.jpg.json.mmwatchd-tmp-1-0a0b0c0d").write_text("{")
        assert matches(capsys, library, "dog beach") == ["IMG_0001.jpg"]

    def test_sidecars_in_a_mirror_folder(self, tmp_path: Path, fake_vlm: FakeVLM,
                                         capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
        cfg = config(tmp_path, fake_vlm, sidecar={"dir": str(tmp_path / "mirror")})
        photo = make_jpeg(tmp_path / "inbox" / "sub" / "IMG_7.jpg")
        fake_vlm.enqueue(
            json=chat_completion(json.dumps({"caption": "A lighthouse.", "tags": []})), path="/v1/chat/completions"
        )
        assert main(["once", "-c", str(cfg), str(photo)]) == 0
        assert not photo.with_name("IMG_7.jpg.json").exists()
        _code, out, _ = run(capsys, "lighthouse", "-c", str(cfg), "--json")
        [hit] = json.loads(out)["matches"]
        assert hit["path"] == str(photo)
        assert hit["sidecar"] == str(tmp_path / "mirror" / photo.relative_to("/").with_name("IMG_7.jpg.json"))

    def test_a_sidecar_recorded_by_its_writer(self, library: Path, tmp_path: Path, fake_vlm: FakeVLM,
                                              capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
        """index_sidecar: what the pipeline calls after each write; a sidecar outside the watched folders (from
        ``mmwatchd once elsewhere/x.jpg``) stays found while it exists."""
        elsewhere = make_jpeg(tmp_path / "elsewhere" / "x.jpg", seed=11)
        describe(library, fake_vlm, {elsewhere: ("A red kite in the sky.", ["kite"])})
        # Not under a watched folder, so no refresh would see it: `once` put it into the index as it wrote it.
        assert matches(capsys, library, "kite") == ["x.jpg"]
        side = elsewhere.with_name("x.jpg.json")
        cfg = load(library)
        with search.SearchIndex(search.index_path(cfg)) as index:
            index.index_sidecar(side, json.loads(side.read_text()))
        assert matches(capsys, library, "kite") == ["x.jpg"]
        assert matches(capsys, library, "kite") == ["x.jpg"]  # a refresh keeps it
        side.unlink()
        assert matches(capsys, library, "kite") == []

    def test_search_while_another_process_reads_the_index(self, library: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
        """The daemon keeps the index open; a process in the middle of a read does not stop a search from
        refreshing it (WAL), and the search does not disturb that reader's snapshot."""
        assert matches(capsys, library, "cat") == ["IMG_0002.jpg"]
        index = library.parent / "state" / "search.sqlite3"
        reader = subprocess.Popen([sys.executable, "-c", READER, str(index)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)  # fmt: skip
        try:
            assert reader.stdout.readline() == "5\n"  # in a read transaction now
            (library.parent / "inbox" / "trip" / "IMG_0002.jpg.json").unlink()
            assert matches(capsys, library, "cat") == []
            out, _ = reader.communicate("go\n", timeout=30)
        finally:
            reader.kill()
            reader.wait()
        assert out == "5\n4\n"  # its snapshot, then after its transaction the refreshed index
        assert os.stat(index).st_mode & 0o077 == 0


#: Holds the write lock on the index until told to go on.
WRITER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("writing", flush=True)
sys.stdin.readline()
conn.execute("COMMIT")
"""

#: Holds a read transaction on the index until told to go on.
READER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN")
print(conn.execute("SELECT count(*) FROM docs").fetchone()[0], flush=True)
sys.stdin.readline()
print(conn.execute("SELECT count(*) FROM docs").fetchone()[0])
conn.execute("COMMIT")
print(conn.execute("SELECT count(*) FROM docs").fetchone()[0])
"""


class TestText:
    def test_captions_and_tags_of_a_schema_reply(self) -> None:
        data = {
            "caption": "A dog.",
            "objects": [{"name": "ball", "color": "red"}],
            "tags": ["dog", "", 3],
            "title": "Play",
        }
        doc = {"response": {"text": "{...}", "data": data}}
        assert search.caption_and_tags(doc) == ("A dog.\nPlay", ["ball", "red", "dog"])
        assert search.caption_and_tags({"response": {"text": "Plain words.", "data": None}}) == ("Plain words.", [])
        assert search.caption_and_tags({"status": "error"}) == ("", [])
        assert search.caption_and_tags({"response": {"text": '"A dog."', "data": "A dog."}}) == ("A dog.", [])
        assert search.caption_and_tags({"response": {"data": ["dog", "ball"]}}) == ("", ["dog", "ball"])

    def test_terminal_output(self) -> None:
        hit = search.Hit(path="/p/a\x1b[2J.jpg", sidecar="/p/a.jpg.json", status="ok", rule="r", model="m", taken=None,
                         snippet=f"a {search.MARK_START}dog{search.MARK_END}\x1b]0;x\x07 here", score=1.0)  # fmt: skip
        assert search.render([hit], tty=True) == "/p/a?[2J.jpg  (ok, r)\n    a \x1b[1mdog\x1b[0m ]0;x here"
        assert search.render([hit], tty=False) == "/p/a?[2J.jpg  (ok, r)\n    a [dog] ]0;x here"
