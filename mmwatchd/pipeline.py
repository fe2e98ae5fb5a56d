"""One job, start to end: sniff → rule → encode under the byte budget → call the model → sidecar.

``Pipeline.process`` never raises for a problem with the file or the endpoint: it returns an ``Outcome`` that says
what happened. Permanent problems leave an error sidecar; transient ones leave nothing and ask to be retried.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from mmwatchd import __version__, outputs, rules, sidecar
from mmwatchd.actions import run_actions
from mmwatchd.done import FileVersion, Record, is_done
from mmwatchd.errors import (
    BudgetExceeded,
    DecodeError,
    ForeignSidecar,
    MediaError,
    MediaTooLarge,
    MmwatchdError,
    SidecarError,
    UnsupportedMedia,
    VLMError,
    VLMRejected,
    VLMUnavailable,
    clip,
)
from mmwatchd.isolate import Isolator, LazyFunction
from mmwatchd.log import get_logger
from mmwatchd.media import media_suffix_kind, oversize, sniff
from mmwatchd.model import (
    ActionSpec,
    Config,
    LinearBudget,
    Part,
    Reply,
    Rule,
    VideoSpec,
    VLMRequest,
)
from mmwatchd.outputs import JsonSidecar
from mmwatchd.servers import (
    EndpointKnowledge,
    VideoDecision,
    image_mimes_for,
    is_image_refusal,
    is_video_format_refusal,
    server_from_url,
)
from mmwatchd.walk import link_allowed
from mmwatchd.wire import build_body, request_bytes

if TYPE_CHECKING:  # the client module loads the openai SDK, which a scan with nothing to send never needs
    from mmwatchd.vlm import VLMClient
    from mmwatchd.vocabulary import Vocabulary

# The decoders, named rather than imported: the daemon hands them to its decoder processes and never loads Pillow,
# PyAV or libheif itself (memory and start-up it does not need; the README's "How it is built" has the figures).
probe_image = LazyFunction("mmwatchd.encode", "probe_image")
probe_and_encode_image = LazyFunction("mmwatchd.encode", "probe_and_encode_image")
encode_image = LazyFunction("mmwatchd.encode", "encode_image")
probe_video = LazyFunction("mmwatchd.encode", "probe_video")
encode_video = LazyFunction("mmwatchd.encode", "encode_video")

log = get_logger()
T = TypeVar("T")
#: Sidecar bytes set aside before a request, besides room for the reply (see ``Pipeline._sidecar_room``).
SIDECAR_ROOM_BYTES = 16 << 10
GONE = "file is gone"
IN_PROGRESS = "in progress: another mmwatchd process is describing it right now"
CHANGED = "the file changed while it was being described; it will be described again"
#: Why a batch leaves a file to the online path (see :meth:`Pipeline.prepare` and :meth:`Pipeline.apply`).
ONLINE_OUTPUTS = "described already; its missing outputs (the XMP sidecar) are written from the answer on record"
ONLINE_PROBE = "the endpoint has not said whether it takes video_url: the online path asks"
BATCHED_CHANGED = "the file changed since it was batched: the batch's answer is not for this version"
RULE_CHANGED = "its rule changed since it was batched: the batch's answer is not for this rule"
Status = Literal["ok", "error", "retry", "skipped", "planned"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    """What became of one file."""

    path: Path
    status: Status
    #: For skipped/error/retry: what a person reads.
    reason: str = ""
    rule: str | None = None
    error: MmwatchdError | None = field(default=None, repr=False)
    request_bytes: int | None = None
    #: For dry runs: what would be sent.
    plan: dict[str, Any] | None = field(default=None, repr=False)
    elapsed_s: float = 0.0
    #: Where on_success/on_error moved the file, and what went wrong with the actions.
    moved_to: Path | None = None
    action_problems: tuple[str, ...] = ()
    #: For files that have their answer (ok, error, up to date): the version answered and under which rule
    #: fingerprint, for the done-index that lets rescans skip them.
    media_kind: str | None = None
    fingerprint: str | None = None
    version: tuple[int, int] | None = None
    #: Which sidecar the file has for that version, "ok" or "error" (also when it was found up to date).
    answer: Literal["ok", "error"] | None = None
    #: The version answered as (size, mtime_ns, inode, ctime_ns): what the done-index records (see ``version``).
    identity: tuple[int, int, int, int] | None = None
    #: The file was not there any more: its retry state can go.
    gone: bool = False

    @property
    def failed(self) -> bool:
        return self.status in ("error", "retry")

    @property
    def retry_after(self) -> float | None:
        return getattr(self.error, "retry_after", None)


@dataclass(frozen=True, slots=True, kw_only=True)
class _Context:
    """One look at a file: its version, where its sidecar goes, its root, and the prompt values (filled in as the
    look goes on: ``values`` is the one mutable part)."""

    path: Path
    before: FileVersion
    side: Path
    root: Path | None
    rel: str
    values: dict[str, object]
    #: The names as they are, for hooks' argv.
    raw: dict[str, object]


@dataclass(frozen=True, slots=True, kw_only=True)
class _Planned:
    rule: Rule
    request: VLMRequest
    #: What the sidecar records about the media, without the request-level fields.
    media: dict[str, Any]
    fingerprint: str
    #: For a clip under ``video.mode: auto``: how its mode was chosen (the answer teaches the endpoint knowledge).
    decision: VideoDecision | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Prepared:
    """One file's request, planned and not sent yet (a Batch API line), and what applying its answer needs later,
    in this process or another: the version and hash the request was made from, and the sidecar's record of it."""

    path: Path
    #: The request body exactly as the online path sends it (:func:`mmwatchd.wire.build_body`).
    body: dict[str, Any] = field(repr=False)
    request_bytes: int
    #: (size, mtime_ns, inode, ctime_ns) of the version encoded, and its sha256.
    identity: tuple[int, int, int, int]
    sha256: str
    kind: str
    rule: str
    model: str
    fingerprint: str
    #: The sidecar's ``media`` record of the request, and the prompt values the rule's actions take.
    media: dict[str, Any] = field(repr=False)
    values: dict[str, object] = field(repr=False)
    #: Held from :meth:`Pipeline.prepare` until the line is recorded in its shard (then the online path elsewhere
    #: finds the file there); released by whoever takes the line, or drops it.
    claim: sidecar.Claim | None = field(default=None, repr=False, compare=False)

    def release(self) -> None:
        if self.claim is not None:
            self.claim.release()

    def record(self) -> dict[str, Any]:
        """What the state store keeps of it (everything but the body): JSON."""
        return {
            "request_bytes": self.request_bytes, "kind": self.kind, "rule": self.rule, "model": self.model,
            "fingerprint": self.fingerprint, "media": self.media, "values": self.values,
        }  # fmt: skip

    @classmethod
    def from_record(
        cls, path: Path, record: dict[str, Any], *, identity: tuple[int, int, int, int], sha256: str
    ) -> Prepared:
        return cls(
            path=path, body={}, request_bytes=int(record["request_bytes"]), identity=identity, sha256=sha256,
            kind=str(record["kind"]), rule=str(record["rule"]), model=str(record["model"]),
            fingerprint=str(record["fingerprint"]), media=dict(record["media"]), values=dict(record["values"]),
        )  # fmt: skip


class Pipeline:
    """Turns paths into outcomes under one config. Thread-safe: it holds no per-job state."""

    def __init__(
        self,
        config: Config,
        client: VLMClient | None,
        *,
        clock: Any = time.monotonic,
        isolator: Isolator | None = None,
    ) -> None:
        """``isolator``: decode in separate processes with a timeout and memory limit (the daemon's way); without
        one, encoders run in the calling thread (dry runs, tests)."""
        self.config = config
        self.client = client
        self.clock = clock
        self.isolator = isolator
        self._roots = [r.path for r in config.watch]
        #: Why a batch backfill has ``path`` (its open shard), or None: asked once the sidecar is claimed (see
        #: :meth:`_claim`; the daemon sets it).
        self.batched: Callable[[Path], str | None] = lambda path: None
        self._vocabularies = _vocabularies(config)
        self._record = JsonSidecar(config)
        #: What is written from the answer besides the JSON record (the XMP sidecar), in this order.
        self._outputs = outputs.configured(config, self._vocabularies)

    # -- the job ---------------------------------------------------------------------------------------------

    def process(
        self,
        path: Path,
        *,
        explicit: bool = False,
        force: bool = False,
        dry_run: bool = False,
        last_attempt: bool = False,
    ) -> Outcome:
        """Process one file.

        ``explicit``: a person named it (so non-media gets an error, not a skip). ``last_attempt``: a failure the
        server answered (408/409/5xx), or a sidecar that cannot be written, is recorded as permanent instead of being
        retried again.

        Nothing is paid for before the sidecar is claimed (:func:`sidecar.claim`: another process at work on it
        makes this a skip) and its temp file exists with room set aside (:func:`sidecar.reserve`): a folder that
        cannot take the answer is found out before the request, not after.
        """
        started = self.clock()
        path = Path(os.path.abspath(path))
        ctx = self._context(path, explicit=explicit)
        if isinstance(ctx, Outcome):
            return ctx
        before, side, values = ctx.before, ctx.side, ctx.values
        rule: Rule | None = None
        fingerprint = ""
        kind: str | None = None
        claim: sidecar.Claim | None = None
        reservation: sidecar.Reservation | None = None
        try:
            matched = self._match(ctx, explicit=explicit)
            if isinstance(matched, Outcome):
                return matched
            kind, problem, rule, fingerprint = matched
            if dry_run:
                if problem is not None:
                    raise problem
                planned = self._plan(path, kind, rule, values, fingerprint)
                return Outcome(
                    path=path,
                    status="planned",
                    rule=rule.name,
                    request_bytes=request_bytes(planned.request),
                    plan=self._describe_plan(path, planned),
                    elapsed_s=self.clock() - started,
                )
            existing = sidecar.read(side)  # a foreign file there is never replaced, forced or not
            if not force and self._fresh(path, existing, before, fingerprint):
                if existing is not None and self._outputs_missing(existing):
                    return self._outputs_for_described(path, side, existing, before, rule, kind, fingerprint)
                sidecar.clear_leftover_lock(side)
                return self._up_to_date(path, existing, before, rule, kind, fingerprint)
            claimed = self._claim(path, side, rule, force=force)
            if isinstance(claimed, Outcome):
                return claimed
            claim = claimed
            # Another process may have written the sidecar between the look above and the claim.
            again = sidecar.read(side)
            if not force and again != existing and self._fresh(path, again, before, fingerprint):
                return self._up_to_date(path, again, before, rule, kind, fingerprint)
            reservation = sidecar.reserve(side, size=self._sidecar_room(rule))
            if problem is not None:
                raise problem
            planned = self._plan(path, kind, rule, values, fingerprint)
            if self.client is None:
                raise RuntimeError("Pipeline without a client cannot call the endpoint")
            reply, planned = self._ask(
                planned, lambda **again: self._plan(path, kind, rule, values, fingerprint, **again)
            )
            # Hash first, then re-stat: when the re-stat finds the version of the first stat, the hash (and what the
            # decoder read, before it) is of that version too.
            sha = sidecar.sha256_file(path)
            after = self._restat(path)
            if after is None:
                return Outcome(path=path, status="skipped", reason=GONE, rule=rule.name, gone=True)
            if after != before:
                return Outcome(path=path, status="retry", reason=CHANGED, rule=rule.name)
            doc = self._ok_doc(path, planned, before, sha, reply, elapsed=self.clock() - started)
            return self._commit(ctx, reservation, doc, rule, kind, request_bytes(planned.request), started)
        except (MediaError, VLMError, SidecarError, OSError) as exc:
            return self._failed(
                exc, ctx, reservation, rule, kind, fingerprint, started, last_attempt=last_attempt, dry_run=dry_run
            )
        finally:
            if reservation is not None:
                reservation.discard()  # nothing to do once committed
            if claim is not None:
                claim.release()

    # -- batches: the same job in two halves -------------------------------------------------------------------

    def prepare(self, path: Path) -> Prepared | Outcome:
        """The first half of :meth:`process` for a batch: the request the online path would send, planned under the
        same budget, without sending it. The sidecar is claimed, as the online path claims it, and the claim goes
        with the result (:attr:`Prepared.claim`): a file another process is describing is ``skipped``.

        An Outcome instead says why not: ``skipped`` (up to date, not media, no rule, gone), or ``retry``: the
        online path must take this file, because it has a problem the online path records as an error sidecar,
        an XMP sidecar to write from the answer on record, a clip whose endpoint has not said whether it takes
        ``video_url`` (the online path asks and learns), or it changed while it was being encoded.
        """
        path = Path(os.path.abspath(path))
        ctx = self._context(path, explicit=False)
        if isinstance(ctx, Outcome):
            return ctx
        before, values = ctx.before, ctx.values
        rule: Rule | None = None
        claim: sidecar.Claim | None = None
        try:
            matched = self._match(ctx, explicit=False)
            if isinstance(matched, Outcome):
                return matched
            kind, problem, rule, fingerprint = matched
            existing = sidecar.read(ctx.side)
            if self._fresh(path, existing, before, fingerprint):
                if existing is not None and self._outputs_missing(existing):
                    return Outcome(path=path, status="retry", reason=ONLINE_OUTPUTS, rule=rule.name)
                return self._up_to_date(path, existing, before, rule, kind, fingerprint)
            if problem is not None:
                raise problem
            claimed = self._claim(path, ctx.side, rule)
            if isinstance(claimed, Outcome):
                return claimed
            claim = claimed
            planned = self._plan(path, kind, rule, values, fingerprint)
            decision, knowledge = planned.decision, self._knowledge()
            if decision is not None and decision.probe:
                if knowledge is not None:
                    knowledge.settle(planned.request.model, decision, accepted=None)
                return Outcome(path=path, status="retry", reason=ONLINE_PROBE, rule=rule.name)
            sha = sidecar.sha256_file(path)  # hash, then re-stat: as the online path does
            after = self._restat(path)
            if after is None:
                return Outcome(path=path, status="skipped", reason=GONE, rule=rule.name, gone=True)
            if after != before:
                return Outcome(path=path, status="retry", reason=CHANGED, rule=rule.name)
            prepared = Prepared(
                path=path, body=build_body(planned.request), request_bytes=request_bytes(planned.request),
                identity=before.identity, sha256=sha, kind=kind, rule=rule.name, model=planned.request.model,
                fingerprint=fingerprint, media=self._media_doc(planned),
                # The vocabulary is the rule's, not the file's: apply() renders it again rather than keep a copy per
                # line.
                values={k: v for k, v in {**values, **ctx.raw}.items() if k != "vocabulary"}, claim=claim,
            )  # fmt: skip
            claim = None  # it goes with the line now
            return prepared
        except ForeignSidecar as exc:
            return Outcome(
                path=path, status="skipped", reason=exc.message, rule=rule.name if rule is not None else None, error=exc
            )
        except FileNotFoundError:
            return Outcome(
                path=path, status="skipped", reason=GONE, rule=rule.name if rule is not None else None, gone=True
            )
        except (MediaError, VLMError, SidecarError, OSError) as exc:
            reason = exc.message if isinstance(exc, MmwatchdError) else f"cannot read the file: {exc.strerror or exc}"
            return Outcome(path=path, status="retry", reason=reason, rule=rule.name if rule is not None else None)
        finally:
            if claim is not None:
                claim.release()

    def apply(self, prepared: Prepared, answer: Reply | MmwatchdError, *, last_attempt: bool = False) -> Outcome:
        """The second half: give the file the answer to its batched request, as :meth:`process` would have (the
        same sidecar, XMP sidecar and actions; an error answer classified by the same rules), unless the file or its
        rule changed since it was batched: then it is ``retry``, for the online path, and the answer is dropped."""
        started = self.clock()
        path = prepared.path
        ctx = self._context(path, explicit=False)
        if isinstance(ctx, Outcome):
            return ctx
        before = ctx.before
        rule = next((r for r in self.config.rules if r.name == prepared.rule), None)
        if rule is None or rules.fingerprint(rule, self.config.endpoint, prepared.kind) != prepared.fingerprint:
            return Outcome(path=path, status="retry", reason=RULE_CHANGED, rule=prepared.rule)
        if before.identity != prepared.identity:
            return Outcome(path=path, status="retry", reason=BATCHED_CHANGED, rule=rule.name)
        ctx.values.clear()
        ctx.values.update({k: v for k, v in prepared.values.items() if k not in ctx.raw})
        vocabulary = self._vocabularies.get(rule.name)
        ctx.values["vocabulary"] = vocabulary.render() if vocabulary is not None else ""
        claim: sidecar.Claim | None = None
        reservation: sidecar.Reservation | None = None
        try:
            if sidecar.sha256_file(path) != prepared.sha256 or self._restat(path) != before:
                return Outcome(path=path, status="retry", reason=BATCHED_CHANGED, rule=rule.name)
            existing = sidecar.read(ctx.side)  # a foreign file there is never replaced
            if self._fresh(path, existing, before, prepared.fingerprint):  # described meanwhile (by `once`, say)
                return self._up_to_date(path, existing, before, rule, prepared.kind, prepared.fingerprint)
            claim = sidecar.claim(ctx.side)
            if claim is None:
                return Outcome(path=path, status="skipped", reason=IN_PROGRESS, rule=rule.name)
            reservation = sidecar.reserve(ctx.side, size=self._sidecar_room(rule))
            if isinstance(answer, MmwatchdError):
                raise answer
            doc = self._answer_doc(
                path, before, prepared.sha256, answer, rule=rule.name, model=prepared.model,
                fingerprint=prepared.fingerprint, media=prepared.media, elapsed=self.clock() - started,
            )  # fmt: skip
            return self._commit(ctx, reservation, doc, rule, prepared.kind, prepared.request_bytes, started)
        except (MediaError, VLMError, SidecarError, OSError) as exc:
            return self._failed(
                exc, ctx, reservation, rule, prepared.kind, prepared.fingerprint, started, last_attempt=last_attempt
            )
        finally:
            if reservation is not None:
                reservation.discard()
            if claim is not None:
                claim.release()

    def _context(self, path: Path, *, explicit: bool) -> _Context | Outcome:
        """What every look at ``path`` starts from (its version, sidecar path, root and prompt values), or why there
        is nothing to look at."""
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return Outcome(path=path, status="skipped", reason=GONE, gone=True)
        except OSError as exc:
            return Outcome(path=path, status="skipped", reason=f"cannot stat: {exc.strerror or exc}")
        if not stat.S_ISREG(st.st_mode):
            return Outcome(path=path, status="skipped", reason="not a regular file")
        root, rel = rules.rel_to_roots(path, self._roots)
        if not explicit and os.path.islink(path):
            root_spec = next((r for r in self.config.watch if r.path == root), None)
            if root_spec is None or not link_allowed(root_spec, path):
                return Outcome(
                    path=path, status="skipped",
                    reason="symlink to a file outside the watched folder (set follow_symlinks: true to allow)",
                )  # fmt: skip
        before = FileVersion.of(st)
        side = self._record.where(path)
        values: dict[str, object] = {
            # Names are data, never instructions: they go into prompts as quoted strings (JSON escaping, so a
            # newline or a quote in a file name cannot break out of the quotes).
            "name": _quoted(path.name),
            "stem": _quoted(path.stem),
            "ext": re.sub(r"[^a-z0-9]", "", path.suffix[1:].lower()),
            "folder": _quoted(path.parent.name),
            "path": _quoted(str(path)),
            "relpath": _quoted(rel),
            "size_bytes": before.size,
        }
        # A hook's argv takes each value as one argument, so it gets them as they are.
        raw: dict[str, object] = {
            "name": path.name, "stem": path.stem, "folder": path.parent.name, "path": str(path), "relpath": rel,
        }  # fmt: skip
        return _Context(path=path, before=before, side=side, root=root, rel=rel, values=values, raw=raw)

    def _match(self, ctx: _Context, *, explicit: bool) -> tuple[str, MediaError | None, Rule, str] | Outcome:
        """The file's kind, the problem that stops it being sent (if any), its rule and that rule's fingerprint;
        or the skip when it is not media or no rule takes it. Puts ``kind`` and ``vocabulary`` into the values."""
        kind, problem = self._media_kind(ctx.path, ctx.before, explicit=explicit)
        if kind is None:
            return Outcome(path=ctx.path, status="skipped", reason="not a photo or video")
        ctx.values["kind"] = kind
        rule = rules.match(ctx.rel, kind, self.config.rules)
        if rule is None:
            return Outcome(path=ctx.path, status="skipped", reason=f"no rule matches this {kind}")
        fingerprint = rules.fingerprint(rule, self.config.endpoint, kind)
        vocabulary = self._vocabularies.get(rule.name)
        ctx.values["vocabulary"] = vocabulary.render() if vocabulary is not None else ""
        return kind, problem, rule, fingerprint

    def _commit(
        self,
        ctx: _Context,
        reservation: sidecar.Reservation,
        doc: dict[str, Any],
        rule: Rule,
        kind: str,
        sent_bytes: int,
        started: float,
    ) -> Outcome:
        """Apply an answer: the XMP sidecar (when configured), the JSON sidecar into its reservation, the rule's
        on_success actions. The online and the batch path both end here."""
        self._write_outputs(ctx.path, doc)
        reservation.commit(doc)
        outcome = Outcome(
            path=ctx.path,
            status="ok",
            rule=rule.name,
            request_bytes=sent_bytes,
            elapsed_s=self.clock() - started,
            media_kind=kind,
            fingerprint=str(doc["fingerprint"]),
            version=ctx.before.version,
            identity=ctx.before.identity,
            answer="ok",
        )
        return self._act(outcome, rule.on_success, ctx.side, ctx.root, {**ctx.values, **ctx.raw})

    def _failed(
        self,
        exc: MediaError | VLMError | SidecarError | OSError,
        ctx: _Context,
        reservation: sidecar.Reservation | None,
        rule: Rule | None,
        kind: str | None,
        fingerprint: str,
        started: float,
        *,
        last_attempt: bool,
        dry_run: bool = False,
    ) -> Outcome:
        """What a problem makes of the file: a skip, a retry, or an error sidecar and the on_error actions. The one
        classification for a problem found on the way and for an error answer, online or from a batch."""
        path, side, before = ctx.path, ctx.side, ctx.before
        name = rule.name if rule is not None else None
        if isinstance(exc, ForeignSidecar):
            return Outcome(path=path, status="skipped", reason=exc.message, rule=name, error=exc)
        if isinstance(exc, FileNotFoundError):
            return Outcome(path=path, status="skipped", reason=GONE, rule=name, gone=True)
        if isinstance(exc, OSError):  # unreadable now (permissions, I/O error, swapped for a FIFO): not the content
            return Outcome(
                path=path, status="retry", reason=f"cannot read the file: {exc.strerror or exc}",
                rule=name,
            )  # fmt: skip
        gave_up = last_attempt and (
            (isinstance(exc, VLMUnavailable) and exc.counts_against_file) or isinstance(exc, SidecarError)
        )
        if exc.retryable and not gave_up:
            return Outcome(
                path=path, status="retry", reason=exc.message, rule=name, error=exc,
                elapsed_s=self.clock() - started,
            )  # fmt: skip
        if dry_run:
            return Outcome(path=path, status="error", reason=exc.message, rule=name, error=exc)
        if isinstance(exc, SidecarError):
            # No sidecar can record this: the state store does (the daemon keeps final errors there).
            return Outcome(
                path=path, status="error", reason=f"gave up after repeated failures: {exc.message}",
                rule=name, error=exc, elapsed_s=self.clock() - started,
            )  # fmt: skip
        outcome = self._fail(path, side, reservation, rule, fingerprint, before, exc, started, gave_up=gave_up)
        if outcome.status == "error" and fingerprint:
            outcome = replace(outcome, media_kind=kind, fingerprint=fingerprint, version=before.version,
                              identity=before.identity, answer="error")  # fmt: skip
        if outcome.status == "error" and rule is not None:
            return self._act(outcome, rule.on_error, side, ctx.root, {**ctx.values, **ctx.raw})
        return outcome

    def _claim(self, path: Path, side: Path, rule: Rule, *, force: bool = False) -> sidecar.Claim | Outcome:
        """The sidecar's claim, or why the file is skipped: another process is describing it, or (unless ``force``)
        a batch backfill holds it. The backfill is asked only once the claim is held: it records each file's line
        while holding that file's claim, so whichever side claims first has the file."""
        claim = sidecar.claim(side)
        if claim is None:
            return Outcome(path=path, status="skipped", reason=IN_PROGRESS, rule=rule.name)
        if not force and (shard := self.batched(path)) is not None:
            claim.release()
            return Outcome(path=path, status="skipped", reason=shard, rule=rule.name)
        return claim

    @staticmethod
    def _fresh(path: Path, doc: dict[str, Any] | None, st: FileVersion, fingerprint: str) -> bool:
        record = None if doc is None else Record.of_sidecar(doc)
        return is_done(record, st, fingerprint, exact=True, sha256=lambda: sidecar.sha256_file(path))

    @staticmethod
    def _up_to_date(
        path: Path, doc: dict[str, Any] | None, st: FileVersion, rule: Rule, kind: str, fingerprint: str
    ) -> Outcome:
        return Outcome(
            path=path, status="skipped", reason="up to date", rule=rule.name, media_kind=kind, fingerprint=fingerprint,
            version=st.version, identity=st.identity, answer=Record.of_sidecar(doc or {}).answer,
        )  # fmt: skip

    def _sidecar_room(self, rule: Rule) -> int:
        """Bytes to set aside for the sidecar before paying: the document without the reply is a few KB; the reply
        is at most ``max_tokens`` tokens, a few bytes each (more when JSON escapes them)."""
        return SIDECAR_ROOM_BYTES + 8 * (rule.max_tokens or self.config.endpoint.max_tokens)

    # -- outputs besides the JSON record --------------------------------------------------------------------------

    def _write_outputs(self, path: Path, doc: dict[str, Any]) -> None:
        """Write every configured output the answer in ``doc`` wants, and record in ``doc`` how each went. Called
        before the JSON sidecar is written, so one write records the outcome; an output's problem never stops the
        JSON sidecar (it is recorded in ``doc``, and a retryable one is tried again on a later scan)."""
        answer = Record.of_sidecar(doc).answer or "ok"
        for output in self._outputs:
            if output.wants(answer):
                output.write(path, doc)

    def _outputs_missing(self, doc: dict[str, Any]) -> bool:
        """An up-to-date description without one of its outputs (turned on later, or a retryable failure)."""
        answer = Record.of_sidecar(doc).answer or "ok"
        return any(o.wants(answer) and not o.fresh(doc) for o in self._outputs)

    def _outputs_for_described(
        self, path: Path, side: Path, existing: dict[str, Any], st: FileVersion, rule: Rule, kind: str, fingerprint: str
    ) -> Outcome:
        """Give a file already described its missing outputs from the answer on record: no request is sent."""
        claim = sidecar.claim(side)
        if claim is None:
            return Outcome(path=path, status="skipped", reason=IN_PROGRESS, rule=rule.name)
        try:
            doc = sidecar.read(side)
            if doc is None or doc != existing:  # rewritten meanwhile: the next look decides again
                return self._up_to_date(path, doc, st, rule, kind, fingerprint)
            doc = dict(doc)
            self._write_outputs(path, doc)
            sidecar.write(side, doc)
        finally:
            claim.release()
        return self._up_to_date(path, doc, st, rule, kind, fingerprint)

    # -- steps -----------------------------------------------------------------------------------------------

    def _media_kind(self, path: Path, st: FileVersion, *, explicit: bool) -> tuple[str | None, MediaError | None]:
        """The media kind for rule matching, and the problem that stops it being sent, if any.

        The kind comes from the bytes. A file that is not media is skipped, unless its name claims it is a photo or
        video or a person named it: then it gets its rule's error sidecar, saying what it really looks like.
        """
        claimed = media_suffix_kind(path)
        if (too_large := oversize(path.name, st.size, self.config.limits)) is not None:
            return claimed or ("image" if explicit else None), too_large
        sniffed = sniff(path)
        if sniffed.kind is not None:
            return sniffed.kind, None
        if claimed is None and not explicit:
            return None, None
        what = {"image": "an image", "video": "a video"}.get(claimed or "", "a photo or video")
        why = sniffed.why or "unrecognised content"
        if why == "empty file":
            problem = UnsupportedMedia(f"{path.name}: empty file")
        else:
            problem = UnsupportedMedia(f"{path.name}: not {what}: {why}")
        return claimed or "image", problem

    def _plan(
        self,
        path: Path,
        kind: str,
        rule: Rule,
        values: dict[str, object],
        fingerprint: str,
        *,
        video_mode: VideoDecision | None = None,
        image_mimes: tuple[str, ...] | None = None,
    ) -> _Planned:
        """``video_mode``: send a clip this way (the fallback after a refused ``video_url``), whatever the rule says;
        ``image_mimes``: the types passthrough may send (the fallback after a refused image: none)."""
        refs = self._references(rule)
        if kind == "image" and rule.video is not None:  # an animated image may be sent as a video
            facts = self._decode(probe_image, path, limits=self.config.limits)
            values.update(width=facts.width, height=facts.height, taken=facts.taken)
            if facts.frames > 1:
                return self._plan_video(path, rule, values, refs, fingerprint, forced=video_mode)
        if kind == "image":
            # One trip to the decoder process: the budget is computed for the widest values the image's facts
            # could put into the prompt, so it holds for whatever the probe then finds.
            widest = self._request(rule, {**values, **_WIDEST_FACTS}, refs)
            budget = self._budget(widest, (Part(mime="image/jpeg", chunks=(b"",), width=0, height=0),))
            if budget <= 0:
                raise self._no_room(path, widest)
            facts, part = self._decode(
                probe_and_encode_image, path, rule.image, budget=budget, limits=self.config.limits,
                passthrough_mimes=self._image_mimes(rule) if image_mimes is None else image_mimes,
            )  # fmt: skip
            values.update(width=facts.width, height=facts.height, taken=facts.taken)
            request = replace(self._request(rule, values, refs), parts=(*refs, part))
            media = {"kind": "image", "format": facts.format, "width": facts.width, "height": facts.height,
                     "taken": facts.taken or None}  # fmt: skip
            return self._checked(path, rule, request, media, fingerprint)
        return self._plan_video(path, rule, values, refs, fingerprint, forced=video_mode)

    # -- what the endpoint takes -----------------------------------------------------------------------------

    def _knowledge(self) -> EndpointKnowledge | None:
        return getattr(self.client, "knowledge", None)

    def _image_mimes(self, rule: Rule) -> tuple[str, ...]:
        """The image types passthrough may send as they are: what the endpoint is known to take."""
        knowledge = self._knowledge()
        if knowledge is not None:
            mimes = knowledge.image_mimes(rule.model or self.config.endpoint.model)
        else:
            mimes = image_mimes_for(server_from_url(self.config.endpoint.base_url))
        return tuple(sorted(mimes))

    def _video_spec(self, rule: Rule, forced: VideoDecision | None) -> tuple[VideoSpec, VideoDecision | None, str]:
        """The rule's video settings with the mode decided and the endpoint's frame limit applied; the decision
        (``mode: auto``) and the degradation the limit caused, if any."""
        spec = rule.video or VideoSpec()
        decision = forced
        if decision is None and spec.mode == "auto":
            knowledge = self._knowledge()
            if knowledge is not None:
                decision = knowledge.video_mode(rule.model or self.config.endpoint.model)
            elif server_from_url(self.config.endpoint.base_url) is not None:
                decision = VideoDecision(mode="images", reason="the endpoint (known from its URL) takes images only")
            else:
                decision = VideoDecision(
                    mode="video_url", reason="the endpoint was not asked (dry run): video_url unless it refuses"
                )
        if decision is not None:
            spec = replace(spec, mode=decision.mode)
        cap = self.config.endpoint.max_video_frames
        note = ""
        # A vLLM keeps the first 32 frames of a video_url and drops the rest: ask for no more
        # than the server looks at, so the frames spread over the whole clip and none is paid for unseen.
        if cap is not None and spec.mode in ("video_url", "file") and spec.frames > cap:
            note = f"frames {spec.frames} -> {cap} (endpoint.max_video_frames)"
            spec = replace(spec, frames=cap)
        return spec, decision, note

    def _ask(self, planned: _Planned, replan: Callable[..., _Planned]) -> tuple[Reply, _Planned]:
        """Send the request. Under ``video.mode: auto``, a ``video_url`` refused for its format is sent again at
        once as images, and a photo passed through as it is and refused for its data is sent again at once
        encoded; the endpoint's answer is remembered and the refusal counts nothing against the file."""
        assert self.client is not None
        decision = planned.decision
        knowledge = self._knowledge()
        model = planned.request.model
        if planned.media.get("kind") == "image":
            original = next((p for p in planned.request.parts if p.origin == "original"), None)
            try:
                return self.client.describe(planned.request), planned
            except VLMRejected as exc:
                if original is None or knowledge is None or not is_image_refusal(exc.status, exc.server_message):
                    raise
                said = _short(exc.server_message)
                knowledge.refuse_image(model, original.mime)
                log.info("endpoint.learned", url=knowledge.base_url, model=model, refused=original.mime, said=said)
                planned = replan(image_mimes=())
                media = {**planned.media, "passthrough_refused": f"{exc.status} {said}"}
                return self.client.describe(planned.request), replace(planned, media=media)
        if planned.media.get("mode") != "video_url":
            return self.client.describe(planned.request), planned
        if decision is None or knowledge is None:  # the rule says video_url: no fallback, but say what to change
            try:
                return self.client.describe(planned.request), planned
            except VLMRejected as exc:
                if not is_video_format_refusal(exc.status, exc.server_message):
                    raise
                hint = VLMRejected(
                    f"{exc.message}; this endpoint takes no video_url: remove rules: {planned.rule.name}: "
                    "video.mode (auto is the default) or set it to images"
                )
                hint.status, hint.server_message = exc.status, exc.server_message
                raise hint from exc
        try:
            reply = self.client.describe(planned.request)
        except VLMRejected as exc:
            if not is_video_format_refusal(exc.status, exc.server_message):
                knowledge.settle(model, decision, accepted=None)
                raise
            said = _short(exc.server_message)
            reason = knowledge.settle(model, decision, accepted=False, refusal=f"{exc.status} {said}")
            log.info("endpoint.learned", url=knowledge.base_url, model=model, video_url=False, reason=reason)
            planned = replan(video_mode=VideoDecision(mode="images", reason=reason))
            return self.client.describe(planned.request), planned
        except BaseException:
            knowledge.settle(model, decision, accepted=None)
            raise
        reason = knowledge.settle(model, decision, accepted=True)
        if reason != decision.reason:
            log.info("endpoint.learned", url=knowledge.base_url, model=model, video_url=True, reason=reason)
            planned = replace(planned, media={**planned.media, "mode_reason": reason})
        return reply, planned

    def _plan_video(
        self,
        path: Path,
        rule: Rule,
        values: dict[str, object],
        refs: tuple[Part, ...],
        fingerprint: str,
        *,
        forced: VideoDecision | None = None,
    ) -> _Planned:
        spec, decision, capped = self._video_spec(rule, forced)
        try:
            return self._encode_video(path, rule, values, refs, fingerprint, spec, decision, capped)
        except BaseException:
            # A clip that fails before its request (decode, budget) must not hold the other clips waiting for a
            # probe that is never sent: the next clip asks instead.
            knowledge = self._knowledge()
            if decision is not None and decision.probe and knowledge is not None:
                knowledge.settle(rule.model or self.config.endpoint.model, decision, accepted=None)
            raise

    def _encode_video(
        self,
        path: Path,
        rule: Rule,
        values: dict[str, object],
        refs: tuple[Part, ...],
        fingerprint: str,
        spec: VideoSpec,
        decision: VideoDecision | None,
        capped: str,
    ) -> _Planned:
        limits = self.config.limits
        facts = self._decode(probe_video, path, limits=limits)
        if limits.max_duration_s is not None and facts.duration_s and facts.duration_s > limits.max_duration_s:
            raise MediaTooLarge(
                f"{path.name}: {facts.duration_s:.1f} s is longer than limits.max_duration_s ({limits.max_duration_s:g})"
            )
        values.update(
            kind="video",
            width=facts.width,
            height=facts.height,
            taken="",
            duration_s="" if facts.duration_s is None else f"{facts.duration_s:.1f}",
            fps="" if facts.fps is None else f"{facts.fps:.3g}",
            frames=spec.frames,  # the most that can be sent: the budget is computed for the longest prompt
        )
        longest = self._request(rule, values, refs)
        stamp_room = len(f", {facts.duration_s or 0:.1f} s") + 2  # per frame, for the timestamps line (images mode)

        def room(n: int) -> int:
            if spec.mode == "images":
                placeholders = tuple(Part(mime="image/jpeg", chunks=(b"",), width=0, height=0) for _ in range(n))
                req = replace(longest, prompt=longest.prompt + _frames_line(n, [0.0] * n) + " " * (stamp_room * n))
            else:
                placeholders = (Part(type="video_url", mime="video/jpeg", chunks=(b"",), width=0, height=0),)
                req = longest
            return self._budget(req, placeholders)

        # The room shrinks by the same JSON bytes for every further part; a frame count with more digits in the
        # timestamps line costs at most a few bytes more, which the slack covers. Plain numbers cross into the
        # decoding process, where a closure could not.
        one, two = room(1), room(2)
        budget = LinearBudget(first=one - 8, per_part=max(0, one - two))
        if budget(1) <= 0:
            raise self._no_room(path, longest)
        video = self._decode(encode_video, path, spec, budget=budget, limits=limits)
        values["frames"] = len(video.frames) or ""
        request = self._request(rule, values, refs)
        if video.mode == "images":
            request = replace(
                request, prompt=request.prompt + _frames_line(len(video.frames), [f.t for f in video.frames])
            )
        request = replace(request, parts=(*refs, *video.parts))
        media = {
            "kind": "video",
            "container": video.facts.container,
            "codec": video.facts.codec,
            "width": video.facts.width,
            "height": video.facts.height,
            "rotation": video.facts.rotation,
            "duration_s": video.facts.duration_s,
            "fps": video.facts.fps,
            "mode": video.mode,
            **({"mode_reason": decision.reason} if decision is not None else {}),
            "frames": [{"t": f.t, "width": f.width, "height": f.height, "bytes": f.bytes} for f in video.frames],
            "degradations": [*([capped] if capped else []), *video.degradations],
        }
        return replace(self._checked(path, rule, request, media, fingerprint), decision=decision)

    def _decode(self, fn: Callable[..., T], path: Path, /, *args: Any, **kwargs: Any) -> T:
        """Run a decoder on ``path``: isolated when there is an isolator, so a decoder that hangs or crashes costs
        only this file."""
        if self.isolator is None:
            return fn(path, *args, **kwargs)
        return self.isolator.call(fn, path, *args, label=path.name, **kwargs)

    def _request(self, rule: Rule, values: dict[str, object], parts: tuple[Part, ...]) -> VLMRequest:
        endpoint = self.config.endpoint
        return VLMRequest(
            model=rule.model or endpoint.model,
            system=rules.render(rule.system, values) if rule.system else None,
            prompt=rules.render(rule.prompt, values),
            parts=parts,
            max_tokens=rule.max_tokens or endpoint.max_tokens,
            temperature=rule.temperature if rule.temperature is not None else endpoint.temperature,
            schema=rule.schema,
            schema_name=rule.name.replace(".", "_"),
            rule=rule.name,
            rule_model=rule.model is not None,
        )

    def _budget(self, request: VLMRequest, placeholders: tuple[Part, ...]) -> int:
        """Data-URL bytes left for ``placeholders`` (empty parts standing for the media) under the request cap."""
        probe = replace(request, parts=(*request.parts, *placeholders))
        overhead = request_bytes(probe) - sum(p.url_len for p in placeholders)
        return self.config.endpoint.max_request_bytes - overhead

    def _no_room(self, path: Path, request: VLMRequest) -> BudgetExceeded:
        cap = self.config.endpoint.max_request_bytes
        return BudgetExceeded(
            f"{path.name}: the prompt, system text, schema and reference images alone take "
            f"{request_bytes(request)} bytes, over endpoint.max_request_bytes ({cap}); shorten them or raise the limit"
        )

    def _references(self, rule: Rule) -> tuple[Part, ...]:
        """The rule's reference images, each given an equal share of the request (the media keeps one share too)."""
        if not rule.reference_images:
            return ()
        share = self.config.endpoint.max_request_bytes // (2 * (len(rule.reference_images) + 1))
        parts = []
        for ref in rule.reference_images:
            try:
                part = self._decode(
                    encode_image, ref, rule.image, budget=share, limits=self.config.limits,
                    passthrough_mimes=self._image_mimes(rule),
                )  # fmt: skip
            except FileNotFoundError:
                raise DecodeError(f"reference image {ref} is missing (rules: {rule.name}.reference_images)") from None
            except MediaError as exc:
                raise type(exc)(f"reference image {ref}: {exc.message}") from exc
            parts.append(replace(part, origin="reference"))
        return tuple(parts)

    def _checked(
        self, path: Path, rule: Rule, request: VLMRequest, media: dict[str, Any], fingerprint: str
    ) -> _Planned:
        total = request_bytes(request)
        cap = self.config.endpoint.max_request_bytes
        if total > cap:  # the encoders' promise, checked: never send an oversize request
            raise BudgetExceeded(
                f"{path.name}: request would be {total} bytes, over endpoint.max_request_bytes ({cap})"
            )
        return _Planned(rule=rule, request=request, media=media, fingerprint=fingerprint)

    @staticmethod
    def _restat(path: Path) -> FileVersion | None:
        try:
            return FileVersion.of(os.stat(path))
        except OSError:
            return None

    # -- documents -------------------------------------------------------------------------------------------

    def _media_doc(self, planned: _Planned) -> dict[str, Any]:
        return {
            **planned.media,
            "parts": [p.describe() for p in planned.request.parts],
            "request_bytes": request_bytes(planned.request),
            "max_request_bytes": self.config.endpoint.max_request_bytes,
        }

    def _describe_plan(self, path: Path, planned: _Planned) -> dict[str, Any]:
        return {
            "path": str(path),
            "rule": planned.rule.name,
            "model": planned.request.model,
            "fingerprint": planned.fingerprint,
            "system": planned.request.system,
            "prompt": planned.request.prompt,
            "media": self._media_doc(planned),
            "request": _body_shape(planned.request),
            **{o.name: o.preview(path) for o in self._outputs},
        }

    def _header(self, path: Path, st: FileVersion, sha256: str | None) -> dict[str, Any]:
        return {
            "mmwatchd": {"version": __version__, "schema": sidecar.SCHEMA},
            "source": {"name": path.name, "size": st.size, "mtime_ns": st.mtime_ns, "inode": st.ino,
                       "ctime_ns": st.ctime_ns, "sha256": sha256},
        }  # fmt: skip

    def _ok_doc(
        self, path: Path, planned: _Planned, st: FileVersion, sha256: str, reply: Reply, *, elapsed: float
    ) -> dict[str, Any]:
        return self._answer_doc(
            path, st, sha256, reply, rule=planned.rule.name, model=planned.request.model,
            fingerprint=planned.fingerprint, media=self._media_doc(planned), elapsed=elapsed,
        )  # fmt: skip

    def _answer_doc(
        self,
        path: Path,
        st: FileVersion,
        sha256: str,
        reply: Reply,
        *,
        rule: str,
        model: str,
        fingerprint: str,
        media: dict[str, Any],
        elapsed: float,
    ) -> dict[str, Any]:
        """The ok sidecar, from what was sent (``media``: see :meth:`_media_doc`) and what came back."""
        doc = self._header(path, st, sha256)
        doc.update(
            status="ok",
            rule=rule,
            model=reply.model or model,
            **({"endpoint": reply.endpoint} if reply.endpoint else {}),
            fingerprint=fingerprint,
            media=media,
            response={
                "text": reply.text,
                "data": reply.data,
                "finish_reason": reply.finish_reason,
                "usage": dict(reply.usage) if reply.usage else None,
                "source": reply.source,
                "attempts": reply.attempts,
                "latency_s": round(reply.latency_s, 3),
            },
            elapsed_s=round(elapsed, 3),
            created=_now(),
        )
        return doc

    def _fail(
        self,
        path: Path,
        side: Path,
        reservation: sidecar.Reservation | None,
        rule: Rule | None,
        fingerprint: str,
        st: FileVersion,
        exc: MmwatchdError,
        started: float,
        *,
        gave_up: bool = False,
    ) -> Outcome:
        """Record a permanent failure so the file is not retried until it or its rule changes."""
        message = f"gave up after repeated failures: {exc.message}" if gave_up else exc.message
        try:
            sha = sidecar.sha256_file(path)
        except OSError:
            sha = None
        # Like the ok path: hash, then re-stat, so the sidecar never pairs one version's hash with another's stat,
        # and an error found in a file that was still changing is not recorded against it.
        after = self._restat(path)
        if after is None:
            return Outcome(path=path, status="skipped", reason=GONE, rule=rule.name if rule else None, gone=True)
        if after != st:
            return Outcome(path=path, status="retry", reason=CHANGED, rule=rule.name if rule else None)
        doc = self._header(path, st, sha)
        doc.update(
            status="error",
            rule=rule.name if rule else None,
            model=(rule.model if rule else None) or self.config.endpoint.model,
            fingerprint=fingerprint or None,
            error={"kind": exc.kind, "message": message},
            elapsed_s=round(self.clock() - started, 3),
            created=_now(),
        )
        try:
            if reservation is not None:
                reservation.commit(doc)
            else:
                sidecar.write(side, doc)
        except SidecarError as write_exc:
            return Outcome(
                path=path, status="retry", reason=f"{exc.message}; and {write_exc.message}",
                rule=rule.name if rule else None, error=write_exc,
            )  # fmt: skip
        return Outcome(path=path, status="error", reason=message, rule=rule.name if rule else None, error=exc)

    def _act(
        self, outcome: Outcome, spec: ActionSpec | None, side: Path, root: Path | None, values: dict[str, object]
    ) -> Outcome:
        """Run the rule's on_success/on_error actions; their problems are reported, never raised."""
        if spec is None:
            return outcome
        # A mirrored sidecar follows its file to the mirror of its new place.
        mirrored = self._record.where if self.config.sidecar.dir is not None else None
        result = run_actions(
            spec, path=outcome.path, sidecar=side, root=root, values=values, status=outcome.status, sidecar_for=mirrored
        )
        problems = result.problems
        if result.moved:
            for output in self._outputs:
                problems = (*problems, *output.follow(outcome.path, result.path))
        return replace(outcome, moved_to=result.path if result.moved else None, action_problems=problems)


#: Prompt values an image's facts can take, at their longest (pixel counts are capped by limits.max_pixels).
_WIDEST_FACTS: dict[str, object] = {"width": 999_999_999, "height": 999_999_999, "taken": "0000-00-00 00:00:00"}


def _short(said: str) -> str:
    """A server's words as a sidecar records them: one line, at most 120 characters."""
    return clip(" ".join(said.split()), 120)


def _vocabularies(config: Config) -> dict[str, Vocabulary]:
    """Each rule's keyword vocabulary, loaded once per config (the config check has already parsed each file)."""
    if not any(r.keywords for r in config.rules):
        return {}
    from mmwatchd.vocabulary import load

    return {r.name: load(r.keywords.vocabulary) for r in config.rules if r.keywords is not None}


def _quoted(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _frames_line(n: int, times: list[float]) -> str:
    """What image-only APIs are told about the frames they get as separate images."""
    stamps = ", ".join(f"{t:.1f} s" for t in times)
    return f"\n\nThe {n} images are frames of the video, in order, at {stamps}."


def _body_shape(request: VLMRequest) -> dict[str, Any]:
    """The request body as it will be sent, with each data URL replaced by its mime and size."""
    body = build_body(request, with_payload=False)
    urls = iter(request.parts)
    for message in body["messages"]:
        for item in message["content"] if isinstance(message["content"], list) else ():
            if item["type"] in ("image_url", "video_url"):
                part = next(urls)
                item[item["type"]]["url"] = f"data:{part.mime};base64,…({part.url_len} bytes)"
    return body


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
