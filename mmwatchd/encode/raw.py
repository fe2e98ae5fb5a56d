"""Camera RAW files (CR2, CR3, NEF, ARW, DNG, RAF, ORF, RW2, PEF, ...) → a Pillow image, through LibRaw (rawpy).

Every camera maker has its own RAW format, and most have several; LibRaw knows over a thousand cameras. This module
only chooses what to decode and applies the limits:

1. the header (LibRaw ``open_file``, no pixel data): refused over ``limits.max_pixels`` by its sensor size; a file
   whose image data or previews are declared beyond its end is refused as truncated (a file still being copied, or
   cut: LibRaw itself happily "decodes" a cut DNG to a black image);
2. the camera's embedded preview JPEG (``extract_thumb``), when it is at least as large as the rule's ``max_side``
   would use: decoded at reduced DCT scale, like any JPEG. Most cameras store a full-size or 1-2 MP preview, the
   image the camera showed on its screen, with the camera's own colour rendering; decoding it costs a fraction of a
   demosaic (see ``bench/raw.py``);
3. otherwise (no preview, a 160x120 one, ``image.raw: demosaic``) a half-size demosaic with the camera's white
   balance, 8 bits per channel, then reduced to the target size.

Orientation: LibRaw's ``sizes.flip`` (from the TIFF Orientation tag, Canon's or Fuji's own fields) is the camera's
orientation. Embedded previews are stored as the sensor saw them, and their own EXIF, when they have one, repeats
the RAW's value, so only ``flip`` is applied, once. A preview whose pixels are already turned (its aspect crosses
the sensor's) is not turned again.

Runs in the decoder processes (:mod:`mmwatchd.isolate`) like every other decoder: LibRaw is C, and the time and
memory limits apply to it too. rawpy is imported on the first RAW file, not with the module.
"""

from __future__ import annotations

import io
import math
import os
import struct
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, BinaryIO, Final, cast

from PIL import Image, ImageFile, UnidentifiedImageError

from mmwatchd.errors import DecodeError, MediaTooLarge, UnsupportedMedia
from mmwatchd.isobmff import HEADER_MAX, read_header
from mmwatchd.model import ImageSpec, Limits

if TYPE_CHECKING:
    import rawpy

__all__ = ["RawHeader", "open_raw"]

#: LibRaw's flip code → the EXIF Orientation value that describes the same transform (dcraw's "50132467" inverted).
_FLIP_TO_ORIENTATION: Final = {0: 1, 1: 2, 3: 3, 2: 4, 4: 5, 6: 6, 7: 7, 5: 8}
#: EXIF Orientation → the transpose that shows the picture upright (the mapping ImageOps.exif_transpose uses);
#: image.py applies it too, after the resize, on the small image.
TRANSPOSE: Final = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
#: A preview (or reduced decode) this much under the target size is used as it is, without a resize (image.py's
#: ``_SLACK``): resizing a 1536x1024 preview to 1536x1022 costs time and changes nothing a model sees.
_SLACK: Final = 0.05
_RESAMPLE: Final = Image.Resampling.LANCZOS
_REDUCING_GAP: Final = 1.5
#: Bounds on the structure walk, so that a hostile file cannot make the check itself expensive.
_MAX_IFDS: Final = 64
_MAX_ENTRIES: Final = 4096
_MAX_ARRAY: Final = 1 << 20
#: How much of a TIFF-based RAW is read for its capture time (IFD0 and the EXIF IFD come first).
_EXIF_HEAD: Final = 256 * 1024


class RawHeader(Image.Image):
    """What :func:`open_raw` returns without a spec: the displayed size and format, and no pixels.

    Enough for ``probe_image`` (size, format, one frame); anything that needs pixels fails loudly instead of seeing
    an empty image.
    """

    def load(self) -> None:
        raise TypeError("a RAW header has no pixels: call open_raw() with a spec to decode the image")


@dataclass(frozen=True, slots=True)
class _Facts:
    """From LibRaw's header: the sensor size (limits), the output size before and after orientation."""

    raw_pixels: int
    stored: tuple[int, int]  # width, height as the sensor records them (half-size demosaic: about half of this)
    orientation: int

    @property
    def displayed(self) -> tuple[int, int]:
        return (self.stored[1], self.stored[0]) if self.orientation >= 5 else self.stored


def open_raw(
    fp: BinaryIO,
    name: str,
    *,
    label: str,
    size: int,
    limits: Limits,
    spec: ImageSpec | None,
) -> Image.Image:
    """The camera RAW file open as ``fp`` (``size`` bytes; ``label`` names its format in messages: "NEF", ...).

    With ``spec``: an RGB image, already in display orientation, sized to fit ``spec.max_side`` and
    ``spec.max_pixels`` (up to 5% under; never larger, never upscaled), from the embedded preview when it is large
    enough and ``spec.raw`` is "preview", else from a half-size demosaic. Without ``spec``: a :class:`RawHeader` of the
    displayed full size, nothing decoded. Either way ``format`` is ``label``.

    Raises :class:`DecodeError` (truncated or damaged), :class:`MediaTooLarge` (over ``limits.max_pixels`` or out of
    memory), :class:`UnsupportedMedia` (a camera or codec LibRaw cannot decode); ``OSError`` for I/O failures.
    """
    problem = _structure_problem(fp, size)
    if problem:
        raise DecodeError(f"{name}: {problem}")
    with _libraw(name, label), _quiet_stderr(), _lib().RawPy() as raw:
        _open(raw, fp)
        facts = _facts(raw)
        if facts.raw_pixels > limits.max_pixels:
            raise MediaTooLarge(
                f"{name}: {label} sensor of {facts.raw_pixels} pixels exceeds limits.max_pixels ({limits.max_pixels})"
            )
        if spec is None:
            header = RawHeader()
            header._size = facts.displayed
            header._mode = "RGB"
            header.format = label
            header.info = _taken_info(fp)
            return header
        target = _fit(facts.displayed, spec.max_side, spec.max_pixels)
        img = _from_preview(raw, name, label, facts, target, limits) if spec.raw == "preview" else None
        if img is None:
            img = _demosaic(raw, half=max(facts.displayed) / 2 >= max(target) * (1 - _SLACK))
    fitted = _fit(img.size, spec.max_side, spec.max_pixels)
    if not _near(img.size, fitted):
        img = img.resize(fitted, _RESAMPLE, reducing_gap=_REDUCING_GAP)
    if isinstance(img, ImageFile.ImageFile):  # the preview as decoded: hand on pixels only, not its own EXIF
        img = img.copy()  # (with its Orientation, which image.py would apply a second time)
    img.info = _taken_info(fp)
    img.format = label
    return img


def _taken_info(fp: BinaryIO) -> dict[str | tuple[int, int], Any]:
    """``info`` with an EXIF block holding only the capture time (DateTimeOriginal, else DateTime), for
    ``probe_image``; empty when there is none. Nothing else: the pixels are already oriented.

    Read from the file's own EXIF: the TIFF structure of TIFF-based RAWs, Canon's CMT1/CMT2 boxes in a CR3, the
    preview JPEG's EXIF in a RAF. LibRaw knows the time too, but only after unpacking the raw data.
    """
    fp.seek(0)
    head = fp.read(_EXIF_HEAD)
    when = ""
    if head.startswith((b"II*\0", b"MM\0*")):
        when = _exif_time(head)
    elif head[4:8] == b"ftyp":
        cmt = _cr3_exif(head)
        when = _exif_time(cmt.get(b"CMT2", b""), exif_ifd=False) or _exif_time(cmt.get(b"CMT1", b""))
    elif head.startswith(b"FUJIFILMCCD-RAW") and len(head) >= 92:
        offset, length = struct.unpack(">II", head[84:92])
        fp.seek(offset)
        when = _jpeg_time(fp.read(min(length, _EXIF_HEAD)))
    if not when:
        return {}
    out = Image.Exif()
    out[0x0132] = when
    return {"exif": out.tobytes()}


_EXIF_PARSE_ERRORS: Final = (SyntaxError, ValueError, struct.error, EOFError, KeyError, IndexError, TypeError, OSError)


def _exif_time(tiff: bytes, *, exif_ifd: bool = True) -> str:
    """DateTimeOriginal (in the EXIF IFD, or in the top IFD when ``exif_ifd`` is False, as in CR3's CMT2), else
    DateTime, of a TIFF structure; "" when absent or unreadable."""
    if not tiff.startswith((b"II*\0", b"MM\0*")):
        return ""
    try:
        exif = Image.Exif()
        exif.load(tiff)
        original = exif.get_ifd(0x8769).get(0x9003) if exif_ifd else exif.get(0x9003)
        when = original or exif.get(0x0132)
    except _EXIF_PARSE_ERRORS:
        return ""
    if isinstance(when, bytes):
        when = when.decode("ascii", "replace")
    return when.strip("\0 ") if isinstance(when, str) else ""


def _jpeg_time(jpeg: bytes) -> str:
    try:
        with Image.open(io.BytesIO(jpeg), formats=("JPEG",)) as im:
            exif = im.getexif()
            when = exif.get_ifd(0x8769).get(0x9003) or exif.get(0x0132)
    except (*_EXIF_PARSE_ERRORS, UnidentifiedImageError):
        return ""
    if isinstance(when, bytes):
        when = when.decode("ascii", "replace")
    return when.strip("\0 ") if isinstance(when, str) else ""


#: Canon's UUID for the CR3 box holding its metadata (CMT1: IFD0, CMT2: EXIF IFD, THMB: thumbnail).
_CANON_UUID: Final = bytes.fromhex("85c0b687820f11e08111f4ce462b6a48")


def _cr3_exif(head: bytes) -> dict[bytes, bytes]:
    """The CMT* boxes of a CR3 (moov → Canon's uuid box), found within ``head``; empty when they are not there."""

    def boxes(start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
        """Boxes cut off by the end of ``head`` end there; a box that runs to the end of the file stops the walk."""
        pos = start
        while pos + 8 <= end:
            box = read_header(head[pos : min(pos + HEADER_MAX, end)], pos)
            if box is None or box.size is None or box.size < box.payload - pos:
                return
            yield box.kind, box.payload, min(end, pos + box.size)
            pos += box.size

    found: dict[bytes, bytes] = {}
    for kind, body, end in boxes(0, len(head)):
        if kind != b"moov":
            continue
        for inner, ibody, iend in boxes(body, end):
            if inner == b"uuid" and head[ibody : ibody + 16] == _CANON_UUID:
                found.update((k, head[b:e]) for k, b, e in boxes(ibody + 16, iend) if k.startswith(b"CMT"))
        break
    return found


# ------------------------------------------------------------------------------------------------------ LibRaw calls


def _lib() -> ModuleType:
    """rawpy, imported on first use: numpy and LibRaw cost every decoder process 14 MiB and 0.2 s at start-up,
    which a folder without RAW files should not pay."""
    import rawpy

    return rawpy


class _QuietStderr:
    """LibRaw, and the libjpeg inside it, print to file descriptor 2 ("Unexpected end of file", "Corrupt JPEG data:
    premature end of data segment"), where they would break the daemon's JSON log (FFmpeg's messages are switched off
    for the same reason, see video.py). Neither has a switch that rawpy exposes, so fd 2 points at /dev/null while
    LibRaw runs: the first of concurrent callers redirects it, the last one restores it. What LibRaw prints adds
    nothing to the error raised here. LibRaw runs in the decoder processes, which log nothing themselves."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._saved = -1

    @contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if self._users == 0:
                sys.stderr.flush()
                self._saved = os.dup(2)
                null = os.open(os.devnull, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
                os.dup2(null, 2)
                os.close(null)
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    os.dup2(self._saved, 2)
                    os.close(self._saved)


_quiet_stderr = _QuietStderr()


@contextmanager
def _libraw(name: str, label: str) -> Iterator[None]:
    """The one place where LibRaw's exceptions become :class:`MediaError` subclasses naming the file."""
    rawpy = _lib()
    try:
        yield
    except (rawpy.LibRawTooBigError, rawpy.LibRawUnsufficientMemoryError, rawpy.LibRawMemPoolOverflowError) as exc:
        raise MediaTooLarge(
            f"{name}: {label} needs more memory than limits.decode_memory_mb allows ({_text(exc)})"
        ) from exc
    except rawpy.LibRawFileUnsupportedError as exc:
        raise UnsupportedMedia(
            f"{name}: LibRaw {_version()} cannot decode this {label} (an unknown camera, or a raw codec it was built "
            "without, such as GoPro's VC-5); convert it to DNG or JPEG with the camera maker's software"
        ) from exc
    except rawpy.LibRawIOError as exc:
        raise DecodeError(
            f"{name}: truncated {label} (its image data ends early; if it is still being copied, it will be "
            "retried when complete)"
        ) from exc
    except rawpy.LibRawError as exc:
        raise DecodeError(f"{name}: damaged {label}: LibRaw says {_text(exc)}") from exc


def _text(exc: BaseException) -> str:
    arg = exc.args[0] if exc.args else ""
    text = arg.decode("utf-8", "replace") if isinstance(arg, bytes) else str(arg)
    return text or type(exc).__name__


def _version() -> str:
    return ".".join(map(str, _lib().libraw_version))


def _open(raw: rawpy.RawPy, fp: BinaryIO) -> None:
    """Open the very file ``fp`` is (through /proc: no second path lookup, no copy into memory)."""
    proc = f"/proc/self/fd/{fp.fileno()}"
    if os.path.exists(proc):
        raw.open_file(proc)
    else:  # no /proc: LibRaw reads a copy in memory
        fp.seek(0)
        raw.open_buffer(io.BytesIO(fp.read()))


def _facts(raw: rawpy.RawPy) -> _Facts:
    sizes = raw.sizes
    orientation = _FLIP_TO_ORIENTATION.get(sizes.flip, 1)
    return _Facts(sizes.raw_width * sizes.raw_height, (sizes.width, sizes.height), orientation)


def _from_preview(
    raw: rawpy.RawPy, name: str, label: str, facts: _Facts, target: tuple[int, int], limits: Limits
) -> Image.Image | None:
    """The embedded preview, oriented and reduced towards ``target``; None when there is none large enough."""
    rawpy = _lib()
    try:
        thumb = raw.extract_thumb()
    except (rawpy.LibRawNoThumbnailError, rawpy.LibRawUnsupportedThumbnailError):
        return None
    except rawpy.LibRawIOError:  # a preview declared past the end: the raw data may still be there
        return None
    if thumb.format == rawpy.ThumbFormat.BITMAP:
        try:
            img = Image.fromarray(cast("Image.SupportsArrayInterface", thumb.data))  # a BITMAP thumbnail is an array
        except (TypeError, ValueError):  # a bitmap layout Pillow has no mode for (one channel of three, ...)
            return None
        size = img.size
    else:
        try:
            img = Image.open(io.BytesIO(cast(bytes, thumb.data)), formats=("JPEG",))  # JPEG: the file's bytes
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
            return None  # an unreadable preview is no reason to give up: the raw data may be fine
        size = img.size
        if size[0] * size[1] > limits.max_pixels:
            raise MediaTooLarge(
                f"{name}: {label} preview of {size[0]}x{size[1]} pixels exceeds limits.max_pixels ({limits.max_pixels})"
            )
    orientation = facts.orientation
    turned = orientation >= 5 and (size[0] > size[1]) != (facts.stored[0] > facts.stored[1])
    if turned:  # the camera turned the preview's pixels itself
        orientation = 1
    shown = (size[1], size[0]) if orientation >= 5 else size
    if max(shown) < max(target) * (1 - _SLACK) and max(shown) < max(facts.displayed):
        return None  # too small for the rule: the raw data gives more
    if img.format == "JPEG":
        want = (target[1], target[0]) if orientation >= 5 else target
        img.draft("RGB", (max(1, math.ceil(want[0] * (1 - _SLACK))), max(1, math.ceil(want[1] * (1 - _SLACK)))))
        try:
            img.load()
        except (OSError, SyntaxError, ValueError, struct.error):
            return None  # a damaged preview: decode the raw data instead
    img = img.convert("RGB") if img.mode != "RGB" else img
    if orientation in TRANSPOSE:
        img = img.transpose(TRANSPOSE[orientation])
    return img


def _demosaic(raw: rawpy.RawPy, *, half: bool) -> Image.Image:
    """Demosaic with the camera's white balance, oriented by LibRaw. ``half``: each 2x2 Bayer cell becomes one
    pixel (no interpolation, a quarter of the memory); only a sensor too small for the rule's size at half scale
    is demosaiced at full size."""
    rgb = raw.postprocess(half_size=half, use_camera_wb=True, output_bps=8)
    return Image.fromarray(rgb)


# ------------------------------------------------------------------------------------------------------------ sizes


def _fit(size: tuple[int, int], max_side: int, max_pixels: int) -> tuple[int, int]:
    """Largest size of the same aspect within ``max_side`` and ``max_pixels``; never larger than ``size``."""
    width, height = size
    scale = min(1.0, max_side / max(width, height), math.sqrt(max_pixels / (width * height)))
    if scale >= 1.0:
        return size
    fw = max(1, min(width, math.floor(width * scale + 1e-6)))
    fh = max(1, min(height, math.floor(height * scale + 1e-6)))
    while fw * fh > max_pixels or max(fw, fh) > max_side:
        if fw >= fh:
            fw -= 1
        else:
            fh -= 1
    return fw, fh


def _near(have: tuple[int, int], want: tuple[int, int]) -> bool:
    return all(w * (1 - _SLACK) <= h <= w for h, w in zip(have, want, strict=True))


# -------------------------------------------------------------------------------------------------------- structure


def _structure_problem(fp: BinaryIO, size: int) -> str:
    """An empty string when the file's own structure fits in ``size`` bytes; else what is wrong, for a person.

    TIFF-based RAWs (and ORF/RW2, TIFFs with their own magic): every IFD, strip, tile and JPEG preview must lie
    within the file. CR3: the top-level boxes must add up to the file. RAF: the preview, CFA header and CFA data
    its header points at must lie within the file. Other formats (CRW, MRW, X3F) are left to LibRaw.
    """
    fp.seek(0)
    head = fp.read(16)
    if head[:2] in (b"II", b"MM") and head[2:4] in (b"*\0", b"\0*", b"RO", b"OR", b"RS", b"U\0"):
        return _tiff_problem(fp, size, "<" if head[:2] == b"II" else ">")
    if head[4:8] == b"ftyp":
        return _boxes_problem(fp, size)
    if head.startswith(b"FUJIFILMCCD-RAW"):
        return _raf_problem(fp, size)
    return ""


def _truncated_msg(what: str, end: int, size: int) -> str:
    return (
        f"truncated camera RAW file: its {what} ends at byte {end} but the file has {size} bytes (if it is still "
        "being copied, it will be retried when complete)"
    )


def _tiff_problem(fp: BinaryIO, size: int, order: str) -> str:
    def read(at: int, n: int) -> bytes:
        fp.seek(at)
        return fp.read(n)

    (first,) = struct.unpack(order + "I", read(4, 4))
    todo, seen = [first], set[int]()
    widths = {1: 1, 2: 1, 3: 2, 4: 4, 6: 1, 7: 1, 8: 2, 9: 4, 11: 4, 13: 4, 16: 8}
    while todo:
        at = todo.pop(0)
        if at == 0 or at in seen:
            continue
        if len(seen) >= _MAX_IFDS:
            break
        seen.add(at)
        raw = read(at, 2)
        if len(raw) < 2:
            return _truncated_msg("image directory", at + 2, size)
        (count,) = struct.unpack(order + "H", raw)
        if count > _MAX_ENTRIES:
            return f"damaged camera RAW file: an image directory at byte {at} claims {count} entries"
        body = read(at + 2, 12 * count + 4)
        if len(body) < 12 * count + 4:
            return _truncated_msg("image directory", at + 2 + 12 * count + 4, size)
        entries: dict[int, tuple[int, int, bytes]] = {}
        for i in range(count):
            tag, kind, n = struct.unpack(order + "HHI", body[12 * i : 12 * i + 8])
            entries[tag] = (kind, n, body[12 * i + 8 : 12 * i + 12])
        (nxt,) = struct.unpack(order + "I", body[12 * count :])
        todo.append(nxt)

        def values(tag: int, entries: dict[int, tuple[int, int, bytes]] = entries) -> list[int] | None:
            if tag not in entries:
                return None
            kind, n, inline = entries[tag]
            width = widths.get(kind)
            if width not in (2, 4) or n > _MAX_ARRAY:
                return None
            fmt = order + ("H" if width == 2 else "I") * n
            if width * n <= 4:
                data = inline[: width * n]
            else:
                (offset,) = struct.unpack(order + "I", inline)
                data = read(offset, width * n)
                if len(data) < width * n:
                    raise _Cut(offset + width * n)
            return list(struct.unpack(fmt, data))

        try:
            subs = values(0x014A) or []
            todo.extend(subs)
            for offsets_tag, counts_tag, what in (
                (0x0111, 0x0117, "image data"),
                (0x0144, 0x0145, "image data"),
                (0x0201, 0x0202, "embedded preview"),
            ):
                offsets, counts = values(offsets_tag), values(counts_tag)
                if offsets and counts:
                    end = max(o + c for o, c in zip(offsets, counts, strict=False))
                    if end > size:
                        return _truncated_msg(what, end, size)
        except _Cut as cut:
            return _truncated_msg("image directory", cut.end, size)
    return ""


class _Cut(Exception):
    def __init__(self, end: int) -> None:
        self.end = end


def _boxes_problem(fp: BinaryIO, size: int) -> str:
    pos = 0
    while pos < size:
        fp.seek(pos)
        header = fp.read(HEADER_MAX)
        box = read_header(header, pos)
        if box is None:  # cut inside the 8-byte header, or inside a 64-bit size
            return _truncated_msg("box structure", pos + (16 if len(header) >= 8 else 8), size)
        btype = box.kind
        if box.size is None:
            return ""
        if box.size < 8 or not all(32 <= c < 127 for c in btype):
            return f"damaged camera RAW file: invalid box at byte {pos}"
        pos += box.size
    return "" if pos == size else _truncated_msg(f"{btype.decode('latin-1')!r} box", pos, size)


def _raf_problem(fp: BinaryIO, size: int) -> str:
    """Fujifilm RAF: big-endian (offset, length) pairs at byte 84 for the JPEG preview, the CFA header, the CFA data."""
    fp.seek(84)
    table = fp.read(24)
    if len(table) < 24:
        return _truncated_msg("header", 108, size)
    pairs = struct.unpack(">6I", table)
    for what, offset, length in zip(("embedded preview", "sensor header", "image data"), pairs[::2], pairs[1::2],
                                    strict=True):  # fmt: skip
        if offset and offset + length > size:
            return _truncated_msg(what, offset + length, size)
    return ""
