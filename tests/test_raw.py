"""Camera RAW files: sniffed from their bytes, decoded from the embedded preview or the raw data, limits and damage."""

from __future__ import annotations

import base64
import io
import itertools
import json
import os
import shutil
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from configs import write_config
from fakevlm import FakeVLM
from hypothesis import HealthCheck, given, settings, strategies as st
from mutations import mutate, mutation
from PIL import Image
from running import spawn_run, stop_run, wait_until

from mmwatchd import rules
from mmwatchd.cli import main
from mmwatchd.encode import raw as raw_module
from mmwatchd.encode.image import encode_image, probe_and_encode_image, probe_image
from mmwatchd.errors import DecodeError, MediaError, MediaTooLarge, UnsupportedMedia
from mmwatchd.isolate import Isolator, LazyFunction
from mmwatchd.media import IMAGE_SUFFIXES, RAW_FORMATS, media_suffix_kind, sniff, sniff_bytes
from mmwatchd.model import EndpointConfig, ImageSpec, Limits, Rule

RAW = Path(__file__).resolve().parents[2] / "shared" / "media" / "raw"
needs_raw = pytest.mark.skipif(not RAW.is_dir(), reason="shared RAW samples not present")
BUDGET = 4_000_000
_serial = itertools.count()


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


def make_dng(
    path: Path,
    *,
    size: tuple[int, int] = (96, 64),
    orientation: int = 1,
    preview: tuple[int, int] | None = (96, 64),
    turned: bool = False,
    make: str = "Apple",
    preview_bytes: bytes | None = None,
    preview_exif: int | None = None,
) -> Path:
    """A small but complete DNG that LibRaw decodes: IFD0 is a JPEG preview (or a 16x16 RGB thumbnail when
    ``preview`` is None) with the Orientation tag, its SubIFD the image as 8-bit LinearRaw RGB.

    The image is blue with a red block in its stored top-left corner, so where the red ends up shows the
    orientation applied. ``turned``: the camera stored the preview already rotated (portrait pixels).
    ``preview_exif``: the preview JPEG carries its own EXIF with this Orientation (as Sony's and Fuji's do).
    """
    width, height = size
    picture = Image.new("RGB", size, (40, 60, 200))
    picture.paste((220, 30, 30), (0, 0, width // 3, height // 3))
    if preview is None:
        shown = picture.resize((16, 16))
        thumb, compression, photometric = shown.tobytes(), 1, 2
    else:
        shown = picture.resize(preview)
        if turned:
            shown = shown.transpose(Image.Transpose.ROTATE_270)
        buf = io.BytesIO()
        exif = Image.Exif()
        if preview_exif is not None:
            exif[0x0112] = preview_exif
        shown.save(buf, "JPEG", quality=90, exif=exif)
        thumb, compression, photometric = preview_bytes or buf.getvalue(), 7, 6
    pixels = picture.tobytes()

    def s(tag: int, value: int) -> tuple[int, int, int, bytes]:
        return (tag, 3, 1, struct.pack("<H", value))

    def long(tag: int, value: int) -> tuple[int, int, int, bytes]:
        return (tag, 4, 1, struct.pack("<I", value))

    rgb8 = (258, 3, 3, struct.pack("<HHH", 8, 8, 8))

    def layout(sub_at: int, thumb_at: int, pixels_at: int) -> tuple[bytes, bytes]:
        ifd0 = [long(254, 1), long(256, shown.width), long(257, shown.height), rgb8, s(259, compression),
                s(262, photometric), ascii_tag(271, make), ascii_tag(272, "Test Camera"), long(273, thumb_at),
                s(274, orientation), s(277, 3), long(278, shown.height), long(279, len(thumb)), long(330, sub_at),
                (0xC612, 1, 4, b"\x01\x04\0\0"), ascii_tag(0xC614, make + " Test Camera")]  # fmt: skip
        sub = [long(254, 0), long(256, width), long(257, height), rgb8, s(259, 1), s(262, 34892),
               long(273, pixels_at), s(277, 3), long(278, height), long(279, len(pixels)), s(0xC61D, 255)]  # fmt: skip
        first = tiff(ifd0)
        return first, ifd_bytes(sub, len(first))

    first, sub = layout(0, 0, 0)
    sub_at = len(first)
    thumb_at = sub_at + len(sub)
    first, sub = layout(sub_at, thumb_at, thumb_at + len(thumb))
    path.write_bytes(first + sub + thumb + pixels)
    return path


def ifd_bytes(entries: list[tuple[int, int, int, bytes]], at: int) -> bytes:
    """One IFD placed at byte ``at`` of a little-endian TIFF, followed by its out-of-line values."""
    data_at = at + 2 + 12 * len(entries) + 4
    ifd, data = b"", b""
    for tag, kind, count, value in sorted(entries):
        if len(value) <= 4:
            ifd += struct.pack("<HHI", tag, kind, count) + value.ljust(4, b"\0")
        else:
            ifd += struct.pack("<HHI", tag, kind, count) + struct.pack("<I", data_at + len(data))
            data += value
    return struct.pack("<H", len(entries)) + ifd + b"\0\0\0\0" + data


def red_corner(img: Image.Image) -> str:
    """Which corner of ``img`` is red: "TL", "TR", "BL" or "BR"."""
    rgb = img.convert("RGB")
    w, h = rgb.size
    corners = {"TL": (1, 1), "TR": (w - 2, 1), "BL": (1, h - 2), "BR": (w - 2, h - 2)}
    red = [name for name, xy in corners.items() if rgb.getpixel(xy)[0] > 150 > rgb.getpixel(xy)[2]]
    assert len(red) == 1, red
    return red[0]


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


class TestSynthetic:
    """Always on: a DNG made here, decoded by LibRaw."""

    @pytest.mark.parametrize(("orientation", "corner"), [(1, "TL"), (3, "BR"), (6, "TR"), (8, "BL")])
    @pytest.mark.parametrize("raw", ["preview", "demosaic"])
    def test_orientation_applied_once(self, tmp_path: Path, orientation: int, corner: str, raw: str) -> None:
        path = make_dng(tmp_path / "IMG_1.DNG", orientation=orientation)
        assert sniff(path).format == "dng"
        facts, part = probe_and_encode_image(path, ImageSpec(max_side=96, raw=raw), budget=BUDGET, limits=Limits())
        want = (64, 96) if orientation >= 5 else (96, 64)
        assert (facts.width, facts.height) == want
        assert (part.width, part.height) == want
        assert red_corner(decoded(part.chunks[0])) == corner

    def test_the_previews_own_exif_orientation_is_not_applied_on_top(self, tmp_path: Path) -> None:
        path = make_dng(tmp_path / "IMG_8.DNG", orientation=6, preview_exif=6)
        part = encode(path, max_side=96)
        assert (part.width, part.height) == (64, 96)
        assert red_corner(decoded(part.chunks[0])) == "TR"

    def test_a_preview_the_camera_already_turned_is_not_turned_again(self, tmp_path: Path) -> None:
        path = make_dng(tmp_path / "IMG_2.DNG", orientation=6, turned=True)
        part = encode(path, max_side=96)
        assert (part.width, part.height) == (64, 96)
        assert red_corner(decoded(part.chunks[0])) == "TR"

    def test_a_preview_smaller_than_the_rule_wants_gives_way_to_the_raw_data(self, tmp_path: Path) -> None:
        # A 48x32 preview of a 96x64 image: at max_side 96 the raw data is developed, at 48 the preview serves.
        path = make_dng(tmp_path / "IMG_3.DNG", preview=(48, 32))
        assert (encode(path, max_side=96).width, encode(path, max_side=48).width) == (96, 48)

    def test_a_bitmap_thumbnail_only_gives_way_to_the_raw_data(self, tmp_path: Path) -> None:
        path = make_dng(tmp_path / "IMG_4.DNG", preview=None, orientation=6)
        part = encode(path, max_side=96)
        assert (part.width, part.height) == (64, 96)
        assert red_corner(decoded(part.chunks[0])) == "TR"

    def test_a_damaged_preview_gives_way_to_the_raw_data(self, tmp_path: Path) -> None:
        path = make_dng(tmp_path / "IMG_5.DNG", preview_bytes=b"\xff\xd8\xff\xdb" + bytes(600))
        part = encode(path, max_side=96)
        assert (part.width, part.height) == (96, 64)
        assert red_corner(decoded(part.chunks[0])) == "TL"

    def test_the_pixel_limit_applies_before_decoding(self, tmp_path: Path) -> None:
        path = make_dng(tmp_path / "IMG_6.DNG")
        message = r"^IMG_6\.DNG: DNG sensor of 6144 pixels exceeds limits\.max_pixels \(6000\)$"
        with pytest.raises(MediaTooLarge, match=message):
            encode(path, limits=Limits(max_pixels=6000))

    def test_a_cut_raf_is_refused_from_its_header(self, tmp_path: Path) -> None:
        # RAF: (offset, length) of the preview, the sensor header and the image data, big-endian, from byte 84.
        header = b"FUJIFILMCCD-RAW 0201FF383501" + b"X-T5".ljust(32, b"\0") + bytes(24)
        header += struct.pack(">6I", 160, 5000, 5160, 400, 5560, 90000)
        path = tmp_path / "DSCF0001.RAF"
        path.write_bytes(header.ljust(160, b"\0") + b"\xff\xd8\xff" + bytes(2000))
        assert sniff(path).format == "raf"
        with pytest.raises(DecodeError, match=r"^DSCF0001\.RAF: truncated camera RAW file: its embedded preview ends "
                                              r"at byte 5160 but the file has 2163 bytes"):  # fmt: skip
            encode(path)

    def test_the_capture_time_of_a_raf_comes_from_its_preview(self, tmp_path: Path) -> None:
        exif = Image.Exif()
        exif.get_ifd(0x8769)[0x9003] = "2024:07:01 18:30:00"
        buf = io.BytesIO()
        Image.new("RGB", (32, 24), "green").save(buf, "JPEG", exif=exif)
        jpeg = buf.getvalue()
        header = b"FUJIFILMCCD-RAW 0201FF383501" + b"X-T5".ljust(32, b"\0") + bytes(24)
        header += struct.pack(">6I", 160, len(jpeg), 0, 0, 0, 0)
        path = tmp_path / "DSCF0002.RAF"
        path.write_bytes(header.ljust(160, b"\0") + jpeg)
        with open(path, "rb") as fp:
            info = raw_module._taken_info(fp)
        found = Image.Exif()
        found.load(info["exif"])
        assert dict(found) == {0x0132: "2024:07:01 18:30:00"}  # the time only: no orientation, nothing else

    def test_a_cut_copy_is_truncated_not_black(self, tmp_path: Path) -> None:
        data = make_dng(tmp_path / "whole.dng").read_bytes()
        (tmp_path / "IMG_7.DNG").write_bytes(data[:-100])
        with pytest.raises(DecodeError, match=r"^IMG_7\.DNG: truncated camera RAW file: its image data ends at byte"):
            encode(tmp_path / "IMG_7.DNG", raw="demosaic")


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

    def test_libraw_prints_nothing_on_stderr(self, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
        # Zeroed bytes inside the lossy-JPEG tiles of this DNG: libjpeg inside LibRaw warns "Corrupt JPEG data" on
        # fd 2, where the daemon's JSON log goes. The picture still develops.
        data = bytearray((RAW / "canon_eos_6d.dng").read_bytes())
        data[len(data) // 2 : len(data) // 2 + 512] = bytes(512)
        (tmp_path / "z.dng").write_bytes(data)
        capfd.readouterr()
        assert encode(tmp_path / "z.dng", max_side=256, raw="demosaic").width == 256
        print("still here", file=sys.stderr)
        assert capfd.readouterr().err == "still here\n"

    def test_the_capture_time_of_a_cr3_comes_from_canons_metadata_boxes(self) -> None:
        # The image tracks are pruned (encoding fails, see TestDamaged), but the header and the CMT boxes are there.
        facts = probe_image(RAW / "bad" / "Canon-R6-pruned.CR3", limits=Limits())
        assert (facts.format, facts.width, facts.height) == ("CR3", 3584, 2386)
        assert facts.taken == "2021-05-12 12:21:21"

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
                        LazyFunction("mmwatchd.encode.image", "probe_and_encode_image"),
                        RAW / "bad" / name,
                        ImageSpec(max_side=1024),
                        budget=BUDGET,
                        limits=Limits(),
                        label=name,
                    )
            facts, part = iso.call(
                LazyFunction("mmwatchd.encode.image", "probe_and_encode_image"),
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


class TestCommand:
    """``mmwatchd once`` on a folder of RAW files, against the fake server: what a person runs."""

    @pytest.fixture(autouse=True)
    def _reset_logging(self) -> Iterator[None]:
        yield
        structlog.reset_defaults()

    def test_once_describes_raw_files_and_refuses_cut_ones(
        self, tmp_path: Path, fake_vlm: FakeVLM, capsys: pytest.CaptureFixture[str]
    ) -> None:
        cfg = write_config(tmp_path, base_url=fake_vlm.base_url, rule={"image": {"max_side": 64}})
        inbox = tmp_path / "inbox"
        good = make_dng(inbox / "IMG_0001.DNG", orientation=6, make="Apple")
        cut = inbox / "IMG_0002.DNG"
        cut.write_bytes(good.read_bytes()[:-10])
        assert main(["once", "-c", str(cfg), str(good), str(cut)]) == 1
        capsys.readouterr()
        done = json.loads((inbox / "IMG_0001.DNG.json").read_text())
        assert done["status"] == "ok"
        assert {k: done["media"][k] for k in ("kind", "format", "width", "height")} == {
            "kind": "image", "format": "DNG", "width": 64, "height": 96,
        }  # fmt: skip
        (request,) = fake_vlm.chat_requests
        (image,) = [p for p in request.content if p["type"] == "image_url"]
        prefix, _, payload = image["image_url"]["url"].partition(",")
        assert prefix == "data:image/jpeg;base64"
        sent = decoded(base64.b64decode(payload))
        assert sent.size == (42, 64) and red_corner(sent) == "TR"
        failed = json.loads((inbox / "IMG_0002.DNG.json").read_text())
        assert failed["status"] == "error"
        assert failed["error"]["message"].startswith("IMG_0002.DNG: truncated camera RAW file")

    def test_the_daemon_describes_a_raw_file_moved_into_the_inbox(self, tmp_path: Path, fake_vlm: FakeVLM) -> None:
        # `mmwatchd run` as systemd runs it: the watcher, the decoder processes (rawpy is imported there on the
        # first RAW file), the sidecar; SIGTERM, and no LibRaw text in the JSON log.
        cfg = write_config(tmp_path, base_url=fake_vlm.base_url, rule={"image": {"max_side": 64}})
        inbox = tmp_path / "inbox"
        proc = spawn_run(cfg, tmp_path, env={"MMWATCHD_TEST_KEY": "sk-raw"})
        try:
            staged = make_dng(tmp_path / "staged.dng", orientation=8)
            os.rename(staged, inbox / "IMG_0003.DNG")
            wait_until(lambda: (inbox / "IMG_0003.DNG.json").exists())
        finally:
            stop_run(proc, tmp_path)
        done = json.loads((inbox / "IMG_0003.DNG.json").read_text())
        assert done["status"] == "ok" and done["media"]["format"] == "DNG"
        assert (done["media"]["width"], done["media"]["height"]) == (64, 96)
        log = (tmp_path / "run.log").read_bytes()
        assert all(line.startswith(b"{") for line in log.splitlines() if line.strip()), log[-2000:]

    @needs_raw
    def test_dry_run_over_the_real_samples(
        self, tmp_path: Path, fake_vlm: FakeVLM, capsys: pytest.CaptureFixture[str]
    ) -> None:
        cfg = write_config(tmp_path, base_url=fake_vlm.base_url, rule={"image": {"max_side": 512}})
        names = ["sample.nef", "CRW.CRW", "canon_eos_6d.dng", "RAW_KODAK_DC50.KDC", "GOPR0024.GPR"]
        files = [shutil.copy(RAW / n, tmp_path / "inbox" / n) for n in names]
        files += [shutil.copy(RAW / "bad" / n, tmp_path / "inbox" / n) for n in ("sample.arw", "IMG_1361.dng")]
        assert main(["once", "-c", str(cfg), "--dry-run", *map(str, files)]) == 1
        plans = {Path(p["path"]).name: p for p in json.loads(capsys.readouterr().out)["files"]}
        for name, fmt in zip(names[:4], ["NEF", "CRW", "DNG", "KDC"], strict=True):
            assert plans[name]["status"] == "planned" and plans[name]["media"]["format"] == fmt
            (part,) = plans[name]["media"]["parts"]
            assert max(part["width"], part["height"]) <= 512
        assert "cannot decode this DNG" in plans["GOPR0024.GPR"]["reason"]
        assert "truncated" in plans["sample.arw"]["reason"] and "truncated" in plans["IMG_1361.dng"]["reason"]
        assert fake_vlm.chat_requests == []


class TestFingerprint:
    def test_the_raw_setting_leaves_existing_fingerprints_alone(self) -> None:
        # The value before image.raw existed: upgrading must not send every photo again.
        endpoint = EndpointConfig(base_url="http://127.0.0.1:1/v1", model="m")
        rule = Rule(name="photos", prompt="Describe {name}.")
        assert rules.fingerprint(rule, endpoint) == "sha256:87bdf298c8b4556d3f883add70ef6494"
        developed = Rule(name="photos", prompt="Describe {name}.", image=ImageSpec(raw="demosaic"))
        assert rules.fingerprint(developed, endpoint) != rules.fingerprint(rule, endpoint)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("raw-seeds")
    found = {"made.dng": make_dng(folder / "made.dng", orientation=6).read_bytes()}
    for name in ("canon_eos_6d.dng", "RAW_KODAK_DC50.KDC"):
        if (RAW / name).is_file():
            found[name] = (RAW / name).read_bytes()
    return found


@pytest.fixture(scope="module")
def isolator() -> Iterator[Isolator]:
    with Isolator(workers=1, timeout_s=20, memory_bytes=1 << 30, preload=("mmwatchd.encode",)) as iso:
        yield iso


class TestFuzz:
    @settings(max_examples=300, deadline=None)
    @given(body=st.binary(max_size=2048), order=st.sampled_from([b"II*\0", b"MM\0*", b"IIRO", b"IIU\0"]))
    def test_sniffing_any_tiff_like_bytes_never_raises(self, body: bytes, order: bytes) -> None:
        found = sniff_bytes(order + body)
        assert found.kind in ("image", None)

    @settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(pick=st.integers(0, 2), how=mutation, raw=st.sampled_from(["preview", "demosaic"]))
    def test_a_damaged_raw_ends_in_an_image_or_a_media_error(
        self,
        seeds: dict[str, bytes],
        isolator: Isolator,
        tmp_path: Path,
        pick: int,
        how: tuple,  # type: ignore[type-arg]
        raw: str,
    ) -> None:
        name = sorted(seeds)[pick % len(seeds)]
        path = tmp_path / f"fuzz-{next(_serial)}-{name}"
        path.write_bytes(mutate(seeds[name], how))
        try:
            spec = ImageSpec(max_side=256, raw=raw)  # type: ignore[arg-type]
            encode = LazyFunction("mmwatchd.encode.image", "encode_image")
            part = isolator.call(encode, path, spec, budget=BUDGET, limits=Limits(), label=path.name)
        except MediaError as exc:
            assert str(exc).startswith(path.name + ": ")
            # Our own code never fails with a stray Python exception (that is what "decoding failed: <Type>" means);
            # LibRaw crashing in the decoder process would be isolated, and is reported as such.
            assert ": decoding failed: " not in str(exc), str(exc)
        else:
            assert 0 < max(part.width, part.height) <= 256
