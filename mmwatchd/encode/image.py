"""Images → one data-URL part that fits a byte budget (Pillow; HEIC via pillow-heif).

For one file, in this order:

1. open: the bytes are sniffed (never the name) and only the matching Pillow plugins may open the file;
2. limits: ``width*height > limits.max_pixels`` is refused from the header, before any pixel is decoded;
   damaged containers are refused too (a PNG without IEND, an ISO-BMFF box running past the end of the file);
3. decode the first frame only, at reduced scale where the format has one: JPEG at the smallest DCT scale (any
   M/8 through simplejpeg's libjpeg-turbo for YCbCr and grey files, else Pillow's ``draft()`` at 1/2, 1/4, 1/8),
   HEIF from the smallest embedded thumbnail, that is at least 95% of the target size, so a 50 MP photo never exists
   in memory at full size;
4. mode normalisation to L, RGB or RGBA (CMYK, 16-bit and float greys scaled, palettes and transparency keys
   turned into alpha; an M/8 decode stays in the decoder's RGBX when the output is JPEG);
5. one resize to fit ``spec.max_side`` and ``spec.max_pixels`` (never up), skipped when the reduced-scale decode
   already came out at most 5% under that size;
6. EXIF orientation, applied to the small image;
7. alpha flattened onto ``spec.background`` for JPEG (kept for PNG/WebP unless fully opaque);
8. encode, then the budget search (:func:`fit_budget`).

Small files that servers read as they are may be sent untouched instead (see :func:`encode_image`).

The output never carries metadata: EXIF (GPS included), XMP and ICC profiles are dropped; passthrough images have
their metadata segments cut out losslessly unless ``spec.keep_metadata`` (see :mod:`mmwatchd.encode.strip`). Everything here is a pure
function of the file and the arguments, safe to call from several threads at once.
"""

from __future__ import annotations

import io
import math
import os
import re
import resource
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import BinaryIO, Final, cast

import pillow_heif
from PIL import Image, ImageMath, UnidentifiedImageError

from mmwatchd.encode.budget import PICTURE, fit, max_payload
from mmwatchd.encode.raw import TRANSPOSE, open_raw
from mmwatchd.errors import BudgetExceeded, DecodeError, MediaTooLarge, UnsupportedMedia
from mmwatchd.isobmff import HEADER_MAX, read_header
from mmwatchd.media import RAW_FORMATS, Sniffed, read_head
from mmwatchd.model import (
    MIME_BY_FORMAT,
    ImageFacts,
    ImageSpec,
    Limits,
    Part,
    data_url_len,
)

from .strip import strip_metadata

__all__ = [
    "MIN_SIDE",
    "Encoded",
    "encode_image",
    "fit_budget",
    "fit_size",
    "probe_and_encode_image",
    "probe_image",
    "save_image",
    "translate_pillow",
]

# HEIC/HEIF (iPhone photos) need pillow-heif; registering is idempotent. AVIF is left to Pillow itself: Pillow >= 11.3
# decodes it natively (libavif) and pillow-heif 1.x no longer ships an AVIF decoder.
pillow_heif.register_heif_opener()

# Pillow's own bomb guard (Image.MAX_IMAGE_PIXELS, ~89.5 MP) warns above its value and fails above twice that, inside
# Image.open, whatever the caller wants: with it a good 100 MP photo logs a DecompressionBombWarning and a 180 MP
# panorama fails although limits.max_pixels (200 MP by default) allows both. The value is process-global, so it cannot
# be set per call from several worker threads. It is switched off here and replaced by the per-call check in _open(),
# which reads the size from the header, before any pixel is decoded. Only mmwatchd.encode imports Pillow.
Image.MAX_IMAGE_PIXELS = None

#: Smallest longest side the budget search scales down to before it gives up.
MIN_SIDE: Final = 32
#: Pillow plugins allowed to open each sniffed format (nothing else gets to parse the bytes).
_PLUGINS: Final[dict[str, tuple[str, ...]]] = {
    "jpeg": ("JPEG", "MPO"),
    "png": ("PNG",),
    "gif": ("GIF",),
    "webp": ("WEBP",),
    "tiff": ("TIFF",),
    "bmp": ("BMP",),
    "heif": ("HEIF", "AVIF"),
    "avif": ("AVIF", "HEIF"),
}
#: Source formats (Pillow names) that may be sent untouched, and the pixel modes each may have.
_PASSTHROUGH_MODES: Final[dict[str, tuple[str, ...]]] = {
    "JPEG": ("RGB", "L"),
    "PNG": ("RGB", "RGBA", "L"),
    "WEBP": ("RGB", "RGBA"),
    "GIF": ("P", "L"),
}
_SOURCE_MIME: Final = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif"}
_RESAMPLE: Final = Image.Resampling.LANCZOS
#: How far under the target size a reduced-scale decode (JPEG DCT scaling, a HEIF thumbnail) may come out and be sent
#: as it is: a 4000x3000 JPEG at ``max_side: 1024`` decodes at 1/4 scale to 1000x750 (2% under) and skips the resize
#: from 2000x1500, which costs about as much as the decode itself.
_SLACK: Final = 0.05
# Shrinking by 3x or more, reduce() by an integer factor first, leaving LANCZOS at least 1.5x to do. A 12 MP HEIC
# (decoded at full size: no DCT scaling) to 1024 px: 135 -> 58 ms, mean difference from plain LANCZOS 0.3-0.6/255,
# at most 6/255; less than what JPEG quality 85 changes. (A gap of 3, Pillow's "indistinguishable", never reduces a
# 4032 px side to 1024.)
_REDUCING_GAP: Final = 1.5
_EXIF_IFD: Final = 0x8769
_DATE_TIME_ORIGINAL: Final = 36867
_DATE_TIME: Final = 306
_ORIENTATION: Final = 0x0112
_EXIF_DATE = re.compile(r"(\d{4}):(\d{2}):(\d{2})[ T](\d{2}):(\d{2}):(\d{2})")
# What malformed EXIF makes Pillow's parser raise. Bad EXIF must not cost a photo: it is read as "no EXIF".
_EXIF_ERRORS: Final = (SyntaxError, ValueError, struct.error, EOFError, KeyError, IndexError, TypeError)


# ---------------------------------------------------------------------------------------------------------------- open


@dataclass(slots=True)
class _Source:
    name: str
    fp: BinaryIO
    im: Image.Image
    sniffed: Sniffed
    file_size: int
    #: What Pillow calls the format in messages: "JPEG", "PNG", "HEIF", ...
    label: str
    #: PNG only: the chunk walk (Pillow only sees an eXIf chunk after IDAT once it has decoded).
    png: _PngScan | None = None


def _truncated(name: str, label: str) -> str:
    return (
        f"{name}: truncated {label} (the file ends early; if it is still being copied, "
        "it will be retried when complete)"
    )


@contextmanager
def translate_pillow(name: str, label: str) -> Iterator[None]:
    """The one place where Pillow/pillow-heif exceptions become :class:`MediaError` subclasses."""
    try:
        yield
    except Image.DecompressionBombError as exc:
        raise MediaTooLarge(f"{name}: {exc}") from exc
    except Image.DecompressionBombWarning as exc:  # raised only when warnings are turned into errors
        raise MediaTooLarge(f"{name}: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise DecodeError(f"{name}: damaged {label}: no decoder recognises its contents") from exc
    except OSError as exc:
        if exc.errno is not None:  # a real I/O error (disk, network share), not a property of the file's bytes
            raise
        if "truncated" in str(exc):
            raise DecodeError(_truncated(name, label)) from exc
        raise DecodeError(f"{name}: damaged {label}: {exc}") from exc
    except EOFError as exc:
        raise DecodeError(_truncated(name, label)) from exc
    except ValueError as exc:  # pillow-heif reports libheif errors as ValueError; PNG text bombs too
        text = str(exc)
        if "too large" in text.lower():
            raise MediaTooLarge(f"{name}: {text} (a decompression bomb?)") from exc
        if "end of file" in text.lower():
            raise DecodeError(_truncated(name, label)) from exc
        raise DecodeError(f"{name}: damaged {label}: {text}") from exc
    except (SyntaxError, struct.error) as exc:  # raised by some plugins for malformed headers
        raise DecodeError(f"{name}: damaged {label}: {exc}") from exc


@dataclass(frozen=True, slots=True)
class _PngScan:
    problem: str  # "", "truncated" or "damaged"
    bit_depth: int
    exif: bytes | None


def _scan_png(fp: BinaryIO) -> _PngScan:
    """Walk the PNG chunks (8 bytes read per chunk): is IEND there, the bit depth, the eXIf payload if any.

    Pillow accepts a PNG that stops after enough IDAT data (no IEND): a file still being copied would be sent half
    done, so the walk insists on IEND.
    """
    pos, exif, depth = 8, None, 0
    while True:
        fp.seek(pos)
        header = fp.read(8)
        if len(header) < 8:
            return _PngScan("truncated", depth, exif)
        length, ctype = struct.unpack(">I4s", header)
        if not ctype.isalpha():
            return _PngScan("damaged", depth, exif)
        if ctype == b"IEND":
            return _PngScan("", depth, exif)
        if ctype == b"IHDR":
            ihdr = fp.read(9)
            depth = ihdr[8] if len(ihdr) == 9 else 0
        elif ctype == b"eXIf" and exif is None and length <= 1 << 20:
            exif = fp.read(length)
        pos += 12 + length


def _scan_isobmff(fp: BinaryIO, size: int) -> str:
    """Walk the top-level boxes of a HEIF/AVIF file: "" when sound, else "truncated" or "damaged"."""
    pos = 0
    while pos < size:
        fp.seek(pos)
        box = read_header(fp.read(HEADER_MAX), pos)
        if box is None:
            return "truncated"
        if box.size is None:  # "extends to the end of the file"
            return ""
        if box.size < 8 or not all(32 <= c < 127 or c == 0xA9 for c in box.kind):
            return "damaged"
        pos += box.size
    return "" if pos == size else "truncated"


@contextmanager
def _open(path: Path, limits: Limits, spec: ImageSpec | None = None) -> Iterator[_Source]:
    """Open ``path`` for reading the header; everything below the size check is up to the caller."""
    name = path.name
    with open(path, "rb") as fp:
        size, sniffed = read_head(fp, name, limits)
        if sniffed.kind is None:
            raise UnsupportedMedia(
                f"{name}: empty file" if sniffed.why == "empty file" else f"{name}: not an image: {sniffed.why}"
            )
        if sniffed.kind != "image":
            raise UnsupportedMedia(f"{name}: not an image: it is a video ({sniffed.format.upper()})")
        label = {"jpeg": "JPEG", "heif": "HEIF", "avif": "AVIF"}.get(sniffed.format, sniffed.format.upper())
        fp.seek(0)
        if sniffed.format in RAW_FORMATS:  # camera RAW: LibRaw gives an oriented image near spec's size
            im = open_raw(fp, name, label=label, size=size, limits=limits, spec=spec)
        else:
            with translate_pillow(name, label):
                im = Image.open(fp, formats=_PLUGINS[sniffed.format])
        with im:
            label = im.format or label
            width, height = im.size
            if width * height > limits.max_pixels:
                raise MediaTooLarge(
                    f"{name}: {width}x{height} = {width * height} pixels exceeds limits.max_pixels "
                    f"({limits.max_pixels})"
                )
            png = _scan_png(fp) if sniffed.format == "png" else None
            problem = png.problem if png else _scan_isobmff(fp, size) if sniffed.format in ("heif", "avif") else ""
            if problem == "truncated":
                raise DecodeError(_truncated(name, label))
            if problem:
                raise DecodeError(f"{name}: damaged {label}: invalid {'chunk' if png else 'box'} structure")
            fp.seek(0)
            yield _Source(name, fp, im, sniffed, size, label, png)


# ---------------------------------------------------------------------------------------------------------------- EXIF


def _exif(src: _Source) -> Image.Exif:
    """EXIF as Pillow parses it, without decoding pixels; empty when absent or unreadable."""
    im = src.im
    try:
        if src.sniffed.format == "png" and "exif" not in im.info:
            # PngImageFile.getexif() would decode the whole image to look for an eXIf chunk after IDAT.
            exif = Image.Exif()
            if src.png and src.png.exif:
                exif.load(src.png.exif)
            return exif
        return im.getexif()
    except _EXIF_ERRORS:
        return Image.Exif()


def _orientation(im: Image.Image, exif: Image.Exif) -> int:
    """The EXIF orientation still to apply to ``im``'s pixels (1: none; values outside 1-8 are ignored)."""
    if im.format == "TIFF":
        # Pillow's TIFF plugin reports the displayed size from the header and transposes on load itself.
        return 1
    value = exif.get(_ORIENTATION)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _taken(exif: Image.Exif) -> str:
    """DateTimeOriginal (Exif IFD), else DateTime (IFD0), as "YYYY-MM-DD HH:MM:SS"; "" when absent or invalid."""
    try:
        candidates = (exif.get_ifd(_EXIF_IFD).get(_DATE_TIME_ORIGINAL), exif.get(_DATE_TIME))
    except _EXIF_ERRORS:
        candidates = (None, exif.get(_DATE_TIME))
    for candidate in candidates:
        value = candidate.decode("ascii", "replace") if isinstance(candidate, bytes) else candidate
        if not isinstance(value, str):
            continue
        match = _EXIF_DATE.match(value.strip("\0 "))
        if match is None:
            continue
        try:
            year, month, day, hour, minute, second = map(int, match.groups())
            return datetime(year, month, day, hour, minute, second).strftime("%Y-%m-%d %H:%M:%S")
        except ValueError:  # "0000:00:00 00:00:00" and friends: cameras write that when the clock is unset
            continue
    return ""


def _displayed(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    return (size[1], size[0]) if orientation >= 5 else size


# --------------------------------------------------------------------------------------------------------------- probe


def probe_image(path: Path, *, limits: Limits) -> ImageFacts:
    """Format, displayed size, capture time and frame count from the header (no pixel decode).

    Raises :class:`UnsupportedMedia` (not an image), :class:`DecodeError` (damaged header or container),
    :class:`MediaTooLarge` (over ``limits``). A file whose pixel data is damaged only fails in :func:`encode_image`.
    """
    with _open(path, limits) as src:
        exif = _exif(src)
        with translate_pillow(src.name, src.label):
            frames = getattr(src.im, "n_frames", 1)
        width, height = _displayed(src.im.size, _orientation(src.im, exif))
        return ImageFacts(format=src.label, width=width, height=height, taken=_taken(exif), frames=frames)


# -------------------------------------------------------------------------------------------------------------- encode


def fit_size(size: tuple[int, int], spec: ImageSpec) -> tuple[int, int]:
    """Largest size with the same aspect ratio within ``spec.max_side`` and ``spec.max_pixels``; never larger."""
    width, height = size
    scale = min(1.0, spec.max_side / max(width, height), math.sqrt(spec.max_pixels / (width * height)))
    if scale >= 1.0:
        return size
    fw = max(1, min(width, math.floor(width * scale + 1e-6)))
    fh = max(1, min(height, math.floor(height * scale + 1e-6)))
    while fw * fh > spec.max_pixels or max(fw, fh) > spec.max_side:  # float rounding at the edge
        if fw >= fh:
            fw -= 1
        else:
            fh -= 1
    return fw, fh


def _load_scaled(
    im: Image.Image, size: tuple[int, int], *, slack: float = 0.0, fp: BinaryIO | None = None, file_size: int = 0
) -> Image.Image:
    """Decode the current frame at reduced scale when the format allows, never below ``(1 - slack) * size``.

    JPEG decodes at the smallest DCT scale that gives at least that size: any M/8 (see :func:`_decode_jpeg_m8`)
    when ``fp`` (the open file, ``file_size`` bytes) is given, else Pillow's 1/2, 1/4 or 1/8. HEIF decodes the
    smallest embedded thumbnail that does and is a scaled copy of the image (same mode, aspect, rotation, crop and
    colour profile; pillow-heif checks), else the image itself. ``size`` is in stored axes.
    """
    floor = (max(1, math.ceil(size[0] * (1 - slack))), max(1, math.ceil(size[1] * (1 - slack))))
    if fp is not None and size != im.size:
        scaled = _decode_jpeg_m8(im, fp, file_size, floor)
        if scaled is not None:
            return scaled
    if size != im.size and im.format in ("JPEG", "MPO", "HEIF"):
        im.draft(im.mode, floor)
    im.load()
    return im


#: Set in a process whose simplejpeg (numpy) import failed or was not tried: its JPEGs take Pillow's 1/2^k path.
_NO_SIMPLEJPEG: list[str] = []
#: The smallest private-memory limit (``RLIMIT_DATA``, the decoder's ``limits.decode_memory_mb``) under which
#: numpy is imported: it was seen to work at 100 MiB and to kill the process at 64 MiB.
_SIMPLEJPEG_MIN_DATA: Final = 256 * 2**20


def _simplejpeg() -> ModuleType | None:
    """simplejpeg, imported on first use; None where it cannot be imported here.

    Imported late because numpy comes with it (0.1-0.2 s and ~14 MiB per decoder process), which a folder without
    JPEGs should not pay. OpenBLAS, loaded by numpy, sizes per-thread buffers by the core count at import; under the
    decoder's ``RLIMIT_DATA`` that can fail or retry for seconds, and nothing here multiplies matrices, so it gets
    one thread. Even so OpenBLAS exits the process when its buffer does not fit (at a 64 MiB limit), so under
    :data:`_SIMPLEJPEG_MIN_DATA` it is not tried at all and the Pillow path does the work, as it does where the
    import fails.
    """
    if _NO_SIMPLEJPEG:
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_DATA)
    if soft != resource.RLIM_INFINITY and soft < _SIMPLEJPEG_MIN_DATA:
        _NO_SIMPLEJPEG.append(f"RLIMIT_DATA {soft} bytes")
        return None
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    try:
        import simplejpeg  # ships a .pyi but no py.typed: see [tool.mypy] in pyproject.toml
    except (ImportError, MemoryError) as exc:
        _NO_SIMPLEJPEG.append(f"{type(exc).__name__}: {exc}")
        return None
    module: ModuleType = simplejpeg
    return module


def _decode_jpeg_m8(im: Image.Image, fp: BinaryIO, file_size: int, floor: tuple[int, int]) -> Image.Image | None:
    """A baseline or progressive YCbCr/greyscale JPEG decoded by libjpeg-turbo at the smallest M/8 scale (1/8, 2/8,
    3/8, ... 7/8) that is at least ``floor``; None when Pillow should decode it instead.

    Pillow's ``draft()`` offers only 1/2, 1/4 and 1/8: a 4000x3000 photo at ``max_side: 1536`` decodes at 1/2
    (2000x1500) and is then resized, which costs about as much as the decode; at 3/8 it comes out at 1500x1125, 2%
    under the target and within :data:`_SLACK`, so the resize is skipped. The pixels are libjpeg-turbo's either way
    (at a scale both offer they are identical). Only what Pillow would show the same way comes here: ``L`` and
    ``RGB`` files (CMYK/YCCK, with Adobe's inversion, stay with Pillow), read whole and unchanged; any error or
    warning (``strict``: a truncated or damaged file, extraneous bytes) sends the file back to Pillow, which then
    decodes it or raises the error it always raised. Orientation is applied by the caller, ICC profiles are dropped
    by both paths. Returns None too when M/8 gains nothing over 1/2^k.

    A colour image comes back in ``RGBX`` mode, wrapping the decoder's array without a copy: resize, transpose and
    the JPEG encoder take RGBX as it is, and the RGBX->RGB ``convert()`` costs ~5 ms of a ~65 ms photo (its
    output is fresh memory). :func:`_normalise` turns it into RGB for the other output formats.
    """
    if im.format not in ("JPEG", "MPO") or im.mode not in ("L", "RGB") or file_size <= 0:
        return None
    width, height = im.size
    scale = next((m for m in range(1, 9) if -(-width * m // 8) >= floor[0] and -(-height * m // 8) >= floor[1]), 8)
    if scale in (1, 2, 4, 8):  # Pillow's draft() reaches this scale itself
        return None
    sj = _simplejpeg()
    if sj is None:
        return None
    fp.seek(0)
    data = fp.read(file_size + 1)
    fp.seek(0)
    if len(data) != file_size:  # changed while we read it
        return None
    # RGBX and L are laid out as Pillow keeps them: frombuffer() wraps the array without a copy.
    mode = "L" if im.mode == "L" else "RGBX"
    try:
        array = sj.decode_jpeg(
            data, colorspace="GRAY" if mode == "L" else "RGBX", min_width=floor[0], min_height=floor[1], strict=True
        )
    except ValueError:
        return None
    rows, cols = int(array.shape[0]), int(array.shape[1])
    if (cols, rows) != (-(-width * scale // 8), -(-height * scale // 8)):  # not the scale predicted: be safe
        return None
    return Image.frombuffer(mode, (cols, rows), array, "raw", mode, 0, 1)


def _near(have: tuple[int, int], want: tuple[int, int], slack: float) -> bool:
    """``have`` is at most ``want`` and at least ``(1 - slack) * want`` on both axes: close enough not to resize."""
    return all(w * (1 - slack) <= h <= w for h, w in zip(have, want, strict=True))


def _from_wide(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit and float greys → L (or RGBA when a transparency key is set), scaled rather than clipped.

    I;16 is divided by 257 (65535 → 255), except when every value fits in 0..255: that is 8-bit data stored in a
    16-bit container, taken as is rather than shown black. I and F use their own range when it is outside 0..65535
    (or 0..1 for F).
    """
    wide = img.convert("I") if img.mode.startswith("I;16") else img
    low, high = cast("tuple[float, float]", wide.getextrema())  # one band: (min, max), never per-band tuples
    if img.mode == "F" and low >= 0 and high <= 1:
        scale, offset = 255.0, 0.0
    elif low >= 0 and high <= 255:
        scale, offset = 1.0, 0.0
    elif low >= 0 and high <= 65535 and img.mode != "F":
        scale, offset = 1 / 257, 0.0
    else:
        scale = 255 / (high - low) if high > low else 0.0
        offset = -low * scale
    grey = wide.point(lambda v: v * scale + offset).convert("L")
    key = img.info.get("transparency")
    if isinstance(key, int) and img.mode != "F":
        alpha = ImageMath.lambda_eval(lambda a: (a["a"] != key) * 255, a=wide)
        assert isinstance(alpha, Image.Image)
        return Image.merge("RGBA", (grey, grey, grey, alpha.convert("L")))
    return grey


def _normalise(img: Image.Image, name: str) -> Image.Image:
    """Any Pillow mode → L, RGB or RGBA."""
    mode = img.mode
    if mode == "RGBA" or (mode in ("L", "RGB") and "transparency" not in img.info):
        return img
    if mode in ("I", "F") or mode.startswith("I;16"):
        return _from_wide(img)
    if mode in ("1",):
        return img.convert("L")
    if img.has_transparency_data:  # P/L/RGB + transparency key, PA, LA, La, RGBa
        return img.convert("RGBA")
    try:
        # CMYK (Adobe's inverted CMYK is undone by the JPEG decoder), YCbCr, HSV, P, RGBX...
        return img.convert("RGB")
    except ValueError as exc:  # LAB and anything else Pillow cannot turn into RGB
        raise UnsupportedMedia(f"{name}: pixel mode {mode} is not supported; convert the file to 8-bit RGB") from exc


def _for_output(img: Image.Image, spec: ImageSpec) -> Image.Image:
    """Drop an alpha channel that is fully opaque; flatten real transparency onto the background for JPEG."""
    if img.mode != "RGBA":
        return img
    alpha = img.getchannel("A")
    if alpha.getextrema() == (255, 255):
        return img.convert("RGB")
    if spec.format != "jpeg":
        return img
    flat = Image.new("RGB", img.size, spec.background)
    flat.paste(img, mask=alpha)
    return flat


#: Largest JPEG (in pixels) written with optimal Huffman tables (``optimize=True``); larger ones get libjpeg's
#: standard tables. The optimising pass costs more than the rest of the encode (a 1500x1125 photo: ~14 ms of CPU with
#: it, ~6 ms without) and saves ~2% of the bytes there (0.5-4% on photos at quality 85, 2-8% at 60; flat graphics
#: lose more in proportion, ~10 kB per megapixel, but they are small files). On small images (video frames,
#: thumbnails, pictures the budget search made smaller) the tables are a larger share of the file (6-20% under
#: 0.1 MP) and the pass costs little. The pixels are the same either way (same quantisation tables, 4:2:0
#: subsampling, accurate integer DCT), and the budget search measures the bytes it gets. simplejpeg's encoder was
#: measured too: as fast as Pillow without the pass, and it releases the interpreter lock, but below quality 96 it
#: always takes libjpeg-turbo's fast DCT (its ``fastdct=False`` changes nothing): 0.03-0.2 dB less PSNR.
_OPTIMIZE_MAX_PIXELS: Final = 1_000_000


def save_image(img: Image.Image, fmt: str, quality: int | None) -> bytes:
    """``img`` (L, RGB, RGBX or RGBA; RGBA not for JPEG) as ``fmt`` at ``quality``, without metadata."""
    buf = io.BytesIO()
    if fmt == "jpeg":
        # Optimal Huffman tables (optimize=True) only up to _OPTIMIZE_MAX_PIXELS, see there.
        img.save(buf, "JPEG", quality=quality, optimize=img.width * img.height <= _OPTIMIZE_MAX_PIXELS)
    elif fmt == "webp":
        img.save(buf, "WEBP", quality=quality, method=4)
    else:
        img.save(buf, "PNG")
    return buf.getvalue()


@dataclass(frozen=True, slots=True)
class Encoded:
    """One result of :func:`fit_budget`: the payload, its pixel size, the quality used and how many encodes it took."""

    data: bytes
    width: int
    height: int
    quality: int | None
    encodes: int

    def __repr__(self) -> str:
        return f"Encoded({len(self.data)} bytes, {self.width}x{self.height}, q={self.quality}, encodes={self.encodes})"


def fit_budget(img: Image.Image, spec: ImageSpec, *, budget: int, name: str) -> Encoded:
    """Encode ``img`` (L, RGB or RGBA, or RGBX for JPEG; already sized) as ``spec.format`` so that its data URL fits
    ``budget``.

    JPEG/WebP: ``spec.quality`` first; when too big, lower quality, never below ``spec.min_quality``; typically 2-3
    encodes. When ``spec.min_quality`` is still too big, or for PNG (which has no quality knob; PNG is chosen for
    lossless detail, so it stays PNG and loses pixels instead), the image is scaled down, down to :data:`MIN_SIDE` px
    on its longest side. Both are predicted from measured sizes (:func:`mmwatchd.encode.budget.fit`, tuned by
    :data:`~mmwatchd.encode.budget.PICTURE`). Raises :class:`BudgetExceeded` when nothing fits.
    """
    mime = MIME_BY_FORMAT[spec.format]
    limit = max_payload(mime, budget)
    if limit <= 0:
        raise BudgetExceeded(
            f"{name}: cannot fit the byte budget: {budget} characters leave no room for image data after the "
            f"data-URL prefix; raise endpoint.max_request_bytes or shorten the prompt"
        )
    encodes = 0
    width, height = img.size

    def dims(scale: float) -> tuple[int, int]:
        return max(1, round(width * scale)), max(1, round(height * scale))

    def measure(quality: int | None, scale: float) -> tuple[int, tuple[Image.Image, bytes]]:
        nonlocal encodes
        image = img if scale == 1.0 else img.resize(dims(scale), _RESAMPLE, reducing_gap=_REDUCING_GAP)
        encodes += 1
        data = save_image(image, spec.format, quality)
        return len(data), (image, data)

    quality = spec.quality if spec.format in ("jpeg", "webp") else None
    result = fit(measure, limit, quality=quality, min_quality=spec.min_quality,
                 min_scale=min(1.0, MIN_SIDE / max(width, height)), dims=dims, tuning=PICTURE)  # fmt: skip
    if result.fits:
        image, data = result.payload
        return Encoded(data, image.width, image.height, result.quality, encodes)
    w, h = dims(result.scale)
    quality = result.quality
    raise BudgetExceeded(
        f"{name}: cannot fit the byte budget: the smallest encoding tried ({w}x{h} {spec.format.upper()}"
        f"{f' quality {quality}' if quality is not None else ''}) needs a {data_url_len(mime, result.total)}-character "
        f"data URL, over the {budget} available for this image; raise endpoint.max_request_bytes or shorten the prompt"
    )


#: What every vision server takes as a data URL (Ollama refuses other types with 400 "invalid image input").
DEFAULT_PASSTHROUGH_MIMES: Final = ("image/jpeg", "image/png", "image/webp")


def _passthrough(src: _Source, spec: ImageSpec, orientation: int, budget: int, mimes: tuple[str, ...]) -> Part | None:
    """The original bytes, when a server will show them exactly as we would, and they fit; else None."""
    im = src.im
    fmt = im.format or ""
    if im.mode not in _PASSTHROUGH_MODES.get(fmt, ()) or orientation != 1:
        return None
    if _SOURCE_MIME[fmt] not in mimes:  # the endpoint does not take this type as it is
        return None
    if src.png and src.png.bit_depth > 8:  # Pillow shows 16-bit RGB(A) as 8-bit; a server may not
        return None
    width, height = im.size
    if max(width, height) > spec.max_side or width * height > spec.max_pixels:
        return None
    mime = _SOURCE_MIME[fmt]
    if data_url_len(mime, src.file_size) > budget:
        return None
    # Transparency keys render differently from server to server (some show the key colour, some black).
    if fmt in ("PNG", "GIF") and "transparency" in im.info:
        return None
    with translate_pillow(src.name, src.label):
        if getattr(im, "is_animated", False):
            return None
    src.fp.seek(0)
    data = src.fp.read()
    if len(data) != src.file_size:  # changed while we read it: encode from what Pillow has instead
        return None
    if not spec.keep_metadata:
        # EXIF (GPS, camera serial), XMP and comments are not the model's business; the coded pixels are kept byte
        # for byte. A structure the walk cannot follow is re-encoded.
        try:
            data = strip_metadata(data, fmt)
        except ValueError:
            return None
    # Decode once, so that a damaged file fails here and not on the server. For JPEG at 1/8 scale: every coefficient
    # is still entropy-decoded (truncation is caught), but the inverse DCT and colour conversion cost 1/64.
    with translate_pillow(src.name, src.label):
        _load_scaled(im, (max(1, width // 8), max(1, height // 8)))
    return Part(
        type="image_url", mime=mime, chunks=(data,), width=width, height=height, origin="original", quality=None
    )


def encode_image(
    path: Path,
    spec: ImageSpec,
    *,
    budget: int,
    limits: Limits,
    passthrough_mimes: tuple[str, ...] = DEFAULT_PASSTHROUGH_MIMES,
) -> Part:
    """One ``image_url`` part for ``path`` whose data URL is at most ``budget`` characters.

    With ``spec.passthrough``, a JPEG (RGB/L), PNG (RGB/RGBA/L), WebP (RGB/RGBA) or GIF (palette) that is not
    animated, has no transparency key and no EXIF rotation, fits ``spec.max_side``/``spec.max_pixels`` and whose data
    URL fits ``budget`` and whose type is in ``passthrough_mimes`` (what the endpoint takes) is sent as it is
    (``origin="original"``, its own MIME type; its metadata cut out losslessly unless ``spec.keep_metadata``). Anything else
    (CMYK, 16-bit, MPO, HEIC, TIFF, ...) is decoded and re-encoded as ``spec.format`` (``origin="encoded"``), see
    :func:`fit_budget` for how it is made to fit.

    Raises :class:`UnsupportedMedia`, :class:`DecodeError`, :class:`MediaTooLarge` or :class:`BudgetExceeded`;
    ``OSError`` for I/O failures (file vanished, unreadable).
    """
    with _open(path, limits, spec) as src:
        exif = _exif(src)
        orientation = _orientation(src.im, exif)
        stored = src.im.size
        target = fit_size(_displayed(stored, orientation), spec)
        if spec.passthrough:
            part = _passthrough(src, spec, orientation, budget, passthrough_mimes)
            if part is not None:
                return part
        stored_target = _displayed(target, orientation)  # the same swap maps displayed axes back to stored ones
        with translate_pillow(src.name, src.label):
            img = _load_scaled(src.im, stored_target, slack=_SLACK, fp=src.fp, file_size=src.file_size)
            if img.mode != "RGBX" or spec.format != "jpeg":  # an M/8 decode's RGBX goes to the JPEG encoder as it is
                img = _normalise(img, src.name)
        if not _near(img.size, stored_target, _SLACK):
            img = img.resize(stored_target, _RESAMPLE, reducing_gap=_REDUCING_GAP)
        if orientation in TRANSPOSE:
            img = img.transpose(TRANSPOSE[orientation])
        img = _for_output(img, spec)
        result = fit_budget(img, spec, budget=budget, name=src.name)
    part = Part(
        type="image_url",
        mime=MIME_BY_FORMAT[spec.format],
        chunks=(result.data,),
        width=result.width,
        height=result.height,
        origin="encoded",
        quality=result.quality,
    )
    if part.url_len > budget:  # cannot happen by construction; never hand an oversize part on
        raise BudgetExceeded(f"{src.name}: encoded image exceeds the budget of {budget} characters")
    return part


def probe_and_encode_image(
    path: Path,
    spec: ImageSpec,
    *,
    budget: int,
    limits: Limits,
    passthrough_mimes: tuple[str, ...] = DEFAULT_PASSTHROUGH_MIMES,
) -> tuple[ImageFacts, Part]:
    """:func:`probe_image` and :func:`encode_image` in one call (one trip to a decoder process)."""
    return probe_image(path, limits=limits), encode_image(
        path, spec, budget=budget, limits=limits, passthrough_mimes=passthrough_mimes
    )


def probe_pictures(n: int, size: tuple[int, int] = (56, 56)) -> list[bytes]:
    """``n`` small JPEGs, each a different plain colour: what ``mmwatchd check --endpoint`` sends to see what an
    endpoint takes (cheap for any model: a few hundred bytes and a handful of tokens each)."""
    out = []
    for i in range(n):
        hue = (i * 47) % 256
        img = Image.new("RGB", size, (hue, 255 - hue, (hue * 3) % 256))
        out.append(save_image(img, "jpeg", 80))
    return out
