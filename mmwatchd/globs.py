"""Glob patterns for watch include/exclude lists and rule matches.

Patterns are matched against a path relative to its watch root, with ``/`` separators:

- ``*`` and ``?`` never cross a ``/``; ``[abc]`` is a character class (``[!abc]`` its complement); ``**/`` is zero or
  more folders.
- ``{jpg,png}`` is brace expansion, as in the shell: ``*.{jpg,png}`` is the two patterns ``*.jpg`` and ``*.png``.
  Groups nest (``{a,b{1,2}}``), and each expanded pattern follows the rules here on its own, so
  ``{raw/**,*.dng}`` is ``raw/**`` or a ``.dng`` file in any folder. A ``{`` without its ``}`` and a group without a
  comma are errors, not literal text: a pattern that silently matches nothing is worse than one that is refused.
- ``\\`` makes the next character literal: ``\\{draft\\}.jpg``, ``\\*``, ``\\[``.
- A pattern with no ``/`` matches the file name in any folder (``*.jpg`` is ``**/*.jpg``): that is what people
  write, and a pattern that silently matches nothing in subfolders is a trap.
- Matching ignores case, because cameras write ``IMG_0001.JPG`` and people write ``*.jpg``.

Malformed patterns raise ``ValueError`` with the reason; the config loader reports it at the key, so
``mmwatchd check`` refuses them.
"""

from __future__ import annotations

import functools
import itertools
import re

#: Patterns one glob may expand to. ``{a,b}{c,d}...`` multiplies; a list this long is a mistake, not a config.
MAX_EXPANSIONS = 256


def _class_end(pat: str, i: int) -> int:
    """Index of the ``]`` closing the class that opens at ``pat[i] == "["``, or -1."""
    j = i + 1
    if pat[j : j + 1] in ("!", "^"):
        j += 1
    if pat[j : j + 1] == "]":  # a leading ] is a member, as in the shell
        j += 1
    while j < len(pat):
        if pat[j] == "\\":
            j += 2
            continue
        if pat[j] == "]":
            return j
        j += 1
    return -1


def _group_end(pat: str, i: int, original: str) -> tuple[int, list[int]]:
    """For the ``{`` at ``pat[i]``: the index of its ``}`` and of its top-level commas."""
    depth, j = 0, i
    commas: list[int] = []
    while j < len(pat):
        c = pat[j]
        if c == "\\":
            j += 2
            continue
        if c == "[":
            end = _class_end(pat, j)
            if end >= 0:
                j = end + 1
                continue
        elif c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return j, commas
        elif c == "," and depth == 1:
            commas.append(j)
        j += 1
    raise ValueError(f"unmatched '{{' in {original!r} (write \\{{ for a literal brace)")


def expand_braces(pattern: str) -> tuple[str, ...]:
    """``*.{jpg,png}`` -> ``("*.jpg", "*.png")``, left to right, nested groups included; escapes are kept."""
    return tuple(dict.fromkeys(_expand(pattern, pattern)))  # each distinct pattern once, in order


def _expand(pat: str, original: str) -> list[str]:
    i = 0
    while i < len(pat):
        c = pat[i]
        if c == "\\":
            i += 2
            continue
        if c == "[":
            end = _class_end(pat, i)
            if end >= 0:
                i = end + 1
                continue
        elif c == "}":
            raise ValueError(f"unmatched '}}' in {original!r} (write \\}} for a literal brace)")
        elif c == "{":
            end, commas = _group_end(pat, i, original)
            if not commas:
                raise ValueError(
                    f"{pat[i : end + 1]!r} in {original!r} has no comma: a brace group lists alternatives, "
                    f"like *.{{jpg,png}} (write \\{{ and \\}} for literal braces)"
                )
            bounds = [i, *commas, end]
            choices = [pat[a + 1 : b] for a, b in itertools.pairwise(bounds)]
            head, tails = pat[:i], _expand(pat[end + 1 :], original)
            out: list[str] = []
            for choice in choices:
                for middle in _expand(choice, original):
                    for tail in tails:
                        out.append(head + middle + tail)
                        if len(out) > MAX_EXPANSIONS:
                            raise ValueError(
                                f"{original!r} expands to more than {MAX_EXPANSIONS} patterns; use fewer brace groups"
                            )
            return out
        i += 1
    return [pat]


def _translate(pat: str, original: str) -> str:
    """Regex source for one brace-free pattern."""
    if not pat:
        raise ValueError(f"{original!r} expands to an empty pattern")
    pat = pat.lstrip("/")
    if "/" not in pat:
        pat = "**/" + pat
    out: list[str] = []
    i, n = 0, len(pat)
    while i < n:
        c = pat[i]
        if c == "\\":
            if i + 1 == n:
                raise ValueError(f"{original!r} ends in a lone backslash (write \\\\ for a literal one)")
            out.append(re.escape(pat[i + 1]))
            i += 2
        elif pat.startswith("**/", i):
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
            j = _class_end(pat, i)
            if j < 0:
                raise ValueError(f"unclosed '[' in {original!r} (write \\[ for a literal bracket)")
            out.append(_class(pat[i + 1 : j]))
            i = j + 1
        else:
            out.append(re.escape(c))
            i += 1
    return "".join(out)


def _class(body: str) -> str:
    """``[...]`` as a regex class: ``!`` or ``^`` first negates, ``a-z`` is a range, everything else is literal."""
    out = ["["]
    if body[:1] in ("!", "^"):
        out.append("^")
        body = body[1:]
    i = 0
    while i < len(body):
        c = body[i]
        if c == "\\" and i + 1 < len(body):
            out.append(re.escape(body[i + 1]))
            i += 2
            continue
        out.append("-" if c == "-" and 0 < i < len(body) - 1 else re.escape(c))
        i += 1
    out.append("]")
    return "".join(out)


@functools.lru_cache(maxsize=512)
def compile_glob(pattern: str) -> re.Pattern[str]:
    """Compile one pattern; raises ``ValueError`` with a readable reason when it is malformed."""
    if not pattern:
        raise ValueError("empty pattern")
    alternatives = [_translate(p, pattern) for p in expand_braces(pattern)]
    source = alternatives[0] if len(alternatives) == 1 else "(?:" + "|".join(alternatives) + ")"
    return re.compile(source + r"\Z", re.IGNORECASE | re.DOTALL)


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
