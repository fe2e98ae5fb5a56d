"""The fake VLM with OpenAI's Files and Batches API on top, for batch backfill tests (the real ``openai`` client
talks to it over loopback, as to the fake's chat completions).

    POST /v1/files                   multipart upload (purpose=batch): the JSONL is kept and checked line by line
    POST /v1/batches                 a batch over an uploaded file: status "validating"
    GET  /v1/batches/{id}            validating → in_progress → (after ``polls_to_finish`` looks) completed
    POST /v1/batches/{id}/cancel     cancelling, then cancelled at the next look (nothing answered)
    GET  /v1/files/{id}/content      an output or error file

A completed batch answers each line with what the fake's chat endpoint would answer the same body
(:meth:`FakeVLM._default`), so a file described through a batch and one described online get the same reply. Output
lines come in reverse input order (the real API keeps no order either); ``line_errors`` turns chosen lines into
error-file lines; ``on_finish`` runs just before a batch's answers are made (a test changes a file there).
"""

from __future__ import annotations

import email.parser
import email.policy
import itertools
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fakevlm import FakeVLM, Recorded, Scripted, error_body

__all__ = ["Batch", "FakeBatchVLM"]


@dataclass(slots=True)
class Batch:
    id: str
    input_file_id: str
    metadata: dict[str, str]
    status: str = "validating"
    looks: int = 0
    output_file_id: str | None = None
    error_file_id: str | None = None
    counts: dict[str, int] = field(default_factory=lambda: {"total": 0, "completed": 0, "failed": 0})

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "object": "batch", "endpoint": "/v1/chat/completions", "errors": None,
            "input_file_id": self.input_file_id, "completion_window": "24h", "status": self.status,
            "output_file_id": self.output_file_id, "error_file_id": self.error_file_id, "created_at": int(time.time()),
            "request_counts": dict(self.counts), "metadata": self.metadata,
        }  # fmt: skip


class FakeBatchVLM(FakeVLM):
    def __init__(self, *, polls_to_finish: int = 2, **kw: Any) -> None:
        super().__init__(**kw)
        #: How many looks at an in-progress batch before it completes.
        self.polls_to_finish = polls_to_finish
        #: custom_id → (HTTP status, error body) for lines that fail (they go to the error file).
        self.line_errors: dict[str, tuple[int, Any]] = {}
        #: Lines answered with an error object and no response (as for requests a batch never reached).
        self.line_unanswered: set[str] = set()
        self.on_finish: Callable[[Batch], None] | None = None
        self.files: dict[str, bytes] = {}
        #: Batch lines answered, as requests (the online ones are in ``requests``).
        self.batch_answered: list[Recorded] = []
        self.batches: dict[str, Batch] = {}
        #: Problems found in uploaded shards (a line that is not a Batch API request): tests assert it stays empty.
        self.problems: list[str] = []
        self._ids = itertools.count(1)
        self._batch_lock = threading.Lock()

    def input_lines(self, batch_id: str) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.files[self.batches[batch_id].input_file_id].splitlines()]

    def _default(self, request: Recorded) -> Scripted:
        path = request.path
        with self._batch_lock:
            if request.method == "POST" and path == "/v1/files":
                return self._upload(request)
            if request.method == "POST" and path == "/v1/batches":
                return self._create(request.json)
            if m := re.fullmatch(r"/v1/batches/([\w-]+)(/cancel)?", path):
                batch = self.batches.get(m[1])
                if batch is None:
                    return Scripted(status=404, json=error_body(f"no batch {m[1]}"))
                if m[2] and request.method == "POST":
                    if batch.status in ("validating", "in_progress"):
                        batch.status = "cancelling"
                    return Scripted(json=batch.as_json())
                if request.method == "GET":
                    self._look(batch)
                    return Scripted(json=batch.as_json())
            if request.method == "GET" and (m := re.fullmatch(r"/v1/files/([\w-]+)/content", path)):
                if m[1] not in self.files:
                    return Scripted(status=404, json=error_body(f"no file {m[1]}"))
                return Scripted(text=self.files[m[1]].decode(), content_type="application/octet-stream")
        return super()._default(request)

    def _upload(self, request: Recorded) -> Scripted:
        head = f"Content-Type: {request.headers['content-type']}\r\n\r\n".encode()
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + request.body)
        fields = {part.get_param("name", header="content-disposition"): part for part in message.iter_parts()}
        purpose = fields["purpose"].get_content().strip() if "purpose" in fields else None
        if purpose != "batch":
            return Scripted(status=400, json=error_body(f"purpose must be batch, got {purpose!r}"))
        data = fields["file"].get_payload(decode=True)
        for n, raw in enumerate(data.splitlines(), 1):
            line = json.loads(raw)
            if set(line) != {"custom_id", "method", "url", "body"} or line["method"] != "POST" or \
                    line["url"] != "/v1/chat/completions":  # fmt: skip
                self.problems.append(f"line {n}: {sorted(line)} {line.get('method')} {line.get('url')}")
        file_id = f"file-{next(self._ids)}"
        self.files[file_id] = data
        return Scripted(
            json={
                "id": file_id,
                "object": "file",
                "bytes": len(data),
                "created_at": 0,
                "filename": fields["file"].get_filename(),
                "purpose": "batch",
                "status": "processed",
            }
        )

    def _create(self, body: Any) -> Scripted:
        if body.get("completion_window") != "24h" or body.get("endpoint") != "/v1/chat/completions":
            return Scripted(status=400, json=error_body(f"bad batch: {body}"))
        if body.get("input_file_id") not in self.files:
            return Scripted(status=404, json=error_body("no such input file"))
        batch = Batch(id=f"batch_{next(self._ids)}", input_file_id=body["input_file_id"],
                      metadata=dict(body.get("metadata") or {}))  # fmt: skip
        self.batches[batch.id] = batch
        return Scripted(json=batch.as_json())

    def _look(self, batch: Batch) -> None:
        batch.looks += 1
        if batch.status == "validating":
            batch.status = "in_progress"
        elif batch.status == "cancelling":
            batch.status = "cancelled"
        elif batch.status == "in_progress" and batch.looks > self.polls_to_finish:
            self._finish(batch)

    def _finish(self, batch: Batch) -> None:
        if self.on_finish is not None:
            self.on_finish(batch)
        out, errors = [], []
        lines = [json.loads(line) for line in self.files[batch.input_file_id].splitlines()]
        for line in reversed(lines):  # not in input order
            cid = line["custom_id"]
            if cid in self.line_unanswered:
                errors.append(
                    {
                        "id": f"req_{cid}",
                        "custom_id": cid,
                        "response": None,
                        "error": {"code": "batch_expired", "message": "This request could not be executed."},
                    }
                )
                continue
            if cid in self.line_errors:
                status, body = self.line_errors[cid]
                errors.append(
                    {
                        "id": f"req_{cid}",
                        "custom_id": cid,
                        "response": {"status_code": status, "request_id": cid, "body": body},
                        "error": None,
                    }
                )
                continue
            fake = Recorded(method="POST", path="/v1/chat/completions", headers={}, body=b"",
                            json=line["body"], content_length=None)  # fmt: skip
            self.batch_answered.append(fake)
            answer = FakeVLM._default(self, fake)
            out.append({"id": f"req_{cid}", "custom_id": cid,
                        "response": {"status_code": answer.status, "request_id": cid, "body": answer.json},
                        "error": None})  # fmt: skip
        batch.counts = {"total": len(lines), "completed": len(out), "failed": len(errors)}
        if out:
            batch.output_file_id = f"file-{next(self._ids)}"
            self.files[batch.output_file_id] = b"".join(json.dumps(o).encode() + b"\n" for o in out)
        if errors:
            batch.error_file_id = f"file-{next(self._ids)}"
            self.files[batch.error_file_id] = b"".join(json.dumps(e).encode() + b"\n" for e in errors)
        batch.status = "completed"
