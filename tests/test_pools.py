"""Several endpoints (``endpoints:``): routing, failover without cost to the file, priority tiers and the return to
the better one, rules that name their endpoints, ``redo_fallback``, and the config errors. In-process (the Runner of
test_daemon.py) against real loopback servers that are really shut down."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from configs import write_config
from fakevlm import FakeVLM
from media import make_jpeg
from running import spawn_run, stop_run, wait_until
from test_daemon import Runner

from mmwatchd import config, status
from mmwatchd.errors import ConfigError, VLMUnavailable
from mmwatchd.state import FILENAME, State


@pytest.fixture
def servers() -> Iterator[dict[str, FakeVLM]]:
    """Three servers of different speed, each listing its own model."""
    made = {
        "fast": FakeVLM(models=["model-fast"], latency_s=0.02),
        "mid": FakeVLM(models=["model-mid"], latency_s=0.06),
        "slow": FakeVLM(models=["model-slow"], latency_s=0.15),
    }
    for s in made.values():
        s.start()
    try:
        yield made
    finally:
        for s in made.values():
            s.stop()


@pytest.fixture
def pool_runner(tmp_path: Path, servers: dict[str, FakeVLM]) -> Iterator[Runner]:
    r = Runner(tmp_path, servers["fast"])
    try:
        yield r
    finally:
        r.close()


def _endpoints(servers: dict[str, FakeVLM], **per_name: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for name, server in servers.items():
        entry = {"name": name, "base_url": server.base_url, "model": f"model-{name}", "concurrency": 2,
                 "timeout_s": 10, "max_retries": 0}  # fmt: skip
        entry.update(per_name.get(name, {}))
        out.append(entry)
    return out


def _sidecar(path: Path) -> dict[str, Any]:
    return json.loads(path.with_name(path.name + ".json").read_text())


def test_three_servers_one_killed_mid_run_describe_every_file_once(
    pool_runner: Runner, servers: dict[str, FakeVLM]
) -> None:
    """The issue's acceptance run: three servers of different speed, one shut down while it has requests in
    flight. Every file is described exactly once, none fails, and no try is counted against any file."""
    photos = [make_jpeg(pool_runner.inbox / f"{i:02}.jpg", (48, 32), seed=i) for i in range(24)]
    with structlog.testing.capture_logs() as logs:
        daemon = pool_runner.start(endpoints=_endpoints(servers), settle_s=0, rescan_interval_s=0)
        # Kill the middle one once it is at work: it has answered some and has requests on the wire.
        wait_until(lambda: servers["mid"].answered >= 2 and servers["mid"].in_flight >= 1, timeout=30)
        servers["mid"].stop()
        wait_until(lambda: all(p.with_name(p.name + ".json").exists() for p in photos), timeout=60)
        wait_until(lambda: daemon.counts["ok"] == len(photos), timeout=10)
    docs = {p: _sidecar(p) for p in photos}
    assert {d["status"] for d in docs.values()} == {"ok"}
    assert daemon.counts == {"ok": len(photos)}
    assert sorted(o.path for o in daemon.outcomes) == sorted(photos)  # each finished once
    answered = sum(s.answered for s in servers.values())
    assert answered == len(photos)  # no file was answered twice; the killed server's unanswered ones went elsewhere
    assert {d["endpoint"] for d in docs.values()} <= {"fast", "mid", "slow"}
    assert all(d["model"] == f"model-{d['endpoint']}" for d in docs.values())
    events = [e["event"] for e in logs]
    assert "endpoint.failover" in events and "endpoint.down" in events
    assert "job.retry" not in events and "job.failed" not in events
    assert pool_runner.state is not None and not pool_runner.state.retrying()
    # The fast server took the most; the slow one was not waited for.
    by = {name: sum(d["endpoint"] == name for d in docs.values()) for name in servers}
    assert by["fast"] > by["slow"]
    assert "mid unreachable" in daemon._status_line()


def test_a_lower_tier_is_used_only_while_the_better_one_is_down_and_work_returns_to_it(
    pool_runner: Runner, servers: dict[str, FakeVLM]
) -> None:
    eps = _endpoints({"fast": servers["fast"], "slow": servers["slow"]}, slow={"priority": 1})
    daemon = pool_runner.start(endpoints=eps, rescan_interval_s=0)
    first = make_jpeg(pool_runner.inbox / "1.jpg", (48, 32), seed=1)
    assert pool_runner.wait_sidecar(first)["endpoint"] == "fast"
    assert servers["slow"].chat_requests == []  # the better tier had room: the fallback was never asked

    servers["fast"].pause()  # connections refused from now on
    second = make_jpeg(pool_runner.inbox / "2.jpg", (48, 32), seed=2)
    doc = pool_runner.wait_sidecar(second)
    assert (doc["status"], doc["endpoint"], doc["model"]) == ("ok", "slow", "model-slow")
    assert "fast unreachable" in daemon._status_line()

    servers["fast"].resume()
    wait_until(lambda: "fast up" in daemon._status_line(), timeout=30)
    third = make_jpeg(pool_runner.inbox / "3.jpg", (48, 32), seed=3)
    assert pool_runner.wait_sidecar(third)["endpoint"] == "fast"
    # Without redo_fallback the fallback's answer stands.
    time.sleep(0.3)
    assert _sidecar(second)["endpoint"] == "slow" and len(servers["slow"].chat_requests) == 1


def test_files_a_fallback_answered_are_described_again_after_a_restart(
    pool_runner: Runner, servers: dict[str, FakeVLM]
) -> None:
    """redo_fallback's list is in the state store: a service stopped before the best tier came back describes the
    file there after its restart, once, and then forgets it."""
    servers["fast"].pause()
    eps = _endpoints({"fast": servers["fast"], "slow": servers["slow"]}, slow={"priority": 1})
    pool_runner.start(endpoints=eps, rule={"redo_fallback": True}, rescan_interval_s=0)
    photo = make_jpeg(pool_runner.inbox / "1.jpg", (48, 32), seed=1)
    assert pool_runner.wait_sidecar(photo)["endpoint"] == "slow"
    pool_runner.restart(endpoints=eps, rule={"redo_fallback": True}, rescan_interval_s=0)  # the best tier still down
    servers["fast"].resume()
    wait_until(lambda: _sidecar(photo)["endpoint"] == "fast", timeout=30)
    wait_until(lambda: pool_runner.state is not None and pool_runner.state.fallbacks() == [], timeout=10)
    assert len(servers["fast"].chat_requests) == 1 and len(servers["slow"].chat_requests) == 1


def test_a_real_service_stopped_by_sigterm_describes_its_fallback_answers_again_once_restarted(
    tmp_path: Path, servers: dict[str, FakeVLM]
) -> None:
    """The same with a real ``mmwatchd run``, stopped by SIGTERM as systemd stops it and started again as a new
    process: the list lives in the state database, not in the process."""
    servers["fast"].pause()
    eps = _endpoints({"fast": servers["fast"], "slow": servers["slow"]}, slow={"priority": 1})
    cfg = write_config(tmp_path, base_url=servers["fast"].base_url, endpoints=eps, rule={"redo_fallback": True},
                       rescan_interval_s=0)  # fmt: skip
    photo = make_jpeg(tmp_path / "inbox" / "1.jpg", (48, 32), seed=1)

    def fallbacks() -> list[tuple[Path, str]]:
        with State(tmp_path / "state" / FILENAME) as state:
            return state.fallbacks()

    proc = spawn_run(cfg, tmp_path)
    try:
        wait_until(lambda: fallbacks() == [(photo, "photos")], timeout=60)
    finally:
        stop_run(proc, tmp_path)
    assert _sidecar(photo)["endpoint"] == "slow"
    servers["fast"].resume()
    proc = spawn_run(cfg, tmp_path)
    try:
        wait_until(lambda: _sidecar(photo)["endpoint"] == "fast", timeout=60)
        wait_until(lambda: fallbacks() == [], timeout=30)
    finally:
        stop_run(proc, tmp_path)
    assert len(servers["fast"].chat_requests) == 1 and len(servers["slow"].chat_requests) == 1


def test_check_endpoint_asks_every_endpoint(
    tmp_path: Path, servers: dict[str, FakeVLM], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`mmwatchd check --endpoint` prints a table per endpoint, named, and fails when one of them cannot be reached
    (a fallback that is down is worth knowing before the best tier goes down too)."""
    from configs import write_config

    from mmwatchd.cli import main

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    eps = _endpoints({"fast": servers["fast"], "slow": servers["slow"]}, slow={"priority": 1})
    cfg = write_config(tmp_path, base_url=servers["fast"].base_url, endpoints=eps)
    assert main(["check", "--endpoint", "-c", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert f"endpoint fast {servers['fast'].base_url}   model model-fast" in out
    assert f"endpoint slow {servers['slow'].base_url}   model model-slow" in out
    assert out.count("ok    reachable") == 2 and "FAIL" not in out
    assert servers["slow"].chat_requests  # the fallback was asked too, not only the first endpoint

    servers["slow"].pause()  # connections refused from now on
    assert main(["check", "--endpoint", "-c", str(cfg)]) == 1
    out = capsys.readouterr().out
    fast, slow = out.split("\nendpoint slow ")
    assert "ok    reachable" in fast and "FAIL" not in fast
    assert "FAIL  reachable" in slow


def test_a_rule_uses_only_the_endpoints_it_names_with_their_own_model(
    pool_runner: Runner, servers: dict[str, FakeVLM]
) -> None:
    photos = [make_jpeg(pool_runner.inbox / f"{i}.jpg", (48, 32), seed=i) for i in range(3)]
    pool_runner.start(endpoints=_endpoints(servers), rule={"endpoints": ["slow"]}, settle_s=0)
    for p in photos:
        doc = pool_runner.wait_sidecar(p)
        assert (doc["endpoint"], doc["model"]) == ("slow", "model-slow")
    assert servers["fast"].chat_requests == [] and servers["mid"].chat_requests == []


def test_redo_fallback_describes_again_once_the_rules_own_tier_is_back(
    pool_runner: Runner, servers: dict[str, FakeVLM]
) -> None:
    servers["fast"].pause()  # the best tier is down from the start
    eps = _endpoints({"fast": servers["fast"], "slow": servers["slow"]}, slow={"priority": 1})
    daemon = pool_runner.start(endpoints=eps, rule={"redo_fallback": True}, rescan_interval_s=0)
    photo = make_jpeg(pool_runner.inbox / "1.jpg", (48, 32), seed=1)
    assert pool_runner.wait_sidecar(photo)["endpoint"] == "slow"
    servers["fast"].resume()
    wait_until(lambda: _sidecar(photo)["endpoint"] == "fast", timeout=30)
    assert len(servers["fast"].chat_requests) == 1 and len(servers["slow"].chat_requests) == 1
    wait_until(lambda: daemon.counts["ok"] == 2, timeout=10)
    time.sleep(0.5)  # answered by its own tier now: not described a third time
    assert len(servers["fast"].chat_requests) == 1


def test_status_shows_each_endpoint_while_the_service_runs(pool_runner: Runner, servers: dict[str, FakeVLM]) -> None:
    pool_runner.start(endpoints=_endpoints(servers), settle_s=0)
    cfg = config.load(pool_runner.config_path)
    assert pool_runner.state is not None

    def report() -> dict[str, Any]:
        return status.collect(cfg, pool_runner.state)  # type: ignore[arg-type]

    wait_until(lambda: [e["status"] for e in report()["endpoints"] or []] == ["up", "up", "up"], timeout=20)
    rows = report()["endpoints"]
    assert [(e["name"], e["concurrency"]) for e in rows] == [("fast", 2), ("mid", 2), ("slow", 2)]
    assert "endpoint mid (priority 0): up, 0 of 2 in flight" in status.render(report())
    pool_runner.stop()
    assert report()["endpoints"] is None  # no service: nothing live to show


def test_metrics_carry_each_endpoint(tmp_path: Path, servers: dict[str, FakeVLM]) -> None:
    from configs import write_config
    from prometheus_client import generate_latest

    from mmwatchd.daemon import Daemon
    from mmwatchd.vlm import VLMClient

    cfg = config.load(write_config(tmp_path, base_url="http://unused/v1", endpoints=_endpoints(servers)))
    clients: list[VLMClient] = []

    def make(c: config.Config) -> VLMClient:
        clients.append(VLMClient(c.endpoint, api_key=None))
        return clients[-1]

    daemon = Daemon(cfg, make(cfg), make_client=make, metrics=True)
    try:
        daemon.check_endpoint()
        text = generate_latest(daemon.metrics.registry).decode()  # type: ignore[union-attr]
    finally:
        daemon.stop(grace_s=1)
        for c in clients:
            c.close()
    for name in servers:
        assert f'mmwatchd_endpoint_up{{endpoint="{name}"}} 1.0' in text
        assert f'mmwatchd_concurrency_limit{{endpoint="{name}"}} 2.0' in text
        assert f'mmwatchd_in_flight_requests{{endpoint="{name}"}} 0.0' in text


class TestConfig:
    BASE = "rules: [{name: r, prompt: x}]\n"

    def _problems(self, text: str) -> str:
        with pytest.raises(ConfigError) as exc:
            config.loads(text)
        return str(exc.value)

    def test_endpoint_and_endpoints_together_is_an_error(self) -> None:
        said = self._problems("endpoint: {model: m}\nendpoints: [{name: a}]\n" + self.BASE)
        assert "endpoints: give either endpoint: (one endpoint) or endpoints: (several" in said

    def test_duplicate_names(self) -> None:
        said = self._problems("endpoints: [{name: a}, {name: b}, {name: a}]\n" + self.BASE)
        assert "endpoints[2].name: 'a' is already used by endpoints[0]; each name may appear once" in said

    def test_a_rule_naming_an_unknown_endpoint(self) -> None:
        said = self._problems(
            "endpoints: [{name: gpu}, {name: cloud}]\nrules: [{name: r, prompt: x, endpoints: [gpus]}]\n"
        )
        assert (
            "rules[0].endpoints[0]: no endpoint is named 'gpus' (did you mean 'gpu'?); the endpoints are: gpu, cloud"
            in said
        )
        said = self._problems("rules: [{name: r, prompt: x, endpoints: [gpu]}]\n")  # the single endpoint is "default"
        assert "no endpoint is named 'gpu'; the endpoints are: default" in said

    def test_a_name_is_required_and_keys_are_checked(self) -> None:
        said = self._problems("endpoints: [{base_url: 'http://h/v1'}]\n" + self.BASE)
        assert "endpoints[0].name: required key is missing" in said
        said = self._problems("endpoints: [{name: a, priorty: 1}]\n" + self.BASE)
        assert "endpoints[0].priorty: unknown key (did you mean 'priority'?)" in said

    def test_files_are_encoded_for_the_smallest_limits(self) -> None:
        cfg = config.loads(
            "endpoints:\n"
            "  - {name: local, base_url: 'http://gpu:8000/v1', model: q, max_request_bytes: 9000000}\n"
            "  - {name: cloud, base_url: 'https://api.example/v1', model: c, priority: 1, max_video_frames: 8,\n"
            "     max_request_bytes: 4000000}\n" + self.BASE
        )
        assert (cfg.endpoint.base_url, cfg.endpoint.model) == ("http://gpu:8000/v1", "q")
        assert (cfg.endpoint.max_request_bytes, cfg.endpoint.max_video_frames) == (4_000_000, 8)
        assert [(e.name, e.priority) for e in cfg.endpoints] == [("local", 0), ("cloud", 1)]


def test_an_endpoint_out_of_todays_requests_hands_over_to_the_next(
    pool_runner: Runner, servers: dict[str, FakeVLM]
) -> None:
    eps = _endpoints({"fast": servers["fast"], "slow": servers["slow"]}, fast={"max_requests_per_day": 1},
                     slow={"priority": 1})  # fmt: skip
    photos = [make_jpeg(pool_runner.inbox / f"{i}.jpg", (48, 32), seed=i) for i in range(3)]
    daemon = pool_runner.start(endpoints=eps, settle_s=0, rescan_interval_s=0)
    wait_until(lambda: all(p.with_name(p.name + ".json").exists() for p in photos), timeout=30)
    assert sorted(_sidecar(p)["endpoint"] for p in photos) == ["fast", "slow", "slow"]
    assert len(servers["fast"].chat_requests) == 1
    wait_until(lambda: daemon.counts == {"ok": 3})  # counted once the sidecar is written: the last one may lag
    assert pool_runner.state is not None and pool_runner.state.requests_today() == 3  # both endpoints' counts


def test_a_reload_moves_an_endpoint_and_closes_its_old_client(pool_runner: Runner, servers: dict[str, FakeVLM]) -> None:
    from configs import write_config

    eps = _endpoints({"fast": servers["fast"], "slow": servers["slow"]}, slow={"priority": 1})
    daemon = pool_runner.start(endpoints=eps, rescan_interval_s=0)
    old = daemon.pool.get("fast").client  # type: ignore[union-attr]
    pool_runner.wait_sidecar(make_jpeg(pool_runner.inbox / "1.jpg", (48, 32), seed=1))
    eps[0].update(base_url=servers["mid"].base_url, model="model-mid")  # "fast" is now served by the mid server
    write_config(pool_runner.tmp, base_url="http://unused/v1", endpoints=eps, rescan_interval_s=0)
    daemon.reload_requested.set()
    wait_until(lambda: daemon.pool.get("fast").client is not old, timeout=20)  # type: ignore[union-attr]
    doc = pool_runner.wait_sidecar(make_jpeg(pool_runner.inbox / "2.jpg", (48, 32), seed=2))
    assert (doc["endpoint"], doc["model"]) == ("fast", "model-mid")
    # The first endpoint's model is in every file's fingerprint: 1.jpg is described again, by the new server.
    wait_until(lambda: _sidecar(pool_runner.inbox / "1.jpg")["model"] == "model-mid", timeout=20)
    assert len(servers["mid"].chat_requests) == 2 and len(servers["fast"].chat_requests) == 1
    wait_until(lambda: old._client.is_closed(), timeout=10)  # type: ignore[attr-defined]


class TestOneShot:
    """``once`` and ``scan`` run no probers: an endpoint that stops answering must not hold them up for ever."""

    def _daemon(self, tmp_path: Path, **changes: Any) -> tuple[Any, list[Any]]:
        from configs import write_config

        from mmwatchd.daemon import Daemon
        from mmwatchd.vlm import VLMClient

        cfg = config.load(write_config(tmp_path, base_url="http://127.0.0.1:1/v1", **changes))
        clients: list[VLMClient] = []

        def make(c: config.Config) -> VLMClient:
            clients.append(VLMClient(c.endpoint, api_key=None))
            return clients[-1]

        return Daemon(cfg, make(cfg), make_client=make, one_shot_attempts=3), clients

    def test_a_single_endpoint_that_dies_ends_the_run_with_files_not_reached(
        self, tmp_path: Path, fake_vlm: FakeVLM
    ) -> None:
        daemon, clients = self._daemon(tmp_path, endpoint={"base_url": fake_vlm.base_url})
        try:
            daemon.probe_once()
            daemon.start(prober=False)
            fake_vlm.pause()
            for i in range(2):
                daemon.submit(make_jpeg(tmp_path / "inbox" / f"{i}.jpg", (48, 32), seed=i), explicit=True)
            assert daemon.wait_idle(timeout=60)
            assert daemon.counts == {"retry": 2}
        finally:
            daemon.close()
            for c in clients:
                c.close()

    def test_a_request_to_a_dead_endpoint_goes_to_another(self, tmp_path: Path, servers: dict[str, FakeVLM]) -> None:
        daemon, clients = self._daemon(tmp_path, endpoints=_endpoints(servers))
        try:
            daemon.probe_once()
            daemon.start(prober=False)
            servers["fast"].pause()
            photos = [make_jpeg(tmp_path / "inbox" / f"{i}.jpg", (48, 32), seed=i) for i in range(6)]
            for p in photos:
                daemon.submit(p, explicit=True)
            assert daemon.wait_idle(timeout=60)
            assert daemon.counts == {"ok": 6}
            assert {_sidecar(p)["endpoint"] for p in photos} <= {"mid", "slow"}
        finally:
            daemon.close()
            for c in clients:
                c.close()


class _Host:
    """What a pool needs from its daemon, for routing alone."""

    def __init__(self) -> None:
        import threading

        self.stopping = threading.Event()
        self.clock = time.monotonic
        self.wall_clock = time.time
        self.state = None
        self.waits: list[bool] = []

    def store(self, what: str, call: Any, *args: Any, **kw: Any) -> Any:
        return call(*args, **kw)

    def log_once(self, *args: Any, **kw: Any) -> bool:
        return True

    def current_path(self) -> Path | None:
        return None

    def waiting_for_a_slot(self, waiting: bool) -> None:
        self.waits.append(waiting)


def test_routing_best_tier_first_fewest_outstanding_within_it() -> None:
    from mmwatchd.endpoint import Pool
    from mmwatchd.metrics import Unmetered

    cfg = config.loads(
        "endpoints: [{name: a, concurrency: 2}, {name: b, concurrency: 2}, {name: c, priority: 1, concurrency: 1}]\n"
        "rules: [{name: r, prompt: x}, {name: only_c, prompt: y, endpoints: [c]}]\n"
    )
    pool = Pool(cfg, _Host(), Unmetered(), lambda m: object())  # type: ignore[arg-type]
    a, b, c = pool.endpoints
    for e in pool:
        e.up()
    picks = [pool.acquire(pool.allowed("r")) for _ in range(5)]
    assert [e.name if e else None for e in picks] == ["a", "b", "a", "b", "c"]  # c only once a and b are full
    pool.release(b)
    assert pool.acquire(pool.allowed("r")) is b  # the one with room, although c is up
    pool.release(a)
    pool.release(c)
    assert pool.acquire(pool.allowed("only_c")) is c  # a rule that names its endpoints
    a.down(VLMUnavailable("gone"))
    pool.release(c)
    assert pool.acquire(pool.allowed("r")) is c  # a down: its tier has only b, which is full
    assert pool.summary() == "a unreachable 1/2, b up 2/2, c up 1/1"


def test_a_ready_request_waits_through_an_outage_only_where_something_brings_the_endpoint_back() -> None:
    """A worker with its request ready holds it while the endpoint is down (the service's prober will open the
    gate), telling the daemon it waits (so it is never taken for stuck); it does not wait where nothing would
    bring the endpoint back: no prober (a one-shot run), or the day's requests used up."""
    import threading

    from mmwatchd.endpoint import Pool, QuotaReached
    from mmwatchd.metrics import Unmetered

    cfg = config.loads("endpoint: {base_url: 'http://127.0.0.1:9/v1', model: m}\nrules: [{name: r, prompt: x}]\n")
    host = _Host()
    pool = Pool(cfg, host, Unmetered(), lambda m: object())  # type: ignore[arg-type]
    [ep] = pool.endpoints
    ep.up()
    ep.down(VLMUnavailable("gone"))
    got: list[object] = []
    waiter = threading.Thread(target=lambda: got.append(pool.acquire([ep])))
    waiter.start()
    wait_until(lambda: pool.ready == 1 and host.waits == [True], timeout=10)
    ep.up()  # what the prober does when the endpoint answers again
    waiter.join(10)
    assert got == [ep] and pool.ready == 0 and host.waits == [True, False] and ep.in_flight == 1
    pool.release(ep)

    ep.down(VLMUnavailable("gone again"))
    pool.probing = False
    assert pool.acquire([ep]) is None
    pool.probing = True
    ep.up()
    quota = QuotaReached("daily cap")
    quota.retry_after = 3600.0
    ep.exhausted(quota)
    assert pool.acquire([ep]) is None and host.waits == [True, False]


def test_the_retry_policy_of_the_service_and_of_one_shot_runs() -> None:
    from mmwatchd.endpoint import EndpointRefuses, QuotaReached
    from mmwatchd.errors import SidecarError
    from mmwatchd.retry import RETRY_BASE_S, RetryPolicy

    service, once = RetryPolicy(), RetryPolicy(3)
    busy = VLMUnavailable("busy")
    busy.status = 503
    assert not service.final(100, busy) and service.records_attempts() and not service.halts(QuotaReached("cap"))
    assert service.last_attempt(7, 8) and not service.last_attempt(6, 8) and not once.last_attempt(7, 8)
    assert [once.final(n, busy) for n in (1, 2, 3)] == [False, False, True]
    assert once.final(1, SidecarError("read-only folder")) and not once.records_attempts()
    assert once.halts(QuotaReached("cap")) and once.halts(EndpointRefuses("refuses")) and not once.halts(busy)
    assert RetryPolicy.delay(5, VLMUnavailable("no answer"), None) == RETRY_BASE_S  # the gate holds work meanwhile
    assert RetryPolicy.delay(1, busy, 120.0) == 120.0  # Retry-After is honoured
