"""Glob patterns for watch include/exclude lists and rule matches.

Patterns are matched against a path relative to its watch root, with ``/`` separators:

- ``*`` and ``?`` never cross a ``/``; ``[abc]`` is a character class; ``**/`` is zero or more folders.
- A pattern with no ``/`` matches the file name in any folder (``*.jpg`` is ``**/*.jpg``): that is what people
  write, and a pattern that silently matches nothing in subfolders is a trap.
- Matching ignores case, because cameras write ``IMG_0001.JPG`` and people write ``*.jpg``.
"""

from __future__ import annotations

import functools
import re


@functools.lru_cache(maxsize=512)
def compile_glob(pattern: str) -> re.Pattern[str]:
    """Compile one pattern; raises ``ValueError`` with a readable reason when it is malformed."""
    if not pattern:
        raise ValueError("empty pattern")
    pat = pattern.replace("\\", "/").lstrip("/")
    if "/" not in pat:
        pat = "**/" + pat
    out: list[str] = []
    i, n = 0, len(pat)
    while i < n:
        c = pat[i]
        if pat.startswith("**/", i):
            out.append("(?:[^/]*/)*")
            i += 3
        elif pat.startswith("**", i) and i + 2 == n:
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            j = pat.find("]", i + 2 if pat[i + 1 : i + 2] in ("!", "]") else i + 1)
            if j < 0:
                raise ValueError(f"unclosed '[' in {pattern!r}")
            body = pat[i + 1 : j]
            if body.startswith("!"):
                body = "^" + body[1:]
            out.append("[" + body.replace("\\", "\\\\") + "]")
            i = j + 1
        else:
            out.append(re.escape(c))
            i += 1
    return re.compile("".join(out) + r"\Z", re.IGNORECASE | re.DOTALL)


def glob_match(rel_path: str, pattern: str) -> bool:
    """True when ``rel_path`` (relative, ``/``-separated) matches ``pattern``."""
    return compile_glob(pattern).match(rel_path) is not None


#: Patterns that match every path; the default, checked for 100,000s of files per rescan, so skip the regex.
_EVERYTHING = frozenset({"**/*", "**", "*"})


def any_match(rel_path: str, patterns: tuple[str, ...] | list[str]) -> bool:
    return any(p in _EVERYTHING or compile_glob(p).match(rel_path) is not None for p in patterns)


def matches_everything(patterns: tuple[str, ...] | list[str]) -> bool:
    """True when ``patterns`` accept every path (one of them is ``**/*``, ``**`` or ``*``)."""
    return any(p in _EVERYTHING for p in patterns)
