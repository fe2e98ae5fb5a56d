"""Is this file done? One decision (:func:`mmwatchd.done.is_done`) for a sidecar and for a done-index row."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

from mmwatchd.done import FileVersion, Record, is_done
from mmwatchd.state import DoneRow

PACKAGE = Path(__file__).resolve().parent.parent / "mmwatchd"
OURS = {"mmwatchd": {"version": "x", "schema": 1}, "status": "ok", "fingerprint": "f",
        "source": {"size": 3, "mtime_ns": 10, "sha256": "abc"}}  # fmt: skip
DOC = {**OURS, "source": {"size": 3, "mtime_ns": 10, "inode": 7, "ctime_ns": 20, "sha256": "abc"}}
NOW = FileVersion(size=3, mtime_ns=10, ino=7, ctime_ns=20)


def _now(**changed: int) -> FileVersion:
    return FileVersion(**{"size": 3, "mtime_ns": 10, "ino": 7, "ctime_ns": 20, **changed})


class TestSidecar:
    def test_same_version_and_rule_needs_no_hash(self) -> None:
        assert is_done(Record.of_sidecar(DOC), NOW, "f", exact=True, sha256=lambda: pytest.fail("hashed"))

    def test_other_rule_or_size_is_not_done(self) -> None:
        assert not is_done(Record.of_sidecar(DOC), NOW, "g", exact=True, sha256=lambda: "abc")
        assert not is_done(Record.of_sidecar(DOC), _now(size=4), "f", exact=True, sha256=lambda: "abc")

    @pytest.mark.parametrize("changed", [{"ino": 8}, {"ctime_ns": 21}, {"mtime_ns": 11}])
    def test_any_other_part_is_settled_by_the_hash_computed_only_then(self, changed: dict[str, int]) -> None:
        calls: list[int] = []

        def sha() -> str:
            calls.append(1)
            return "abc"

        assert is_done(Record.of_sidecar(DOC), _now(**changed), "f", exact=True, sha256=sha) and calls == [1]
        assert not is_done(Record.of_sidecar(DOC), _now(**changed), "f", exact=True, sha256=lambda: "def")

    def test_a_sidecar_without_inode_and_ctime_is_settled_by_the_hash(self) -> None:
        assert is_done(Record.of_sidecar(OURS), NOW, "f", exact=True, sha256=lambda: "abc")
        assert not is_done(Record.of_sidecar(OURS), NOW, "f", exact=True, sha256=lambda: "def")
        assert not is_done(Record.of_sidecar(OURS), NOW, "f", exact=True)  # no hash to settle it

    def test_not_exact_size_and_mtime_decide(self) -> None:
        """``status`` and the gallery, which never hash."""
        assert is_done(Record.of_sidecar(OURS), _now(ino=8, ctime_ns=99), "f", exact=False)
        assert not is_done(Record.of_sidecar(OURS), _now(mtime_ns=11), "f", exact=False)

    def test_any_rule_when_no_fingerprint_is_given(self) -> None:
        """The gallery shows what was said whatever rule said it."""
        assert is_done(Record.of_sidecar({**DOC, "fingerprint": "old"}), NOW, None, exact=False)

    def test_an_error_sidecar_is_done_too_and_says_so(self) -> None:
        record = Record.of_sidecar({**DOC, "status": "error"})
        assert is_done(record, NOW, "f", exact=True) and record.answer == "error"
        assert Record.of_sidecar(DOC).answer == "ok"

    def test_no_record_is_not_done(self) -> None:
        assert not is_done(None, NOW, "f", exact=True, sha256=lambda: "abc")


class TestIndexRow:
    """A done-index row is a record as it is (a rescan asks for every file's)."""

    def test_a_row_for_this_version_and_rule(self) -> None:
        row = DoneRow(3, 10, "image", "f", "error", 7, 20)
        assert is_done(row, NOW, "f", exact=True)
        assert not is_done(row, NOW, "g", exact=True)

    @pytest.mark.parametrize("changed", [{"ino": 8}, {"ctime_ns": 21}, {"mtime_ns": 11}, {"size": 4}])
    def test_a_row_has_no_hash_so_any_change_is_not_done(self, changed: dict[str, int]) -> None:
        row = DoneRow(3, 10, "image", "f", "ok", 7, 20)
        assert not is_done(row, _now(**changed), "f", exact=True, sha256=lambda: "abc")

    def test_a_row_against_the_files_stat(self, tmp_path: Path) -> None:
        """What a rescan asks for each file: the row against an ``os.stat`` of it."""
        photo = tmp_path / "a.jpg"
        photo.write_bytes(b"abc")
        st = os.stat(photo)
        row = DoneRow(st.st_size, st.st_mtime_ns, "image", "f", "ok", st.st_ino, st.st_ctime_ns)
        assert is_done(row, st, "f", exact=True)
        (tmp_path / "b.jpg").write_bytes(b"abc")
        os.utime(tmp_path / "b.jpg", ns=(st.st_atime_ns, st.st_mtime_ns))
        os.replace(tmp_path / "b.jpg", photo)  # same size and mtime, another file
        assert not is_done(row, os.stat(photo), "f", exact=True)

    def test_a_row_from_before_inodes_were_kept_vouches_for_size_and_mtime(self) -> None:
        row = DoneRow(3, 10, "image", "f", None)
        assert row.size_and_mtime_only
        assert is_done(row, _now(ino=8, ctime_ns=99), "f", exact=True)
        assert not is_done(row, _now(mtime_ns=11), "f", exact=True)


def test_only_the_done_module_compares_a_record_with_a_file() -> None:
    """The decision lives in one place: no other module reads a sidecar's ``source`` or an index row's version to
    judge it (writing them, as the pipeline does, is not judging)."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "done.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Compare):
                text = ast.unparse(node)
                if any(k in text for k in ('"source"', "row.mtime_ns", "row.ino", "row.ctime_ns", "row.fingerprint")):
                    found.append(f"{path.name}: {text}")
    assert found == []
