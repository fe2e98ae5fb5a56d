"""A controlled vocabulary: the keywords a person already uses, so the model's answers come back as those tags.

The file is plain text, one keyword a line, hierarchy with ``/``, synonyms after a ``;``, comments with ``#``::

    # animals
    Animals/Dog; dog, dogs, puppy
    Animals/Cat; kitten
    Places/France/Paris

Every level of a path is a keyword too (``Animals`` above). The vocabulary is offered to the model through the
``{vocabulary}`` prompt placeholder (:meth:`Vocabulary.render`), and the model's keywords are mapped onto it
(:meth:`Vocabulary.map`): case-insensitively, by full path, by synonym, or by leaf name when that name is unique, so
``Dog`` comes back as ``Animals/Dog`` instead of a new near-duplicate tag. Issue 12.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mmwatchd.errors import ConfigError

#: A keyword as its levels, top first: ``("Animals", "Dog")``.
KeywordPath = tuple[str, ...]
Unknown = Literal["keep", "drop"]

#: Vocabularies exported from photo libraries run to tens of thousands of lines; a bigger file is a mistake.
MAX_BYTES = 4 << 20
#: Characters a level may not contain: ``/`` separates levels here and in digiKam:TagsList, ``|`` in
#: lr:hierarchicalSubject.
_FORBIDDEN = "|"


def fold(text: str) -> str:
    """The form keywords are compared in: case-folded, whitespace collapsed."""
    return " ".join(text.split()).casefold()


@dataclass(frozen=True, slots=True, kw_only=True)
class Mapping:
    """What became of the model's keywords."""

    #: Vocabulary paths the answer named, in answer order, each once.
    keywords: tuple[KeywordPath, ...]
    #: The model's keywords the vocabulary does not have (kept or dropped per ``unknown``), in answer order.
    unknown: tuple[str, ...]
    #: Leaf names that more than one vocabulary path ends in: not guessed, treated as unknown (also in ``unknown``).
    ambiguous: tuple[str, ...] = ()

    def describe(self) -> dict[str, object]:
        """What the JSON sidecar records."""
        return {
            "keywords": ["/".join(p) for p in self.keywords],
            "unknown": list(self.unknown),
            **({"ambiguous": list(self.ambiguous)} if self.ambiguous else {}),
        }


@dataclass(frozen=True, slots=True)
class Vocabulary:
    """A parsed vocabulary file. Build it with :func:`load` or :func:`parse`."""

    #: The entries as written, in file order.
    entries: tuple[KeywordPath, ...]
    #: Folded synonym → path.
    synonyms: dict[str, KeywordPath] = field(repr=False)
    source: str = "vocabulary"
    #: Folded full path ("animals/dog") → path, for every entry and every level above one.
    _paths: dict[str, KeywordPath] = field(default_factory=dict, repr=False)
    #: Folded leaf name → the paths ending in it.
    _leaves: dict[str, tuple[KeywordPath, ...]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        leaves: dict[str, list[KeywordPath]] = {}
        for entry in self.entries:
            for depth in range(1, len(entry) + 1):
                node = entry[:depth]
                key = fold("/".join(node))
                if key not in self._paths:
                    self._paths[key] = node
                    leaves.setdefault(fold(node[-1]), []).append(node)
        self._leaves.update({k: tuple(v) for k, v in leaves.items()})

    def __len__(self) -> int:
        return len(self.entries)

    def lookup(self, word: str) -> KeywordPath | tuple[KeywordPath, ...] | None:
        """The path ``word`` names: a full path first, then a synonym, then a unique leaf name. Several paths (a
        tuple of paths) when the leaf name is ambiguous; None when the vocabulary does not know it."""
        key = fold(word)
        if not key:
            return None
        if (path := self._paths.get(fold("/".join(p.strip() for p in word.split("/"))))) is not None:
            return path
        if (path := self.synonyms.get(key)) is not None:
            return path
        found = self._leaves.get(key, ())
        if len(found) == 1:
            return found[0]
        return found or None

    def map(self, words: Iterable[str]) -> Mapping:
        """Map the model's keywords onto the vocabulary (see the module docstring)."""
        keywords: list[KeywordPath] = []
        unknown: list[str] = []
        ambiguous: list[str] = []
        for given in words:
            word = " ".join(given.split())
            if not word:
                continue
            found = self.lookup(word)
            if found is None or (found and isinstance(found[0], tuple)):
                if fold(word) not in {fold(u) for u in unknown}:
                    unknown.append(word)
                    if found:
                        ambiguous.append(word)
                continue
            path = found  # a single path
            if path not in keywords:
                keywords.append(path)  # type: ignore[arg-type]
        return Mapping(keywords=tuple(keywords), unknown=tuple(unknown), ambiguous=tuple(ambiguous))

    def render(self) -> str:
        """The vocabulary for the ``{vocabulary}`` placeholder, compactly: one line per parent, its children after a
        colon (``Animals: Cat, Dog``); top-level keywords without children on the first line. Synonyms are left out:
        they only help mapping the answer back."""
        children: dict[KeywordPath, list[str]] = {}
        for node in self._paths.values():
            children.setdefault(node[:-1], [])
            if node[-1] not in children[node[:-1]]:
                children[node[:-1]].append(node[-1])
        lines = []
        top = [name for name in children.get((), []) if (name,) not in children]
        if top:
            lines.append(", ".join(top))
        for parent, names in children.items():
            if parent:
                lines.append(f"{'/'.join(parent)}: {', '.join(names)}")
        return "\n".join(lines)


def load(path: Path) -> Vocabulary:
    """Read and parse a vocabulary file. Raises ConfigError with one ``file:line: problem`` per bad line."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: vocabulary file not found (rules[].keywords.vocabulary)") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder; rules[].keywords.vocabulary must name a text file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read vocabulary: {exc.strerror or exc}") from exc
    if len(raw) > MAX_BYTES:
        raise ConfigError(f"{path}: vocabulary is larger than {MAX_BYTES >> 20} MiB; is this the right file?")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (save the vocabulary as UTF-8)") from None
    return parse(text, source=str(path))


def parse(text: str, *, source: str = "vocabulary") -> Vocabulary:
    """Parse vocabulary text (see the module docstring). Every bad line is reported, not just the first."""
    problems: list[str] = []
    entries: list[KeywordPath] = []
    entry_line: dict[str, int] = {}
    synonyms: dict[str, KeywordPath] = {}
    synonym_line: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        where = f"{source}:{number}"
        content = _strip_comment(line).strip()
        if not content:
            continue
        head, sep, tail = content.partition(";")
        if ";" in tail:
            problems.append(f"{where}: more than one ';' (write synonyms after one ';', separated by commas)")
            continue
        path, problem = _path(head)
        if problem:
            problems.append(f"{where}: {problem}")
            continue
        folded = fold("/".join(path))
        if (first := entry_line.get(folded)) is not None:
            problems.append(f"{where}: {'/'.join(path)!r} is already listed on line {first}")
            continue
        entry_line[folded] = number
        entries.append(path)
        names = [" ".join(s.split()) for s in tail.split(",")] if sep else []
        if sep and not any(names):
            problems.append(f"{where}: ';' but no synonyms after it (write 'Animals/Dog; dog, puppy')")
            continue
        for name in names[:-1] if names and not names[-1] else names:  # a trailing comma is harmless
            if not name:
                problems.append(f"{where}: empty synonym between commas")
            elif "/" in name or _FORBIDDEN in name:
                problems.append(f"{where}: synonym {name!r} contains '/' or '|'; a synonym is a single word or phrase")
            elif (other := synonyms.get(fold(name))) is not None and other != path:
                problems.append(
                    f"{where}: synonym {name!r} already means {'/'.join(other)!r} "
                    f"(line {synonym_line[fold(name)]}); a synonym can name one keyword only"
                )
            else:
                synonyms[fold(name)] = path
                synonym_line[fold(name)] = number
    if problems:
        raise ConfigError(problems)
    return Vocabulary(tuple(entries), synonyms, source)


def _strip_comment(line: str) -> str:
    """``#`` starts a comment at the start of a line or after whitespace (so a keyword like ``C#`` survives)."""
    if line.lstrip().startswith("#"):
        return ""
    for i, ch in enumerate(line):
        if ch == "#" and i > 0 and line[i - 1].isspace():
            return line[:i]
    return line


def _path(text: str) -> tuple[KeywordPath, str]:
    levels = tuple(" ".join(level.split()) for level in text.split("/"))
    if not any(levels):
        return (), "no keyword before the ';' (write 'Animals/Dog; dog, puppy')"
    if not all(levels):
        return (), f"empty level in {text.strip()!r} (write levels like 'Animals/Dog', without '//' or an end '/')"
    if any(_FORBIDDEN in level for level in levels):
        return (), f"{text.strip()!r} contains '|', which photo apps use to separate levels; use '/' for hierarchy"
    return levels, ""


def split_prefix(prefix: str) -> tuple[str, ...]:
    """``"AI/"`` → ``("AI",)``. Raises ValueError for ``|`` or an empty level (the config reports it at the key)."""
    levels = tuple(" ".join(p.split()) for p in prefix.strip().strip("/").split("/")) if prefix.strip("/ ") else ()
    if not all(levels) or any("|" in level for level in levels):
        raise ValueError(f"prefix {prefix!r}: write levels separated by '/', like 'AI/' (no '|', no empty level)")
    return levels
