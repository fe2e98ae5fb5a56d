"""What a file is, judged by its first bytes, never by its name.

Cameras, phones and sync tools name files in every way (``IMG_1.JPG`` that is a HEIC, ``.mp4`` that is audio only,
``photo.jpg.part`` being copied); the extension only says what a file *claims* to be (:func:`media_suffix_kind`),
the bytes say what it is (:func:`sniff`). This module reads bytes only and imports no decoder.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

from mmwatchd.errors import MediaTooLarge
from mmwatchd.model import Limits, MediaKind

__all__ = [
    "HEAD_SIZE",
    "IMAGE_SUFFIXES",
    "RAW_FORMATS",
    "RAW_SUFFIXES",
    "VIDEO_SUFFIXES",
    "Sniffed",
    "media_suffix_kind",
    "sniff",
    "sniff_bytes",
]

#: How many leading bytes :func:`sniff` reads. Most signatures fit in 64 bytes; MPEG-TS needs the second sync byte
#: at offset 188 (192 for M2TS), so one small read of 512 bytes covers every format below.
HEAD_SIZE = 512
#: How many leading bytes a TIFF gets instead: a camera RAW is a TIFF whose IFD0 (58 entries, 700 bytes, in a GoPro
#: DNG) and the strings and SubIFDs it points to lie further in; every sample measured has them in its first 64 KiB.
TIFF_HEAD_SIZE = 64 * 1024

#: Camera RAW names, so that a damaged one still gets an error sidecar. ``.raw`` is left out: too many other things
#: (audio, disk images) are called that, and the bare Kodak/Casio sensor dumps it names have no header to sniff.
RAW_SUFFIXES: frozenset[str] = frozenset(
    {".dng", ".cr2", ".cr3", ".crw", ".nef", ".nrw", ".arw", ".srf", ".sr2", ".raf", ".orf", ".rw2", ".rwl",
     ".pef", ".srw", ".kdc", ".dcr", ".3fr", ".iiq", ".mos", ".erf", ".mef", ".mrw", ".x3f", ".gpr"}
)  # fmt: skip
IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".webp", ".tif", ".tiff", ".bmp",
     ".heic", ".heif", ".hif", ".avif", ".mpo"}
) | RAW_SUFFIXES  # fmt: skip
VIDEO_SUFFIXES: frozenset[str] = frozenset(
    {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".3gp", ".mts", ".m2ts", ".ts", ".wmv", ".mpg", ".mpeg"}
)


@dataclass(frozen=True, slots=True)
class Sniffed:
    """The verdict on a file's first bytes.

    ``kind`` is None for anything that is not an image or video we handle; ``why`` then says, for a person, what
    the file looks like instead ("empty file", "looks like text", "looks like a PDF document", ...).
    """

    kind: MediaKind | None
    #: "jpeg", "png", "gif", "webp", "tiff", "bmp", "heif", "avif", "mp4", "mov", "mkv", "webm", "avi", "mpegts",
    #: "mpeg", "asf", "flv", a camera RAW format from :data:`RAW_FORMATS` ("cr2", "nef", "dng", ...; "raw" for a
    #: TIFF-based RAW of a maker not named there); "" when unknown.
    format: str
    #: e.g. "image/jpeg", "video/mp4"; "" when unknown.
    mime: str
    why: str = ""


def _image(fmt: str, mime: str) -> Sniffed:
    return Sniffed("image", fmt, mime)


def _video(fmt: str, mime: str) -> Sniffed:
    return Sniffed("video", fmt, mime)


def _other(why: str) -> Sniffed:
    return Sniffed(None, "", "", why)


# ISO base media file format (ISO/IEC 14496-12): the `ftyp` box names a major brand and compatible brands.
_HEIF_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs"}
_HEIF_GENERIC = {b"mif1", b"msf1", b"mif2", b"MiHE", b"MiHB", b"MiAF"}  # structural brands: look further
_AVIF_BRANDS = {b"avif", b"avis"}
_MP4_BRANDS = {
    b"mp41", b"mp42", b"mp71", b"avc1", b"dash", b"M4V ", b"M4VH", b"M4VP", b"f4v ", b"mmp4", b"MSNV",
    b"XAVC", b"NDAS", b"NDSC", b"NDSH", b"NDSM", b"NDSP", b"NDSS", b"NDXC", b"NDXH", b"NDXM", b"NDXP", b"NDXS",
    b"isml", b"piff", b"cmfc", b"cmfs", b"av01", b"hvc1", b"hev1",
}  # fmt: skip
_AUDIO_BRANDS = {b"M4A ": "M4A audio", b"M4B ": "M4B audiobook", b"M4P ": "protected M4P audio", b"F4A ": "F4A audio"}
_OTHER_BRANDS = {
    b"jp2 ": "a JPEG 2000 image (not supported)",
    b"jpx ": "a JPEG 2000 image (not supported)",
    b"jxl ": "a JPEG XL image (not supported)",
}


def _sniff_ftyp(head: bytes) -> Sniffed:
    size = int.from_bytes(head[0:4], "big")
    end = min(len(head), size if size >= 16 else 16)
    major = head[8:12]
    brands = [major] + [head[i : i + 4] for i in range(16, end - 3, 4)]

    def classify(brand: bytes) -> Sniffed | None:
        if brand in _AVIF_BRANDS:
            return _image("avif", "image/avif")
        if brand in _HEIF_BRANDS:
            return _image("heif", "image/heic")
        if brand == b"crx ":
            return _image("cr3", "image/x-canon-cr3")
        if brand == b"qt  ":
            return _video("mov", "video/quicktime")
        if brand.startswith(b"3g2"):
            return _video("mp4", "video/3gpp2")
        if brand.startswith(b"3g"):
            return _video("mp4", "video/3gpp")
        if brand in _MP4_BRANDS or brand.startswith(b"iso"):
            return _video("mp4", "video/mp4")
        if brand in _AUDIO_BRANDS:
            return _other(f"looks like audio ({_AUDIO_BRANDS[brand]}), not a video")
        if brand in _OTHER_BRANDS:
            return _other(f"looks like {_OTHER_BRANDS[brand]}")
        return None

    if major in _HEIF_GENERIC:
        # "mif1" only says "HEIF structure": the codec brand (avif, heic, ...) sits among the compatible brands.
        for brand in brands[1:]:
            if brand in _AVIF_BRANDS:
                return _image("avif", "image/avif")
            if brand in _HEIF_BRANDS:
                return _image("heif", "image/heic")
        return _image("heif", "image/heif")
    for brand in brands:
        found = classify(brand)
        if found is not None:
            return found
    shown = major.decode("latin-1").strip() or major.hex(" ")
    return _other(f"looks like an ISO media file of an unknown type (brand {shown!r})")


def _sniff_ebml(head: bytes) -> Sniffed:
    # The EBML header's DocType element (ID 0x4282) names the flavour; it sits within the first ~40 bytes.
    at = head.find(b"\x42\x82")
    if at >= 0:
        doctype = head[at + 3 : at + 3 + 8]
        if doctype.startswith(b"webm"):
            return _video("webm", "video/webm")
    return _video("mkv", "video/x-matroska")


def _looks_like_bmp(head: bytes) -> bool:
    # "BM" alone is too weak (a text file may start with "BMW"): check the reserved fields and the DIB header size.
    if len(head) < 18:
        return False
    dib = int.from_bytes(head[14:18], "little")
    return head[6:10] == b"\0\0\0\0" and dib in (12, 16, 40, 52, 56, 64, 108, 124)


def _looks_like_mpegts(head: bytes) -> bool:
    # 188-byte packets, each starting with the sync byte 0x47 ("G"); M2TS/MTS (AVCHD) put a 4-byte timecode first.
    # Every sync position within the head must match (at least two), and the head must not read as text.
    for first, step in ((0, 188), (4, 192)):
        syncs = range(first, len(head), step)
        if len(syncs) >= 2 and all(head[i] == 0x47 for i in syncs):
            return not _looks_like_text(head)
    return False


def _looks_like_text(head: bytes) -> bool:
    if head.startswith((b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff")):
        return True
    if b"\0" in head:
        return False
    # The head may end inside a multi-byte character: drop up to 3 trailing bytes before decoding.
    for cut in range(4):
        try:
            text = head[: len(head) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
        printable = sum(1 for ch in text if ch.isprintable() or ch in "\t\n\r\f\v")
        return printable >= 0.95 * max(1, len(text))
    return False


# ----------------------------------------------------------------------------------------------------- camera RAW

_RAW_MIME: dict[str, str] = {
    "dng": "image/x-adobe-dng", "cr2": "image/x-canon-cr2", "cr3": "image/x-canon-cr3", "crw": "image/x-canon-crw",
    "nef": "image/x-nikon-nef", "nrw": "image/x-nikon-nrw", "arw": "image/x-sony-arw", "raf": "image/x-fuji-raf",
    "orf": "image/x-olympus-orf", "rw2": "image/x-panasonic-rw2", "pef": "image/x-pentax-pef",
    "srw": "image/x-samsung-srw", "kdc": "image/x-kodak-kdc", "dcr": "image/x-kodak-dcr",
    "3fr": "image/x-hasselblad-3fr", "iiq": "image/x-phaseone-iiq", "mos": "image/x-leaf-mos",
    "erf": "image/x-epson-erf", "mef": "image/x-mamiya-mef", "mrw": "image/x-minolta-mrw",
    "x3f": "image/x-sigma-x3f", "raw": "image/x-dcraw",
}  # fmt: skip
#: Sniffed formats that are camera RAW files (decoded by LibRaw in :mod:`mmwatchd.encode.raw`, not by Pillow).
RAW_FORMATS: frozenset[str] = frozenset(_RAW_MIME)
#: Makers whose TIFF-based RAW files have their own name, by the start of the Make tag (upper-cased).
_RAW_MAKERS: tuple[tuple[str, str], ...] = (
    ("NIKON", "nef"), ("SONY", "arw"), ("PENTAX", "pef"), ("RICOH", "pef"), ("ASAHI", "pef"), ("SAMSUNG", "srw"),
    ("EASTMAN KODAK", "kdc"), ("KODAK", "dcr"), ("HASSELBLAD", "3fr"), ("PHASE ONE", "iiq"), ("LEAF", "mos"),
    ("SEIKO EPSON", "erf"), ("MAMIYA", "mef"), ("CANON", "cr2"),
)  # fmt: skip
#: TIFF Compression values only camera RAW data uses (Nikon, Sony, Kodak, Panasonic, Pentax, Samsung, ...).
_RAW_COMPRESSIONS = frozenset({32767, 32769, 32770, 32867, 34316, 34713, 34892, 65000, 65535})
#: PhotometricInterpretation: CFA (a sensor mosaic) and LinearRaw (DNG); no ordinary TIFF has either.
_RAW_PHOTOMETRIC = frozenset({32803, 34892})
#: Tags only RAW files carry: TIFF/EP CFARepeatPatternDim and CFAPattern, DNGPrivateData (Sony's SR2 data, ...),
#: Kodak's KDC IFD.
_RAW_TAGS = frozenset({0x828D, 0x828E, 0xC634, 0xFE00})
_DNG_VERSION = 0xC612
_MAX_IFDS = 32


def _raw(fmt: str) -> Sniffed:
    return Sniffed("image", fmt, _RAW_MIME[fmt])


def _tiff_ifds(head: bytes) -> tuple[dict[int, tuple[int, int, bytes]], list[dict[int, tuple[int, int, bytes]]]]:
    """IFD0's entries and those of every other IFD reachable within ``head`` (the IFD0 chain and SubIFDs).

    Each entry is ``tag -> (type, count, the 4 value-or-offset bytes)``. Anything outside ``head`` is skipped:
    this is a sniff, not a validation.
    """
    order: Literal["little", "big"] = "little" if head[:2] == b"II" else "big"

    def u16(at: int) -> int:
        return int.from_bytes(head[at : at + 2], order)

    def u32(at: int) -> int:
        return int.from_bytes(head[at : at + 4], order)

    todo, seen = [u32(4)], set[int]()
    ifds: list[dict[int, tuple[int, int, bytes]]] = []
    while todo and len(ifds) < _MAX_IFDS:
        at = todo.pop(0)
        if at in seen or at < 8 or at + 2 > len(head):
            continue
        seen.add(at)
        count = u16(at)
        entries: dict[int, tuple[int, int, bytes]] = {}
        for i in range(min(count, (len(head) - at - 2) // 12)):
            p = at + 2 + 12 * i
            tag, kind, n = u16(p), u16(p + 2), u32(p + 4)
            entries[tag] = (kind, n, head[p + 8 : p + 12])
            if tag == 0x014A and kind in (4, 13):  # SubIFDs: one offset inline, or an array of them
                if n == 1:
                    todo.append(u32(p + 8))
                else:
                    base = u32(p + 8)
                    todo.extend(u32(base + 4 * k) for k in range(min(n, 8)) if base + 4 * k + 4 <= len(head))
        ifds.append(entries)
        end = at + 2 + 12 * count
        if end + 4 <= len(head):
            todo.append(u32(end))
    return (ifds[0] if ifds else {}), ifds


def _tiff_value(head: bytes, entry: tuple[int, int, bytes] | None) -> int | None:
    if entry is None:
        return None
    kind, _, value = entry
    order: Literal["little", "big"] = "little" if head[:2] == b"II" else "big"
    return int.from_bytes(value[:2], order) if kind == 3 else int.from_bytes(value, order)


def _tiff_text(head: bytes, entry: tuple[int, int, bytes] | None) -> str:
    if entry is None or entry[0] != 2:
        return ""
    _, count, value = entry
    if count <= 4:
        raw = value[:count]
    else:
        at = int.from_bytes(value, "little" if head[:2] == b"II" else "big")
        raw = head[at : at + min(count, 256)]
    return raw.split(b"\0", 1)[0].decode("latin-1").strip()


def _sniff_tiff(head: bytes) -> Sniffed:
    """A TIFF, or a camera RAW built on TIFF: DNG (DNGVersion), CR2 (its "CR" marker), or a maker's RAW.

    A maker's RAW needs evidence beyond the Make tag, which scanners and cameras also write into ordinary TIFFs: a
    sensor-mosaic or linear-raw IFD, a RAW-only compression, or a RAW-only tag.
    """
    if head[:2] == b"II" and head[8:11] == b"CR\x02":
        return _raw("cr2")
    if head[2:4] in (b"+\0", b"\0+"):  # BigTIFF: no camera writes it
        return _image("tiff", "image/tiff")
    ifd0, ifds = _tiff_ifds(head)
    if _DNG_VERSION in ifd0:
        return _raw("dng")
    evidence = any(
        _RAW_TAGS.intersection(ifd)
        or _tiff_value(head, ifd.get(0x0106)) in _RAW_PHOTOMETRIC
        or _tiff_value(head, ifd.get(0x0103)) in _RAW_COMPRESSIONS
        for ifd in ifds
    )
    if not evidence:
        return _image("tiff", "image/tiff")
    make = _tiff_text(head, ifd0.get(0x010F)).upper()
    for prefix, fmt in _RAW_MAKERS:
        if make.startswith(prefix):
            if fmt == "nef" and _tiff_text(head, ifd0.get(0x0110)).upper().startswith("COOLPIX"):
                return _raw("nrw")
            return _raw(fmt)
    return _raw("raw")


def _sniff_raw_magic(head: bytes) -> Sniffed | None:
    """The camera RAW formats that are not TIFF files, by their signatures."""
    if head.startswith((b"IIRO", b"IIRS", b"MMOR")):  # Olympus: a TIFF with its own magic number
        return _raw("orf")
    if head.startswith(b"IIU\0"):  # Panasonic (and Leica RWL): likewise
        return _raw("rw2")
    if head.startswith(b"FUJIFILMCCD-RAW"):
        return _raw("raf")
    if head[:2] in (b"II", b"MM") and head[6:14] == b"HEAPCCDR":  # Canon CIFF, before CR2
        return _raw("crw")
    if head.startswith(b"\0MRM"):
        return _raw("mrw")
    if head.startswith(b"FOVb"):
        return _raw("x3f")
    return None


_OTHER_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"%PDF-", "looks like a PDF document"),
    (b"PK\x03\x04", "looks like a ZIP archive (or an Office document)"),
    (b"PK\x05\x06", "looks like an empty ZIP archive"),
    (b"\x1f\x8b", "looks like a gzip archive"),
    (b"7z\xbc\xaf\x27\x1c", "looks like a 7-Zip archive"),
    (b"Rar!\x1a\x07", "looks like a RAR archive"),
    (b"BZh", "looks like a bzip2 archive"),
    (b"\xfd7zXZ\x00", "looks like an xz archive"),
    (b"\x28\xb5\x2f\xfd", "looks like a zstd archive"),
    (b"\x7fELF", "looks like an executable program (ELF)"),
    (b"SQLite format 3\x00", "looks like an SQLite database"),
    (b"ID3", "looks like MP3 audio"),
    (b"fLaC", "looks like FLAC audio"),
    (b"OggS", "looks like an Ogg file (audio)"),
    (b"8BPS", "looks like a Photoshop document (not supported)"),
    (b"\x00\x00\x01\x00", "looks like a Windows icon (not supported)"),
    (b"\xff\x0a", "looks like a JPEG XL image (not supported)"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "looks like a JPEG XL image (not supported)"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "looks like a JPEG 2000 image (not supported)"),
)


def sniff_bytes(head: bytes) -> Sniffed:
    """Judge a file by its first bytes (pass :data:`HEAD_SIZE` bytes, :data:`TIFF_HEAD_SIZE` for a TIFF, or the whole
    file when it is shorter)."""
    if not head:
        return _other("empty file")
    if head.startswith(b"\xff\xd8\xff"):
        # MPO (stereo/multi-picture) files start as plain JPEGs; the decoder tells them apart.
        return _image("jpeg", "image/jpeg")
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return _image("png", "image/png")
    if head.startswith((b"GIF87a", b"GIF89a")):
        return _image("gif", "image/gif")
    if head.startswith(b"RIFF") and len(head) >= 12:
        form = head[8:12]
        if form == b"WEBP":
            return _image("webp", "image/webp")
        if form in (b"AVI ", b"AVIX"):
            return _video("avi", "video/x-msvideo")
        if form == b"WAVE":
            return _other("looks like WAV audio")
        return _other(f"looks like a RIFF file of an unknown type ({form.decode('latin-1')!r})")
    if head.startswith((b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")):
        return _sniff_tiff(head)
    if (raw := _sniff_raw_magic(head)) is not None:
        return raw
    if head.startswith(b"BM") and _looks_like_bmp(head):
        return _image("bmp", "image/bmp")
    if len(head) >= 12 and head[4:8] == b"ftyp":
        return _sniff_ftyp(head)
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return _sniff_ebml(head)
    if _looks_like_mpegts(head):
        return _video("mpegts", "video/mp2t")
    if head.startswith((b"\x00\x00\x01\xba", b"\x00\x00\x01\xb3")):
        return _video("mpeg", "video/mpeg")
    if head.startswith(b"\x30\x26\xb2\x75\x8e\x66\xcf\x11"):
        return _video("asf", "video/x-ms-asf")
    if head.startswith(b"FLV\x01"):
        return _video("flv", "video/x-flv")
    for magic, why in _OTHER_MAGIC:
        if head.startswith(magic):
            return _other(why)
    if head.startswith(b"MZ"):
        return _other("looks like a Windows program")
    if not head.strip(b"\0"):
        return _other("starts with zero bytes only (a preallocated file that is still being written?)")
    if _looks_like_text(head):
        lowered = head[:512].lower()
        if b"<svg" in lowered:
            return _other("looks like an SVG drawing (vector images are not supported)")
        if b"<html" in lowered or b"<!doctype html" in lowered:
            return _other("looks like a web page (HTML)")
        return _other("looks like text")
    return _other(f"unrecognised binary data (starts with {head[:8].hex(' ')} ...)")


def sniff(path: Path) -> Sniffed:
    """Read the first :data:`HEAD_SIZE` bytes of ``path`` and judge them. ``OSError`` propagates.

    Opened non-blocking and checked with ``fstat`` before reading: a path swapped for a FIFO or a device after the
    caller looked at it (or a folder) is refused with ``OSError(EINVAL)`` instead of blocking a worker forever.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=False) as fp:
            return sniff_bytes(_read_head(fp))
    finally:
        os.close(fd)


def oversize(name: str, size: int, limits: Limits) -> MediaTooLarge | None:
    """The error for a file of ``size`` bytes over ``limits.max_file_bytes``; None when it is within."""
    if size <= limits.max_file_bytes:
        return None
    return MediaTooLarge(f"{name}: {size} bytes exceeds limits.max_file_bytes ({limits.max_file_bytes})")


def read_head(fp: BinaryIO, name: str, limits: Limits) -> tuple[int, Sniffed]:
    """For a decoder about to parse the open file ``fp``: its size (refused over ``limits.max_file_bytes`` before a
    byte is read) and its sniffed head. ``fp`` is left after the head."""
    size = os.fstat(fp.fileno()).st_size
    if (error := oversize(name, size, limits)) is not None:
        raise error
    return size, sniff_bytes(_read_head(fp))


def _read_head(fp: BinaryIO) -> bytes:
    """:data:`HEAD_SIZE` bytes; :data:`TIFF_HEAD_SIZE` for a TIFF (a camera RAW is told from a TIFF further in)."""
    head = fp.read(HEAD_SIZE)
    if head.startswith((b"II*\x00", b"MM\x00*")) and len(head) == HEAD_SIZE:
        head += fp.read(TIFF_HEAD_SIZE - HEAD_SIZE)
    return head


def media_suffix_kind(path: Path) -> Literal["image", "video"] | None:
    """What the file name claims to be (case-insensitive), without looking inside."""
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in VIDEO_SUFFIXES:
        return "video"
    return None


def looked_at(path: Path) -> tuple[os.stat_result, Literal["image", "video"]] | None:
    """The file's stat and the kind a rule is matched with, as the pipeline decides it: sniffed from the bytes, else
    what the name claims (a file named like media that is not still gets its rule, and an error sidecar). None for a
    file that is neither, or that cannot be read. For reports (``status``, ``gallery``) that look without decoding.
    """
    try:
        st = path.stat()
        kind = sniff(path).kind or media_suffix_kind(path)
    except OSError:
        return None
    return None if kind is None else (st, kind)
