"""ISO-BMFF box headers, read once for the video rotation walk, the HEIF/AVIF check and the CR3 readers."""

from __future__ import annotations

import io
import struct

import pytest

from mmwatchd.encode import container, image, raw
from mmwatchd.isobmff import BoxHeader, read_header


def box(kind: bytes, body: bytes = b"", *, size: int | None = None) -> bytes:
    return struct.pack(">I4s", 8 + len(body) if size is None else size, kind) + body


def long_box(kind: bytes, body: bytes = b"", *, size: int | None = None) -> bytes:
    return struct.pack(">I4sQ", 1, kind, 16 + len(body) if size is None else size) + body


class TestReadHeader:
    @pytest.mark.parametrize(
        ("data", "expected"),
        [
            (box(b"moov", b"x" * 8), BoxHeader(b"moov", 108, 16)),
            (long_box(b"mdat")[:16], BoxHeader(b"mdat", 116, 16)),
            (box(b"mdat", size=0), BoxHeader(b"mdat", 108, None)),  # runs to the end of the file
            (long_box(b"mdat", size=0), BoxHeader(b"mdat", 116, 0)),  # a 64-bit zero is no "to the end"
        ],
    )
    def test_headers(self, data: bytes, expected: BoxHeader) -> None:
        assert read_header(data, 100) == expected

    @pytest.mark.parametrize("data", [b"", box(b"moov")[:7], long_box(b"mdat")[:15]])
    def test_a_header_cut_short_is_none(self, data: bytes) -> None:
        assert read_header(data, 0) is None


class TestWalks:
    def test_video_walk_stops_at_a_box_past_its_parent(self) -> None:
        data = box(b"moov", box(b"trak") + box(b"free", size=99)) + box(b"mdat", size=0) + b"tail"
        fp = io.BytesIO(data)
        assert list(container._boxes(fp, 0, len(data))) == [(b"moov", 8, 24), (b"mdat", 32, len(data))]
        assert list(container._boxes(fp, 8, 24)) == [(b"trak", 16, 16)]

    @pytest.mark.parametrize(
        ("data", "problem"),
        [
            (box(b"ftyp", b"heic") + box(b"\xa9xyz"), ""),
            (box(b"ftyp") + box(b"mdat", size=0) + b"rest", ""),
            (box(b"ftyp") + long_box(b"mdat")[:12], "truncated"),
            (box(b"ftyp") + box(b"mdat", b"x" * 4, size=20), "truncated"),
            (box(b"ftyp") + long_box(b"mdat", size=0), "damaged"),
            (box(b"ftyp") + box(b"md\x01t"), "damaged"),
        ],
    )
    def test_heif_check(self, data: bytes, problem: str) -> None:
        assert image._scan_isobmff(io.BytesIO(data), len(data)) == problem

    def test_raw_check_says_where_a_header_is_cut(self) -> None:
        short = box(b"ftyp") + box(b"moov")[:4]
        extended = box(b"ftyp") + long_box(b"moov")[:12]
        assert "ends at byte 16 " in raw._boxes_problem(io.BytesIO(short), len(short))
        assert "ends at byte 24 " in raw._boxes_problem(io.BytesIO(extended), len(extended))
        assert raw._boxes_problem(io.BytesIO(long_box(b"\xa9xyz")), 16).startswith("damaged camera RAW file")

    def test_cr3_metadata_inside_a_moov_cut_off_by_the_head(self) -> None:
        canon = box(b"uuid", raw._CANON_UUID + box(b"CMT1", b"II*\x00") + box(b"THMB", b"jpeg"))
        head = box(b"ftyp", b"crx ") + box(b"moov", canon + b"x" * 1000)[: 8 + len(canon) + 10]
        assert raw._cr3_exif(head) == {b"CMT1": box(b"CMT1", b"II*\x00")[8:]}
        assert raw._cr3_exif(box(b"moov", size=0) + canon) == {}  # a moov "to the end of the file" is not read
