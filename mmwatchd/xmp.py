"""XMP sidecars for photo apps: the caption and keywords, merged into whatever a person or another app wrote there.

Photo apps do not read our JSON sidecar; each reads the caption and keywords from one XMP field (see the table in the
README, "Photo apps (XMP)"), so the same complete keyword set (what was already there, plus ours) goes into all of:

- ``dc:description``: ``rdf:Alt``, our text as ``x-default``, other languages kept;
- ``dc:subject``: ``rdf:Bag`` of leaf names (PhotoPrism, Lightroom, Immich through exiftool's MWG Keywords);
- ``lr:hierarchicalSubject``: ``rdf:Bag``, levels joined by ``|`` (darktable, Lightroom);
- ``digiKam:TagsList``: ``rdf:Seq``, levels joined by ``/`` (digiKam; Immich reads it first).

A person's file is merged into, never replaced: every namespace and property we do not own stays as it was (ratings,
labels, darktable's history, other languages, unknown namespaces, the xpacket wrapper). What we wrote is recorded in
our own namespace (:data:`NS_MMWATCHD`), so that the next run

- replaces only our own keywords and never adds back one that a person removed;
- replaces the description only while it is empty or still ours; a description a person edited is kept, and the
  result says so (``description == "kept"``) for the JSON sidecar.

Whether a keyword was removed is told against the set we wrote last time (a three-way merge): a keyword we wrote that
is now missing from any of the keyword fields present in the file was removed by someone (an app that edits only
``dc:subject`` and ``lr:hierarchicalSubject`` still counts), while a keyword we did not write that is in any field
was added by someone. A field missing altogether is not read as "all removed" (an app that does not know
``digiKam:TagsList`` may drop it), so it cannot cost a person their keywords.

The file is parsed with lxml without DTDs, entities or network, under a size cap; a DOCTYPE is refused outright
(:class:`~mmwatchd.errors.XMPRefused`), so external entities and expansion bombs are never expanded. Writes are
atomic (temp file, fsync, rename: the mtime changes, which is how digiKam and PhotoPrism notice); when the file
changed between our read and our rename (an app saving at the same moment), it is read again and merged again.

Usage, after the reply is in (the pipeline's side, see the README)::

    description, words = xmp.answer_from_reply(reply.data, reply.text, description="caption", keywords="tags")
    keywords, mapping = xmp.our_keywords(words, prefix="AI/", vocabulary=vocab, unknown="keep")
    answer = xmp.Answer(description=description, keywords=keywords, model=reply.model, rule=rule.name,
                        fingerprint=fingerprint)
    doc["xmp"] = xmp.write_sidecar(media, answer, naming="name")   # never raises for an XMP problem

Issue 12.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from collections.abc import Callable, Iterable, Mapping as CMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from lxml import etree

from mmwatchd import __version__
from mmwatchd.errors import XMPError, XMPRefused
from mmwatchd.log import get_logger
from mmwatchd.sidecar import fit_name, fsync_dir, os_reason, own_like_folder, temp_path
from mmwatchd.vocabulary import fold, split_prefix

if TYPE_CHECKING:
    from mmwatchd.model import Rule, XmpSpec
    from mmwatchd.vocabulary import Mapping, Vocabulary

log = get_logger()

#: A keyword as its levels, top first: ``("AI", "dog")``.
Keyword = tuple[str, ...]
Naming = Literal["name", "stem"]
DescriptionState = Literal["written", "unchanged", "kept", "not_given"]

NS_X = "adobe:ns:meta/"
NS_RDF = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
NS_DC = "http://purl.org/dc/elements/1.1/"
NS_LR = "http://ns.adobe.com/lightroom/1.0/"
NS_DIGIKAM = "http://www.digikam.org/ns/1.0/"
#: Our own namespace: what we wrote, so a re-run can tell our keywords and description from a person's. Stable: a
#: changed URI would make every earlier sidecar look like a person's.
NS_MMWATCHD = "https://mmwatchd.invalid/ns/1.0/"
_XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"

#: Preferred prefixes; another is picked when a file already uses one of these for something else.
PREFIXES = {"dc": NS_DC, "lr": NS_LR, "digiKam": NS_DIGIKAM, "mmwatchd": NS_MMWATCHD}

#: Sidecars hold a few KB (darktable's edit history: tens of KB); anything near this is not an honest sidecar.
MAX_BYTES = 16 << 20
#: Times the merge is redone when another program keeps saving the file under us.
MAX_ATTEMPTS = 4
#: Longest keyword level we write; a model that answers an essay as a keyword gets it cut.
MAX_KEYWORD = 200

_RDF = f"{{{NS_RDF}}}RDF"
_DESC = f"{{{NS_RDF}}}Description"
_ABOUT = f"{{{NS_RDF}}}about"
_LI = f"{{{NS_RDF}}}li"
_CONTAINERS = (f"{{{NS_RDF}}}Bag", f"{{{NS_RDF}}}Seq", f"{{{NS_RDF}}}Alt")
_DESCRIPTION = f"{{{NS_DC}}}description"
_SUBJECT = f"{{{NS_DC}}}subject"
_HIER = f"{{{NS_LR}}}hierarchicalSubject"
_TAGS = f"{{{NS_DIGIKAM}}}TagsList"
_KEYWORD_FIELDS = (_SUBJECT, _HIER, _TAGS)


def _ours(name: str) -> str:
    return f"{{{NS_MMWATCHD}}}{name}"


_R_KEYWORDS = _ours("keywords")  # our keywords in the file now
_R_REMOVED = _ours("removedKeywords")  # ours that a person removed: never added again
_R_ALL = _ours("allKeywords")  # the complete set at our last write: the base of the three-way merge
_R_DESCRIPTION = _ours("descriptionSHA256")
_R_SIMPLE = ("model", "rule", "fingerprint", "version")

#: For ``once --dry-run``: the properties a write touches, and what each holds.
PROPERTIES: dict[str, str] = {
    "dc:description": "rdf:Alt, x-default: the description (other languages kept)",
    "dc:subject": "rdf:Bag: every keyword's leaf name",
    "lr:hierarchicalSubject": "rdf:Bag: every keyword, levels joined by |",
    "digiKam:TagsList": "rdf:Seq: every keyword, levels joined by /",
    "mmwatchd:*": "what mmwatchd wrote: keywords, removed keywords, description hash, model, rule, fingerprint",
}

_TEMPLATE = (
    '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
    f'<x:xmpmeta xmlns:x="{NS_X}" x:xmptk="mmwatchd {__version__}">\n'
    f' <rdf:RDF xmlns:rdf="{NS_RDF}">\n'
    '  <rdf:Description rdf:about=""/>\n'
    " </rdf:RDF>\n"
    "</x:xmpmeta>\n"
    '<?xpacket end="w"?>'
).encode()


# -- what to write ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Answer:
    """What one answer puts into the sidecar."""

    #: None: leave the description as it is (the reply had none).
    description: str | None
    #: Our keywords, hierarchy as levels (see :func:`our_keywords`).
    keywords: tuple[Keyword, ...]
    model: str
    rule: str
    fingerprint: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Merged:
    """What a merge did (see :class:`Result` for the fields)."""

    description: DescriptionState
    keywords: tuple[Keyword, ...]
    ours: tuple[Keyword, ...]
    declined: tuple[Keyword, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Result:
    """What :func:`update` did to one sidecar."""

    path: Path
    #: The file did not exist before.
    created: bool
    #: The file was written (False: it already said all of this, and was left untouched).
    changed: bool
    #: "written": ours is there now; "unchanged": ours was already there; "kept": a person's description is there
    #: and was kept; "not_given": the answer had no description.
    description: DescriptionState
    #: Every keyword in the file now (a person's and ours).
    keywords: tuple[Keyword, ...]
    #: Ours among them.
    ours: tuple[Keyword, ...]
    #: Keywords of ours that a person removed, which are therefore not written again.
    declined: tuple[Keyword, ...]
    #: Reads and merges it took (more than one when another program saved the file meanwhile).
    attempts: int = 1

    def describe(self) -> dict[str, Any]:
        """What the JSON sidecar records under ``"xmp"``."""
        return {
            "path": str(self.path),
            "written": self.changed,
            "created": self.created,
            "description": self.description,
            "keywords": ["/".join(k) for k in self.keywords],
            "ours": ["/".join(k) for k in self.ours],
            **({"declined": ["/".join(k) for k in self.declined]} if self.declined else {}),
        }


def xmp_path(media: Path, naming: Naming = "name") -> Path:
    """Where ``media``'s XMP sidecar is.

    ``name`` (default): ``IMG_1.jpg.xmp``, as Immich, digiKam and darktable write and read it, unless only
    ``IMG_1.xmp`` exists (Lightroom's and exiftool's habit), which is then updated instead of adding a second one.
    ``stem``: ``IMG_1.xmp``. Videos the same way (``clip.mp4.xmp``).
    """
    stem = media.with_name(fit_name(media.stem or media.name, ".xmp"))
    if naming == "stem":
        return stem
    full = media.with_name(fit_name(media.name, ".xmp"))
    if not os.path.lexists(full) and os.path.lexists(stem) and stem != media:
        return stem
    return full


def answer_from_reply(
    data: Any, text: str, *, description: str | None, keywords: str | None
) -> tuple[str | None, list[str]]:
    """The description and the model's raw keywords from a reply.

    With a JSON reply (a rule with a schema), both are keys of the reply object: a string for the description, a
    list of strings (or one comma-separated string) for the keywords. Without one, the whole text is the
    description and there are no keywords. A key set to None is not written.
    """
    if isinstance(data, dict):
        found = data.get(description) if description else None
        desc = found.strip() if isinstance(found, str) and found.strip() else None
        raw = data.get(keywords) if keywords else None
        if isinstance(raw, str):
            words = raw.split(",")
        elif isinstance(raw, list):
            words = [w for w in raw if isinstance(w, str)]
        else:
            words = []
        return desc, [w for w in words if w.strip()]
    return ((text.strip() or None) if description else None), []


def clean_keyword(word: str) -> str:
    """A model's keyword as one level: ``/`` and ``|`` (level separators in photo apps) become spaces, characters XML
    cannot hold are dropped, whitespace is collapsed, and an essay is cut to MAX_KEYWORD characters."""
    word = _xml_text(word).replace("/", " ").replace("|", " ")
    return " ".join(word.split())[:MAX_KEYWORD].strip()


def our_keywords(
    words: Iterable[str],
    *,
    prefix: str = "",
    vocabulary: Vocabulary | None = None,
    unknown: Literal["keep", "drop"] = "keep",
) -> tuple[tuple[Keyword, ...], Mapping | None]:
    """The model's keywords as the keywords we write, and (with a vocabulary) how they were mapped.

    Keywords the vocabulary knows keep the hierarchy it gives them (they are a person's tags, so no prefix); the
    others, kept or dropped per ``unknown``, are cleaned (:func:`clean_keyword`) and put under ``prefix``.
    """
    words = [w for w in words if isinstance(w, str)]
    mapping = vocabulary.map(words) if vocabulary is not None else None
    known: Sequence[Keyword] = mapping.keywords if mapping is not None else ()
    free: Sequence[str] = words if mapping is None else (mapping.unknown if unknown == "keep" else ())
    head = split_prefix(prefix)
    out: dict[Keyword, Keyword] = {}
    for keyword in (*known, *((*head, c) for w in free if (c := clean_keyword(w)))):
        out.setdefault(_key(keyword), keyword)
    return tuple(out.values()), mapping


# -- the merge -------------------------------------------------------------------------------------------------------


def merge(raw: bytes | None, answer: Answer, *, where: str = "XMP sidecar") -> tuple[bytes, Merged]:
    """Merge ``answer`` into the sidecar bytes ``raw`` (None or blank: a new sidecar). Pure: no file is touched.

    Raises XMPRefused for a file we will not touch (see the module docstring); ``where`` names it in the message.
    """
    tree = parse(raw if raw is not None and raw.strip() else _TEMPLATE, where=where)
    rdf = _rdf_of(tree, where)
    descs = rdf.findall(_DESC)
    if not descs:
        descs = [etree.SubElement(rdf, _DESC, {_ABOUT: ""})]
    record = _Record.read(descs)
    fields = {tag: _list_values(descs, tag) for tag in _KEYWORD_FIELDS}
    current = _present(fields, base=record.all)

    # Ours that are gone were removed by a person (or an app at a person's word): remember them for good.
    current_keys = {_key(k) for k in current}
    previous_ours = {_key(k) for k in record.ours}
    removed = _unique([*record.removed, *(k for k in record.ours if _key(k) not in current_keys)])
    removed_keys = {_key(k) for k in removed}
    theirs = [k for k in current if _key(k) not in previous_ours]
    their_keys = {_key(k) for k in theirs}
    ours = _unique(k for k in answer.keywords if _key(k) not in removed_keys and _key(k) not in their_keys)
    final = [*theirs, *ours]
    declined = tuple(k for k in _unique(answer.keywords) if _key(k) in removed_keys)

    target = _target(descs[0])
    descs = [target, *descs[1:]]
    state, description_hash = _merge_description(descs, target, answer.description, record.description)

    for desc in descs:
        for tag in (*_KEYWORD_FIELDS, *(e.tag for e in desc if _ns(e.tag) == NS_MMWATCHD)):
            _drop(desc, tag)
        for name in [a for a in desc.attrib if _ns(a) == NS_MMWATCHD]:
            del desc.attrib[name]
    if final:
        leaves = _unique_text(k[-1] for k in final)
        _add_list(target, _SUBJECT, "Bag", leaves)
        _add_list(target, _HIER, "Bag", ["|".join(k) for k in final])
        _add_list(target, _TAGS, "Seq", ["/".join(k) for k in final])
    record_out = _Record(ours=tuple(ours), removed=tuple(removed), all=tuple(final), description=description_hash)
    record_out.write(target, answer)
    data = _serialise(tree, raw)
    return data, Merged(description=state, keywords=tuple(final), ours=tuple(ours), declined=declined)


def _merge_description(
    descs: list[etree._Element], target: etree._Element, text: str | None, ours_hash: str
) -> tuple[DescriptionState, str]:
    if text is None:
        return "not_given", ours_hash
    text = _xml_text(text).strip()
    current = _x_default(descs)
    if current is not None and current.strip():
        if not ours_hash or _hash(current) != ours_hash:
            return "kept", ours_hash  # a person's: theirs stays, and the JSON sidecar says so
        if _hash(current) == _hash(text):
            return "unchanged", ours_hash
    others: list[tuple[str, str]] = []  # the other languages, in order, wherever they were
    for desc in descs:
        if desc.get(_DESCRIPTION) is not None:
            del desc.attrib[_DESCRIPTION]
        for prop in desc.findall(_DESCRIPTION):
            for li in _items(prop):
                lang = li.get(_XML_LANG, "x-default")
                if lang != "x-default" and all(lang != o for o, _ in others):
                    others.append((lang, li.text or ""))
            _remove(prop)
    prop = _append(target, _DESCRIPTION)
    alt = etree.SubElement(prop, f"{{{NS_RDF}}}Alt")
    for lang, value in (("x-default", text), *others):
        li = etree.SubElement(alt, _LI, {_XML_LANG: lang})
        li.text = value
    _tidy(prop)
    return "written", _hash(text)


def _present(fields: dict[str, list[str] | None], *, base: Sequence[Keyword]) -> list[Keyword]:
    """The keywords in the file now: a three-way merge of the three fields against what we wrote last (``base``)."""
    subject, hier, tags = fields[_SUBJECT], fields[_HIER], fields[_TAGS]
    found: dict[Keyword, Keyword] = {}
    for value in hier or ():
        if (k := _levels(value, "|")) is not None:
            found.setdefault(_key(k), k)
    joined = {fold("/".join(k)) for k in found.values()}
    for value in tags or ():
        if fold(value) not in joined and (k := _levels(value, "/")) is not None:
            found.setdefault(_key(k), k)
    leaves = {fold(k[-1]) for k in found.values()}
    for value in subject or ():
        if fold(value) not in leaves and (k := _levels(value, None)) is not None:
            found.setdefault(_key(k), k)
            leaves.add(fold(value))
    tests: list[Callable[[Keyword], bool]] = []
    if subject is not None:
        in_subject = {fold(v) for v in subject}
        tests.append(lambda k: fold(k[-1]) in in_subject)
    if hier is not None:
        in_hier = {fold(v) for v in hier}
        tests.append(lambda k: fold("|".join(k)) in in_hier)
    if tags is not None:
        in_tags = {fold(v) for v in tags}
        tests.append(lambda k: fold("/".join(k)) in in_tags)
    base_keys = {_key(k) for k in base}
    return [k for key, k in found.items() if key not in base_keys or all(t(k) for t in tests)]


@dataclass(frozen=True, slots=True)
class _Record:
    ours: tuple[Keyword, ...] = ()
    removed: tuple[Keyword, ...] = ()
    all: tuple[Keyword, ...] = ()
    description: str = ""

    @classmethod
    def read(cls, descs: Sequence[etree._Element]) -> _Record:
        def keywords(tag: str) -> tuple[Keyword, ...]:
            values = _list_values(descs, tag) or []
            return tuple(k for v in values if (k := _levels(v, "|")) is not None)

        hashes = _list_values(descs, _R_DESCRIPTION) or [""]
        return cls(keywords(_R_KEYWORDS), keywords(_R_REMOVED), keywords(_R_ALL), hashes[0].strip())

    def write(self, desc: etree._Element, answer: Answer) -> None:
        for tag, values in ((_R_KEYWORDS, self.ours), (_R_REMOVED, self.removed), (_R_ALL, self.all)):
            if values:
                _add_list(desc, tag, "Bag", ["|".join(k) for k in values])
        simple = {
            _R_DESCRIPTION: self.description,
            **{
                _ours(n): v
                for n, v in zip(_R_SIMPLE, (answer.model, answer.rule, answer.fingerprint, __version__), strict=True)
            },
        }
        for tag, value in simple.items():
            if value:
                el = _append(desc, tag)
                el.text = _xml_text(value)


# -- parsing ---------------------------------------------------------------------------------------------------------


def _parser() -> etree.XMLParser:
    # No DTD, no entity substitution, no network, no huge-tree mode (lxml's own depth and size limits stay on).
    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        huge_tree=False,
        load_dtd=False,
        dtd_validation=False,
        attribute_defaults=False,
        remove_comments=False,
        remove_pis=False,
        strip_cdata=False,
    )


def parse(raw: bytes, *, where: str = "XMP sidecar") -> etree._ElementTree:
    """Parse XMP bytes safely, or raise XMPRefused saying why the file is left alone."""
    what = f"{where}: left untouched (the JSON sidecar is still written)"
    if len(raw) > MAX_BYTES:
        raise XMPRefused(f"{what}: larger than {MAX_BYTES >> 20} MiB, which no real XMP sidecar is")
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in raw[:4]:
        raise XMPRefused(f"{what}: not UTF-8 (UTF-16/32 XMP is not supported; photo apps write UTF-8)")
    # A DOCTYPE is what every entity attack needs (external entities, expansion bombs); XMP never has one.
    if b"<!DOCTYPE" in raw or b"<!ENTITY" in raw:
        raise XMPRefused(f"{what}: it has a DOCTYPE or entity declarations, which XMP never has (refused unexpanded)")
    try:
        tree = etree.ElementTree(etree.fromstring(raw, _parser()))
    except etree.XMLSyntaxError as exc:
        raise XMPRefused(f"{what}: not well-formed XML ({_first_line(exc)})") from None
    except ValueError as exc:  # lxml refuses some inputs before parsing (e.g. an encoding it cannot map)
        raise XMPRefused(f"{what}: not readable XML ({exc})") from None
    # lxml-stubs 0.5 lacks DocInfo.doctype (lxml has it since 2.0) and types internalDTD as never None.
    if tree.docinfo.doctype or tree.docinfo.internalDTD is not None:  # type: ignore[attr-defined]
        raise XMPRefused(f"{what}: it has a DOCTYPE, which XMP never has (refused unexpanded)")
    return tree


def _rdf_of(tree: etree._ElementTree, where: str) -> etree._Element:
    root = tree.getroot()
    if root.tag == _RDF:
        return root
    if _ns(root.tag) == NS_X and (rdf := root.find(_RDF)) is not None:
        return rdf
    if _ns(root.tag) == NS_X:
        return etree.SubElement(root, _RDF)
    raise XMPRefused(
        f"{where}: left untouched (the JSON sidecar is still written): not XMP (its root element is "
        f"{etree.QName(root).localname!r}, not x:xmpmeta or rdf:RDF)"
    )


def _serialise(tree: etree._ElementTree, raw: bytes | None) -> bytes:
    """The document as UTF-8, with the XML declaration when the file had one, and the nodes around the root element
    (the xpacket wrapper, comments) each on its own line."""
    root = tree.getroot()
    declared = raw is not None and raw.lstrip(b"\xef\xbb\xbf").lstrip().startswith(b"<?xml")
    parts = [b'<?xml version="1.0" encoding="UTF-8"?>'] if declared else []
    parts += [_node(n) for n in reversed(list(root.itersiblings(preceding=True)))]
    parts.append(_node(root))
    parts += [_node(n) for n in root.itersiblings()]
    return b"\n".join(parts) + b"\n"


def _node(node: etree._Element) -> bytes:
    data: bytes = etree.tostring(node, encoding="UTF-8", with_tail=False)
    return data


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


# -- reading and writing properties ----------------------------------------------------------------------------------


def _ns(tag: object) -> str | None:
    return tag[1:].split("}", 1)[0] if isinstance(tag, str) and tag.startswith("{") else None


def _items(prop: etree._Element) -> list[etree._Element]:
    """The rdf:li of an array property (Bag, Seq or Alt)."""
    return [li for c in prop if c.tag in _CONTAINERS for li in c if li.tag == _LI]


def _list_values(descs: Sequence[etree._Element], tag: str) -> list[str] | None:
    """Every value of property ``tag`` across all rdf:Description blocks, in either form: attribute
    (``dc:subject="a"``), element with an array, or element with plain text. None when the property is absent."""
    values: list[str] | None = None
    for desc in descs:
        if (attr := desc.get(tag)) is not None:
            values = (values or []) + ([attr.strip()] if attr.strip() else [])
        for prop in desc.findall(tag):
            values = values or []
            if any(c.tag in _CONTAINERS for c in prop):
                values += [li.text.strip() for li in _items(prop) if li.text and li.text.strip()]
            elif prop.text and prop.text.strip():
                values.append(prop.text.strip())
    return values


def _x_default(descs: Sequence[etree._Element]) -> str | None:
    """The ``x-default`` description (attribute form, a plain element, or the Alt's x-default, else its only li)."""
    for desc in descs:
        if (attr := desc.get(_DESCRIPTION)) is not None:
            return attr
        for prop in desc.findall(_DESCRIPTION):
            items = _items(prop)
            if not items and not len(prop):
                return prop.text or ""
            for li in items:
                if li.get(_XML_LANG) == "x-default":
                    return li.text or ""
            if len(items) == 1 and items[0].get(_XML_LANG) is None:
                return items[0].text or ""
    return None


def _target(desc: etree._Element) -> etree._Element:
    """The rdf:Description our properties go into, with our namespaces declared on it (lxml cannot add a
    declaration to an existing element, so it is rebuilt in place: same attributes, children and position)."""
    missing = {p: uri for p, uri in PREFIXES.items() if uri not in desc.nsmap.values()}
    if not missing:
        return desc
    taken = set(desc.nsmap)
    extra: dict[str, str] = {}
    for prefix, uri in missing.items():
        name, n = prefix, 1
        while name in taken or name in extra:
            name, n = f"{prefix}{n}", n + 1
        extra[name] = uri
    parent = desc.getparent()
    assert parent is not None  # an rdf:Description sits in rdf:RDF (_rdf_of)
    inherited = parent.nsmap
    own = {p: u for p, u in desc.nsmap.items() if inherited.get(p) != u}
    # lxml-stubs types nsmap keys as str; lxml takes None for the default namespace, which ``own`` may hold.
    new = etree.SubElement(parent, desc.tag, nsmap={**own, **extra})  # type: ignore[dict-item]
    for key, value in desc.attrib.items():
        new.set(key, value)
    new.text, new.tail = desc.text, desc.tail
    new.extend(list(desc))
    parent.replace(desc, new)
    return new


def _depth(el: etree._Element) -> int:
    return sum(1 for _ in el.iterancestors())


def _append(desc: etree._Element, tag: str) -> etree._Element:
    """A new property element at the end of ``desc``, indented like exiftool's output (one space a level)."""
    depth = _depth(desc)
    inner, outer = "\n" + " " * (depth + 1), "\n" + " " * depth
    last = desc[-1] if len(desc) else None
    if last is None:
        desc.text = inner
    else:
        last.tail = inner
    prop = etree.SubElement(desc, tag)
    prop.tail = outer
    return prop


def _add_list(desc: etree._Element, tag: str, kind: str, values: Sequence[str]) -> None:
    prop = _append(desc, tag)
    container = etree.SubElement(prop, f"{{{NS_RDF}}}{kind}")
    for value in values:
        etree.SubElement(container, _LI).text = _xml_text(value)
    _tidy(prop)


def _tidy(prop: etree._Element) -> None:
    tail = prop.tail
    etree.indent(prop, space=" ", level=_depth(prop))
    prop.tail = tail


def _drop(desc: etree._Element, tag: str) -> None:
    if desc.get(tag) is not None:
        del desc.attrib[tag]
    for prop in desc.findall(tag):
        _remove(prop)


def _remove(el: etree._Element) -> None:
    """Remove ``el`` and the whitespace before it, so removals leave no blank lines."""
    parent = el.getparent()
    assert parent is not None  # found under its rdf:Description
    previous = el.getprevious()
    if previous is not None:
        previous.tail = el.tail
    else:
        parent.text = el.tail
    parent.remove(el)


# -- small helpers ---------------------------------------------------------------------------------------------------


def _key(keyword: Keyword) -> tuple[str, ...]:
    return tuple(fold(level) for level in keyword)


def _unique(keywords: Iterable[Keyword]) -> list[Keyword]:
    out: dict[tuple[str, ...], Keyword] = {}
    for k in keywords:
        out.setdefault(_key(k), k)
    return list(out.values())


def _unique_text(values: Iterable[str]) -> list[str]:
    out: dict[str, str] = {}
    for v in values:
        out.setdefault(fold(v), v)
    return list(out.values())


def _levels(value: str, sep: str | None) -> Keyword | None:
    parts = [value] if sep is None else value.split(sep)
    levels = tuple(" ".join(p.split()) for p in parts)
    return levels if levels and all(levels) else None


def _hash(text: str) -> str:
    """Of the description as a person reads it: apps that re-wrap lines or change line endings do not make our
    description look like a person's."""
    return hashlib.sha256(" ".join(text.split()).encode("utf-8", "surrogatepass")).hexdigest()


def _xml_text(text: str) -> str:
    """``text`` without the characters XML 1.0 cannot hold (control characters, lone surrogates, U+FFFE/FFFF)."""
    return "".join(
        ch
        for ch in text
        if ch in "\t\n\r" or ("\x20" <= ch <= "\ud7ff") or ("\ue000" <= ch <= "\ufffd") or ch >= "\U00010000"
    )


# -- the file --------------------------------------------------------------------------------------------------------


def read(path: Path) -> tuple[bytes | None, tuple[int, int, int] | None]:
    """The sidecar's bytes and identity (inode, size, mtime), or (None, None) when there is none.

    Never blocks on a FIFO and never reads more than the cap: a hostile "sidecar" costs a stat and a refusal.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None, None
    except IsADirectoryError:
        raise XMPRefused(f"{path}: a folder sits where the XMP sidecar belongs; left untouched") from None
    except OSError as exc:
        raise XMPError(f"{path}: cannot read the XMP sidecar: {os_reason(exc)}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise XMPRefused(f"{path}: not a regular file where the XMP sidecar belongs; left untouched")
        if st.st_size > MAX_BYTES:
            raise XMPRefused(
                f"{path}: left untouched (the JSON sidecar is still written): {st.st_size} bytes, larger than "
                f"{MAX_BYTES >> 20} MiB, which no real XMP sidecar is"
            )
        chunks = []
        left = MAX_BYTES + 1
        while left > 0 and (chunk := os.read(fd, min(left, 1 << 20))):
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks), (st.st_ino, st.st_size, st.st_mtime_ns)
    except OSError as exc:
        raise XMPError(f"{path}: cannot read the XMP sidecar: {os_reason(exc)}") from exc
    finally:
        os.close(fd)


def update(
    path: Path,
    answer: Answer,
    *,
    max_attempts: int = MAX_ATTEMPTS,
    before_replace: Callable[[int], None] | None = None,
) -> Result:
    """Merge ``answer`` into the sidecar at ``path`` (see :func:`xmp_path`) and write it atomically.

    Just before the rename, the file is read again; when another program saved it since our read, the merge is
    redone on what it wrote (at most ``max_attempts`` times). ``before_replace(attempt)`` runs at that moment (tests
    use it to save the file as a photo app would). Raises XMPRefused for a file we will not touch, XMPError when it
    cannot be written; the caller records either in the JSON sidecar.
    """
    for attempt in range(1, max_attempts + 1):
        raw, identity = read(path)
        data, merged = merge(raw, answer, where=str(path))
        result = Result(
            path=path, created=raw is None, changed=data != raw, description=merged.description,
            keywords=merged.keywords, ours=merged.ours, declined=merged.declined, attempts=attempt,
        )  # fmt: skip
        if not result.changed:
            return result
        tmp = temp_path(path)
        try:
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
                _own_like(fd, path)
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
            except OSError as exc:
                raise XMPError(f"{path}: cannot write the XMP sidecar: {os_reason(exc)}") from exc
            if before_replace is not None:
                before_replace(attempt)
            now, now_identity = read(path)
            if now != raw or now_identity != identity:
                continue  # saved by someone else meanwhile: merge again into what they wrote
            try:
                os.replace(tmp, path)
            except OSError as exc:
                raise XMPError(f"{path}: cannot write the XMP sidecar: {os_reason(exc)}") from exc
            fsync_dir(path.parent)
            return result
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    raise XMPError(
        f"{path}: another program saved the XMP sidecar each of the {max_attempts} times it was merged; "
        "it will be tried again"
    )


def write_sidecar(media: Path, answer: Answer, *, naming: Naming = "name") -> dict[str, Any]:
    """The one call the pipeline makes for a described file: write ``media``'s XMP sidecar and return what the JSON
    sidecar records under ``"xmp"``. Never raises for an XMP problem: a refused or unwritable sidecar is returned as
    ``{"path", "error", "message", "retryable"}``, so it can never stop the JSON sidecar from being written."""
    path = xmp_path(media, naming)
    try:
        return update(path, answer).describe()
    except XMPError as exc:
        return {"path": str(path), "error": exc.kind, "message": exc.message, "retryable": exc.retryable}


def _own_like(fd: int, path: Path) -> None:
    """A person's sidecar keeps its owner and permissions when we replace it; a new one belongs to whoever owns the
    folder (a service running as root must not leave root-owned files in someone's photos)."""
    try:
        st = os.stat(path)
    except OSError:
        own_like_folder(fd, path.parent)
        return
    with contextlib.suppress(OSError):  # not allowed: the file keeps our user and group, which is still correct
        os.fchown(fd, st.st_uid if os.geteuid() == 0 else -1, st.st_gid)
    with contextlib.suppress(OSError):
        os.fchmod(fd, stat.S_IMODE(st.st_mode))


def preview(path: Path) -> dict[str, Any]:
    """What ``once --dry-run`` shows: the sidecar that would be written, what is in it now, and which properties a
    write sets. Reads only; a file that would be refused is reported, not raised."""
    out: dict[str, Any] = {"path": str(path), "properties": dict(PROPERTIES)}
    try:
        raw, _ = read(path)
        out["exists"] = raw is not None
        if raw is None or not raw.strip():
            return out
        tree = parse(raw, where=str(path))
        descs = _rdf_of(tree, str(path)).findall(_DESC)
        record = _Record.read(descs)
        fields = {tag: _list_values(descs, tag) for tag in _KEYWORD_FIELDS}
        current = _present(fields, base=record.all)
        ours = {_key(k) for k in record.ours}
        description = _x_default(descs)
        out["description"] = description
        out["description_is_ours"] = bool(
            description and description.strip() and record.description and _hash(description) == record.description
        )
        out["keywords_kept"] = ["/".join(k) for k in current if _key(k) not in ours]
        out["keywords_ours"] = ["/".join(k) for k in current if _key(k) in ours]
        out["keywords_declined"] = ["/".join(k) for k in record.removed]
    except XMPError as exc:
        out["error"] = {"kind": exc.kind, "message": exc.message}
    return out


# -- as an output (mmwatchd.outputs) ---------------------------------------------------------------------------------


class XmpOutput:
    """The XMP sidecar as one of the outputs the pipeline writes from an answer (see :mod:`mmwatchd.outputs`)."""

    name = "xmp"

    def __init__(self, spec: XmpSpec, rules: Sequence[Rule], vocabularies: CMapping[str, Vocabulary]) -> None:
        self.spec = spec
        self.rules = {r.name: r for r in rules}
        self.vocabularies = vocabularies

    def where(self, media: Path) -> Path:
        return xmp_path(media, self.spec.naming)

    def wants(self, answer: str) -> bool:
        return answer == "ok"  # an error sidecar has no caption or keywords to give

    def present(self, media: Path) -> bool:
        return os.path.lexists(self.where(media))

    def fresh(self, record: CMapping[str, Any]) -> bool:
        """Written for this answer, or refused for good (a retryable failure is tried again on a later scan)."""
        done = record.get("xmp")
        return isinstance(done, dict) and not done.get("retryable")

    def write(self, media: Path, record: dict[str, Any]) -> None:
        """Merge the answer in ``record`` into the XMP sidecar; record under ``"xmp"`` what was done (and under
        ``"keywords"`` how a vocabulary mapped them)."""
        spec = self.spec
        rule = self.rules.get(str(record.get("rule")))
        response = record.get("response") or {}
        description, words = answer_from_reply(
            response.get("data"), response.get("text") or "", description=spec.description, keywords=spec.keywords
        )
        keywords = rule.keywords if rule is not None else None
        ours, mapping = our_keywords(
            words, prefix=spec.prefix, vocabulary=self.vocabularies.get(rule.name) if rule else None,
            unknown=keywords.unknown if keywords else "keep",
        )  # fmt: skip
        answer = Answer(
            description=description, keywords=ours, model=str(record.get("model") or ""), rule=str(record.get("rule")),
            fingerprint=str(record.get("fingerprint") or ""),
        )  # fmt: skip
        record["xmp"] = write_sidecar(media, answer, naming=spec.naming)
        if mapping is not None:
            record["keywords"] = mapping.describe()
        if "error" in record["xmp"]:
            log.warning("xmp.failed", path=str(media), xmp=record["xmp"]["path"], reason=record["xmp"]["message"])

    def preview(self, media: Path) -> dict[str, Any]:
        spec = self.spec
        return {**preview(self.where(media)), "description_from": spec.description, "keywords_from": spec.keywords,
                "prefix": spec.prefix}  # fmt: skip

    def follow(self, old: Path, new: Path) -> tuple[str, ...]:
        """An XMP sidecar follows its file when ``move_to`` moves it (photo apps look for it beside the file)."""
        source = xmp_path(old, self.spec.naming)
        if not os.path.lexists(source):
            return ()
        naming = self.spec.naming
        target = new.with_name(new.name + ".xmp") if naming == "name" else new.with_name(new.stem + ".xmp")
        if source.name == old.stem + ".xmp" and naming == "name":
            target = new.with_name(new.stem + ".xmp")  # Lightroom's name stays Lightroom's name
        if os.path.lexists(target):
            return (f"move_to: {target} already exists; the XMP sidecar stays at {source}",)
        try:
            os.rename(source, target)
        except OSError as exc:
            return (f"move_to: cannot move the XMP sidecar {source}: {exc.strerror or exc}",)
        return ()
