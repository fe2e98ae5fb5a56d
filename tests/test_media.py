"""Sniffing: what a file is, from its bytes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from media import (
    make_avif,
    make_bmp,
    make_empty,
    make_gif,
    make_heic,
    make_jpeg,
    make_named_text,
    make_pdf,
    make_png,
    make_tiff,
    make_video,
    make_webp,
    make_zip,
)

from mmwatchd.media import (
    IMAGE_SUFFIXES,
    VIDEO_SUFFIXES,
    Sniffed,
    media_suffix_kind,
    sniff,
    sniff_bytes,
)

SHARED_MEDIA = Path(__file__).resolve().parents[2] / "shared" / "media"


def ftyp(major: bytes, *compatible: bytes) -> bytes:
    body = major + b"\0\0\0\0" + b"".join(compatible)
    return (8 + len(body)).to_bytes(4, "big") + b"ftyp" + body + b"\0\0\0\x08free"


class TestGeneratedFiles:
    """Real files written by Pillow, pillow-heif and PyAV, under misleading names: the bytes decide."""

    @pytest.mark.parametrize(
        ("maker", "fmt", "mime"),
        [
            (make_jpeg, "jpeg", "image/jpeg"),
            (make_png, "png", "image/png"),
            (make_gif, "gif", "image/gif"),
            (make_webp, "webp", "image/webp"),
            (make_tiff, "tiff", "image/tiff"),
            (make_bmp, "bmp", "image/bmp"),
            (make_heic, "heif", "image/heic"),
            (make_avif, "avif", "image/avif"),
        ],
    )
    def test_images(self, tmp_path: Path, maker, fmt: str, mime: str) -> None:
        path = maker(tmp_path / "misnamed.mp4", (32, 24))
        assert sniff(path) == Sniffed("image", fmt, mime)

    @pytest.mark.parametrize(
        ("suffix", "size", "fmt", "mime"),
        [
            (".mp4", (64, 48), "mp4", "video/mp4"),
            (".mov", (64, 48), "mov", "video/quicktime"),
            (".mkv", (64, 48), "mkv", "video/x-matroska"),
            (".webm", (64, 48), "webm", "video/webm"),
            (".avi", (64, 48), "avi", "video/x-msvideo"),
            (".ts", (64, 48), "mpegts", "video/mp2t"),
            (".mpg", (64, 48), "mpeg", "video/mpeg"),
            (".wmv", (64, 48), "asf", "video/x-ms-asf"),
            (".flv", (64, 48), "flv", "video/x-flv"),
            (".3gp", (176, 144), "mp4", "video/3gpp"),
        ],
    )
    def test_videos(self, tmp_path: Path, suffix: str, size: tuple[int, int], fmt: str, mime: str) -> None:
        written = make_video(tmp_path / f"clip{suffix}", size, frames=3)
        path = written.rename(tmp_path / "clip.jpg")
        assert sniff(path) == Sniffed("video", fmt, mime)

    @pytest.mark.parametrize(
        ("maker", "why"),
        [
            (make_empty, "empty file"),
            (make_named_text, "looks like text"),
            (make_pdf, "looks like a PDF document"),
            (make_zip, "looks like a ZIP archive (or an Office document)"),
        ],
    )
    def test_not_media(self, tmp_path: Path, maker, why: str) -> None:
        assert sniff(maker(tmp_path / "IMG_0001.jpg")) == Sniffed(None, "", "", why)

    def test_reads_only_the_head(self, tmp_path: Path) -> None:
        path = tmp_path / "big.jpg"
        path.write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 10_000_000)
        assert sniff(path).format == "jpeg"

    def test_os_errors_propagate(self, tmp_path: Path) -> None:
        with pytest.raises(FileNotFoundError):
            sniff(tmp_path / "gone.jpg")
        with pytest.raises(OSError, match="not a regular file"):
            sniff(tmp_path)
        os.mkfifo(tmp_path / "pipe.jpg")  # would block a plain open() forever
        with pytest.raises(OSError, match="not a regular file"):
            sniff(tmp_path / "pipe.jpg")
        if os.geteuid() == 0:  # making a device node needs root
            os.mknod(tmp_path / "zero.jpg", 0o644 | stat.S_IFCHR, os.makedev(1, 5))  # /dev/zero: endless reads
            with pytest.raises(OSError, match="not a regular file"):
                sniff(tmp_path / "zero.jpg")


class TestIsoBmffBrands:
    @pytest.mark.parametrize(
        ("head", "kind", "fmt", "mime"),
        [
            (ftyp(b"heic", b"mif1", b"heic"), "image", "heif", "image/heic"),
            (ftyp(b"heix", b"mif1"), "image", "heif", "image/heic"),
            (ftyp(b"hevc", b"msf1"), "image", "heif", "image/heic"),
            (ftyp(b"heim"), "image", "heif", "image/heic"),
            (ftyp(b"heis"), "image", "heif", "image/heic"),
            (ftyp(b"mif1", b"mif1", b"heic"), "image", "heif", "image/heic"),
            (ftyp(b"mif1", b"mif1", b"MiHE"), "image", "heif", "image/heif"),
            (ftyp(b"msf1", b"iso8", b"avis"), "image", "avif", "image/avif"),
            (ftyp(b"mif1", b"avif", b"mif1", b"miaf"), "image", "avif", "image/avif"),
            (ftyp(b"avif", b"mif1"), "image", "avif", "image/avif"),
            (ftyp(b"avis", b"msf1"), "image", "avif", "image/avif"),
            (ftyp(b"qt  ", b"qt  "), "video", "mov", "video/quicktime"),
            (ftyp(b"isom", b"isom", b"iso2", b"avc1", b"mp41"), "video", "mp4", "video/mp4"),
            (ftyp(b"iso5", b"iso6", b"mp41"), "video", "mp4", "video/mp4"),
            (ftyp(b"mp42", b"mp42", b"isom"), "video", "mp4", "video/mp4"),
            (ftyp(b"avc1"), "video", "mp4", "video/mp4"),
            (ftyp(b"dash", b"iso6"), "video", "mp4", "video/mp4"),
            (ftyp(b"M4V ", b"M4V ", b"mp42"), "video", "mp4", "video/mp4"),
            (ftyp(b"3gp4", b"3gp4"), "video", "mp4", "video/3gpp"),
            (ftyp(b"3g2a"), "video", "mp4", "video/3gpp2"),
            (ftyp(b"XAVC", b"mp42"), "video", "mp4", "video/mp4"),
            (ftyp(b"abcd", b"abcd", b"isom"), "video", "mp4", "video/mp4"),  # unknown major, known compatible
        ],
    )
    def test_brands(self, head: bytes, kind: str, fmt: str, mime: str) -> None:
        assert sniff_bytes(head) == Sniffed(kind, fmt, mime)  # type: ignore[arg-type]

    @pytest.mark.parametrize(
        ("head", "says"),
        [
            (ftyp(b"M4A ", b"M4A ", b"mp42"), "audio"),
            (ftyp(b"jp2 "), "JPEG 2000"),
            (ftyp(b"zzzz", b"yyyy"), "unknown type (brand 'zzzz')"),
        ],
    )
    def test_not_handled(self, head: bytes, says: str) -> None:
        found = sniff_bytes(head)
        assert found.kind is None and found.format == "" and found.mime == ""
        assert says in found.why


class TestSignatures:
    @pytest.mark.parametrize(
        ("head", "kind", "fmt"),
        [
            (b"\xff\xd8\xff\xe1\x00\x10Exif", "image", "jpeg"),
            (b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", "image", "png"),
            (b"GIF87a\x01\x00", "image", "gif"),
            (b"GIF89a\x01\x00", "image", "gif"),
            (b"RIFF\x10\0\0\0WEBPVP8 ", "image", "webp"),
            (b"RIFF\x10\0\0\0AVI LIST", "video", "avi"),
            (b"II*\0\x08\0\0\0", "image", "tiff"),
            (b"MM\0*\0\0\0\x08", "image", "tiff"),
            (b"II+\0\x08\0\0\0", "image", "tiff"),
            (b"BM\x36\x00\x0c\x00\0\0\0\0\x36\0\0\0\x28\0\0\0", "image", "bmp"),
            (b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01\x42\x82\x84webm\x42\x87", "video", "webm"),
            (b"\x1a\x45\xdf\xa3\xa3\x42\x86\x81\x01\x42\x82\x88matroska", "video", "mkv"),
            (b"\x1a\x45\xdf\xa3", "video", "mkv"),  # DocType not in view: Matroska is the family
            ((b"\x47" + b"\xff" * 187) * 2, "video", "mpegts"),
            ((b"\0\0\0\0\x47" + b"\xff" * 187) * 2, "video", "mpegts"),  # M2TS: 4-byte timecode first
            (b"\0\0\x01\xba\x44\0\x04", "video", "mpeg"),
        ],
    )
    def test_media(self, head: bytes, kind: str, fmt: str) -> None:
        found = sniff_bytes(head)
        assert (found.kind, found.format) == (kind, fmt)
        assert found.mime and not found.why

    @pytest.mark.parametrize(
        ("head", "why"),
        [
            (b"", "empty file"),
            (b"hello, world\n", "looks like text"),
            ("Grüße aus Köln, 写真\n".encode(), "looks like text"),
            ("é".encode() * 300, "looks like text"),  # the head may end inside a character
            (b"\xef\xbb\xbfBOM text", "looks like text"),
            (b"BMW 320d, 2019\n", "looks like text"),  # "BM" alone does not make a bitmap
            (b"G" * 400, "looks like text"),  # nor does 0x47 without a second sync byte at 188
            (b"%PDF-1.7\n", "looks like a PDF document"),
            (b"PK\x03\x04\x14\0", "looks like a ZIP archive (or an Office document)"),
            (b"\x1f\x8b\x08\0", "looks like a gzip archive"),
            (b"RIFF\x10\0\0\0WAVEfmt ", "looks like WAV audio"),
            (b"ID3\x04\0", "looks like MP3 audio"),
            (b"\x7fELF\x02\x01", "looks like an executable program (ELF)"),
            (b"<?xml version='1.0'?><svg xmlns='http://www.w3.org/2000/svg'/>", "looks like an SVG drawing"),
            (b"<!DOCTYPE html><html>", "looks like a web page (HTML)"),
            (b"\0" * 512, "starts with zero bytes only"),
            (b"\x01\x02\x03\xfe\xfd\x00\x00\x10", "unrecognised binary data (starts with 01 02 03 fe fd 00 00 10 ...)"),
        ],
    )
    def test_not_media(self, head: bytes, why: str) -> None:
        found = sniff_bytes(head)
        assert found.kind is None and found.format == "" and found.mime == ""
        assert found.why.startswith(why)


class TestSuffixes:
    @pytest.mark.parametrize("name", ["a.jpg", "a.JPG", "a.jpeg", "a.HEIC", "a.hif", "a.avif", "a.mpo", "a.Tiff"])
    def test_images(self, name: str) -> None:
        assert media_suffix_kind(Path(name)) == "image"

    @pytest.mark.parametrize("name", ["a.mp4", "a.MOV", "a.m2ts", "a.mts", "a.3gp", "a.webm", "a.mpeg"])
    def test_videos(self, name: str) -> None:
        assert media_suffix_kind(Path(name)) == "video"

    @pytest.mark.parametrize("name", ["a.json", "a", "a.jpg.part", ".jpg", "a.txt"])
    def test_other(self, name: str) -> None:
        assert media_suffix_kind(Path(name)) is None

    def test_sets_are_lower_case_with_dot(self) -> None:
        for suffix in IMAGE_SUFFIXES | VIDEO_SUFFIXES:
            assert suffix.startswith(".") and suffix == suffix.lower()
        assert not IMAGE_SUFFIXES & VIDEO_SUFFIXES


@pytest.mark.skipif(not SHARED_MEDIA.is_dir(), reason="shared media corpus not present")
class TestSharedCorpus:
    def test_every_image_sniffs_as_image(self) -> None:
        for path in sorted((SHARED_MEDIA / "images").rglob("*")):
            if path.is_file():
                assert sniff(path).kind == "image", path.name

    def test_every_video_sniffs_as_video(self) -> None:
        for path in sorted((SHARED_MEDIA / "videos").rglob("*")):
            if path.is_file() and path.suffix != ".gif":  # iss634.gif: an animated GIF kept as a "video"
                assert sniff(path).kind == "video", path.name

    @pytest.mark.parametrize(
        ("name", "fmt"),
        [
            ("images/arrow.heic", "heif"),
            ("images/pug.heic", "heif"),
            ("images/example.avif", "avif"),
            ("images/star.avifs", "avif"),
            ("images/frozenpond.mpo", "jpeg"),
            ("images/iss634.webp", "webp"),
            ("videos/frames.webm", "webm"),
            ("videos/multi-cluster.mkv", "mkv"),
            ("videos/no-correct-videoframe-format.mov", "mov"),
            ("videos/av1-aac.avi", "avi"),
            ("videos/rotate-buck-bunny.mp4", "mp4"),
            ("videos/mp4-with-audio.mp4", "mp4"),  # audio only, but the brand says mp4: the decoder finds out
        ],
    )
    def test_formats(self, name: str, fmt: str) -> None:
        assert sniff(SHARED_MEDIA / name).format == fmt
