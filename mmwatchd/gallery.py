"""``mmwatchd gallery``: one static HTML page to review what the model said about each file.

The page opens from ``file://`` with no server and no external assets: thumbnails are small JPEGs made by our own
encoders (in the decoder processes, with the config's limits, like the daemon's) in a folder beside the page
(``review.html`` → ``review_files/``), reused on the next run while the file is unchanged. Every file under the
watched folders (or the PATHs given) that a rule would take is a card: its thumbnail (a strip of frames for a video),
caption, tags, rule, model, status and error, with links to the original and to its sidecar; files without a
sidecar are "not yet described".

Nothing from a sidecar or a file name becomes HTML: the cards are data in a ``<script type="application/json">``
block (``<``, ``>``, ``&`` and U+2028/9 escaped, so no text can end the block) and the page's script builds them with
``textContent``. A Content-Security-Policy with a per-page nonce lets only the page's own script run. With 10,000
files the page stays quick: cards are rendered a page at a time as the reader scrolls, images load lazily, and
filtering works on the data, not the DOM.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from mmwatchd import rules, sidecar
from mmwatchd.done import Record, is_done
from mmwatchd.errors import ForeignSidecar, MmwatchdError, SidecarError
from mmwatchd.isolate import DECODER_PRELOAD, Isolator, LazyFunction
from mmwatchd.media import looked_at
from mmwatchd.model import Config, ImageSpec, LinearBudget, VideoSpec, WatchRoot
from mmwatchd.search import caption_and_tags
from mmwatchd.walk import ScanErrorCallback, scan_paths

#: Thumbnails: one JPEG of at most this many pixels a side; a video gets a strip of a few smaller frames.
THUMB_SPEC = ImageSpec(max_side=320, format="jpeg", quality=75, min_quality=40, passthrough=False)
FRAME_SPEC = VideoSpec(frames=4, max_side=160, mode="images", frame_format="jpeg", quality=70, min_quality=30)
#: Data-URL characters a thumbnail may take (far more than 320 px need; only a bound).
THUMB_BUDGET = 1_000_000
#: Changes when the thumbnails would come out differently, so old ones are made again.
THUMB_VERSION = f"1:{THUMB_SPEC}:{FRAME_SPEC}"
#: Cards rendered at a time; more are added as the reader scrolls.
PAGE_SIZE = 120
#: The first line of every page we write: a file at the output path without it is not ours to replace.
MARKER = "<!-- written by mmwatchd gallery -->"
MANIFEST = "thumbnails.json"
_THUMB_NAME = re.compile(r"\A[0-9a-f]{24}(-\d+)?\.jpg\Z")
_encode_image = LazyFunction("mmwatchd.encode", "encode_image")
_encode_video = LazyFunction("mmwatchd.encode", "encode_video")


@dataclass(slots=True)
class Card:
    """One file on the page (the JSON the page's script reads; short keys keep 10,000 of them small)."""

    path: Path
    media_kind: str
    size: int
    mtime_ns: int
    status: str  # "ok", "error" or "new" (not yet described)
    root: Path | None = None
    side: Path | None = None
    doc: dict[str, Any] | None = None
    note: str = ""
    thumbs: list[str] = field(default_factory=list)
    thumb_error: str = ""


@dataclass(frozen=True, slots=True)
class Summary:
    page: Path
    files: int
    ok: int
    error: int
    new: int
    thumbs_made: int
    thumbs_reused: int
    no_preview: int
    #: Folders that could not be read (one line each, for stderr).
    unreadable: tuple[str, ...] = ()

    def line(self) -> str:
        return (f"{self.page}: {self.files} files ({self.ok} described, {self.error} failed, {self.new} not yet "
                f"described); thumbnails: {self.thumbs_made} made, {self.thumbs_reused} reused, {self.no_preview} "
                "without a preview")  # fmt: skip


# ------------------------------------------------------------------------------------------------------ collecting


def collect(cfg: Config, paths: Sequence[Path] = (), unreadable: list[str] | None = None) -> list[Card]:
    """The cards for ``paths`` (files, or folders walked like a watched folder), or for the watched folders.
    Folders that cannot be listed get no cards and a line in ``unreadable``, so the page is written for the rest."""
    roots = [r.path for r in cfg.watch]
    seen: set[str] = set()
    cards = []
    problems = [] if unreadable is None else unreadable

    def report(path: Path, exc: OSError) -> None:
        problems.append(f"{path}: cannot read this folder ({exc.strerror or exc}); its files are not on the page")

    for name in _candidates(cfg, paths, report):
        if name in seen:
            continue
        seen.add(name)
        card = _card(cfg, Path(name), roots)
        if card is not None:
            cards.append(card)
    return cards


def _candidates(cfg: Config, paths: Sequence[Path], report: ScanErrorCallback) -> Iterator[str]:
    suffix = cfg.sidecar.suffix
    if not paths:
        for root in cfg.watch:
            yield from scan_paths(root, sidecar_suffix=suffix, on_error=report)
        return
    for p in paths:
        if p.is_dir():
            yield from scan_paths(WatchRoot(path=p), sidecar_suffix=suffix, on_error=report)
        elif p.is_file() and not p.name.endswith(suffix):
            yield str(p)


def _card(cfg: Config, path: Path, roots: list[Path]) -> Card | None:
    seen = looked_at(path)
    if seen is None:
        return None
    st, kind = seen
    root, rel = rules.rel_to_roots(path, roots)
    side = sidecar.locate(path, suffix=cfg.sidecar.suffix, mirror=cfg.sidecar.dir, roots=roots)
    card = Card(path=path, media_kind=kind, size=st.st_size, mtime_ns=st.st_mtime_ns, status="new", root=root)
    try:
        doc = sidecar.read(side)
    except ForeignSidecar:
        card.note = f"a file mmwatchd did not write is at {side.name}; it blocks this file"
        return card
    except SidecarError as exc:
        card.note = exc.message
        return card
    if doc is None:
        if rules.match(rel if root is not None else path.name, kind, cfg.rules) is None:
            return None  # no rule takes it: it will never be described, so it is not waiting for anything
        return card
    card.doc, card.side = doc, side
    record = Record.of_sidecar(doc)
    card.status = record.answer or "ok"
    if not is_done(record, st, None, exact=False):  # whatever rule wrote it: the page shows what was said
        card.note = "the file changed after this description was written"
    return card


# ------------------------------------------------------------------------------------------------------ thumbnails


def _key(card: Card) -> str:
    raw = b"\0".join([os.fsencode(card.path), str(card.size).encode(), str(card.mtime_ns).encode(),
                      THUMB_VERSION.encode()])  # fmt: skip
    return hashlib.sha256(raw).hexdigest()[:24]


def make_thumbnails(cfg: Config, cards: Sequence[Card], folder: Path) -> tuple[int, int]:
    """Give every card its thumbnail(s) in ``folder`` (made in decoder processes, or reused from an earlier run);
    remove the thumbnails no card uses any more. Returns how many cards got new thumbnails, and how many kept
    earlier ones."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest_path = folder / MANIFEST
    try:
        old = json.loads(manifest_path.read_text(encoding="utf-8"))
        if not isinstance(old, dict):
            old = {}
    except (OSError, ValueError):
        old = {}
    manifest: dict[str, Any] = {}
    todo = []
    reused = 0
    for card in cards:
        key = _key(card)
        entry = old.get(key)
        if isinstance(entry, dict) and all((folder / n).is_file() for n in entry.get("files", [])):
            manifest[key] = entry
            reused += bool(entry.get("files"))
        else:
            todo.append((key, card))
    if todo:
        workers = max(1, min(2, os.cpu_count() or 1, len(todo)))
        with Isolator(workers=workers, name="mmwatchd-thumbnails", preload=DECODER_PRELOAD,
                      **cfg.limits.decoders) as isolator, ThreadPoolExecutor(workers) as pool:  # fmt: skip
            for key, entry in pool.map(lambda job: (job[0], _thumbnail(isolator, cfg, job[0], job[1], folder)), todo):
                manifest[key] = entry
    for card in cards:
        entry = manifest[_key(card)]
        card.thumbs = [f"{folder.name}/{n}" for n in entry.get("files", [])]
        card.thumb_error = entry.get("error", "")
    keep = {n for entry in manifest.values() for n in entry.get("files", [])}
    with os.scandir(folder) as it:
        for item in it:
            if _THUMB_NAME.match(item.name) and item.name not in keep:
                with contextlib.suppress(OSError):
                    os.unlink(item.path)
    _atomic_write(manifest_path, json.dumps(manifest).encode())
    return sum(1 for key, _ in todo if manifest[key].get("files")), reused


def _thumbnail(isolator: Isolator, cfg: Config, key: str, card: Card, folder: Path) -> dict[str, Any]:
    try:
        if card.media_kind == "video":
            video = isolator.call(_encode_video, card.path, FRAME_SPEC, budget=LinearBudget(THUMB_BUDGET, 0),
                                  limits=cfg.limits, label=card.path.name)  # fmt: skip
            chunks = [part.chunks[0] for part in video.parts]
        else:
            part = isolator.call(_encode_image, card.path, THUMB_SPEC, budget=THUMB_BUDGET, limits=cfg.limits,
                                 label=card.path.name)  # fmt: skip
            chunks = [part.chunks[0]]
    except MmwatchdError as exc:
        return {"files": [], "error": exc.message}
    except OSError as exc:
        return {"files": [], "error": f"{card.path.name}: {exc.strerror or exc}"}
    names = [f"{key}.jpg"] if len(chunks) == 1 and card.media_kind != "video" else [f"{key}-{i}.jpg" for i in
                                                                               range(len(chunks))]  # fmt: skip
    for name, data in zip(names, chunks, strict=True):
        (folder / name).write_bytes(data)
    return {"files": names}


# ------------------------------------------------------------------------------------------------------------ page


def _href(target: Path, base: Path) -> str:
    """A relative link from the page's folder to ``target``, percent-encoded from the name's bytes (so ``#``, ``?``,
    ``:`` and names that are not UTF-8 all arrive at the right file)."""
    return quote(os.fsencode(os.path.relpath(target, base)), safe="/")


def _shown(path: Path) -> str:
    return os.fsencode(path).decode("utf-8", "replace")


def _date(card: Card) -> str:
    media = (card.doc or {}).get("media")
    taken = media.get("taken") if isinstance(media, dict) else None
    if isinstance(taken, str) and taken:
        return taken
    return datetime.fromtimestamp(card.mtime_ns / 1e9).strftime("%Y-%m-%d %H:%M:%S")


def card_data(card: Card, base: Path) -> dict[str, Any]:
    doc = card.doc or {}
    caption, tags = caption_and_tags(doc)
    error = doc.get("error")
    where = card.path.relative_to(card.root) if card.root is not None else card.path
    return {
        "path": _shown(where),
        "full": _shown(card.path),
        "href": _href(card.path, base),
        "sidecar": _href(card.side, base) if card.side is not None else None,
        "status": card.status,
        "kind": card.media_kind,
        "rule": doc.get("rule") if isinstance(doc.get("rule"), str) else None,
        "model": doc.get("model") if isinstance(doc.get("model"), str) else None,
        "caption": caption,
        "tags": list(dict.fromkeys(t for t in tags if len(t) <= 80)),
        "error": error.get("message") if isinstance(error, dict) and isinstance(error.get("message"), str) else None,
        "note": card.note or None,
        "date": _date(card),
        "thumbs": card.thumbs,
        "thumb_error": card.thumb_error or None,
    }


def script_json(data: object) -> str:
    """JSON that can sit inside ``<script type="application/json">``: nothing in it can close the element or start
    markup, whatever the strings hold (``</script>``, ``<!--``), and U+2028/9 cannot break a JavaScript reader."""
    text = json.dumps(data, ensure_ascii=True, separators=(",", ":"))
    for char, escape in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e"), ("\u2028", "\\u2028"),
                         ("\u2029", "\\u2029")):  # fmt: skip
        text = text.replace(char, escape)
    return text


def render_page(cards: Iterable[Card], base: Path, *, title: str, page_size: int = PAGE_SIZE) -> str:
    data = {"title": title, "page_size": page_size, "cards": [card_data(c, base) for c in cards]}
    nonce = secrets.token_urlsafe(18)
    return _PAGE.replace("%NONCE%", nonce).replace("%TITLE%", _escape_text(title)).replace("%DATA%", script_json(data))


def _escape_text(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def build(cfg: Config, out: Path, paths: Sequence[Path] = (), *, page_size: int = PAGE_SIZE) -> Summary:
    """Write the page ``out`` and its thumbnail folder for ``paths`` (default: the watched folders)."""
    out = Path(os.path.abspath(out))
    _check_ours(out)
    unreadable: list[str] = []
    cards = collect(cfg, paths, unreadable)
    cards.sort(key=lambda c: os.fsencode(c.path))
    folder = out.with_name(f"{out.stem}_files")
    try:
        made, reused = make_thumbnails(cfg, cards, folder)
    except OSError as exc:
        raise MmwatchdError(f"{folder}: cannot write thumbnails: {exc.strerror or exc}") from exc
    page = render_page(cards, out.parent, title=f"mmwatchd review: {len(cards)} files", page_size=page_size)
    try:
        _atomic_write(out, page.encode("utf-8"))
    except OSError as exc:
        raise MmwatchdError(f"{out}: cannot write the page: {exc.strerror or exc}") from exc

    def count(status: str) -> int:
        return sum(1 for c in cards if c.status == status)

    return Summary(page=out, files=len(cards), ok=count("ok"), error=count("error"), new=count("new"),
                   thumbs_made=made, thumbs_reused=reused,
                   no_preview=sum(1 for c in cards if not c.thumbs), unreadable=tuple(unreadable))  # fmt: skip


def _check_ours(out: Path) -> None:
    if out.is_dir():
        raise MmwatchdError(f"{out}: is a folder; give the page a file name, e.g. -o {out / 'review.html'}")
    try:
        with open(out, "rb") as fh:
            head = fh.read(len(MARKER) + 64)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise MmwatchdError(f"{out}: cannot read it to check it is an earlier gallery: {exc.strerror or exc}") from exc
    if MARKER.encode() not in head:
        raise MmwatchdError(f"{out}: exists and was not written by mmwatchd gallery; it is left alone (choose another "
                            "name with -o, or move it away)")  # fmt: skip


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = sidecar.temp_path(path)
    try:
        with open(tmp, "xb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


_PAGE = (
    MARKER
    + """
<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy"
      content="default-src 'none'; img-src file: data: 'self'; style-src 'nonce-%NONCE%'; script-src 'nonce-%NONCE%'">
<link rel="icon" href="data:,">
<title>%TITLE%</title>
<style nonce="%NONCE%">
:root { --bg: #f4f4f2; --card: #fff; --ink: #1d1d1f; --muted: #6b6b70; --line: #deded9; --ok: #1f7a45;
        --err: #b3261e; --new: #6b5b00; --accent: #2856b8; }
@media (prefers-color-scheme: dark) {
  :root { --bg: #18181a; --card: #242427; --ink: #ececef; --muted: #a0a0a8; --line: #3a3a3f; --ok: #5cc98a;
          --err: #ff8a80; --new: #e0c85a; --accent: #8ab4ff; }
}
* { box-sizing: border-box; }
[hidden] { display: none !important; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; background: var(--bg);
       color: var(--ink); }
header { position: sticky; top: 0; z-index: 2; background: var(--bg); border-bottom: 1px solid var(--line);
         padding: 12px 20px; }
h1 { font-size: 18px; margin: 0 0 8px; font-weight: 600; }
.controls { display: flex; flex-wrap: wrap; gap: 8px; align-items: center; }
.controls input, .controls select { font: inherit; padding: 5px 8px; border: 1px solid var(--line);
       border-radius: 6px; background: var(--card); color: var(--ink); }
.controls input[type=search] { flex: 1 1 260px; min-width: 200px; }
#count { color: var(--muted); margin-left: auto; }
main { padding: 16px 20px 40px; }
#grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(260px, 1fr)); gap: 16px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 10px; overflow: hidden;
        display: flex; flex-direction: column; }
.thumb { background: #0001; aspect-ratio: 4 / 3; display: flex; align-items: center; justify-content: center;
         overflow: hidden; }
.thumb img { width: 100%; height: 100%; object-fit: cover; display: block; }
.thumb.strip { display: grid; grid-auto-flow: column; grid-auto-columns: 1fr; gap: 2px; background: #000; }
.thumb .none { color: var(--muted); padding: 12px; font-size: 12px; text-align: center; overflow-wrap: anywhere; }
.body { padding: 10px 12px 12px; display: flex; flex-direction: column; gap: 6px; flex: 1; }
.top { display: flex; gap: 8px; align-items: baseline; }
.name { font-weight: 600; overflow-wrap: anywhere; color: var(--ink); text-decoration: none; flex: 1; }
.name:hover { text-decoration: underline; }
.badge { font-size: 11px; font-weight: 600; text-transform: uppercase; letter-spacing: .03em; padding: 1px 6px;
         border-radius: 999px; border: 1px solid currentColor; white-space: nowrap; }
.badge.ok { color: var(--ok); } .badge.error { color: var(--err); } .badge.new { color: var(--new); }
.caption { margin: 0; white-space: pre-wrap; overflow-wrap: anywhere; }
.error { margin: 0; color: var(--err); white-space: pre-wrap; overflow-wrap: anywhere; }
.note { margin: 0; color: var(--new); font-size: 12px; }
.tags { display: flex; flex-wrap: wrap; gap: 4px; }
.tag { font: inherit; font-size: 12px; border: 1px solid var(--line); background: transparent; color: var(--ink);
       border-radius: 999px; padding: 0 8px; cursor: pointer; }
.tag:hover { border-color: var(--accent); color: var(--accent); }
.meta { color: var(--muted); font-size: 12px; margin-top: auto; display: flex; flex-wrap: wrap; gap: 4px 10px; }
.meta a { color: var(--accent); }
#more { display: block; margin: 20px auto 0; font: inherit; padding: 6px 16px; border-radius: 6px;
        border: 1px solid var(--line); background: var(--card); color: var(--ink); cursor: pointer; }
#empty { color: var(--muted); text-align: center; padding: 40px; }
</style>
</head>
<body>
<header>
  <h1 id="title"></h1>
  <div class="controls">
    <input id="q" type="search" placeholder="Search captions, tags and paths" aria-label="Search">
    <select id="status" aria-label="Status">
      <option value="">all statuses</option><option value="ok">ok</option><option value="error">error</option>
      <option value="new">not yet described</option>
    </select>
    <select id="rule" aria-label="Rule"><option value="">all rules</option></select>
    <select id="tag" aria-label="Tag"><option value="">all tags</option></select>
    <select id="sort" aria-label="Sort">
      <option value="date-desc">newest first</option><option value="date-asc">oldest first</option>
      <option value="path">by path</option>
    </select>
    <span id="count"></span>
  </div>
</header>
<main>
  <div id="grid"></div>
  <p id="empty" hidden>No file matches.</p>
  <button id="more" type="button" hidden>Show more</button>
</main>
<script id="data" type="application/json">%DATA%</script>
<script nonce="%NONCE%">
"use strict";
(function () {
  const data = JSON.parse(document.getElementById("data").textContent);
  const cards = data.cards;
  // Searching matches the start of words ("cat" finds "cat" and "cats", not "truncated"), whatever separates them.
  const words = (text) => " " + text.toLowerCase().replace(/[^\\p{L}\\p{N}]+/gu, " ").trim() + " ";
  const pageSize = data.page_size;
  const $ = (id) => document.getElementById(id);
  const grid = $("grid"), more = $("more"), count = $("count"), empty = $("empty");
  const STATUS = { ok: "ok", error: "error", "new": "not yet described" };
  $("title").textContent = data.title;
  document.title = data.title;
  for (const c of cards) {
    c.key = c.full.toLowerCase();
    c.hay = words([c.path, c.caption, c.tags.join(" "), c.error || "", c.rule || ""].join(" "));
  }
  function options(select, values) {
    for (const v of values) {
      const o = document.createElement("option");
      o.value = v; o.textContent = v;
      select.appendChild(o);
    }
  }
  const tagCount = new Map();
  for (const c of cards) for (const t of c.tags) tagCount.set(t, (tagCount.get(t) || 0) + 1);
  options($("rule"), [...new Set(cards.map((c) => c.rule).filter(Boolean))].sort());
  options($("tag"), [...tagCount.keys()].sort((a, b) => tagCount.get(b) - tagCount.get(a) || a.localeCompare(b))
    .slice(0, 500));

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = text;
    return e;
  }
  function link(href, cls, text) {
    const a = el("a", cls, text);
    a.setAttribute("href", href);
    a.rel = "noopener";
    return a;
  }
  function image(src, alt) {
    const img = document.createElement("img");
    img.loading = "lazy";
    img.decoding = "async";
    img.alt = alt;
    img.src = src;
    return img;
  }
  function render(c) {
    const card = el("article", "card");
    card.dataset.status = c.status;
    const thumb = el("div", "thumb" + (c.thumbs.length > 1 ? " strip" : ""));
    if (c.thumbs.length) for (const t of c.thumbs) thumb.appendChild(image(t, c.path));
    else thumb.appendChild(el("div", "none", c.thumb_error ? "no preview: " + c.thumb_error : "no preview"));
    card.appendChild(thumb);
    const body = el("div", "body");
    const top = el("div", "top");
    const name = link(c.href, "name", c.path);
    name.title = c.full;
    top.appendChild(name);
    top.appendChild(el("span", "badge " + c.status, STATUS[c.status]));
    body.appendChild(top);
    if (c.caption) body.appendChild(el("p", "caption", c.caption));
    if (c.error) body.appendChild(el("p", "error", c.error));
    if (c.note) body.appendChild(el("p", "note", c.note));
    if (c.tags.length) {
      const tags = el("div", "tags");
      for (const t of c.tags) {
        const b = el("button", "tag", t);
        b.type = "button";
        b.addEventListener("click", () => { setTag(t); });
        tags.appendChild(b);
      }
      body.appendChild(tags);
    }
    const meta = el("div", "meta");
    for (const m of [c.rule, c.model, c.date, c.kind === "video" ? "video" : null]) {
      if (m) meta.appendChild(el("span", "", m));
    }
    meta.appendChild(link(c.href, "", "original"));
    if (c.sidecar) meta.appendChild(link(c.sidecar, "", "sidecar"));
    body.appendChild(meta);
    card.appendChild(body);
    return card;
  }
  function setTag(t) {
    const select = $("tag");
    if (![...select.options].some((o) => o.value === t)) options(select, [t]);
    select.value = t;
    update();
  }

  let shown = [], rendered = 0;
  function filtered() {
    const wanted = words($("q").value).split(" ").filter(Boolean).map((w) => " " + w);
    const status = $("status").value, rule = $("rule").value, tag = $("tag").value, sort = $("sort").value;
    const out = cards.filter((c) => (!status || c.status === status) && (!rule || c.rule === rule) &&
      (!tag || c.tags.includes(tag)) && wanted.every((w) => c.hay.includes(w)));
    const byPath = (a, b) => (a.key < b.key ? -1 : a.key > b.key ? 1 : 0);
    if (sort === "path") out.sort(byPath);
    else if (sort === "date-asc") out.sort((a, b) => (a.date < b.date ? -1 : a.date > b.date ? 1 : byPath(a, b)));
    else out.sort((a, b) => (a.date > b.date ? -1 : a.date < b.date ? 1 : byPath(a, b)));
    return out;
  }
  function showMore() {
    const end = Math.min(shown.length, rendered + pageSize);
    const frag = document.createDocumentFragment();
    for (; rendered < end; rendered++) frag.appendChild(render(shown[rendered]));
    grid.appendChild(frag);
    more.hidden = rendered >= shown.length;
    more.textContent = "Show more (" + (shown.length - rendered) + " left)";
  }
  function update() {
    shown = filtered();
    rendered = 0;
    grid.replaceChildren();
    showMore();
    empty.hidden = shown.length > 0;
    count.textContent = shown.length === cards.length ? cards.length + " files"
      : shown.length + " of " + cards.length + " files";
  }
  let timer = 0;
  $("q").addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(update, 120); });
  for (const id of ["status", "rule", "tag", "sort"]) $(id).addEventListener("change", update);
  more.addEventListener("click", showMore);
  if ("IntersectionObserver" in window) {
    new IntersectionObserver((entries) => {
      if (entries.some((e) => e.isIntersecting) && rendered < shown.length) showMore();
    }, { rootMargin: "800px" }).observe(more);
  }
  update();
})();
</script>
</body>
</html>
"""
)
