"""One job, start to end: sniff → rule → encode under the byte budget → call the model → sidecar.

``Processor.process`` never raises for a problem with the file or the endpoint: it returns an ``Outcome`` that says
what happened. Permanent problems leave an error sidecar; transient ones leave nothing and ask to be retried.
"""

from __future__ import annotations

import datetime as dt
import os
import stat
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from mmwatchd import __version__, rules, sidecar
from mmwatchd.config import Config, Rule
from mmwatchd.encode import encode_image, probe_image
from mmwatchd.errors import (
    BudgetExceeded,
    ForeignSidecar,
    MediaError,
    MediaTooLarge,
    MmwatchdError,
    SidecarError,
    UnsupportedMedia,
    VLMError,
)
from mmwatchd.media import media_suffix_kind, sniff
from mmwatchd.model import ImageFacts, Part, Reply, VLMRequest
from mmwatchd.vlm import VLMClient, build_body, request_bytes

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

    @property
    def failed(self) -> bool:
        return self.status in ("error", "retry")

    @property
    def retry_after(self) -> float | None:
        return getattr(self.error, "retry_after", None)


@dataclass(frozen=True, slots=True, kw_only=True)
class _Stat:
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> _Stat:
        return cls(size=st.st_size, mtime_ns=st.st_mtime_ns)


@dataclass(frozen=True, slots=True, kw_only=True)
class _Planned:
    rule: Rule
    request: VLMRequest
    facts: ImageFacts
    fingerprint: str


class Processor:
    """Turns paths into outcomes under one config. Thread-safe: it holds no per-job state."""

    def __init__(self, config: Config, client: VLMClient | None, *, clock: Any = time.monotonic) -> None:
        self.config = config
        self.client = client
        self.clock = clock
        self._roots = [r.path for r in config.watch]

    # -- the job ---------------------------------------------------------------------------------------------

    def process(self, path: Path, *, explicit: bool = False, force: bool = False, dry_run: bool = False) -> Outcome:
        """Process one file. ``explicit``: a person named it (so non-media gets an error, not a skip)."""
        started = self.clock()
        path = Path(os.path.abspath(path))
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return Outcome(path=path, status="skipped", reason="file is gone")
        except OSError as exc:
            return Outcome(path=path, status="skipped", reason=f"cannot stat: {exc.strerror or exc}")
        if not stat.S_ISREG(st.st_mode):
            return Outcome(path=path, status="skipped", reason="not a regular file")
        before = _Stat.of(st)
        side = sidecar.sidecar_path(path, self.config.sidecar.suffix)
        rule: Rule | None = None
        fingerprint = ""
        try:
            kind, problem = self._kind(path, before, explicit=explicit)
            if kind is None:
                return Outcome(path=path, status="skipped", reason="not a photo or video")
            _root, rel = rules.rel_to_roots(path, self._roots)
            rule = rules.match(rel, kind, self.config.rules)
            if rule is None:
                return Outcome(path=path, status="skipped", reason=f"no rule matches this {kind}")
            fingerprint = rules.fingerprint(rule, self.config.endpoint)
            if not dry_run and not force:
                existing = sidecar.read(side)
                if existing is not None and sidecar.is_fresh(
                    existing,
                    size=before.size,
                    mtime_ns=before.mtime_ns,
                    fingerprint=fingerprint,
                    sha256=lambda: sidecar.sha256_file(path),
                ):
                    return Outcome(path=path, status="skipped", reason="up to date", rule=rule.name)
            elif not dry_run:
                sidecar.read(side)  # a foreign file there is never replaced, forced or not
            if problem is not None:
                raise problem
            if kind == "video":
                return Outcome(
                    path=path, status="skipped", reason="videos are not described by this version", rule=rule.name
                )
            planned = self._plan(path, rel, rule, before, fingerprint)
            if dry_run:
                return Outcome(
                    path=path,
                    status="planned",
                    rule=rule.name,
                    request_bytes=request_bytes(planned.request),
                    plan=self._describe_plan(path, planned),
                    elapsed_s=self.clock() - started,
                )
            if self.client is None:
                raise RuntimeError("Processor without a client cannot call the endpoint")
            reply = self.client.describe(planned.request)
            after = self._restat(path)
            if after != before:
                return Outcome(
                    path=path,
                    status="retry",
                    reason="the file changed while it was being described; it will be described again",
                    rule=rule.name,
                )
            doc = self._ok_doc(path, planned, before, reply, elapsed=self.clock() - started)
            sidecar.write(side, doc)
            return Outcome(
                path=path,
                status="ok",
                rule=rule.name,
                request_bytes=request_bytes(planned.request),
                elapsed_s=self.clock() - started,
            )
        except ForeignSidecar as exc:
            return Outcome(path=path, status="skipped", reason=exc.message, rule=rule and rule.name, error=exc)
        except (MediaError, VLMError, SidecarError) as exc:
            if exc.retryable:
                return Outcome(
                    path=path, status="retry", reason=exc.message, rule=rule and rule.name, error=exc,
                    elapsed_s=self.clock() - started,
                )  # fmt: skip
            if dry_run:
                return Outcome(path=path, status="error", reason=exc.message, rule=rule and rule.name, error=exc)
            return self._fail(path, side, rule, fingerprint, before, exc, started)

    # -- steps -----------------------------------------------------------------------------------------------

    def _kind(self, path: Path, st: _Stat, *, explicit: bool) -> tuple[str | None, MediaError | None]:
        """The media kind for rule matching, and the problem that stops it being sent, if any.

        The kind comes from the bytes. A file that is not media is skipped, unless its name claims it is a photo or
        video or a person named it: then it gets its rule's error sidecar, saying what it really looks like.
        """
        claimed = media_suffix_kind(path)
        limit = self.config.limits.max_file_bytes
        if st.size > limit:
            kind = claimed or ("image" if explicit else None)
            return kind, MediaTooLarge(f"{path.name}: {st.size} bytes exceeds limits.max_file_bytes ({limit})")
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

    def _plan(self, path: Path, rel: str, rule: Rule, st: _Stat, fingerprint: str) -> _Planned:
        limits = self.config.limits
        facts = probe_image(path, limits=limits)
        values = {
            "name": path.name,
            "stem": path.stem,
            "ext": path.suffix[1:].lower(),
            "folder": path.parent.name,
            "path": str(path),
            "relpath": rel,
            "size_bytes": st.size,
            "kind": "image",
            "width": facts.width,
            "height": facts.height,
            "taken": facts.taken,
        }
        endpoint = self.config.endpoint
        placeholder = Part(mime="image/jpeg", chunks=(b"",), width=0, height=0)
        request = VLMRequest(
            model=rule.model or endpoint.model,
            system=rules.render(rule.system, values) if rule.system else None,
            prompt=rules.render(rule.prompt, values),
            parts=(placeholder,),
            max_tokens=rule.max_tokens or endpoint.max_tokens,
            temperature=rule.temperature if rule.temperature is not None else endpoint.temperature,
            schema=rule.schema,
            schema_name=rule.name.replace(".", "_"),
        )
        overhead = request_bytes(request) - placeholder.url_len
        budget = endpoint.max_request_bytes - overhead
        if budget <= 0:
            raise BudgetExceeded(
                f"{path.name}: the prompt, system text and schema alone take {overhead} bytes, over "
                f"endpoint.max_request_bytes ({endpoint.max_request_bytes}); shorten them or raise the limit"
            )
        part = encode_image(path, rule.image, budget=budget, limits=limits)
        request = replace(request, parts=(part,))
        total = request_bytes(request)
        if total > endpoint.max_request_bytes:  # the encoder's promise, checked: never send an oversize request
            raise BudgetExceeded(
                f"{path.name}: request would be {total} bytes, over endpoint.max_request_bytes "
                f"({endpoint.max_request_bytes})"
            )
        return _Planned(rule=rule, request=request, facts=facts, fingerprint=fingerprint)

    @staticmethod
    def _restat(path: Path) -> _Stat | None:
        try:
            return _Stat.of(os.stat(path))
        except OSError:
            return None

    # -- documents -------------------------------------------------------------------------------------------

    def _media_doc(self, planned: _Planned) -> dict[str, Any]:
        facts = planned.facts
        return {
            "kind": "image",
            "format": facts.format,
            "width": facts.width,
            "height": facts.height,
            "taken": facts.taken or None,
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
        }

    def _header(self, path: Path, st: _Stat, sha256: str | None) -> dict[str, Any]:
        return {
            "mmwatchd": {"version": __version__, "schema": sidecar.SCHEMA},
            "source": {"name": path.name, "size": st.size, "mtime_ns": st.mtime_ns, "sha256": sha256},
        }

    def _ok_doc(self, path: Path, planned: _Planned, st: _Stat, reply: Reply, *, elapsed: float) -> dict[str, Any]:
        doc = self._header(path, st, sidecar.sha256_file(path))
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
        rule: Rule | None,
        fingerprint: str,
        st: _Stat,
        exc: MmwatchdError,
        started: float,
    ) -> Outcome:
        """Record a permanent failure so the file is not retried until it or its rule changes."""
        try:
            sha = sidecar.sha256_file(path)
        except OSError:
            sha = None
        doc = self._header(path, st, sha)
        doc.update(
            status="error",
            rule=rule.name if rule else None,
            model=(rule.model if rule else None) or self.config.endpoint.model,
            fingerprint=fingerprint or None,
            error={"kind": exc.kind, "message": exc.message},
            elapsed_s=round(self.clock() - started, 3),
            created=_now(),
        )
        try:
            sidecar.write(side, doc)
        except SidecarError as write_exc:
            return Outcome(
                path=path, status="retry", reason=f"{exc.message}; and {write_exc.message}",
                rule=rule and rule.name, error=write_exc,
            )  # fmt: skip
        return Outcome(path=path, status="error", reason=exc.message, rule=rule and rule.name, error=exc)


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
