"""Batch backfill: a large backlog through the OpenAI-compatible Batch API, or through engines that run the same
JSONL without an API (``vllm run-batch``, Ray Data), instead of one request per file (issue 14).

The files are the ones a scan would send (:meth:`Daemon.needing_work`); each becomes one JSONL line whose body is
exactly the online request (:meth:`Pipeline.prepare`: the same encoders under the same budget proof), and each answer
is applied as the online path applies its own (:meth:`Pipeline.apply`: the same sidecar, XMP sidecar, actions, and
error classification). What ties the two halves together, across restarts and days, is the state store: every shard
and, per line, the file, the version and hash its request was made from, and the sidecar's record of the request.

    needing_work ─▶ prepare ─▶ shards (≤ max_requests lines, ≤ max_file_bytes) ─▶ upload ─▶ batch ─▶ poll
                                    │ (--export DIR: written for vllm run-batch / Ray)                │
                                    ▼                                                                 ▼
                              state store ◀──────────── apply by custom_id (any order) ◀─── output + error files
                                                              │
                   files that changed, refusals the online path learns from, busy/unanswered lines ─▶ online path
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from mmwatchd.errors import (
    ConfigError,
    MmwatchdError,
    VLMBadReply,
    VLMError,
    VLMRejected,
    VLMUnavailable,
)
from mmwatchd.log import get_logger
from mmwatchd.metrics import endpoint_name
from mmwatchd.model import Config, EndpointConfig
from mmwatchd.pipeline import Outcome, Prepared
from mmwatchd.servers import is_image_refusal, is_video_format_refusal
from mmwatchd.state import CLOSED_SHARDS, HOLDING_SHARDS, OPEN_SHARDS, WRITING, BatchItem, BatchRow, abandoned

if TYPE_CHECKING:
    from mmwatchd.daemon import Daemon
    from mmwatchd.model import Reply
    from mmwatchd.vlm import VLMClient

log = get_logger()

#: Where every Batch API line goes, and the only kind of request a shard holds.
URL = "/v1/chat/completions"
#: The API's statuses after which nothing more happens to a batch (its files are there, or never will be).
REMOTE_DONE = frozenset({"completed", "failed", "expired", "cancelled"})


def choose_endpoint(config: Config, name: str | None) -> EndpointConfig:
    """The endpoint a backfill uses: ``--endpoint NAME`` or the default. The one place that picks it (named
    endpoints will be looked up here)."""
    default = endpoint_name(config)
    if name is not None and name != default:
        raise ConfigError(
            f"--endpoint {name}: no endpoint of that name; this config has one endpoint, {default!r} "
            f"(endpoint: in {config.source or 'the config'})"
        )
    return config.endpoint


@dataclass(slots=True)
class Summary:
    """What a backfill did, for the command's last lines."""

    batched: int = 0
    shards: list[Path] = field(default_factory=list)
    outcomes: dict[str, int] = field(default_factory=dict)
    #: Files handed to the online path (and, for export/import, left for ``mmwatchd scan``).
    online: list[Path] = field(default_factory=list)
    #: Lines of an imported output file that belong to no shard this state store knows.
    unknown: int = 0
    #: Shards ``--import`` or ``--cancel`` left alone: another backfill was acting on them at the time.
    busy: list[str] = field(default_factory=list)

    def count(self, status: str) -> None:
        self.outcomes[status] = self.outcomes.get(status, 0) + 1


class _ShardWriter:
    """Cuts lines into shards of at most ``max_requests`` lines and ``max_file_bytes`` bytes.

    A shard is recorded in the state store as it opens (:data:`~mmwatchd.state.WRITING`, its file locked while this
    process writes it) and each line as it is written, while the line's file is still claimed: from then on the
    online path elsewhere (the service, a scan) leaves that file to the backfill. A closed shard gets its status
    (``written``, ``exported``) and may be sent; one whose writer died is dropped by the next backfill.
    """

    def __init__(self, backfill: Backfill, folder: Path, mode: str) -> None:
        self.backfill = backfill
        self.state = backfill.state
        self.folder = folder
        self.mode = mode
        self.limits = backfill.config.batch
        self.closed: list[BatchRow] = []
        self._file: BinaryIO | None = None
        self._row: BatchRow | None = None
        self._lines = 0
        self._bytes = 0

    def add(self, prepared: Prepared) -> bool:
        """Write and record one request; False when it is too large for any shard (the online path takes it)."""
        if self._row is not None and self._lines >= self.limits.max_requests:
            self.close()
        custom_id = f"{self._open().id}-{self._lines:05d}"
        line = _line(custom_id, prepared.body)
        if self._bytes + len(line) > self.limits.max_file_bytes and self._lines:
            self.close()
            custom_id = f"{self._open().id}-00000"
            line = _line(custom_id, prepared.body)
        if len(line) > self.limits.max_file_bytes:
            return False
        assert self._file is not None and self._row is not None
        self._file.write(line)
        self._bytes += len(line)
        self._lines += 1
        size, mtime_ns, ino, ctime_ns = prepared.identity
        self.state.add_batch_items(self._row.id, [BatchItem(
            custom_id, self._row.id, prepared.path, size, mtime_ns, ino, ctime_ns, prepared.sha256,
            prepared.fingerprint, prepared.record(),
        )])  # fmt: skip
        return True

    def _open(self) -> BatchRow:
        if self._row is None:
            now = self.backfill.now()
            stamp = dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y%m%d-%H%M%S")
            batch_id = f"mmw-{stamp}-{secrets.token_hex(3)}"
            shard = self.folder / f"{batch_id}.jsonl"
            self.folder.mkdir(parents=True, exist_ok=True)
            self._file = open(shard, "xb")  # noqa: SIM115 -- closed by close(), once the shard is full or done
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX)  # held until closed: see state.shard_being_written
            self._row = BatchRow(
                id=batch_id, mode=self.mode, endpoint=self.backfill.endpoint_label, shard=str(shard), requests=0,
                bytes=0, status=WRITING, remote_id=None, input_file_id=None, output_file_id=None, error_file_id=None,
                message=None, created=now, updated=now,
            )  # fmt: skip
            self.state.add_batch(self._row, [])
        return self._row

    def close(self) -> None:
        if self._row is None or self._file is None:
            return
        row, shard = self._row, self._file
        self._file, self._row = None, None
        lines, self._lines, nbytes, self._bytes = self._lines, 0, self._bytes, 0
        try:
            if not lines:  # every line so far was too large for any shard
                self.state.drop_batch(row.id)
                Path(row.shard).unlink()
                return
            shard.flush()
            os.fsync(shard.fileno())
            status = "written" if self.mode == "api" else "exported"
            self.state.close_shard(row.id, status=status, requests=lines, nbytes=nbytes)
        finally:
            shard.close()  # and its lock
        row = replace(row, status=status, requests=lines, bytes=nbytes)
        log.info("batch.shard_written", batch=row.id, shard=row.shard, requests=row.requests, bytes=row.bytes)
        self.closed.append(row)


class Backfill:
    """One backfill over a one-shot daemon (its config, state store, client, processor, online path, metrics).

    ``sleep`` waits between polls (tests inject one that does not sleep); ``now`` is the wall clock shards are
    stamped with. A second Backfill over the same state store (a restart) picks up where the first stopped.
    """

    def __init__(
        self,
        daemon: Daemon,
        *,
        endpoint: str | None = None,
        sleep: Callable[[float], None] = time.sleep,
        now: Callable[[], float] = time.time,
        shard_dir: Path | None = None,
    ) -> None:
        if daemon.state is None:
            raise ValueError("a backfill keeps its batches in the state store: the daemon needs one")
        self.daemon = daemon
        self.config = daemon.config
        self.state = daemon.state
        self.endpoint = choose_endpoint(self.config, endpoint)
        self.endpoint_label = endpoint or endpoint_name(self.config)
        self.sleep = sleep
        self.now = now
        self.shard_dir = shard_dir or Path(self.state.path).parent / "batches"
        self.summary = Summary()

    @property
    def client(self) -> VLMClient:
        return self.daemon.client

    # -- the commands --------------------------------------------------------------------------------------------

    def run(self, *, wait: bool = True) -> Summary:
        """``backfill --batch``: resume the batches under way, send the rest of the backlog as new batches, wait for
        all of them (``wait``), apply their answers, and describe what they could not answer the online way."""
        self.poll(wait=False)
        self.write_shards(self.shard_dir, mode="api")
        for row in self._open("written"):  # new shards, and any a stopped run wrote but did not send
            if row.endpoint == self.endpoint_label:
                self._submit(row)
        if wait:
            self.poll(wait=True)
        self.describe_online()
        return self.summary

    def export(self, folder: Path) -> Summary:
        """``backfill --export DIR``: write the shards for an engine that runs them without an API."""
        self.write_shards(folder, mode="export")
        return self.summary

    def import_outputs(self, outputs: Iterable[Path]) -> Summary:
        """``backfill --import OUT...``: apply an engine's output lines (``vllm run-batch -o``, Ray Data), matched to
        their shards' lines by custom_id."""
        lines: list[dict[str, Any]] = []
        for path in outputs:
            lines += _read_lines(path.read_bytes(), str(path))
        known = self.state.batch_items(custom_ids=[str(line.get("custom_id")) for line in lines])
        self.summary.unknown = sum(1 for line in lines if str(line.get("custom_id")) not in known)
        batches = {item.batch for item in known.values()}
        for row in self.state.batches():
            if row.id not in batches or row.status in CLOSED_SHARDS:
                continue
            with self.state.batch_lease(row.id) as now:
                if now is None:
                    self._busy(row)
                elif now.status not in CLOSED_SHARDS:  # not applied meanwhile
                    items = self.state.batch_items(now.id)
                    self._apply(now, items, [line for line in lines if line.get("custom_id") in items], "imported")
        return self.summary

    def cancel(self) -> list[BatchRow]:
        """``backfill --cancel``: cancel every batch under way (what they answered before is still applied by the
        next ``backfill --batch``), and drop exported shards not imported yet; their files are free for the next
        backfill or scan."""
        self._drop_abandoned()
        done = []
        for row in self.state.batches():
            if row.status in CLOSED_SHARDS or row.status == WRITING:  # WRITING: another backfill's, not ours
                continue
            with self.state.batch_lease(row.id) as now:
                if now is None:
                    self._busy(row)
                elif self._cancel(now):
                    done.append(now)
        return done

    def _cancel(self, row: BatchRow) -> bool:
        """Cancel one shard as it is recorded now; False when there is nothing left to cancel (it was applied or
        cancelled meanwhile, or its batch has finished)."""
        if row.status in CLOSED_SHARDS:
            return False
        if row.remote_id is None:
            self.state.update_batch(row.id, status="dropped", message="cancelled before it was sent")
            self.state.forget_batch_items(row.id)
            if row.mode == "api":
                Path(row.shard).unlink(missing_ok=True)
            return True
        if row.mode == "api" and row.status not in REMOTE_DONE:
            batch = self.client.cancel_batch(row.remote_id)
            self.state.update_batch(row.id, status=str(batch.get("status") or "cancelling"))
            return True
        return False

    def _busy(self, row: BatchRow) -> None:
        log.info("batch.busy", batch=row.id, note="another backfill is sending, applying or cancelling it")
        self.summary.busy.append(row.id)

    # -- planning ------------------------------------------------------------------------------------------------

    def write_shards(self, folder: Path, *, mode: str) -> list[BatchRow]:
        """Prepare every file a scan would send and write them into shards; files the online path must take are
        noted in the summary, files found up to date are recorded as a scan would record them."""
        self._drop_abandoned()
        # Files in a shard still out (or being written by another backfill), and files this run already hands to
        # the online path (a batch that expired or was cancelled before answering them), are not batched again.
        busy = self.state.batched_paths(HOLDING_SHARDS) | {str(p) for p in self.summary.online}
        writer = _ShardWriter(self, folder, mode)
        try:
            todo = (path for path in self.daemon.needing_work() if str(path) not in busy)
            for prepared in self._prepare_all(todo):
                path = prepared.path
                if isinstance(prepared, Outcome):
                    self._prepared_outcome(prepared)
                    continue
                try:
                    if writer.add(prepared):
                        self.summary.batched += 1
                    else:
                        log.info("batch.too_large", path=str(path), request_bytes=prepared.request_bytes)
                        self.summary.online.append(path)
                finally:
                    prepared.release()  # recorded in its shard, or left to the online path
        finally:
            writer.close()
        self.summary.shards += [Path(row.shard) for row in writer.closed]
        return writer.closed

    def _prepare_all(self, paths: Iterator[Path]) -> Iterator[Prepared | Outcome]:
        """Each file's request, in walk order, encoded by as many decoder processes at once as the daemon has (a
        window of them in memory at a time: each holds its base64)."""
        processor = self.daemon.processor
        workers = max(1, self.daemon.isolator.workers)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mmwatchd-prepare") as pool:
            window: deque[Future[Prepared | Outcome]] = deque()
            try:
                for path in paths:
                    window.append(pool.submit(processor.prepare, path))
                    if len(window) >= 2 * workers:
                        yield window.popleft().result()
                while window:
                    yield window.popleft().result()
            finally:  # left early (an error, a stop): the files prepared meanwhile are not claimed any longer
                for future in window:
                    if future.cancel() or future.exception() is not None:
                        continue
                    if isinstance(result := future.result(), Prepared):
                        result.release()

    def _drop_abandoned(self) -> None:
        """Shards a backfill was writing when it was killed: incomplete, never sent, holding nothing (the online
        path already ignores them); forgotten, with their files."""
        for row in self._open(WRITING):
            if abandoned(row):
                log.info("batch.abandoned_shard_dropped", batch=row.id, shard=row.shard)
                self.state.drop_batch(row.id)
                Path(row.shard).unlink(missing_ok=True)

    def _prepared_outcome(self, outcome: Outcome) -> None:
        if outcome.status == "retry":
            log.info("batch.online", path=str(outcome.path), reason=outcome.reason)
            self.summary.online.append(outcome.path)
        else:
            self.daemon.finish(outcome)  # up to date, not media, no rule: recorded as a scan records them

    # -- the Batch API -------------------------------------------------------------------------------------------

    def _submit(self, row: BatchRow) -> None:
        """Upload a shard and create its batch, recording each step as it is taken (an upload whose batch was not
        created is uploaded again after a restart; the orphan file expires on the API's side). Not while another
        backfill does, nor after: each shard becomes one batch."""
        with self.state.batch_lease(row.id) as now:
            if now is None:  # being sent by another backfill; once it is, the polls below see it
                log.info("batch.busy", batch=row.id, note="another backfill is sending it")
            elif now.status == "written":
                self._send(now)

    def _send(self, row: BatchRow) -> None:
        file_id = self.client.upload_batch(Path(row.shard))
        self.state.update_batch(row.id, input_file_id=file_id)
        batch = self.client.create_batch(file_id, metadata={"mmwatchd_batch": row.id})
        self.state.update_batch(row.id, remote_id=str(batch["id"]), status=str(batch.get("status") or "submitted"))
        log.info("batch.created", batch=row.id, remote_id=batch["id"], requests=row.requests)

    def poll(self, *, wait: bool) -> None:
        """Ask how each batch under way is doing; apply those that are done. ``wait``: until none is left,
        asking every ``batch.poll_interval_s``."""
        while True:
            pending = 0
            for row in self._open():
                if row.mode != "api" or row.remote_id is None or row.endpoint != self.endpoint_label:
                    continue
                with self.state.batch_lease(row.id) as now:
                    if now is None:  # another backfill is looking at it or applying it: ask again next time
                        pending += 1
                    elif now.status in OPEN_SHARDS and now.remote_id is not None:  # not applied meanwhile
                        pending += self._look(now, now.remote_id)
            if not wait or not pending:
                return
            self.sleep(self.config.batch.poll_interval_s)

    def _look(self, row: BatchRow, remote_id: str) -> bool:
        """Ask how one batch is doing, and apply it once it is done; True while it is still under way."""
        try:
            batch = self.client.get_batch(remote_id)
        except VLMUnavailable as exc:  # a blip in a wait of hours: ask again at the next interval
            log.warning("batch.poll_failed", batch=row.id, remote_id=remote_id, reason=exc.message)
            return True
        status = str(batch.get("status"))
        if status != row.status:
            log.info("batch.status", batch=row.id, remote_id=remote_id, status=status,
                     counts=batch.get("request_counts"))  # fmt: skip
            self.state.update_batch(
                row.id, status=status, output_file_id=batch.get("output_file_id"),
                error_file_id=batch.get("error_file_id"), message=_errors(batch),
            )  # fmt: skip
        if status not in REMOTE_DONE:
            return True
        self._collect(row, batch, status)
        return False

    def _collect(self, row: BatchRow, batch: dict[str, Any], status: str) -> None:
        """Download a finished batch's output and error files and apply them."""
        lines: list[dict[str, Any]] = []
        for key in ("output_file_id", "error_file_id"):
            file_id = batch.get(key)
            if file_id:
                lines += _read_lines(self.client.file_content(str(file_id)), f"{row.id} {key} {file_id}")
        self._apply(row, self.state.batch_items(row.id), lines, status)

    # -- applying answers ----------------------------------------------------------------------------------------

    def _apply(self, row: BatchRow, items: dict[str, BatchItem], lines: list[dict[str, Any]], status: str) -> None:
        """Apply each line to its file by custom_id (the output is in no particular order); files without a usable
        answer go to the online path. Then the shard is closed and its lines forgotten."""
        counts: dict[str, int] = {}
        answered: set[str] = set()
        for line in lines:
            custom_id = str(line.get("custom_id"))
            item = items.get(custom_id)
            if item is None or custom_id in answered:
                continue
            answered.add(custom_id)
            became = self._apply_line(item, line)
            counts[became] = counts.get(became, 0) + 1
        for custom_id, item in items.items():
            if custom_id not in answered:  # expired, cancelled or failed before its turn
                self.summary.online.append(item.path)
                counts["online"] = counts.get("online", 0) + 1
        message = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        self.state.update_batch(row.id, status="applied", message=f"{status}: {message}" if message else status)
        self.state.forget_batch_items(row.id)
        if row.mode == "api":  # uploaded and answered: our copy is of no more use (exported ones are the user's)
            Path(row.shard).unlink(missing_ok=True)
        log.info("batch.applied", batch=row.id, **counts)

    def _apply_line(self, item: BatchItem, line: dict[str, Any]) -> str:
        prepared = Prepared.from_record(
            item.path, item.record, identity=(item.size, item.mtime_ns, item.ino, item.ctime_ns), sha256=item.sha256
        )
        answer = self._answer(prepared, line)
        if isinstance(answer, VLMError) and _online_first(answer):
            log.info("batch.online", path=str(item.path), reason=answer.message)
            self.summary.online.append(item.path)
            return "online"
        outcome = self.daemon.processor.apply(prepared, answer)
        if outcome.status == "retry":
            log.info("batch.online", path=str(item.path), reason=outcome.reason)
            self.summary.online.append(item.path)
            return "online"
        if outcome.status == "ok" and not isinstance(answer, MmwatchdError):
            self.daemon.metrics.replied(answer)
        self.daemon.finish(outcome)
        self.summary.count(outcome.status)
        return outcome.status

    def _answer(self, prepared: Prepared, line: dict[str, Any]) -> Reply | MmwatchdError:
        """A line as the online path would have had it: a Reply, or the error the same HTTP answer raises there."""
        response = line.get("response")
        if isinstance(response, dict) and isinstance(response.get("status_code"), int):
            status, body = int(response["status_code"]), response.get("body")
            if status == 200:
                rule = next((r for r in self.config.rules if r.name == prepared.rule), None)
                try:
                    return self.client.reply_from(body, model=prepared.model, schema=rule.schema if rule else None)
                except VLMBadReply as exc:
                    return exc
            # vLLM's run-batch leaves the body empty and puts its ErrorResponse (or a plain message) under "error".
            said = body or line.get("error")
            return self.client.error_from(status, {"message": said} if isinstance(said, str) else said)
        error = line.get("error")
        said = error.get("message") if isinstance(error, dict) else error
        unanswered = VLMUnavailable(f"the batch did not answer this request: {said or 'no reason given'}")
        unanswered.status = None
        return unanswered

    # -- the online path -----------------------------------------------------------------------------------------

    def describe_online(self) -> None:
        """Describe the files a batch could not answer one request each, as a scan does (same attempts, same
        records)."""
        if not self.summary.online:
            return
        daemon = self.daemon
        daemon.isolator.prestart()
        daemon.probe_once()  # an endpoint that is down is reported once, not per file
        daemon.start(prober=False)
        self.daemon.submit_all(dict.fromkeys(self.summary.online), scanned=True)
        self.daemon.wait_idle()

    # -- reading -------------------------------------------------------------------------------------------------

    def _open(self, *statuses: str) -> list[BatchRow]:
        wanted = statuses or OPEN_SHARDS
        return [row for row in self.state.batches() if row.status in wanted]


def _online_first(error: VLMError) -> bool:
    """An error answer the online path handles better than an error sidecar: busy or unanswered (it retries), a
    reply it would have asked for once more, and refusals it learns from (passthrough types, video_url)."""
    if isinstance(error, VLMUnavailable | VLMBadReply):
        return True
    if isinstance(error, VLMRejected):
        return is_image_refusal(error.status, error.server_message) or is_video_format_refusal(
            error.status, error.server_message
        )
    return False


def _line(custom_id: str, body: dict[str, Any]) -> bytes:
    """One Batch API request line. Compact JSON without ASCII escapes, as the SDK sends a body."""
    line = {"custom_id": custom_id, "method": "POST", "url": URL, "body": body}
    return json.dumps(line, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def _read_lines(data: bytes, where: str) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL output or error file; a line that is not one is named and skipped."""
    out = []
    for n, raw in enumerate(data.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except ValueError as exc:
            log.warning("batch.bad_line", file=where, line=n, reason=str(exc))
            continue
        if isinstance(line, dict):
            out.append(line)
    return out


def _errors(batch: dict[str, Any]) -> str | None:
    """The API's words about a batch that failed as a whole (validation), one line."""
    errors = batch.get("errors")
    data = errors.get("data") if isinstance(errors, dict) else None
    if not data:
        return None
    return "; ".join(str(e.get("message") if isinstance(e, dict) else e) for e in data)[:500]


def render_status(rows: Iterable[BatchRow], items: Callable[[str], int]) -> Iterator[str]:
    """``backfill --status``: one line per shard."""
    any_rows = False
    for row in rows:
        any_rows = True
        created = dt.datetime.fromtimestamp(row.created, dt.UTC).strftime("%Y-%m-%d %H:%M")
        waiting = items(row.id)
        remote = row.remote_id or "-"
        parts = [f"{row.id}  {row.mode:<6} {row.status:<11} {row.requests:>6} requests  {row.bytes:>11} bytes",
                 f"created {created}Z", f"remote {remote}"]  # fmt: skip
        if waiting and row.status not in CLOSED_SHARDS:
            parts.append(f"{waiting} files waiting")
        if row.message:
            parts.append(row.message)
        if abandoned(row):
            parts.append("abandoned (its backfill stopped while writing it): the next backfill drops it")
        yield "  ".join(parts)
        if row.mode == "export" and row.status == "exported":
            yield f"    run it: vllm run-batch -i {row.shard} -o OUT.jsonl --model MODEL; then backfill --import OUT.jsonl"
    if not any_rows:
        yield "no batches yet"
