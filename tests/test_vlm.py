"""mmwatchd.vlm against a real HTTP server (tests/fakevlm.py) through the real openai client."""

from __future__ import annotations

import email.utils
import json
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
from fakevlm import FakeVLM, chat_completion, error_body
from hypothesis import HealthCheck, given, settings, strategies as st

from mmwatchd.errors import VLMBadReply, VLMMisconfigured, VLMRejected, VLMUnavailable
from mmwatchd.model import EndpointConfig, Part, VLMRequest
from mmwatchd.vlm import NO_KEY, VLMClient
from mmwatchd.wire import budget_for_parts, build_body, build_messages, redact, request_bytes

SHARED = Path(__file__).resolve().parents[2] / "shared"
SPEC = SHARED / "openai-spec" / "chat-completions-request.schema.json"

KEY = "sk-test-5ecret-Key-0123456789"
KEY_ENV = "MMW_TEST_KEY"
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "caption": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["caption", "tags"],
    "additionalProperties": False,
}


def blob(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def image(n: int = 600, *, seed: int = 0, mime: str = "image/jpeg") -> Part:
    return Part(mime=mime, chunks=(blob(n, seed),), width=64, height=48)


def video(frames: int = 3, n: int = 400) -> Part:
    chunks = tuple(blob(n, seed=100 + i) for i in range(frames))
    return Part(type="video_url", mime="video/jpeg", chunks=chunks, width=56, height=56)


def request(**overrides: Any) -> VLMRequest:
    fields: dict[str, Any] = {
        "model": "fake-vlm",
        "system": None,
        "prompt": "Describe this photo.",
        "parts": (image(),),
        "max_tokens": 64,
    }
    fields.update(overrides)
    return VLMRequest(**fields)


def endpoint(fake: FakeVLM, **overrides: Any) -> EndpointConfig:
    fields: dict[str, Any] = {
        "base_url": fake.base_url,
        "model": "fake-vlm",
        "api_key_env": KEY_ENV,
        "timeout_s": 5.0,
        "max_retries": 0,
    }
    fields.update(overrides)
    return EndpointConfig(**fields)


@pytest.fixture
def client(fake_vlm: FakeVLM) -> Iterator[VLMClient]:
    with VLMClient(endpoint(fake_vlm), api_key=KEY) as vlm:
        yield vlm


def b64(part: Part) -> str:
    return part.url().split(",", 1)[1]


class TestBuild:
    def test_text_first_then_parts_in_order(self) -> None:
        first, second, clip = image(seed=1), image(seed=2, mime="image/png"), video()
        messages = build_messages(request(parts=(first, second, clip)))
        assert [m["role"] for m in messages] == ["user"]
        content = messages[0]["content"]
        assert content == [
            {"type": "text", "text": "Describe this photo."},
            {"type": "image_url", "image_url": {"url": first.url()}},
            {"type": "image_url", "image_url": {"url": second.url()}},
            {"type": "video_url", "video_url": {"url": clip.url()}},
        ]
        assert content[3]["video_url"]["url"].startswith("data:video/jpeg;base64,")
        assert content[3]["video_url"]["url"].count(",") == 3  # the prefix's comma and one between each frame

    def test_system_message_is_optional(self) -> None:
        assert build_messages(request(system="You are terse."))[0] == {"role": "system", "content": "You are terse."}
        assert [m["role"] for m in build_messages(request(system=None))] == ["user"]

    def test_body_fields(self) -> None:
        body = build_body(request())
        assert set(body) == {"model", "messages", "max_tokens"}
        body = build_body(request(temperature=0.2, schema=SCHEMA, schema_name="photo"))
        assert body["temperature"] == 0.2
        assert body["response_format"] == {"type": "json_schema", "json_schema": {"name": "photo", "schema": SCHEMA}}

    def test_without_payload_every_url_is_empty(self) -> None:
        body = build_body(request(parts=(image(), video())), with_payload=False)
        urls = [p[p["type"]]["url"] for p in body["messages"][-1]["content"] if p["type"] != "text"]
        assert urls == ["", ""]

    def test_lone_surrogates_become_replacement_characters(self) -> None:
        name = b"caf\xe9.jpg".decode("utf-8", "surrogateescape")
        text = build_messages(request(prompt=f"File {name}"))[-1]["content"][0]["text"]
        assert text == "File caf\ufffd.jpg"
        text.encode("utf-8")

    def test_budget_counts_the_pending_parts_wrappers(self) -> None:
        fixed = request(parts=(image(300, seed=7),))
        new = image(5000, seed=8)
        budget = budget_for_parts(fixed, 20_000)
        # A pending part whose URL is exactly the budget would fill the request to the byte.
        assert request_bytes(request(parts=(*fixed.parts, new))) == 20_000 - budget + new.url_len
        two = budget_for_parts(fixed, 20_000, pending=("image_url", "video_url"))
        assert two < budget
        assert budget_for_parts(fixed, 10) < 0


class TestRedact:
    def test_replaces_payloads_everywhere(self) -> None:
        part, clip = image(900), video(frames=2, n=30)
        body = build_body(request(parts=(part, clip), system="sys"))
        red = redact(body)
        assert body["messages"][-1]["content"][1]["image_url"]["url"] == part.url()  # a copy: original untouched
        text = json.dumps(red)
        assert b64(part) not in text and b64(clip) not in text
        urls = [p[p["type"]]["url"] for p in red["messages"][-1]["content"][1:]]
        assert urls == [
            f"data:image/jpeg;base64,…({len(b64(part))} bytes)",
            f"data:video/jpeg;base64,…({len(b64(clip))} bytes)",
        ]

    def test_inside_longer_strings_and_containers(self) -> None:
        url = image(60).url()
        red = redact({"error": (f"bad image {url} at index 1", [url]), "n": 3})
        short = "data:image/jpeg;base64,…(80 bytes)"
        assert red == {"error": (f"bad image {short} at index 1", [short]), "n": 3}


class TestDescribe:
    def test_request_on_the_wire(self, fake_vlm: FakeVLM, client: VLMClient) -> None:
        req = request(system="Be brief.", parts=(image(seed=1), image(seed=2), video()), temperature=0.0)
        reply = client.describe(req)
        (sent,) = fake_vlm.chat_requests
        assert sent.json == build_body(req)
        assert [p["type"] for p in sent.content] == ["text", "image_url", "image_url", "video_url"]
        assert sent.headers["authorization"] == f"Bearer {KEY}"
        assert reply.text == "saw 2 images and 1 videos"
        assert reply.source == "content" and reply.attempts == 1 and reply.finish_reason == "stop"
        assert reply.usage == {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
        assert reply.model == "fake-vlm" and reply.data is None and reply.latency_s > 0

    def test_json_schema_reply_is_parsed_and_validated(self, fake_vlm: FakeVLM, client: VLMClient) -> None:
        reply = client.describe(request(schema=SCHEMA, schema_name="photo"))
        assert fake_vlm.chat_requests[0].json["response_format"]["json_schema"]["name"] == "photo"
        assert reply.data == {"caption": "saw 1 images and 0 videos", "tags": ["tags-1"]}
        assert json.loads(reply.text) == reply.data

    @pytest.mark.parametrize(
        "text",
        [
            '```json\n{"caption": "a cat", "tags": ["cat"]}\n```',
            '```\n{"caption": "a cat", "tags": ["cat"]}```',
            'Here you go:\n```json\n{"caption": "a cat", "tags": ["cat"]}\n```\nAnything else?',
            '<think>It looks like a cat.</think>\n{"caption": "a cat", "tags": ["cat"]}',
        ],
    )
    def test_fences_are_stripped(self, fake_vlm: FakeVLM, client: VLMClient, text: str) -> None:
        fake_vlm.enqueue(json=chat_completion(text))
        reply = client.describe(request(schema=SCHEMA))
        assert reply.data == {"caption": "a cat", "tags": ["cat"]} and reply.attempts == 1

    def test_invalid_json_is_asked_once_more_then_bad_reply(self, fake_vlm: FakeVLM, client: VLMClient) -> None:
        for _ in range(3):
            fake_vlm.enqueue(json=chat_completion("A cat on a sofa " + image(300).url()))
        with pytest.raises(VLMBadReply) as caught:
            client.describe(request(schema=SCHEMA))
        assert len(fake_vlm.chat_requests) == 2
        assert fake_vlm.chat_requests[0].body == fake_vlm.chat_requests[1].body
        message = caught.value.message
        assert "not valid JSON" in message and "A cat on a sofa" in message
        assert "data:image/jpeg;base64,…(400 bytes)" in message

    def test_second_attempt_can_succeed(self, fake_vlm: FakeVLM, client: VLMClient) -> None:
        fake_vlm.enqueue(json=chat_completion('{"caption": "cut off', finish_reason="length"))
        reply = client.describe(request(schema=SCHEMA))
        assert reply.attempts == 2 and reply.data["tags"] == ["tags-1"]

    def test_truncated_reply_says_raise_max_tokens(self, fake_vlm: FakeVLM, client: VLMClient) -> None:
        for _ in range(2):
            fake_vlm.enqueue(json=chat_completion('{"caption": "cut off', finish_reason="length"))
        with pytest.raises(VLMBadReply, match=r"raise endpoint.max_tokens"):
            client.describe(request(schema=SCHEMA))

    def test_schema_mismatch(self, fake_vlm: FakeVLM, client: VLMClient) -> None:
        for _ in range(2):
            fake_vlm.enqueue(json=chat_completion('{"caption": "a cat", "tags": "cat"}'))
        with pytest.raises(VLMBadReply, match=r"does not match the schema: at \$\.tags: 'cat' is not of type 'array'"):
            client.describe(request(schema=SCHEMA))
        assert len(fake_vlm.chat_requests) == 2

    def test_empty_reply_is_asked_once_more(self, fake_vlm: FakeVLM, client: VLMClient) -> None:
        fake_vlm.enqueue(json=chat_completion(""))
        fake_vlm.enqueue(json=chat_completion(None))
        with pytest.raises(VLMBadReply, match="the reply is empty"):
            client.describe(request())
        assert len(fake_vlm.chat_requests) == 2

    @pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
    def test_reasoning_fallback(self, fake_vlm: FakeVLM, client: VLMClient, field: str) -> None:
        answer = '{"caption": "a dog", "tags": []}'
        fake_vlm.enqueue(json=chat_completion(None, **{field: answer}))
        reply = client.describe(request(schema=SCHEMA))
        assert reply.source == field and reply.text == answer and reply.data == {"caption": "a dog", "tags": []}

    def test_content_wins_over_reasoning(self, fake_vlm: FakeVLM, client: VLMClient) -> None:
        fake_vlm.enqueue(json=chat_completion("the answer", reasoning_content="thinking..."))
        reply = client.describe(request())
        assert (reply.text, reply.source) == ("the answer", "content")

    def test_lone_surrogates_reach_the_server(self, fake_vlm: FakeVLM, client: VLMClient) -> None:
        client.describe(request(prompt="File " + b"\xff.jpg".decode("utf-8", "surrogateescape")))
        assert fake_vlm.chat_requests[0].json["messages"][-1]["content"][0]["text"] == "File \ufffd.jpg"


class TestErrors:
    def test_429_with_retry_after_seconds(self, fake_vlm: FakeVLM, client: VLMClient) -> None:
        fake_vlm.enqueue(status=429, json=error_body("Rate limit reached"), headers={"Retry-After": "7"})
        with pytest.raises(VLMUnavailable) as caught:
            client.describe(request())
        assert caught.value.retry_after == 7.0  # type: ignore[attr-defined]
        assert caught.value.retryable
        assert "HTTP 429): Rate limit reached; the server asks to retry after 7 s" in caught.value.message

    @pytest.mark.parametrize(
        ("headers", "expected"),
        [({"retry-after-ms": "1500"}, 1.5), ({"Retry-After": "0"}, 0.0), ({"Retry-After": "soon"}, None), ({}, None)],
    )
    def test_retry_after_forms(
        self, fake_vlm: FakeVLM, client: VLMClient, headers: dict[str, str], expected: float | None
    ) -> None:
        fake_vlm.enqueue(status=429, json=error_body("busy"), headers=headers)
        with pytest.raises(VLMUnavailable) as caught:
            client.describe(request())
        assert caught.value.retry_after == expected  # type: ignore[attr-defined]

    def test_retry_after_http_date(self, fake_vlm: FakeVLM, client: VLMClient) -> None:
        when = email.utils.formatdate(time.time() + 30, usegmt=True)
        fake_vlm.enqueue(status=503, text="overloaded", headers={"Retry-After": when})
        with pytest.raises(VLMUnavailable) as caught:
            client.describe(request())
        assert 25 <= caught.value.retry_after <= 31  # type: ignore[attr-defined]

    @pytest.mark.parametrize("status", [408, 409, 500, 502, 503])
    def test_transient_statuses(self, fake_vlm: FakeVLM, client: VLMClient, status: int) -> None:
        fake_vlm.enqueue(status=status, json=error_body("try later"))
        with pytest.raises(VLMUnavailable, match=f"HTTP {status}") as caught:
            client.describe(request())
        assert caught.value.retry_after is None  # type: ignore[attr-defined]

    def test_sdk_retries_follow_endpoint_max_retries(self, fake_vlm: FakeVLM) -> None:
        fake_vlm.enqueue(status=503, json=error_body("loading"), headers={"Retry-After": "0.01"})
        with VLMClient(endpoint(fake_vlm, max_retries=1), api_key=None) as vlm:
            assert vlm.describe(request()).text == "saw 1 images and 0 videos"
        assert len(fake_vlm.chat_requests) == 2

    def test_400_carries_the_servers_message(self, fake_vlm: FakeVLM, client: VLMClient) -> None:
        said = "Image at index 1 could not be decoded: " + image(2000).url()
        fake_vlm.enqueue(status=400, json={"object": "error", "message": said, "type": "BadRequestError", "code": 400})
        with pytest.raises(VLMRejected) as caught:
            client.describe(request())
        message = caught.value.message
        assert message.startswith(f"endpoint {fake_vlm.base_url} refused the request (HTTP 400): Image at index 1")
        assert "base64,…(2668 bytes)" in message and not caught.value.retryable

    def test_server_message_is_clipped(self, fake_vlm: FakeVLM, client: VLMClient) -> None:
        fake_vlm.enqueue(status=422, json={"detail": "x" * 5000})
        with pytest.raises(VLMRejected) as caught:
            client.describe(request())
        assert "HTTP 422" in caught.value.message and len(caught.value.message) < 450

    def test_401_on_list_models(self, fake_vlm: FakeVLM, client: VLMClient) -> None:
        fake_vlm.enqueue(status=401, json=error_body("Incorrect API key provided", type_="invalid_api_key"))
        expected = rf"HTTP 401\): Incorrect API key provided\. Check the key in \${KEY_ENV}"
        with pytest.raises(VLMMisconfigured, match=expected):
            client.list_models()

    def test_401_without_a_key_says_to_set_it(self, fake_vlm: FakeVLM) -> None:
        fake_vlm.enqueue(status=401, text="Unauthorized")
        with (
            VLMClient(endpoint(fake_vlm), api_key=None) as vlm,
            pytest.raises(VLMMisconfigured, match=rf"\${KEY_ENV} is not set"),
        ):
            vlm.list_models()

    def test_list_models(self, fake_vlm: FakeVLM, client: VLMClient) -> None:
        fake_vlm.models = ["qwen2.5vl:7b", "fake-vlm"]
        assert client.list_models() == ["qwen2.5vl:7b", "fake-vlm"]
        assert fake_vlm.requests[0].path == "/v1/models"

    def test_model_not_found(self, fake_vlm: FakeVLM, client: VLMClient) -> None:
        with pytest.raises(VLMMisconfigured) as caught:
            client.describe(request(model="llava:13b"))
        assert "model 'llava:13b' not found" in caught.value.message
        assert "ollama pull llava:13b" in caught.value.message and "endpoint.model" in caught.value.message

    def test_wrong_path_404_points_at_base_url(self, fake_vlm: FakeVLM) -> None:
        fake_vlm.enqueue(status=404, json={"detail": "Not Found"})
        with (
            VLMClient(endpoint(fake_vlm), api_key=KEY) as vlm,
            pytest.raises(VLMRejected, match=r"Check endpoint.base_url"),
        ):
            vlm.list_models()

    def test_413_from_a_gateway(self, fake_vlm: FakeVLM, client: VLMClient) -> None:
        fake_vlm.max_body_bytes = 1000
        with pytest.raises(VLMRejected) as caught:
            client.describe(request(parts=(image(2000),)))
        message = caught.value.message
        assert "HTTP 413" in message and "Request Entity Too Large" in message and "<" not in message
        assert "lower endpoint.max_request_bytes (now 20000000)" in message

    def test_connection_refused(self, fake_vlm: FakeVLM, client: VLMClient) -> None:
        fake_vlm.pause()
        with pytest.raises(VLMUnavailable) as caught:
            client.describe(request())
        message = caught.value.message
        assert fake_vlm.base_url in message and "start Ollama/vLLM" in message and "endpoint.base_url" in message
        assert caught.value.retry_after is None  # type: ignore[attr-defined]
        with pytest.raises(VLMUnavailable, match="Connection refused"):
            client.list_models()
        fake_vlm.resume()
        assert client.describe(request()).text == "saw 1 images and 0 videos"

    def test_credentials_in_base_url_are_not_shown(self, fake_vlm: FakeVLM) -> None:
        fake_vlm.pause()
        url = fake_vlm.base_url.replace("//", "//user:pa55word@") + "?token=t0ken"
        with (
            VLMClient(endpoint(fake_vlm, base_url=url), api_key=None) as vlm,
            pytest.raises(VLMUnavailable) as caught,
        ):
            vlm.list_models()
        assert fake_vlm.base_url in caught.value.message
        assert "pa55word" not in caught.value.message and "t0ken" not in caught.value.message

    def test_dropped_connection(self, fake_vlm: FakeVLM, client: VLMClient) -> None:
        fake_vlm.enqueue(disconnect=True)
        with pytest.raises(VLMUnavailable, match="cannot reach"):
            client.describe(request())

    def test_timeout(self, fake_vlm: FakeVLM) -> None:
        fake_vlm.enqueue(delay_s=30)
        started = time.monotonic()
        with (
            VLMClient(endpoint(fake_vlm, timeout_s=0.3), api_key=KEY) as vlm,
            pytest.raises(VLMUnavailable, match=r"within endpoint.timeout_s=0.3 s"),
        ):
            vlm.describe(request())
        assert time.monotonic() - started < 3

    @pytest.mark.parametrize(
        "scripted",
        [
            {"status": 200, "text": "<html>Welcome to nginx</html>", "content_type": "text/html"},
            {"status": 200, "text": "{not json", "content_type": "application/json"},
            {"status": 200, "json": {"object": "chat.completion", "choices": []}},
            {"status": 200, "json": ["a list"]},
        ],
    )
    def test_malformed_200(self, fake_vlm: FakeVLM, client: VLMClient, scripted: dict[str, Any]) -> None:
        fake_vlm.enqueue(**scripted)
        with pytest.raises(VLMBadReply):
            client.describe(request())
        assert len(fake_vlm.chat_requests) == 1

    @pytest.mark.parametrize(
        "scripted",
        [
            {"status": 400, "json": error_body(f"bad key {KEY} for this model")},
            {"status": 401, "json": error_body(f"Incorrect API key provided: {KEY}")},
            {"status": 404, "json": error_body(f"model fake-vlm not found for key {KEY}")},
            {"status": 413, "text": f"too large ({KEY})"},
            {"status": 429, "json": {"error": f"quota for {KEY} exceeded"}},
            {"status": 500, "text": f"<h1>crash</h1> Authorization: Bearer {KEY}"},
            {"status": 200, "text": f"not json {KEY}", "content_type": "application/json"},
            {"status": 200, "json": chat_completion(f"not json {KEY}")},
        ],
    )
    def test_key_never_in_a_message(self, fake_vlm: FakeVLM, client: VLMClient, scripted: dict[str, Any]) -> None:
        for _ in range(2):
            fake_vlm.enqueue(**scripted)
        with pytest.raises((VLMUnavailable, VLMRejected, VLMBadReply)) as caught:
            client.describe(request(schema=SCHEMA))
        assert KEY not in caught.value.message and KEY not in str(caught.value) and KEY not in repr(caught.value)
        assert "***" in caught.value.message
        assert fake_vlm.chat_requests[0].headers["authorization"] == f"Bearer {KEY}"

    def test_missing_key_sends_the_placeholder(self, fake_vlm: FakeVLM, monkeypatch: pytest.MonkeyPatch) -> None:
        # A key for some other service in the environment must not be sent to this endpoint.
        monkeypatch.setenv("OPENAI_API_KEY", "sk-someone-elses")
        with VLMClient(endpoint(fake_vlm), api_key=None) as vlm:
            assert vlm.describe(request()).text == "saw 1 images and 0 videos"
        assert fake_vlm.chat_requests[0].headers["authorization"] == f"Bearer {NO_KEY}"

    def test_a_hanging_response_does_not_hold_up_stop(self) -> None:
        fake = FakeVLM().start()
        fake.enqueue(delay_s=60)
        errors: list[Exception] = []

        def call() -> None:
            with VLMClient(endpoint(fake), api_key=KEY) as vlm:
                try:
                    vlm.describe(request())
                except VLMUnavailable as exc:
                    errors.append(exc)

        caller = threading.Thread(target=call)
        caller.start()
        fake.wait_for_requests(1)
        started = time.monotonic()
        fake.stop()
        caller.join(timeout=5)
        assert time.monotonic() - started < 2 and not caller.is_alive()
        assert len(errors) == 1


class TestRequestBytes:
    def test_upper_bound_of_the_real_content_length(self, fake_vlm: FakeVLM, client: VLMClient) -> None:
        req = request(
            system="Réponds en français. 日本語でも可。",
            prompt="Décris cette photo 📷🐈‍⬛ — 描述这张照片, 사진을 설명하세요. " * 5 + 'and " \\ \n \t\x01',
            parts=(image(40_000, seed=1), image(25_000, seed=2, mime="image/png"), video(frames=4, n=12_000)),
            temperature=0.7,
            schema={**SCHEMA, "description": "Légende et étiquettes 🏷️"},
        )
        client.describe(req)
        (sent,) = fake_vlm.chat_requests
        assert sent.content_length == len(sent.body)
        assert sent.json == build_body(req)  # the SDK sends our dict unchanged
        bound = request_bytes(req)
        assert sent.content_length <= bound <= sent.content_length * 1.01

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        prompt=st.text(st.characters(blacklist_categories=())),  # any code point, lone surrogates included
        system=st.none() | st.text(max_size=40),
        sizes=st.lists(st.tuples(st.sampled_from(["image_url", "video_url"]), st.integers(0, 3000)), max_size=4),
        temperature=st.none() | st.floats(0, 2),
        described=st.booleans(),
    )
    def test_upper_bound_for_any_text(
        self, prompt: str, system: str | None, sizes: list[tuple[str, int]], temperature: float | None, described: bool
    ) -> None:
        # Same SDK and httpx2 stack as on the wire, with httpx2's in-process transport: fast enough for hypothesis.
        seen: list[httpx2.Request] = []

        def handler(http_request: httpx2.Request) -> httpx2.Response:
            seen.append(http_request)
            return httpx2.Response(200, json=chat_completion("{}"))

        parts = tuple(video(frames=2, n=n) if kind == "video_url" else image(n, mime="image/webp") for kind, n in sizes)
        schema = {"type": "object", "description": prompt[:20]} if described else None
        req = request(prompt=prompt, system=system, parts=parts, temperature=temperature, schema=schema)
        with httpx2.Client(transport=httpx2.MockTransport(handler)) as http:
            sdk = openai.OpenAI(api_key=KEY, base_url="http://vlm.invalid/v1", max_retries=0, http_client=http)
            VLMClient(EndpointConfig(base_url="http://vlm.invalid/v1"), api_key=KEY, openai_client=sdk).describe(req)
        (sent,) = seen
        assert int(sent.headers["content-length"]) == len(sent.content)
        assert json.loads(sent.content) == build_body(req)
        assert len(sent.content) <= request_bytes(req)

    def test_body_matches_openais_published_schema(self, fake_vlm: FakeVLM, client: VLMClient) -> None:
        if not SPEC.exists():
            pytest.skip(f"{SPEC} is absent")
        referencing = pytest.importorskip("referencing")
        jsonschema = pytest.importorskip("jsonschema")
        from referencing.jsonschema import DRAFT202012

        uri = "urn:openai-spec"
        resource = DRAFT202012.create_resource(json.loads(SPEC.read_text()))
        registry = referencing.Registry().with_resource(uri, resource)
        validator = jsonschema.Draft202012Validator(
            {"$ref": f"{uri}#/components/schemas/CreateChatCompletionRequest"}, registry=registry
        )
        # video_url is a vLLM extension the published schema lacks: images only here.
        req = request(
            system="Be brief.", parts=(image(seed=1), image(seed=2, mime="image/png")), temperature=0.5, schema=SCHEMA
        )
        client.describe(req)
        sent = fake_vlm.chat_requests[0].json
        errors = [f"{e.json_path}: {e.message[:200]}" for e in validator.iter_errors(sent)]
        assert errors == []
        assert list(validator.iter_errors({**sent, "messages": "nope"})), "the validator checks something"


class TestServerShapes:
    """What each server says it is, and how it refuses what it does not take."""

    @pytest.mark.parametrize(
        ("shape", "expected"),
        [("ollama", ("ollama", "0.12.6")), ("vllm", ("vllm", "0.11.0")), ("lmstudio", ("lmstudio", "")),
         ("openai", ("unknown", "")), ("generic", ("unknown", ""))],
    )  # fmt: skip
    def test_identify(self, shape: str, expected: tuple[str, str]) -> None:
        with FakeVLM(shape=shape) as fake, VLMClient(endpoint(fake), api_key=KEY) as vlm:  # type: ignore[arg-type]
            assert vlm.identify() == expected
            assert fake.chat_requests == []

    def test_identify_unreachable_is_unknown(self) -> None:
        fake = FakeVLM().start()
        url = endpoint(fake)
        fake.stop()
        with VLMClient(url, api_key=KEY) as vlm:
            assert vlm.identify() == ("unknown", "")

    @pytest.mark.parametrize(
        ("shape", "said"),
        [("ollama", "invalid message format"), ("openai", "Invalid value: 'video_url'"), ("lmstudio", "'text' or 'image_url'")],
    )  # fmt: skip
    def test_video_url_refusal_is_a_format_refusal(self, shape: str, said: str) -> None:
        from mmwatchd.servers import is_video_format_refusal

        with (
            FakeVLM(shape=shape) as fake,  # type: ignore[arg-type]
            VLMClient(endpoint(fake), api_key=KEY) as vlm,
            pytest.raises(VLMRejected) as caught,
        ):
            vlm.describe(request(parts=(video(),)))
        assert caught.value.status == 400 and said in caught.value.server_message
        assert is_video_format_refusal(caught.value.status, caught.value.server_message)

    @pytest.mark.parametrize(
        "said",
        ["max_tokens is too large: 512. This model's maximum context length is 256 tokens",
         "Rate limit reached", "model 'x' not found, try pulling it first", "invalid image input"],
    )  # fmt: skip
    def test_other_refusals_are_not(self, said: str) -> None:
        from mmwatchd.servers import is_video_format_refusal

        assert not is_video_format_refusal(400, said)
        assert not is_video_format_refusal(500, "invalid message format")

    def test_ollama_refuses_a_gif_data_url(self) -> None:
        with FakeVLM(shape="ollama") as fake, VLMClient(endpoint(fake), api_key=KEY) as vlm:
            with pytest.raises(VLMRejected, match="invalid image input"):
                vlm.describe(request(parts=(image(mime="image/gif"),)))
            vlm.describe(request(parts=(image(mime="image/webp"),)))

    def test_openai_shape_takes_what_the_client_sends(self) -> None:
        """The body mmwatchd builds, schema and all, passes OpenAI's own request schema."""
        with FakeVLM(shape="openai") as fake, VLMClient(endpoint(fake), api_key=KEY) as vlm:
            reply = vlm.describe(request(system="Be brief.", schema=SCHEMA, temperature=0.2,
                                         parts=(image(), image(seed=2, mime="image/png"))))  # fmt: skip
            assert reply.data and fake.refused == []


class TestKnowledge:
    """EndpointKnowledge: one video request asks while it is unknown; the answer is remembered."""

    class Store:
        def __init__(self) -> None:
            self.rows: dict[str, dict[str, Any]] = {}

        def endpoint_capabilities(self, key: str) -> dict[str, Any] | None:
            return self.rows.get(key)

        def remember_endpoint(self, key: str, capabilities: dict[str, Any]) -> None:
            self.rows[key] = capabilities

    def test_one_probe_at_a_time_and_the_others_wait_for_its_answer(self) -> None:
        from mmwatchd.servers import EndpointKnowledge

        store = self.Store()
        knowledge = EndpointKnowledge("http://gateway.example/v1", identify=lambda: ("unknown", ""), store=store)
        first = knowledge.video_mode("m")
        assert first.probe and first.mode == "video_url"
        results: list[Any] = []
        waiter = threading.Thread(target=lambda: results.append(knowledge.video_mode("m")))
        waiter.start()
        waiter.join(0.2)
        assert waiter.is_alive() and results == []  # held while the probe is out
        knowledge.settle("m", first, accepted=False, refusal="400 invalid message format")
        waiter.join(5)
        assert results[0].mode == "images" and not results[0].probe
        assert results[0].reason == "endpoint refused video_url (400 invalid message format); learned"
        # A new process with the same store asks nothing and probes nothing.
        again = EndpointKnowledge("http://gateway.example/v1", identify=lambda: pytest.fail("asked again"), store=store)
        assert again.video_mode("m").mode == "images"

    def test_no_verdict_lets_the_next_caller_probe(self) -> None:
        from mmwatchd.servers import EndpointKnowledge

        knowledge = EndpointKnowledge("http://gateway.example/v1", identify=lambda: ("unknown", ""))
        first = knowledge.video_mode("m")
        knowledge.settle("m", first, accepted=None)  # the server was busy: nothing learned
        assert knowledge.video_mode("m").probe

    def test_identified_servers_need_no_probe(self) -> None:
        from mmwatchd.servers import EndpointKnowledge

        for server, mode in (("ollama", "images"), ("lmstudio", "images"), ("vllm", "video_url")):
            decision = EndpointKnowledge("http://h/v1", identify=lambda s=server: (s, "1")).video_mode("m")
            assert decision.mode == mode and not decision.probe
        openai_url = EndpointKnowledge("https://api.openai.com/v1", identify=lambda: pytest.fail("asked"))
        assert openai_url.video_mode("gpt-4o-mini").mode == "images"
        assert "image/gif" in openai_url.image_mimes("gpt-4o-mini")

    def test_passthrough_types_follow_what_is_known(self) -> None:
        from mmwatchd.servers import EndpointKnowledge

        knowledge = EndpointKnowledge("http://h:11434/v1", identify=lambda: ("ollama", "0.12.6"))
        assert knowledge.image_mimes("m") == {"image/jpeg", "image/png"}  # nobody asked yet: what every server reads
        knowledge.video_mode("m")  # a clip asks the server what it is
        assert knowledge.image_mimes("m") == {"image/jpeg", "image/png", "image/webp"}


@pytest.mark.parametrize(
    ("said", "expected"),
    [("invalid image input", True), ("You uploaded an unsupported image. Please make sure ...", True),
     ("Invalid image format", True), ("failed to load image", True), ("cannot identify image file", True),
     ("Invalid image: unsupported format image/png", True), ("image too small", False), ("rate limited", False)],
)  # fmt: skip
def test_image_refusals(said: str, expected: bool) -> None:
    from mmwatchd.servers import is_image_refusal

    assert is_image_refusal(400, said) is expected
    assert not is_image_refusal(500, said)
