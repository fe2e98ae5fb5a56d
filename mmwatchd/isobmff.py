"""ISO base media file format (ISO/IEC 14496-12) box headers: MP4/MOV, HEIF/AVIF and Canon CR3 are all boxes.

Every box starts with a 32-bit big-endian size and a 4-byte type; size 1 means a 64-bit size follows, size 0 means
the box runs to the end of the file. The walks over these boxes differ in what they do with a box that is cut short
or malformed (a validator names the problem, a reader stops), so each keeps its own loop; how a header is read is
decided here, once.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = ["HEADER_MAX", "BoxHeader", "read_header"]

#: Bytes to read at a box's start to be sure to have its whole header (a 64-bit size makes it 16).
HEADER_MAX = 16


@dataclass(frozen=True, slots=True)
class BoxHeader:
    kind: bytes
    #: Where the box's payload starts (its start + 8, or + 16 with a 64-bit size).
    payload: int
    #: The box's size in bytes, header included, as written; None for a box that runs to the end of the file.
    size: int | None


def read_header(data: bytes, pos: int) -> BoxHeader | None:
    """The header of the box at ``pos``, from ``data`` (the bytes from ``pos`` on, up to :data:`HEADER_MAX`); None
    when ``data`` ends before the header does."""
    if len(data) < 8:
        return None
    size, kind = struct.unpack(">I4s", data[:8])
    if size == 1:
        if len(data) < 16:
            return None
        return BoxHeader(kind, pos + 16, struct.unpack(">Q", data[8:16])[0])
    return BoxHeader(kind, pos + 8, None if size == 0 else size)
