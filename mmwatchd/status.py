"""``mmwatchd status``: where every file under the watched folders stands, and what went wrong lately.

Done/failed/pending come from the folders and their sidecars (the truth); retrying, recent errors and today's
request count come from the state store. A file the done-index proves done (same size, mtime and rule fingerprint,
its sidecar listed; see :mod:`mmwatchd.index`) is counted from a ``stat``; any other is sniffed (a few hundred bytes,
to know which rule it gets) and its sidecar read. Nothing is decoded.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from mmwatchd import limiter, outputs as outputs_mod, rules, sidecar
from mmwatchd.done import Answer, Record, is_done
from mmwatchd.errors import ForeignSidecar, SidecarError
from mmwatchd.index import DoneIndex
from mmwatchd.live import published
from mmwatchd.media import looked_at
from mmwatchd.model import Config
from mmwatchd.outputs import Output
from mmwatchd.state import State


def collect(cfg: Config, state: State, *, errors: int = 10) -> dict[str, Any]:
    retrying = state.retrying()
    retrying_paths = {r.path for r in retrying}
    index = DoneIndex(cfg, state.done_index())
    answers: dict[str, Literal["ok", "error"]] = {}  # for entries that predate the answer column
    roots: dict[str, dict[str, int]] = {}
    outputs = outputs_mod.configured(cfg)
    for root in cfg.watch:
        counts = {"done": 0, "failed": 0, "pending": 0, "retrying": 0, "foreign": 0}
        counts.update((o.name, 0) for o in outputs)
        for name, row in index.walk(root):
            if row is not None and row.answer is not None:
                counts["failed" if row.answer == "error" else "done"] += 1
                _count_outputs(counts, outputs, "error" if row.answer == "error" else "ok", name)
                continue
            path = Path(name)
            where = _classify(cfg, root.path, path)
            if where is None:
                continue  # not media, or no rule: never processed, so neither done nor pending
            if where == "pending" and path in retrying_paths:
                where = "retrying"
            elif row is not None and where in ("done", "failed"):
                answers[name] = "ok" if where == "done" else "error"  # so the next status counts it from the index
            counts[where] += 1
            if where in ("done", "failed"):
                _count_outputs(counts, outputs, "ok" if where == "done" else "error", name)
        roots[str(root.path)] = counts
    if answers:
        state.set_answers(answers)
    return {
        "roots": roots,
        "retrying": [
            {"path": os.fsdecode(r.path), "attempts": r.attempts, "kind": r.kind, "last_error": r.last_error,
             "retry_at": _iso(r.retry_at)}
            for r in retrying
        ],
        "last_errors": [
            {"path": os.fsdecode(e.path), "kind": e.kind, "message": e.message, "at": _iso(e.at)}
            for e in state.last_errors(errors)
        ],
        "requests_today": state.requests_today(),
        "max_requests_per_day": cfg.endpoint.max_requests_per_day if not cfg.endpoints else None,
        # Several endpoints: each one's state and requests in flight, as the running service last published them.
        **({"endpoints": published(state.path.parent)} if cfg.endpoints else {}),
        "concurrency": _concurrency(cfg, state),
    }  # fmt: skip


def _concurrency(cfg: Config, state: State) -> dict[str, Any] | int:
    """The (first) endpoint's fixed concurrency, or for ``auto`` the limit the service found last (None until it
    has run)."""
    ep = cfg.endpoint
    if ep.concurrency != "auto":
        return ep.concurrency
    found = state.endpoint_capabilities(limiter.state_key(ep)) or {}
    limit, at = found.get("limit"), found.get("at")
    return {
        "auto": True,
        "max": limiter.workers(ep),
        "limit": limit if isinstance(limit, int) else None,
        "at": _iso(at) if isinstance(at, int | float) else None,
    }


def _classify(cfg: Config, root: Path, path: Path) -> str | None:
    seen = looked_at(path)
    if seen is None:
        return None
    st, kind = seen
    rule = rules.match(rules.rel_to_roots(path, [root])[1], kind, cfg.rules)
    if rule is None:
        return None
    try:
        doc = sidecar.read(
            sidecar.locate(path, suffix=cfg.sidecar.suffix, mirror=cfg.sidecar.dir, roots=[r.path for r in cfg.watch])
        )
    except ForeignSidecar:
        return "foreign"
    except SidecarError:
        return "pending"
    if doc is None:
        return "pending"
    record = Record.of_sidecar(doc)
    # No hash: a touched file counts as pending here; the daemon settles it by hash.
    if not is_done(record, st, rules.fingerprint(rule, cfg.endpoint, kind), exact=False):
        return "pending"
    return "failed" if record.answer == "error" else "done"


def _count_outputs(counts: dict[str, int], outputs: Sequence[Output], answer: Answer, name: str) -> None:
    """Count the outputs an answered file has (a look at the folder, nothing read)."""
    for output in outputs:
        if output.wants(answer):
            counts[output.name] += output.present(Path(name))


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts).astimezone().isoformat(timespec="seconds")


def render(report: dict[str, Any]) -> str:
    """The report for a person."""
    lines = []
    for root, c in report["roots"].items():
        extra = f", {c['xmp']} with an XMP sidecar" if "xmp" in c else ""
        extra += f", {c['foreign']} blocked by a foreign file" if c["foreign"] else ""
        lines.append(
            f"{root}: {c['done']} done, {c['failed']} failed, {c['pending']} pending, {c['retrying']} retrying{extra}"
        )
    cap = report["max_requests_per_day"]
    lines.append(f"requests today: {report['requests_today']}" + (f" of {cap}" if cap else ""))
    conc = report["concurrency"]
    if isinstance(conc, dict):
        found = "not found yet" if conc["limit"] is None else f"{conc['limit']} in flight, as of {conc['at']}"
        lines.append(f"concurrency: auto (at most {conc['max']}): {found}")
    for e in report.get("endpoints") or []:
        lines.append(f"endpoint {e['name']} (priority {e['priority']}): {e['status']}, "
                     f"{e['in_flight']} of {e['concurrency']} in flight")  # fmt: skip
    if "endpoints" in report and report["endpoints"] is None:
        lines.append("endpoints: the service is not running (their state is shown while it runs)")
    if report["retrying"]:
        lines.append("retrying:")
        for r in report["retrying"]:
            lines.append(
                f"  {r['path']}: {r['attempts']} attempt(s), next {r['retry_at'] or 'soon'}: {r['last_error']}"
            )
    if report["last_errors"]:
        lines.append("last errors:")
        for e in report["last_errors"]:
            lines.append(f"  {e['at']}  {e['path']}: {e['kind']}: {e['message']}")
    return "\n".join(lines)
