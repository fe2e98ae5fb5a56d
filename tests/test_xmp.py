"""XMP sidecars for photo apps, read back with the tools the apps build on.

exiftool is what Immich reads with (``-use MWG``: Description, Keywords, TagsList); exiv2 is the library digiKam and
darktable use; darktable-cli is a real photo app importing the sidecar and writing its tags into an export. Each test
that needs one of them is skipped when it is not installed (``.ci/run`` installs them).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from mounts import tmpfs
from PIL import Image

from mmwatchd import xmp
from mmwatchd.errors import SidecarError, XMPError, XMPRefused
from mmwatchd.sidecar import TEMP_MARK, write as write_json
from mmwatchd.vocabulary import parse as parse_vocabulary

EXIFTOOL = shutil.which("exiftool")
EXIV2 = shutil.which("exiv2")
DARKTABLE = shutil.which("darktable-cli")
needs_exiftool = pytest.mark.skipif(EXIFTOOL is None, reason="exiftool not installed (libimage-exiftool-perl)")
needs_exiv2 = pytest.mark.skipif(EXIV2 is None, reason="exiv2 not installed")
needs_darktable = pytest.mark.skipif(DARKTABLE is None, reason="darktable-cli not installed (darktable)")

#: A sidecar as darktable leaves it after a person rated, labelled, tagged and edited a photo, with a French caption
#: from another app and a namespace nobody here knows.
PERSONS = """<?xml version="1.0" encoding="UTF-8"?>
<x:xmpmeta xmlns:x="adobe:ns:meta/" x:xmptk="XMP Core 4.4.0-Exiv2">
 <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <rdf:Description rdf:about=""
    xmlns:xmp="http://ns.adobe.com/xap/1.0/"
    xmlns:xmpMM="http://ns.adobe.com/xap/1.0/mm/"
    xmlns:dc="http://purl.org/dc/elements/1.1/"
    xmlns:lr="http://ns.adobe.com/lightroom/1.0/"
    xmlns:darktable="http://darktable.sf.net/"
    xmlns:acme="http://example.com/acme/1.0/"
   xmp:Rating="4"
   xmp:Label="Red"
   xmpMM:DerivedFrom="IMG_1.jpg"
   darktable:xmp_version="5"
   darktable:history_end="1"
   acme:project="Holiday">
   <dc:description>
    <rdf:Alt>
     <rdf:li xml:lang="fr-FR">Un chien sur la plage</rdf:li>
    </rdf:Alt>
   </dc:description>
   <dc:subject>
    <rdf:Bag>
     <rdf:li>Paris</rdf:li>
     <rdf:li>family</rdf:li>
    </rdf:Bag>
   </dc:subject>
   <lr:hierarchicalSubject>
    <rdf:Bag>
     <rdf:li>Places|France|Paris</rdf:li>
     <rdf:li>family</rdf:li>
    </rdf:Bag>
   </lr:hierarchicalSubject>
   <darktable:history>
    <rdf:Seq>
     <rdf:li darktable:num="0" darktable:operation="exposure" darktable:enabled="1" darktable:modversion="6"
      darktable:params="0000000000000000" darktable:multi_name="" darktable:multi_priority="0"/>
    </rdf:Seq>
   </darktable:history>
  </rdf:Description>
 </rdf:RDF>
</x:xmpmeta>
"""


def answer(description: str | None, *keywords: str, rule: str = "photos") -> xmp.Answer:
    return xmp.Answer(
        description=description,
        keywords=tuple(tuple(k.split("/")) for k in keywords),
        model="qwen2.5vl:7b",
        rule=rule,
        fingerprint="sha256:" + rule,
    )


def photo(folder: Path, name: str = "IMG_1.jpg") -> Path:
    path = folder / name
    Image.new("RGB", (64, 48), (200, 120, 40)).save(path)
    return path


def exiftool(*args: str | Path) -> Any:
    assert EXIFTOOL is not None
    done = subprocess.run([EXIFTOOL, *map(str, args)], capture_output=True, text=True, timeout=60, check=True)
    return json.loads(done.stdout)[0] if "-j" in args else done.stdout


def immich_sees(path: Path) -> dict[str, Any]:
    """What Immich reads: exiftool's MWG view of the description and keywords."""
    found: dict[str, Any] = exiftool("-use", "MWG", "-j", "-Description", "-Keywords", "-TagsList", path)
    found.pop("SourceFile")
    return found


def namespaces(path: Path) -> dict[str, Any]:
    """Every XMP property, per namespace group (exiftool -G1 -a -s -XMP:all)."""
    found: dict[str, Any] = exiftool("-G1", "-a", "-s", "-j", "-XMP:all", path)
    found.pop("SourceFile")
    return found


def exiv2(path: Path) -> dict[str, str]:
    """``exiv2 -px``: key → value, as digiKam and darktable read it."""
    assert EXIV2 is not None
    done = subprocess.run([EXIV2, "-px", str(path)], capture_output=True, text=True, timeout=60, check=True)
    out = {}
    for line in done.stdout.splitlines():
        key, _type, _count, *value = line.split(None, 3)
        out[key] = value[0] if value else ""
    return out


def listed(value: Any) -> list[str]:
    return value if isinstance(value, list) else [value]


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if TEMP_MARK in p.name]


class TestNewSidecar:
    @needs_exiftool
    @needs_exiv2
    def test_every_app_field_holds_the_answer(self, tmp_path: Path) -> None:
        media = photo(tmp_path)
        path = xmp.xmp_path(media)
        result = xmp.update(path, answer("A dog runs on a beach.", "AI/dog", "AI/beach"))

        assert path == tmp_path / "IMG_1.jpg.xmp"
        assert (result.created, result.changed, result.description) == (True, True, "written")
        assert immich_sees(path) == {
            "Description": "A dog runs on a beach.",
            "Keywords": ["dog", "beach"],
            "TagsList": ["AI/dog", "AI/beach"],
        }
        seen = exiv2(path)
        assert seen["Xmp.dc.description"] == 'lang="x-default" A dog runs on a beach.'
        assert seen["Xmp.dc.subject"] == "dog, beach"
        assert seen["Xmp.lr.hierarchicalSubject"] == "AI|dog, AI|beach"
        assert seen["Xmp.digiKam.TagsList"] == "AI/dog, AI/beach"
        ours = namespaces(path)
        assert ours["XMP-mmwatchd:Keywords"] == ["AI|dog", "AI|beach"]
        assert ours["XMP-mmwatchd:Rule"] == "photos"
        assert ours["XMP-mmwatchd:Fingerprint"] == "sha256:photos"
        assert ours["XMP-mmwatchd:Model"] == "qwen2.5vl:7b"
        assert path.read_bytes().startswith(b'<?xpacket begin="\xef\xbb\xbf"')
        assert leftovers(tmp_path) == []

    def test_a_rerun_with_the_same_answer_leaves_the_file_alone(self, tmp_path: Path) -> None:
        path = xmp.xmp_path(photo(tmp_path))
        xmp.update(path, answer("A cat.", "AI/cat"))
        before = path.read_bytes(), os.stat(path).st_mtime_ns, os.stat(path).st_ino
        again = xmp.update(path, answer("A cat.", "AI/cat"))
        assert (again.changed, again.description) == (False, "unchanged")
        assert (path.read_bytes(), os.stat(path).st_mtime_ns, os.stat(path).st_ino) == before

    def test_a_change_is_a_new_file_in_place_so_apps_notice(self, tmp_path: Path) -> None:
        path = xmp.xmp_path(photo(tmp_path))
        xmp.update(path, answer("A cat.", "AI/cat"))
        os.utime(path, ns=(1_000_000_000, 1_000_000_000))
        inode = os.stat(path).st_ino
        xmp.update(path, answer("A cat asleep.", "AI/cat", "AI/sofa"))
        assert os.stat(path).st_mtime_ns != 1_000_000_000
        assert os.stat(path).st_ino != inode  # renamed over, never rewritten in place
        assert leftovers(tmp_path) == []

    def test_a_persons_file_keeps_its_owner_and_mode(self, tmp_path: Path) -> None:
        path = tmp_path / "IMG_1.jpg.xmp"
        path.write_text(PERSONS)
        os.chmod(path, 0o600)
        if os.geteuid() == 0:
            os.chown(path, 4321, 4321)
        xmp.update(path, answer("A cat.", "AI/cat"))
        st = os.stat(path)
        assert st.st_mode & 0o777 == 0o600
        if os.geteuid() == 0:
            assert (st.st_uid, st.st_gid) == (4321, 4321)

    def test_a_full_disk_is_an_error_to_retry_and_loses_nothing(self, tmp_path: Path) -> None:
        with tmpfs(tmp_path / "small", "64k") as folder:
            path = folder / "IMG_1.jpg.xmp"
            path.write_text(PERSONS)
            before = path.read_bytes()
            fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
            with contextlib.suppress(OSError):
                while os.write(fd, b"x" * 4096):
                    pass
            os.close(fd)
            with pytest.raises(XMPError) as caught:
                xmp.update(path, answer("A cat.", "AI/cat"))
            assert caught.value.retryable and "free some space" in caught.value.message
            assert path.read_bytes() == before
            assert leftovers(folder) == []

    @needs_exiftool
    def test_a_video_gets_one_too(self, tmp_path: Path) -> None:
        clip = tmp_path / "clip.mp4"
        clip.write_bytes(b"\x00\x00\x00\x18ftypmp42")
        path = xmp.xmp_path(clip)
        xmp.update(path, answer("Waves.", "AI/sea"))
        assert path.name == "clip.mp4.xmp"
        assert immich_sees(path)["Keywords"] == "sea"


class TestNaming:
    def test_full_name_by_default(self, tmp_path: Path) -> None:
        assert xmp.xmp_path(tmp_path / "IMG_1.jpg") == tmp_path / "IMG_1.jpg.xmp"

    def test_an_existing_stem_sidecar_is_updated_instead(self, tmp_path: Path) -> None:
        (tmp_path / "IMG_1.xmp").write_text(PERSONS)
        assert xmp.xmp_path(tmp_path / "IMG_1.CR2") == tmp_path / "IMG_1.xmp"

    def test_full_name_wins_when_both_exist(self, tmp_path: Path) -> None:
        (tmp_path / "IMG_1.xmp").write_text(PERSONS)
        (tmp_path / "IMG_1.jpg.xmp").write_text(PERSONS)
        assert xmp.xmp_path(tmp_path / "IMG_1.jpg") == tmp_path / "IMG_1.jpg.xmp"

    def test_stem_naming(self, tmp_path: Path) -> None:
        assert xmp.xmp_path(tmp_path / "IMG_1.jpg", "stem") == tmp_path / "IMG_1.xmp"
        assert xmp.xmp_path(tmp_path / "clip.mp4", "stem") == tmp_path / "clip.xmp"


class TestMergingIntoAPersonsSidecar:
    @needs_exiftool
    @needs_exiv2
    def test_everything_of_theirs_survives_two_runs_with_different_keywords(self, tmp_path: Path) -> None:
        media = photo(tmp_path)
        path = xmp.xmp_path(media)
        path.write_text(PERSONS)
        theirs_before = {k: v for k, v in namespaces(path).items() if not k.startswith(("XMP-dc:", "XMP-lr:"))}

        first = xmp.update(path, answer("A dog on a beach.", "AI/dog", "AI/beach"))
        second = xmp.update(path, answer("A dog with a ball.", "AI/dog", "AI/ball"))

        assert first.description == second.description == "written"
        found = namespaces(path)
        for key, value in theirs_before.items():  # rating, label, darktable history, the unknown namespace
            assert found[key] == value, key
        assert found["XMP-xmp:Rating"] == 4
        assert found["XMP-xmp:Label"] == "Red"
        assert found["XMP-acme:Project"] == "Holiday"
        assert found["XMP-darktable:HistoryOperation"] == "exposure"
        assert found["XMP-dc:Description-fr-FR"] == "Un chien sur la plage"
        assert immich_sees(path) == {
            "Description": "A dog with a ball.",
            "Keywords": ["Paris", "family", "dog", "ball"],
            "TagsList": ["Places/France/Paris", "family", "AI/dog", "AI/ball"],
        }
        seen = exiv2(path)
        assert seen["Xmp.xmp.Rating"] == "4"
        assert seen["Xmp.acme.project"] == "Holiday"
        assert seen["Xmp.lr.hierarchicalSubject"] == "Places|France|Paris, family, AI|dog, AI|ball"
        assert seen["Xmp.dc.description"] == 'lang="x-default" A dog with a ball., lang="fr-FR" Un chien sur la plage'
        assert second.ours == (("AI", "dog"), ("AI", "ball"))
        assert path.read_text().startswith('<?xml version="1.0" encoding="UTF-8"?>')

    @needs_exiftool
    def test_a_keyword_the_person_removed_is_not_added_again(self, tmp_path: Path) -> None:
        path = xmp.xmp_path(photo(tmp_path))
        path.write_text(PERSONS)
        xmp.update(path, answer("A dog on a beach.", "AI/dog", "AI/beach"))
        # The person removes "dog" in their app; exiftool edits the file as such an app would.
        exiftool("-overwrite_original", "-XMP-dc:Subject-=dog", "-XMP-lr:HierarchicalSubject-=AI|dog",
                 "-XMP-digiKam:TagsList-=AI/dog", path)  # fmt: skip

        second = xmp.update(path, answer("A dog with a ball.", "AI/dog", "AI/ball"))

        assert immich_sees(path)["Keywords"] == ["Paris", "family", "ball"]
        assert second.declined == (("AI", "dog"),)
        third = xmp.update(path, answer("A dog.", "AI/dog"))  # and it stays gone on every later run
        assert "dog" not in listed(immich_sees(path)["Keywords"])
        assert third.declined == (("AI", "dog"),)

    @needs_exiftool
    def test_a_removal_made_by_an_app_that_leaves_TagsList_stale_counts(self, tmp_path: Path) -> None:
        """darktable and Lightroom rewrite dc:subject and lr:hierarchicalSubject only; digiKam:TagsList keeps the
        removed keyword. Missing from any field means removed."""
        path = xmp.xmp_path(photo(tmp_path))
        xmp.update(path, answer("A dog.", "AI/dog", "AI/beach"))
        exiftool("-overwrite_original", "-XMP-dc:Subject-=dog", "-XMP-lr:HierarchicalSubject-=AI|dog", path)

        xmp.update(path, answer("A dog.", "AI/dog", "AI/beach"))

        assert immich_sees(path)["TagsList"] == "AI/beach"

    @needs_exiftool
    def test_a_keyword_the_person_added_after_our_run_is_theirs(self, tmp_path: Path) -> None:
        path = xmp.xmp_path(photo(tmp_path))
        xmp.update(path, answer("A dog.", "AI/dog"))
        exiftool("-overwrite_original", "-XMP-dc:Subject+=Rex", "-XMP-lr:HierarchicalSubject+=Pets|Rex", path)

        result = xmp.update(path, answer("A cat.", "AI/cat"))  # a run that no longer says "dog"

        assert immich_sees(path)["TagsList"] == ["Pets/Rex", "AI/cat"]
        assert result.ours == (("AI", "cat"),)

    @needs_exiftool
    def test_a_description_the_person_edited_is_kept(self, tmp_path: Path) -> None:
        path = xmp.xmp_path(photo(tmp_path))
        xmp.update(path, answer("A dog on a beach.", "AI/dog"))
        exiftool("-overwrite_original", "-XMP-dc:Description=Rex at Biarritz, summer 2024", path)

        result = xmp.update(path, answer("A dog with a ball.", "AI/dog"))

        assert result.description == "kept"
        assert result.describe()["description"] == "kept"
        assert immich_sees(path)["Description"] == "Rex at Biarritz, summer 2024"
        # Once the person clears it, ours fills it again.
        exiftool("-overwrite_original", "-XMP-dc:Description=", path)
        assert xmp.update(path, answer("A dog with a ball.", "AI/dog")).description == "written"
        assert immich_sees(path)["Description"] == "A dog with a ball."

    def test_a_description_already_there_before_our_first_run_is_kept(self, tmp_path: Path) -> None:
        path = tmp_path / "IMG_1.jpg.xmp"
        path.write_text(PERSONS.replace('xml:lang="fr-FR">Un chien', 'xml:lang="x-default">Rex'))
        result = xmp.update(path, answer("A dog.", "AI/dog"))
        assert result.description == "kept"
        assert ">Rex sur la plage<" in path.read_text()

    def test_no_description_in_the_answer_leaves_it_alone(self, tmp_path: Path) -> None:
        path = tmp_path / "IMG_1.jpg.xmp"
        path.write_text(PERSONS)
        result = xmp.update(path, answer(None, "AI/dog"))
        assert result.description == "not_given"
        assert "x-default" not in path.read_text()

    @needs_exiftool
    def test_attribute_form_plain_text_and_several_description_blocks(self, tmp_path: Path) -> None:
        path = tmp_path / "IMG_1.jpg.xmp"
        path.write_text(
            """<x:xmpmeta xmlns:x="adobe:ns:meta/">
<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
 <rdf:Description rdf:about="" xmlns:xmp="http://ns.adobe.com/xap/1.0/" xmp:Rating="2"
   xmlns:dc="http://purl.org/dc/elements/1.1/" dc:description="Written as an attribute"/>
 <rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/"
   xmlns:digiKam="http://www.digikam.org/ns/1.0/">
  <dc:subject><rdf:Bag><rdf:li>sunset</rdf:li></rdf:Bag></dc:subject>
  <digiKam:TagsList>People/Ann</digiKam:TagsList>
 </rdf:Description>
</rdf:RDF>
</x:xmpmeta>
"""
        )
        result = xmp.update(path, answer("A sunset.", "AI/sky"))

        assert result.description == "kept"  # the attribute was a person's description
        assert immich_sees(path) == {
            "Description": "Written as an attribute",
            "Keywords": ["Ann", "sunset", "sky"],
            "TagsList": ["People/Ann", "sunset", "AI/sky"],
        }
        assert namespaces(path)["XMP-xmp:Rating"] == 2
        assert path.read_text().count("<dc:subject>") == 1  # one set, not one per block

    @needs_exiftool
    def test_odd_text_and_a_file_that_uses_our_prefixes_for_something_else(self, tmp_path: Path) -> None:
        path = tmp_path / "IMG_1.jpg.xmp"
        path.write_text(
            '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
            '<rdf:Description rdf:about="" xmlns:lr="http://example.com/not-lightroom/" lr:thing="kept"/>'
            "</rdf:RDF></x:xmpmeta>"
        )
        xmp.update(path, answer("Ein Hund\x00 am Strand \U0001f415 <b>&amp;", "AI/Strand", "AI/\U0001f415"))
        assert immich_sees(path) == {
            "Description": "Ein Hund am Strand \U0001f415 <b>&amp;",
            "Keywords": ["Strand", "\U0001f415"],
            "TagsList": ["AI/Strand", "AI/\U0001f415"],
        }
        text = path.read_text()
        assert 'xmlns:lr="http://example.com/not-lightroom/" ' in text and 'lr:thing="kept"' in text
        assert 'xmlns:lr1="http://ns.adobe.com/lightroom/1.0/"' in text

    def test_rdf_without_xmpmeta_and_an_empty_file(self, tmp_path: Path) -> None:
        bare = tmp_path / "a.jpg.xmp"
        bare.write_text('<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"/>')
        assert xmp.update(bare, answer("A.", "AI/a")).keywords == (("AI", "a"),)
        empty = tmp_path / "b.jpg.xmp"
        empty.write_bytes(b"")
        assert xmp.update(empty, answer("B.", "AI/b")).description == "written"

    def test_a_concurrent_save_is_merged_not_lost(self, tmp_path: Path) -> None:
        """A photo app saves the sidecar between our read and our rename: we read again and merge into theirs."""
        path = tmp_path / "IMG_1.jpg.xmp"
        path.write_text(PERSONS)
        saves = []

        def app_saves(attempt: int) -> None:
            if attempt == 1:
                saves.append(attempt)
                text = path.read_text().replace('xmp:Rating="4"', 'xmp:Rating="5"')
                tmp = path.with_name("app-temp")
                tmp.write_text(text)
                os.replace(tmp, path)

        result = xmp.update(path, answer("A dog.", "AI/dog"), before_replace=app_saves)

        assert saves == [1] and result.attempts == 2
        text = path.read_text()
        assert 'xmp:Rating="5"' in text and "AI|dog" in text
        assert leftovers(tmp_path) == []

    def test_a_file_that_never_stops_changing_is_an_error_to_retry(self, tmp_path: Path) -> None:
        path = tmp_path / "IMG_1.jpg.xmp"
        path.write_text(PERSONS)

        def app_saves(attempt: int) -> None:
            path.write_text(PERSONS.replace('"4"', f'"{attempt % 5}"'))

        with pytest.raises(XMPError) as caught:
            xmp.update(path, answer("A dog.", "AI/dog"), before_replace=app_saves, max_attempts=3)
        assert caught.value.retryable and "3 times" in caught.value.message
        assert leftovers(tmp_path) == []


class TestHostileFiles:
    XXE = (
        '<?xml version="1.0"?>\n<!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]>\n'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/"><dc:title>&e;</dc:title>'
        "</rdf:Description></rdf:RDF></x:xmpmeta>"
    )
    LAUGHS = (
        '<?xml version="1.0"?>\n<!DOCTYPE lolz [<!ENTITY lol1 "lol">'
        + "".join(f'<!ENTITY lol{i} "{f"&lol{i - 1};" * 10}">' for i in range(2, 10))
        + ']>\n<x:xmpmeta xmlns:x="adobe:ns:meta/">&lol9;</x:xmpmeta>'
    )

    @pytest.mark.parametrize(
        ("content", "says"),
        [
            (XXE, "DOCTYPE"),
            (LAUGHS, "DOCTYPE"),
            ("<x:xmpmeta xmlns:x='adobe:ns:meta/'><unclosed>", "not well-formed XML"),
            ("<html><body>not xmp</body></html>", "not XMP"),
            ("\ufeffhello".encode("utf-16").decode("latin-1"), "not UTF-8"),
            (XXE.replace('"1.0"?>', '"1.0" encoding="IBM037"?>', 1).encode("cp037").decode("latin-1"), "XML"),
        ],
        ids=["external-entity", "billion-laughs", "broken-xml", "not-xmp", "utf16", "ebcdic-hides-the-doctype"],
    )
    def test_refused_untouched_and_never_expanded(self, tmp_path: Path, content: str, says: str) -> None:
        path = tmp_path / "IMG_1.jpg.xmp"
        path.write_bytes(content.encode("latin-1") if says in ("not UTF-8", "XML") else content.encode())
        before = path.read_bytes(), os.stat(path).st_mtime_ns
        with pytest.raises(XMPRefused) as caught:
            xmp.update(path, answer("A dog.", "AI/dog"))
        error = caught.value
        assert says in error.message and str(path) in error.message
        assert isinstance(error, SidecarError) and not error.retryable and error.kind == "xmp_refused"
        assert "root:" not in error.message  # /etc/passwd never read into anything
        assert (path.read_bytes(), os.stat(path).st_mtime_ns) == before
        assert leftovers(tmp_path) == []

    def test_the_json_sidecar_is_written_all_the_same(self, tmp_path: Path) -> None:
        """What the pipeline does: the XMP outcome, refused or not, becomes part of the JSON record."""
        media = photo(tmp_path)
        (tmp_path / "IMG_1.jpg.xmp").write_text(self.XXE)
        recorded = xmp.write_sidecar(media, answer("A dog.", "AI/dog"))
        doc = {"mmwatchd": {"version": "0", "schema": 1}, "status": "ok", "xmp": recorded}
        json_path = tmp_path / "IMG_1.jpg.json"
        write_json(json_path, doc)
        assert json.loads(json_path.read_text())["xmp"] == {
            "path": str(tmp_path / "IMG_1.jpg.xmp"), "error": "xmp_refused", "retryable": False,
            "message": recorded["message"],
        }  # fmt: skip
        assert "DOCTYPE" in recorded["message"]
        fine = photo(tmp_path, "IMG_2.jpg")
        assert xmp.write_sidecar(fine, answer("A dog.", "AI/dog"))["keywords"] == ["AI/dog"]

    def test_gigabytes_are_refused_from_the_size_alone(self, tmp_path: Path) -> None:
        path = tmp_path / "IMG_1.jpg.xmp"
        with open(path, "wb") as fh:
            fh.truncate(4 << 30)  # sparse: 4 GiB that take no disk space and would take minutes to read
        with pytest.raises(XMPRefused, match="larger than 16 MiB"):
            xmp.update(path, answer("A dog.", "AI/dog"))
        assert os.stat(path).st_size == 4 << 30

    def test_a_fifo_does_not_hang(self, tmp_path: Path) -> None:
        path = tmp_path / "IMG_1.jpg.xmp"
        os.mkfifo(path)
        with pytest.raises(XMPRefused, match="not a regular file"):
            xmp.update(path, answer("A dog.", "AI/dog"))

    def test_preview_reports_instead_of_raising(self, tmp_path: Path) -> None:
        path = tmp_path / "IMG_1.jpg.xmp"
        path.write_text(self.XXE)
        shown = xmp.preview(path)
        assert shown["exists"] and shown["error"]["kind"] == "xmp_refused"


class TestPreview:
    def test_what_a_dry_run_shows(self, tmp_path: Path) -> None:
        path = tmp_path / "IMG_1.jpg.xmp"
        assert xmp.preview(path) == {"path": str(path), "exists": False, "properties": xmp.PROPERTIES}
        path.write_text(PERSONS)
        xmp.update(path, answer("A dog.", "AI/dog"))
        shown = xmp.preview(path)
        assert shown["description"] == "A dog." and shown["description_is_ours"]
        assert shown["keywords_kept"] == ["Places/France/Paris", "family"]
        assert shown["keywords_ours"] == ["AI/dog"]
        assert set(shown["properties"]) == {
            "dc:description", "dc:subject", "lr:hierarchicalSubject", "digiKam:TagsList", "mmwatchd:*",
        }  # fmt: skip


class TestKeywordsFromTheAnswer:
    def test_schema_keys_or_the_whole_text(self) -> None:
        data = {"caption": " A dog. ", "tags": ["dog", "", 3, "beach"]}
        assert xmp.answer_from_reply(data, "{...}", description="caption", keywords="tags") == (
            "A dog.", ["dog", "beach"],
        )  # fmt: skip
        assert xmp.answer_from_reply({"tags": "dog, beach"}, "", description="caption", keywords="tags") == (
            None, ["dog", " beach"],
        )  # fmt: skip
        assert xmp.answer_from_reply(None, " A dog on a beach.\n", description="caption", keywords="tags") == (
            "A dog on a beach.", [],
        )  # fmt: skip
        assert xmp.answer_from_reply(data, "", description=None, keywords=None) == (None, [])

    def test_the_models_own_separators_are_stripped_and_the_prefix_added(self) -> None:
        keywords, mapping = xmp.our_keywords(["cats/dogs", "a|b", "  sea\x00 side ", "Sea side", ""], prefix="AI/")
        assert keywords == (("AI", "cats dogs"), ("AI", "a b"), ("AI", "sea side"))
        assert mapping is None

    def test_vocabulary_keywords_keep_their_hierarchy(self) -> None:
        vocab = parse_vocabulary("Animals/Dog; dog, dogs, puppy\nPlaces/France/Paris\n")
        keywords, mapping = xmp.our_keywords(["Puppy", "paris", "sand/dune"], prefix="AI", vocabulary=vocab)
        assert keywords == (("Animals", "Dog"), ("Places", "France", "Paris"), ("AI", "sand dune"))
        assert mapping is not None and mapping.unknown == ("sand/dune",)
        dropped, _ = xmp.our_keywords(["Puppy", "sand"], vocabulary=vocab, unknown="drop")
        assert dropped == (("Animals", "Dog"),)

    @pytest.mark.parametrize("bad", ["AI||x", "A|I"])
    def test_a_bad_prefix(self, bad: str) -> None:
        with pytest.raises(ValueError, match="prefix"):
            xmp.split_prefix(bad)


@needs_darktable
@needs_exiftool
def test_darktable_imports_the_sidecar_and_exports_its_tags(tmp_path: Path) -> None:
    """A real photo app: darktable-cli reads IMG_1.jpg.xmp (tags, rating, its own history) and writes the tags into
    the exported JPEG."""
    media = photo(tmp_path)
    path = xmp.xmp_path(media)
    path.write_text(PERSONS)
    xmp.update(path, answer("A dog on a beach.", "AI/dog", "AI/beach"))
    out = tmp_path / "out.jpg"
    done = subprocess.run(
        [DARKTABLE, str(media), str(path), str(out), "--core", "--library", ":memory:",
         "--configdir", str(tmp_path / "darktable")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    exported = exiftool("-j", "-XMP-dc:Subject", "-XMP-xmp:Rating", out)
    subjects = listed(exported["Subject"])
    assert {"dog", "beach", "Paris", "family"} <= set(subjects)
    assert exported["Rating"] == 4
