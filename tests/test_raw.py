"""Camera RAW files: sniffed from their bytes, decoded from the embedded preview or the raw data, limits and damage."""

from __future__ import annotations

import io
import shutil
import struct
from pathlib import Path

import pytest
from PIL import Image

from mmwatchd.encode.image import encode_image, probe_and_encode_image, probe_image
from mmwatchd.errors import DecodeError, MediaTooLarge, UnsupportedMedia
from mmwatchd.isolate import ByName, Isolator
from mmwatchd.media import IMAGE_SUFFIXES, RAW_FORMATS, media_suffix_kind, sniff, sniff_bytes
from mmwatchd.model import ImageSpec, Limits

RAW = Path(__file__).resolve().parents[2] / "shared" / "media" / "raw"
needs_raw = pytest.mark.skipif(not RAW.is_dir(), reason="shared RAW samples not present")
BUDGET = 4_000_000


def tiff(entries: list[tuple[int, int, int, bytes]], *, order: str = "<", extra: bytes = b"") -> bytes:
    """A one-IFD TIFF: entries are (tag, type, count, value bytes, inline when at most 4 bytes)."""
    magic = b"II*\0" if order == "<" else b"MM\0*"
    ifd_at = 8
    data_at = ifd_at + 2 + 12 * len(entries) + 4
    ifd, data = b"", b""
    for tag, kind, count, value in sorted(entries):
        if len(value) <= 4:
            field = value.ljust(4, b"\0")
        else:
            field = struct.pack(order + "I", data_at + len(data))
            data += value
        ifd += struct.pack(order + "HHI", tag, kind, count) + field
    body = struct.pack(order + "H", len(entries)) + ifd + b"\0\0\0\0" + data + extra
    return magic + struct.pack(order + "I", ifd_at) + body


def ascii_tag(tag: int, text: str) -> tuple[int, int, int, bytes]:
    raw = text.encode() + b"\0"
    return (tag, 2, len(raw), raw)


def short(tag: int, value: int) -> tuple[int, int, int, bytes]:
    return (tag, 3, 1, struct.pack("<H", value))


class TestSniff:
    @needs_raw
    @pytest.mark.parametrize(
        ("name", "fmt"),
        [
            ("sample.nef", "nef"),
            ("CRW.CRW", "crw"),
            ("canon_eos_6d.dng", "dng"),
            ("RAW_KODAK_DC50.KDC", "kdc"),
            ("GOPR0024.GPR", "dng"),
            ("bad/IMG_1361.dng", "dng"),
            ("bad/Canon-R6-pruned.CR3", "cr3"),
            ("bad/sample.arw", "arw"),
            ("bad/jølstravatnet.pef", "pef"),
        ],
    )
    def test_real_files(self, name: str, fmt: str) -> None:
        found = sniff(RAW / name)
        assert (found.kind, found.format) == ("image", fmt)
        assert fmt in RAW_FORMATS

    @needs_raw
    def test_a_renamed_raw_is_still_a_raw(self, tmp_path: Path) -> None:
        shutil.copy(RAW / "sample.nef", tmp_path / "IMG_1.jpg")
        assert sniff(tmp_path / "IMG_1.jpg").format == "nef"

    @pytest.mark.parametrize(
        ("head", "fmt"),
        [
            (b"IIRO\x08\0\0\0" + bytes(24), "orf"),
            (b"IIRS\x08\0\0\0" + bytes(24), "orf"),
            (b"MMOR\0\0\0\x08" + bytes(24), "orf"),
            (b"IIU\0\x08\0\0\0" + bytes(24), "rw2"),
            (b"FUJIFILMCCD-RAW 0201FF383501", "raf"),
            (b"II\x1a\0\0\0HEAPCCDR\x02\0" + bytes(16), "crw"),
            (b"II*\0\x10\0\0\0CR\x02\0" + bytes(20), "cr2"),
            (b"\0\0\0\x18ftypcrx \0\0\0\x01crx isom", "cr3"),
            (b"\0MRM\0\0\0\x08" + bytes(24), "mrw"),
            (b"FOVb" + bytes(28), "x3f"),
        ],
    )
    def test_signatures(self, head: bytes, fmt: str) -> None:
        found = sniff_bytes(head)
        assert (found.kind, found.format) == ("image", fmt)
        assert found.mime.startswith("image/x-")

    @pytest.mark.parametrize(
        ("entries", "fmt"),
        [
            ([(0xC612, 1, 4, b"\x01\x04\0\0"), ascii_tag(0x010F, "Apple")], "dng"),  # a phone DNG
            ([ascii_tag(0x010F, "NIKON CORPORATION"), short(0x0106, 32803)], "nef"),
            ([ascii_tag(0x010F, "NIKON"), ascii_tag(0x0110, "COOLPIX P7000"), short(0x0103, 34713)], "nrw"),
            ([ascii_tag(0x010F, "SONY"), (0xC634, 1, 4, b"\0\0\0\0")], "arw"),
            ([ascii_tag(0x010F, "PENTAX Corporation"), short(0x0103, 65535)], "pef"),
            ([ascii_tag(0x010F, "SAMSUNG"), short(0x0106, 32803)], "srw"),
            ([ascii_tag(0x010F, "Hasselblad"), short(0x0106, 32803)], "3fr"),
            ([ascii_tag(0x010F, "Someone New"), (0x828E, 1, 4, b"\0\x01\x01\x02")], "raw"),
        ],
    )
    def test_tiff_based(self, entries: list[tuple[int, int, int, bytes]], fmt: str) -> None:
        found = sniff_bytes(tiff(entries))
        assert (found.kind, found.format) == ("image", fmt)

    @pytest.mark.parametrize(
        "entries",
        [
            [],
            [ascii_tag(0x010F, "NIKON CORPORATION"), short(0x0106, 2), short(0x0103, 1)],  # a camera's own TIFF
            [ascii_tag(0x010F, "Canon"), short(0x0106, 2), short(0x0103, 5)],  # a scanner's LZW TIFF
            [ascii_tag(0x010F, "SONY"), short(0x0106, 1), short(0x0103, 32773)],  # PackBits is ordinary TIFF
        ],
    )
    def test_ordinary_tiffs_stay_tiffs(self, entries: list[tuple[int, int, int, bytes]]) -> None:
        assert sniff_bytes(tiff(entries)).format == "tiff"

    def test_a_pillow_tiff_with_camera_tags_stays_a_tiff(self, tmp_path: Path) -> None:
        exif = Image.Exif()
        exif[0x010F], exif[0x0110], exif[0x0112] = "NIKON CORPORATION", "NIKON D850", 6
        Image.new("RGB", (64, 48), "red").save(tmp_path / "a.tif", exif=exif)
        assert sniff(tmp_path / "a.tif").format == "tiff"

    def test_raw_names_claim_an_image(self) -> None:
        for suffix in (".CR2", ".cr3", ".nef", ".ARW", ".dng", ".raf", ".orf", ".rw2", ".pef", ".srw"):
            assert media_suffix_kind(Path("IMG_1" + suffix)) == "image"
            assert suffix.lower() in IMAGE_SUFFIXES


def decoded(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


@needs_raw
class TestDecode:
    def test_the_embedded_preview_is_used_when_large_enough(self) -> None:
        # canon_eos_6d.dng: raw 1224x816 (linear DNG), JPEG preview 1024x683.
        facts, part = probe_and_encode_image(
            RAW / "canon_eos_6d.dng", ImageSpec(max_side=1024), budget=BUDGET, limits=Limits()
        )
        assert (facts.format, facts.width, facts.height) == ("DNG", 1224, 816)
        assert facts.taken == "2019-06-06 07:29:51"
        assert (part.width, part.height, part.mime, part.origin) == (1024, 683, "image/jpeg", "encoded")
        img = decoded(part.chunks[0])
        assert img.size == (1024, 683) and not img.getexif()  # no metadata on the wire

    def test_preview_and_demosaic_show_the_same_picture(self) -> None:
        preview = decoded(encode(RAW / "canon_eos_6d.dng", max_side=256).chunks[0])
        developed = decoded(encode(RAW / "canon_eos_6d.dng", max_side=256, raw="demosaic").chunks[0])
        assert preview.size[0] == developed.size[0] == 256
        assert abs(preview.size[1] - developed.size[1]) <= 1
        a = preview.convert("L").resize((32, 21))
        b = developed.convert("L").resize((32, 21))
        diff = sum(abs(x - y) for x, y in zip(a.tobytes(), b.tobytes(), strict=True)) / (32 * 21)
        assert diff < 40  # the same scene (different rendering), not noise or a black frame

    def test_a_small_preview_falls_back_to_the_raw_data(self) -> None:
        # CRW.CRW: a 1440x960 JPEG preview of a 2176x1448 image. At 1024 px the preview serves; at 2048 it is too
        # small, and the raw data is demosaiced (full size: half of 2176 would be smaller than 2048 too).
        small = encode(RAW / "CRW.CRW", max_side=1024, max_pixels=10**7)
        assert (small.width, small.height) == (1024, 682)
        big = encode(RAW / "CRW.CRW", max_side=2048, max_pixels=10**7)
        assert big.width == 2048 and big.height in (1362, 1363)

    def test_a_file_without_a_jpeg_preview_is_developed(self) -> None:
        # sample.nef (Nikon D1): only a 160x120 bitmap thumbnail.
        facts, part = probe_and_encode_image(
            RAW / "sample.nef", ImageSpec(max_side=1000), budget=BUDGET, limits=Limits()
        )
        assert (facts.format, facts.width, facts.height) == ("NEF", 2012, 1324)
        assert facts.taken == "2000-11-19 13:01:50"
        assert (part.width, part.height) == (1000, 658)
        img = decoded(part.chunks[0]).convert("L")
        low, high = img.getextrema()
        assert high - low > 100  # a developed picture, not a flat frame

    def test_probe_decodes_nothing(self) -> None:
        facts = probe_image(RAW / "RAW_KODAK_DC50.KDC", limits=Limits())
        assert (facts.format, facts.width, facts.height, facts.frames) == ("KDC", 768, 512, 1)
        assert facts.taken == "1997-04-23 08:00:47"

    def test_the_pixel_limit_is_checked_on_the_sensor_size(self) -> None:
        with pytest.raises(MediaTooLarge, match=r"^sample\.nef: NEF sensor of 2663888 pixels exceeds limits\.max_"):
            encode(RAW / "sample.nef", limits=Limits(max_pixels=2_000_000))
        with pytest.raises(MediaTooLarge, match=r"limits\.max_pixels"):
            probe_image(RAW / "sample.nef", limits=Limits(max_pixels=2_000_000))

    def test_the_file_size_limit_applies(self) -> None:
        with pytest.raises(MediaTooLarge, match=r"^CRW\.CRW: 3591114 bytes exceeds limits\.max_file_bytes"):
            encode(RAW / "CRW.CRW", limits=Limits(max_file_bytes=1_000_000))

    def test_a_codec_libraw_lacks_is_named(self) -> None:
        with pytest.raises(UnsupportedMedia, match=r"^GOPR0024\.GPR: LibRaw [\d.]+ cannot decode this DNG .*VC-5"):
            encode(RAW / "GOPR0024.GPR")

    def test_a_bare_sensor_dump_is_not_taken_for_an_image(self) -> None:
        # No header at all: LibRaw knows it by its exact size; nothing in its bytes says "image".
        with pytest.raises(UnsupportedMedia, match=r"not an image: unrecognised binary data"):
            encode(RAW / "RAW_KODAK_C330_FORMAT_NONE_YRGB.raw")


def encode(path: Path, *, limits: Limits | None = None, **spec: object):  # type: ignore[no-untyped-def]
    return encode_image(path, ImageSpec(**spec), budget=BUDGET, limits=limits or Limits())  # type: ignore[arg-type]


BAD = [
    ("IMG_1361.dng", DecodeError, r"^IMG_1361\.dng: truncated camera RAW file: its image data ends at byte 5428539"),
    ("jølstravatnet.pef", DecodeError, r"^jølstravatnet\.pef: truncated camera RAW file: its image data ends"),
    ("sample.arw", DecodeError, r"^sample\.arw: truncated camera RAW file: its embedded preview ends at byte"),
    ("Canon-R6-pruned.CR3", DecodeError, r"^Canon-R6-pruned\.CR3: truncated CR3 \(its image data ends early"),
]


@needs_raw
class TestDamaged:
    @pytest.mark.parametrize(("name", "error", "message"), BAD)
    @pytest.mark.parametrize("raw", ["preview", "demosaic"])
    def test_in_process(self, name: str, error: type[Exception], message: str, raw: str) -> None:
        with pytest.raises(error, match=message):
            encode(RAW / "bad" / name, raw=raw)

    def test_through_the_decoder_processes(self) -> None:
        with Isolator(workers=1, timeout_s=60, memory_bytes=1 << 30, preload=("mmwatchd.encode",)) as iso:
            for name, error, message in BAD:
                with pytest.raises(error, match=message):
                    iso.call(
                        ByName("mmwatchd.encode.image", "probe_and_encode_image"),
                        RAW / "bad" / name,
                        ImageSpec(max_side=1024),
                        budget=BUDGET,
                        limits=Limits(),
                        label=name,
                    )
            facts, part = iso.call(
                ByName("mmwatchd.encode.image", "probe_and_encode_image"),
                RAW / "sample.nef",
                ImageSpec(max_side=512),
                budget=BUDGET,
                limits=Limits(),
                label="sample.nef",
            )
            assert (facts.format, part.width) == ("NEF", 512)

    def test_cut_copies_of_good_files_fail_cleanly(self, tmp_path: Path) -> None:
        # A half-copied file at several points: never a crash, a hang or a picture made from what is missing.
        for name in ("canon_eos_6d.dng", "sample.nef", "CRW.CRW"):
            data = (RAW / name).read_bytes()
            for cut in (16, 300, len(data) // 3, len(data) - 1000):
                path = tmp_path / f"cut-{cut}-{name}"
                path.write_bytes(data[:cut])
                try:
                    encode(path, max_side=512)
                except (DecodeError, UnsupportedMedia) as exc:
                    assert str(exc).startswith(path.name + ": ")
                else:
                    pytest.fail(f"{path.name} decoded although cut at byte {cut}")
