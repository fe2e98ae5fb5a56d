"""One job, start to end: sniff → rule → encode under the byte budget → call the model → sidecar.

``Processor.process`` never raises for a problem with the file or the endpoint: it returns an ``Outcome`` that says
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

from mmwatchd import __version__, rules, sidecar
from mmwatchd.actions import run_actions
from mmwatchd.model import Config, Rule
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
)
from mmwatchd.isolate import Isolator, LazyFunction
from mmwatchd.log import get_logger
from mmwatchd.media import media_suffix_kind, oversize, sniff
from mmwatchd.model import ActionSpec, LinearBudget, Part, Reply, VideoSpec, VLMRequest
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
# PyAV or libheif itself (about 35 MB and 0.1 s of start-up it does not need).
probe_image = LazyFunction("mmwatchd.encode", "probe_image")
probe_and_encode_image = LazyFunction("mmwatchd.encode", "probe_and_encode_image")
encode_image = LazyFunction("mmwatchd.encode", "encode_image")
probe_video = LazyFunction("mmwatchd.encode", "probe_video")
encode_video = LazyFunction("mmwatchd.encode", "encode_video")

log = get_logger()
T = TypeVar("T")
#: Sidecar bytes set aside before a request, besides room for the reply (see ``Processor._sidecar_room``).
SIDECAR_ROOM_BYTES = 16 << 10
GONE = "file is gone"
IN_PROGRESS = "in progress: another mmwatchd process is describing it right now"
CHANGED = "the file changed while it was being described; it will be described again"
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
    kind: str | None = None
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
class _Stat:
    """A file version: size, mtime, inode and ctime. A rewrite that keeps the size and puts the mtime back still
    changes the ctime (only the kernel sets it), and a file replaced by another gets another inode."""

    size: int
    mtime_ns: int
    ino: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> _Stat:
        return cls(size=st.st_size, mtime_ns=st.st_mtime_ns, ino=st.st_ino, ctime_ns=st.st_ctime_ns)

    @property
    def version(self) -> tuple[int, int]:
        return (self.size, self.mtime_ns)

    @property
    def identity(self) -> tuple[int, int, int, int]:
        return (self.size, self.mtime_ns, self.ino, self.ctime_ns)


@dataclass(frozen=True, slots=True, kw_only=True)
class _Planned:
    rule: Rule
    request: VLMRequest
    #: What the sidecar records about the media, without the request-level fields.
    media: dict[str, Any]
    fingerprint: str
    #: For a clip under ``video.mode: auto``: how its mode was chosen (the answer teaches the endpoint knowledge).
    decision: VideoDecision | None = None


class Processor:
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
        self._vocabularies = _vocabularies(config)

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
        before = _Stat.of(st)
        side = sidecar.locate(
            path, suffix=self.config.sidecar.suffix, mirror=self.config.sidecar.dir, roots=self._roots
        )
        rule: Rule | None = None
        fingerprint = ""
        kind: str | None = None
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
        raw = {"name": path.name, "stem": path.stem, "folder": path.parent.name, "path": str(path), "relpath": rel}
        claim: sidecar.Claim | None = None
        reservation: sidecar.Reservation | None = None
        try:
            kind, problem = self._kind(path, before, explicit=explicit)
            if kind is None:
                return Outcome(path=path, status="skipped", reason="not a photo or video")
            values["kind"] = kind
            rule = rules.match(rel, kind, self.config.rules)
            if rule is None:
                return Outcome(path=path, status="skipped", reason=f"no rule matches this {kind}")
            fingerprint = rules.fingerprint(rule, self.config.endpoint, kind)
            vocabulary = self._vocabularies.get(rule.name)
            values["vocabulary"] = vocabulary.render() if vocabulary is not None else ""
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
                if existing is not None and self._xmp_missing(existing):
                    return self._xmp_for_described(path, side, existing, before, rule, kind, fingerprint)
                sidecar.clear_leftover_lock(side)
                return self._up_to_date(path, existing, before, rule, kind, fingerprint)
            claim = sidecar.claim(side)
            if claim is None:
                return Outcome(path=path, status="skipped", reason=IN_PROGRESS, rule=rule.name)
            # Another process may have written the sidecar between the look above and the claim.
            again = sidecar.read(side)
            if not force and again != existing and self._fresh(path, again, before, fingerprint):
                return self._up_to_date(path, again, before, rule, kind, fingerprint)
            reservation = sidecar.reserve(side, size=self._sidecar_room(rule))
            if problem is not None:
                raise problem
            planned = self._plan(path, kind, rule, values, fingerprint)
            if self.client is None:
                raise RuntimeError("Processor without a client cannot call the endpoint")
            reply, planned = self._ask(planned, lambda **again: self._plan(path, kind, rule, values, fingerprint, **again))
            # Hash first, then re-stat: when the re-stat finds the version of the first stat, the hash (and what the
            # decoder read, before it) is of that version too.
            sha = sidecar.sha256_file(path)
            after = self._restat(path)
            if after is None:
                return Outcome(path=path, status="skipped", reason=GONE, rule=rule.name, gone=True)
            if after != before:
                return Outcome(path=path, status="retry", reason=CHANGED, rule=rule.name)
            doc = self._ok_doc(path, planned, before, sha, reply, elapsed=self.clock() - started)
            self._xmp(path, doc)
            reservation.commit(doc)
            outcome = Outcome(
                path=path,
                status="ok",
                rule=rule.name,
                request_bytes=request_bytes(planned.request),
                elapsed_s=self.clock() - started,
                kind=kind,
                fingerprint=fingerprint,
                version=before.version,
                identity=before.identity,
                answer="ok",
            )
            return self._act(outcome, rule.on_success, side, root, {**values, **raw})
        except ForeignSidecar as exc:
            return Outcome(path=path, status="skipped", reason=exc.message, rule=rule and rule.name, error=exc)
        except FileNotFoundError:
            return Outcome(path=path, status="skipped", reason=GONE, rule=rule and rule.name, gone=True)
        except OSError as exc:  # unreadable now (permissions, I/O error, swapped for a FIFO): not the file's content
            return Outcome(
                path=path, status="retry", reason=f"cannot read the file: {exc.strerror or exc}",
                rule=rule and rule.name,
            )  # fmt: skip
        except (MediaError, VLMError, SidecarError) as exc:
            gave_up = last_attempt and (
                (isinstance(exc, VLMUnavailable) and exc.counts_against_file) or isinstance(exc, SidecarError)
            )
            if exc.retryable and not gave_up:
                return Outcome(
                    path=path, status="retry", reason=exc.message, rule=rule and rule.name, error=exc,
                    elapsed_s=self.clock() - started,
                )  # fmt: skip
            if dry_run:
                return Outcome(path=path, status="error", reason=exc.message, rule=rule and rule.name, error=exc)
            if isinstance(exc, SidecarError):
                # No sidecar can record this: the state store does (the daemon keeps final errors there).
                return Outcome(
                    path=path, status="error", reason=f"gave up after repeated failures: {exc.message}",
                    rule=rule and rule.name, error=exc, elapsed_s=self.clock() - started,
                )  # fmt: skip
            outcome = self._fail(path, side, reservation, rule, fingerprint, before, exc, started, gave_up=gave_up)
            if outcome.status == "error" and fingerprint:
                outcome = replace(outcome, kind=kind, fingerprint=fingerprint, version=before.version,
                                  identity=before.identity, answer="error")  # fmt: skip
            if outcome.status == "error" and rule is not None:
                return self._act(outcome, rule.on_error, side, root, {**values, **raw})
            return outcome
        finally:
            if reservation is not None:
                reservation.discard()  # nothing to do once committed
            if claim is not None:
                claim.release()

    @staticmethod
    def _fresh(path: Path, doc: dict[str, Any] | None, st: _Stat, fingerprint: str) -> bool:
        return doc is not None and sidecar.is_fresh(
            doc,
            size=st.size,
            mtime_ns=st.mtime_ns,
            ino=st.ino,
            ctime_ns=st.ctime_ns,
            fingerprint=fingerprint,
            sha256=lambda: sidecar.sha256_file(path),
        )

    @staticmethod
    def _up_to_date(
        path: Path, doc: dict[str, Any] | None, st: _Stat, rule: Rule, kind: str, fingerprint: str
    ) -> Outcome:
        return Outcome(
            path=path, status="skipped", reason="up to date", rule=rule.name, kind=kind, fingerprint=fingerprint,
            version=st.version, identity=st.identity, answer="error" if (doc or {}).get("status") == "error" else "ok",
        )  # fmt: skip

    def _sidecar_room(self, rule: Rule) -> int:
        """Bytes to set aside for the sidecar before paying: the document without the reply is a few KB; the reply
        is at most ``max_tokens`` tokens, a few bytes each (more when JSON escapes them)."""
        return SIDECAR_ROOM_BYTES + 8 * (rule.max_tokens or self.config.endpoint.max_tokens)

    # -- XMP for photo apps -------------------------------------------------------------------------------------

    def _xmp(self, path: Path, doc: dict[str, Any]) -> None:
        """Write (merge) the XMP sidecar photo apps read, from the answer in ``doc``, and record in ``doc`` what was
        done. Called before the JSON sidecar is written, so one write records the outcome; an XMP problem never
        stops the JSON sidecar (it is recorded under ``"xmp"``, and a retryable one is tried again on a later scan).
        """
        spec = self.config.sidecar.xmp
        if spec is None or doc.get("status") != "ok":
            return
        from mmwatchd import xmp

        rule = next((r for r in self.config.rules if r.name == doc.get("rule")), None)
        response = doc.get("response") or {}
        description, words = xmp.answer_from_reply(
            response.get("data"), response.get("text") or "", description=spec.description, keywords=spec.keywords
        )
        keywords = rule.keywords if rule is not None else None
        ours, mapping = xmp.our_keywords(
            words, prefix=spec.prefix, vocabulary=self._vocabularies.get(rule.name) if rule else None,
            unknown=keywords.unknown if keywords else "keep",
        )  # fmt: skip
        answer = xmp.Answer(
            description=description, keywords=ours, model=str(doc.get("model") or ""), rule=str(doc.get("rule")),
            fingerprint=str(doc.get("fingerprint") or ""),
        )  # fmt: skip
        doc["xmp"] = xmp.write_sidecar(path, answer, naming=spec.naming)
        if mapping is not None:
            doc["keywords"] = mapping.describe()
        if "error" in doc["xmp"]:
            log.warning("xmp.failed", path=str(path), xmp=doc["xmp"]["path"], reason=doc["xmp"]["message"])

    def _xmp_missing(self, doc: dict[str, Any]) -> bool:
        """An up-to-date description without its XMP sidecar (XMP turned on later, or a retryable failure)."""
        if self.config.sidecar.xmp is None or doc.get("status") != "ok":
            return False
        done = doc.get("xmp")
        return not isinstance(done, dict) or bool(done.get("retryable"))

    def _xmp_for_described(
        self, path: Path, side: Path, existing: dict[str, Any], st: _Stat, rule: Rule, kind: str, fingerprint: str
    ) -> Outcome:
        """Give a file already described its XMP sidecar from the answer on record: no request is sent."""
        claim = sidecar.claim(side)
        if claim is None:
            return Outcome(path=path, status="skipped", reason=IN_PROGRESS, rule=rule.name)
        try:
            doc = sidecar.read(side)
            if doc is None or doc != existing:  # rewritten meanwhile: the next look decides again
                return self._up_to_date(path, doc, st, rule, kind, fingerprint)
            doc = dict(doc)
            self._xmp(path, doc)
            sidecar.write(side, doc)
        finally:
            claim.release()
        return self._up_to_date(path, doc, st, rule, kind, fingerprint)

    # -- steps -----------------------------------------------------------------------------------------------

    def _kind(self, path: Path, st: _Stat, *, explicit: bool) -> tuple[str | None, MediaError | None]:
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
            request = replace(request, prompt=request.prompt + _frames_line(len(video.frames), [f.t for f in video.frames]))
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
            raise BudgetExceeded(f"{path.name}: request would be {total} bytes, over endpoint.max_request_bytes ({cap})")
        return _Planned(rule=rule, request=request, media=media, fingerprint=fingerprint)

    @staticmethod
    def _restat(path: Path) -> _Stat | None:
        try:
            return _Stat.of(os.stat(path))
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
            **self._xmp_plan(path),
        }

    def _xmp_plan(self, path: Path) -> dict[str, Any]:
        """What ``once --dry-run`` shows of the XMP sidecar: where, what is in it now, which properties it sets."""
        spec = self.config.sidecar.xmp
        if spec is None:
            return {}
        from mmwatchd import xmp

        return {"xmp": {**xmp.preview(xmp.xmp_path(path, spec.naming)), "description_from": spec.description,
                        "keywords_from": spec.keywords, "prefix": spec.prefix}}  # fmt: skip

    def _header(self, path: Path, st: _Stat, sha256: str | None) -> dict[str, Any]:
        return {
            "mmwatchd": {"version": __version__, "schema": sidecar.SCHEMA},
            "source": {"name": path.name, "size": st.size, "mtime_ns": st.mtime_ns, "inode": st.ino,
                       "ctime_ns": st.ctime_ns, "sha256": sha256},  # fmt: skip
        }

    def _ok_doc(
        self, path: Path, planned: _Planned, st: _Stat, sha256: str, reply: Reply, *, elapsed: float
    ) -> dict[str, Any]:
        doc = self._header(path, st, sha256)
        doc.update(
            status="ok",
            rule=planned.rule.name,
            model=reply.model or planned.request.model,
            fingerprint=planned.fingerprint,
            media=self._media_doc(planned),
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
        st: _Stat,
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
            return Outcome(path=path, status="skipped", reason=GONE, rule=rule and rule.name, gone=True)
        if after != st:
            return Outcome(path=path, status="retry", reason=CHANGED, rule=rule and rule.name)
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
                rule=rule and rule.name, error=write_exc,
            )  # fmt: skip
        return Outcome(path=path, status="error", reason=message, rule=rule and rule.name, error=exc)

    def _act(
        self, outcome: Outcome, spec: ActionSpec | None, side: Path, root: Path | None, values: dict[str, object]
    ) -> Outcome:
        """Run the rule's on_success/on_error actions; their problems are reported, never raised."""
        if spec is None:
            return outcome
        mirrored = None
        if self.config.sidecar.dir is not None:
            cfg = self.config.sidecar

            def mirrored(media: Path) -> Path:  # the mirrored sidecar follows its file to its new place
                return sidecar.locate(media, suffix=cfg.suffix, mirror=cfg.dir, roots=self._roots)

        result = run_actions(
            spec, path=outcome.path, sidecar=side, root=root, values=values, status=outcome.status, sidecar_for=mirrored
        )
        problems = result.problems
        if result.moved and self.config.sidecar.xmp is not None:
            problems = (*problems, *_move_xmp(outcome.path, result.path, self.config.sidecar.xmp.naming))
        return replace(outcome, moved_to=result.path if result.moved else None, action_problems=problems)


#: Prompt values an image's facts can take, at their longest (pixel counts are capped by limits.max_pixels).
_WIDEST_FACTS: dict[str, object] = {"width": 999_999_999, "height": 999_999_999, "taken": "0000-00-00 00:00:00"}


def _short(said: str) -> str:
    """A server's words as a sidecar records them: one line, at most 120 characters."""
    said = " ".join(said.split())
    return said if len(said) <= 120 else said[:119] + "…"


def _move_xmp(old: Path, new: Path, naming: Literal["name", "stem"]) -> tuple[str, ...]:
    """An XMP sidecar follows its file when ``move_to`` moves it (photo apps look for it beside the file)."""
    from mmwatchd.xmp import xmp_path

    source = xmp_path(old, naming)
    if not os.path.lexists(source):
        return ()
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
