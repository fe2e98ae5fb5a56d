"""Lossless metadata removal for images sent as they are (passthrough): the coded pixels are copied byte for byte.

What goes and what stays, per format:

- JPEG: APP1 (EXIF with GPS, XMP), APP13 (IPTC/Photoshop), COM, APP2 other than ICC (FlashPix, MPF), APP3-APP12
  and APP15, and anything after EOI (trailers, appended motion-photo videos) go. SOI, the tables, SOF, SOS with its
  entropy-coded data, RSTn, EOI stay, and so do APP0 JFIF (pixel density), APP2 ICC_PROFILE and APP14 Adobe (the
  decoder needs its colour-transform flag).
- PNG: tEXt, zTXt, iTXt (XMP sits in iTXt), eXIf and tIME go, and anything after IEND.
- WebP: the EXIF and XMP chunks go, their VP8X flags are cleared and the RIFF size corrected.
- GIF: comment extensions and application extensions other than animation (NETSCAPE2.0, ANIMEXTS1.0) and ICC
  (ICCRGBG1) go (XMP is an application extension).

ICC profiles stay on purpose: they are needed to show the colours right (a Display P3 phone photo looks dull without
its profile) and say nothing about where or by whom a photo was taken. Every function raises ``ValueError`` for a
structure it cannot walk; the caller then re-encodes instead (which never carries metadata).
"""

from __future__ import annotations

import struct
from typing import Final

__all__ = ["strip_metadata"]

_PNG_SIGNATURE: Final = b"\x89PNG\r\n\x1a\n"
_PNG_DROP: Final = frozenset({b"tEXt", b"zTXt", b"iTXt", b"eXIf", b"tIME"})
_GIF_KEEP_APPS: Final = (b"NETSCAPE2.0", b"ANIMEXTS1.0", b"ICCRGBG1")


def strip_metadata(data: bytes, fmt: str) -> bytes:
    """``data`` without its metadata; ``fmt`` is Pillow's format name (JPEG, PNG, WEBP, GIF)."""
    if fmt == "JPEG":
        return _jpeg(data)
    if fmt == "PNG":
        return _png(data)
    if fmt == "WEBP":
        return _webp(data)
    if fmt == "GIF":
        return _gif(data)
    raise ValueError(f"no metadata walk for {fmt}")


def _jpeg_keeps(marker: int, payload: bytes) -> bool:
    if marker == 0xFE:  # COM
        return False
    if not 0xE0 <= marker <= 0xEF:  # not APPn: tables, frame and scan headers, DRI, ...
        return True
    if marker == 0xE0:
        return payload.startswith(b"JFIF\0")
    if marker == 0xE2:
        return payload.startswith(b"ICC_PROFILE\0")
    return marker == 0xEE  # Adobe


def _jpeg(data: bytes) -> bytes:
    if not data.startswith(b"\xff\xd8"):
        raise ValueError("no SOI")
    out = [b"\xff\xd8"]
    i, n = 2, len(data)
    while i < n:
        if data[i] != 0xFF:
            raise ValueError(f"no marker at {i}")
        while i < n and data[i] == 0xFF:  # fill bytes
            i += 1
        if i >= n:
            break
        marker = data[i]
        i += 1
        if marker == 0xD9:  # EOI: whatever follows is not part of the image
            out.append(b"\xff\xd9")
            return b"".join(out)
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # RSTn, TEM: no length
            out.append(bytes((0xFF, marker)))
            continue
        if i + 2 > n:
            break
        (length,) = struct.unpack(">H", data[i : i + 2])
        end = i + length
        if length < 2 or end > n:
            raise ValueError(f"segment {marker:#x} runs past the end")
        if _jpeg_keeps(marker, data[i + 2 : end]):
            out.append(bytes((0xFF, marker)))
            out.append(data[i:end])
        i = end
        if marker == 0xDA:  # SOS: entropy-coded data up to the next marker that is not stuffing or RSTn
            k = i
            while True:
                k = data.find(b"\xff", k)
                if k < 0 or k + 1 >= n:
                    raise ValueError("scan data without an end")
                following = data[k + 1]
                if following == 0x00 or 0xD0 <= following <= 0xD7 or following == 0xFF:
                    k += 1
                    continue
                break
            out.append(data[i:k])
            i = k
    raise ValueError("no EOI")


def _png(data: bytes) -> bytes:
    if not data.startswith(_PNG_SIGNATURE):
        raise ValueError("no PNG signature")
    out = [_PNG_SIGNATURE]
    i, n = len(_PNG_SIGNATURE), len(data)
    while i + 8 <= n:
        (length,) = struct.unpack(">I", data[i : i + 4])
        kind = data[i + 4 : i + 8]
        end = i + 12 + length
        if end > n:
            raise ValueError("chunk runs past the end")
        if kind not in _PNG_DROP:
            out.append(data[i:end])
        i = end
        if kind == b"IEND":
            return b"".join(out)
    raise ValueError("no IEND")


def _webp(data: bytes) -> bytes:
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        raise ValueError("not a RIFF WebP")
    (riff_size,) = struct.unpack("<I", data[4:8])
    n = min(len(data), 8 + riff_size)
    chunks: list[bytearray | bytes] = []
    i = 12
    while i + 8 <= n:
        kind = data[i : i + 4]
        (size,) = struct.unpack("<I", data[i + 4 : i + 8])
        end = i + 8 + size + (size & 1)
        if i + 8 + size > n:
            raise ValueError("chunk runs past the end")
        chunk = data[i : min(end, n)]
        if kind == b"VP8X" and size >= 1:
            flags = bytearray(chunk)
            flags[8] &= ~0x0C & 0xFF  # EXIF (0x08) and XMP (0x04) flags
            chunk = bytes(flags)
        if kind not in (b"EXIF", b"XMP "):
            chunks.append(chunk)
        i = end
    body = b"".join(bytes(c) for c in chunks)
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WEBP" + body


def _gif_blocks_end(data: bytes, i: int) -> int:
    """The position after the data sub-blocks starting at ``i`` (the zero-length terminator included)."""
    n = len(data)
    while True:
        if i >= n:
            raise ValueError("sub-blocks run past the end")
        size = data[i]
        i += 1 + size
        if size == 0:
            return i


def _gif(data: bytes) -> bytes:
    if len(data) < 13 or data[:3] != b"GIF":
        raise ValueError("not a GIF")
    packed = data[10]
    i = 13 + (3 * 2 ** ((packed & 7) + 1) if packed & 0x80 else 0)
    out = [data[:i]]
    n = len(data)
    while i < n:
        block = data[i]
        if block == 0x3B:  # trailer
            out.append(b"\x3b")
            return b"".join(out)
        if block == 0x21:  # extension
            if i + 2 > n:
                break
            label = data[i + 1]
            end = _gif_blocks_end(data, i + 2)
            keep = label in (0xF9, 0x01)  # graphic control, plain text
            if label == 0xFF:
                keep = data[i + 3 : i + 3 + 11].startswith(_GIF_KEEP_APPS)
            if keep:
                out.append(data[i:end])
            i = end
        elif block == 0x2C:  # image: descriptor, local colour table, LZW code size, data
            if i + 10 > n:
                break
            flags = data[i + 9]
            start = i + 10 + (3 * 2 ** ((flags & 7) + 1) if flags & 0x80 else 0) + 1
            end = _gif_blocks_end(data, start)
            out.append(data[i:end])
            i = end
        else:
            raise ValueError(f"unknown GIF block {block:#x}")
    raise ValueError("no trailer")
