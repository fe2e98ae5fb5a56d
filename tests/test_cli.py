"""The command line as a person uses it: in-process for one-shot commands, a real process for ``run``."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from configs import write_config
from fakevlm import FakeVLM, chat_completion, error_body
from media import make_jpeg, make_named_text
from running import session_processes, spawn_run, stop_run, wait_until

from mmwatchd import __version__
from mmwatchd.cli import main

REPO = Path(__file__).resolve().parents[1]
RUN_ENV = {"MMWATCHD_TEST_KEY": "sk-secret-run"}


def sidecar(path: Path) -> dict:
    return json.loads(path.with_name(path.name + ".json").read_text())


class TestBasics:
    def test_version(self, capsys: pytest.CaptureFixture[str]) -> None:
        with pytest.raises(SystemExit) as info:
            main(["--version"])
        assert info.value.code == 0
        assert capsys.readouterr().out.strip() == f"mmwatchd {__version__}"

    def test_no_command_is_usage_error(self, capsys: pytest.CaptureFixture[str]) -> None:
        assert main([]) == 2

    def test_check_ok(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        cfg = write_config(tmp_path, base_url="http://127.0.0.1:9/v1")
        assert main(["check", "-c", str(cfg)]) == 0
        assert capsys.readouterr().out.startswith("config OK")

    def test_check_example_config(self, capsys: pytest.CaptureFixture[str]) -> None:
        assert main(["check", "-c", str(REPO / "config.example.yaml")]) == 0

    def test_check_reports_each_problem_and_exits_2(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        cfg = tmp_path / "bad.yaml"
        cfg.write_text("endpoint:\n  timeout: 5\nrules:\n  - name: a\n    prompt: '{nope}'\n")
        assert main(["check", "-c", str(cfg)]) == 2
        err = capsys.readouterr().err.splitlines()
        assert err[0] == f"{cfg}:2:3: endpoint.timeout: unknown key (did you mean 'timeout_s'?)"
        assert err[1].startswith(f"{cfg}:5:13: rules[0].prompt: unknown placeholder {{nope}}")
        assert "Traceback" not in "".join(err)

    def test_check_missing_watch_folder(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        cfg = write_config(tmp_path, base_url="http://127.0.0.1:9/v1", inbox=tmp_path / "in")
        (tmp_path / "in").rmdir()
        assert main(["check", "-c", str(cfg)]) == 2
        assert "watch[0].path:" in capsys.readouterr().err

    def test_config_from_environment(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        cfg = write_config(tmp_path, base_url="http://127.0.0.1:9/v1")
        monkeypatch.setenv("MMWATCHD_CONFIG", str(cfg))
        assert main(["check"]) == 0

    def test_the_command_exits_with_mains_code_and_flushed_output(self, tmp_path: Path) -> None:
        """``python -m mmwatchd`` skips the interpreter's teardown: the exit code and every line still come out."""
        good = write_config(tmp_path / "good", base_url="http://127.0.0.1:9/v1")
        bad = tmp_path / "bad.yaml"
        bad.write_text("endpoint:\n  timeout: 5\n")
        for cfg, code, out, err in ((good, 0, "config OK", ""), (bad, 2, "", "endpoint.timeout: unknown key")):
            run = subprocess.run([sys.executable, "-m", "mmwatchd", "check", "-c", str(cfg)],
                                 capture_output=True, text=True, timeout=60)  # fmt: skip
            assert run.returncode == code and out in run.stdout and err in run.stderr, run

    @pytest.mark.parametrize("fmt", [[], ["--json"]])
    def test_a_reader_that_went_away_is_no_traceback(self, tmp_path: Path, fmt: list[str]) -> None:
        """``mmwatchd status | head -1``: the pipe closes before the output is written."""
        cfg = write_config(tmp_path, base_url="http://127.0.0.1:9/v1")
        for i in range(3):
            make_jpeg(tmp_path / "inbox" / f"{i}.jpg", (16, 16), seed=i)
        read_end, write_end = os.pipe()
        os.close(read_end)  # the reader is gone before the first byte
        try:
            run = subprocess.run([sys.executable, "-m", "mmwatchd", "status", "-c", str(cfg), *fmt],
                                 stdout=write_end, stderr=subprocess.PIPE, timeout=60)  # fmt: skip
        finally:
            os.close(write_end)
        assert run.returncode == 1 and run.stderr.decode() == ""

    def test_the_console_scripts_decoders_do_not_run_the_command_again(self, tmp_path: Path, fake_vlm: FakeVLM) -> None:
        """The ``mmwatchd`` console script (what the systemd units start) is a script ``__main__``, which
        multiprocessing would import again in every decoder process, and with it the whole command: its decoders
        must carry only the encoders, as under ``python -m mmwatchd``."""
        script = tmp_path / "mmwatchd"  # as pip writes console scripts
        script.write_text(
            "import re\nimport sys\nfrom mmwatchd.cli import entry\nif __name__ == '__main__':\n"
            "    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])\n    sys.exit(entry())\n"
        )
        cfg = write_config(tmp_path, base_url=fake_vlm.base_url)
        with open(tmp_path / "run.log", "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, str(script), "run", "-c", str(cfg), "--log-format", "json"],
                cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
                stdout=subprocess.DEVNULL, stderr=log, start_new_session=True,
            )  # fmt: skip
        try:
            photo = make_jpeg(tmp_path / "inbox" / "a.jpg", (64, 48))
            wait_until(lambda: photo.with_name("a.jpg.json").exists(), timeout=60)  # a decoder has done a call
            maps = {pid: Path(f"/proc/{pid}/maps").read_text() for pid, _ in session_processes(proc.pid)}
            decoders = [pid for pid, text in maps.items() if "_imaging" in text and pid != proc.pid]
            assert decoders, maps.keys()
            assert "pydantic_core" in maps[proc.pid]  # what the command loads, and the decoders need not
            assert all("pydantic_core" not in maps[pid] for pid in decoders)
        finally:
            stop_run(proc, tmp_path)


class TestOnce:
    def test_dry_run_prints_the_plan_and_sends_nothing(
        self, tmp_path: Path, fake_vlm: FakeVLM, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("MMWATCHD_TEST_KEY", "sk-dry-run-secret")
        cfg = write_config(tmp_path, base_url=fake_vlm.base_url)
        photo = make_jpeg(tmp_path / "inbox" / "a.jpg", (3000, 1500))
        assert main(["once", "-c", str(cfg), "--dry-run", str(photo)]) == 0
        captured = capsys.readouterr()
        assert "sk-dry-run-secret" not in captured.out + captured.err
        out = json.loads(captured.out)
        (plan,) = out["files"]
        assert plan["status"] == "planned" and plan["rule"] == "photos" and plan["model"] == "fake-vlm"
        (part,) = plan["media"]["parts"]
        assert {k: part[k] for k in ("mime", "width", "height")} == {"mime": "image/jpeg", "width": 1500, "height": 750}
        assert 0 < part["bytes"] < plan["request_bytes"] <= out["max_request_bytes"]
        assert fake_vlm.requests == []
        assert not (tmp_path / "inbox" / "a.jpg.json").exists()

    def test_dry_run_decodes_in_decoder_processes_and_keeps_the_order(
        self, tmp_path: Path, fake_vlm: FakeVLM, capsys: pytest.CaptureFixture[str]
    ) -> None:
        # The plans come from the daemon's decoder processes, under its memory limit (a full-size decode of a
        # 24 MP photo does not fit in 64 MB), two at a time, and are printed in the order given.
        cfg = write_config(tmp_path, base_url=fake_vlm.base_url, limits={"decode_memory_mb": 64},
                           rule={"image": {"max_side": 6000, "passthrough": False}})  # fmt: skip
        big = make_jpeg(tmp_path / "inbox" / "big.jpg", (6000, 4000), detail=False)
        small = [make_jpeg(tmp_path / "inbox" / f"s{i}.jpg", (300 + i, 200)) for i in range(3)]
        assert main(["once", "-c", str(cfg), "--dry-run", str(small[0]), str(big), *map(str, small[1:])]) == 1
        plans = json.loads(capsys.readouterr().out)["files"]
        assert [Path(p["path"]).name for p in plans] == ["s0.jpg", "big.jpg", "s1.jpg", "s2.jpg"]
        assert [p["status"] for p in plans] == ["planned", "error", "planned", "planned"]
        assert "decoding needed more than 64 MB (limits.decode_memory_mb)" in plans[1]["reason"]
        assert [p["media"]["parts"][0]["width"] for p in plans if p["status"] == "planned"] == [300, 301, 302]

    def test_once_starts_no_more_decoder_processes_than_files(self, tmp_path: Path, fake_vlm: FakeVLM) -> None:
        from mmwatchd import config
        from mmwatchd.cli import _one_shot_daemon

        cfg = config.load(write_config(tmp_path, base_url=fake_vlm.base_url, endpoint={"concurrency": 4}))
        for files, decoders in ((1, 1), (0, 1), (None, min(4, os.cpu_count() or 1))):
            daemon = _one_shot_daemon(cfg, decoders=files)
            try:
                assert daemon.isolator.workers == decoders, files
            finally:
                daemon.close()

    def test_the_first_files_are_encoded_while_the_endpoint_is_checked(self, tmp_path: Path, fake_vlm: FakeVLM) -> None:
        """A one-shot run hands its first files to the workers before it checks the endpoint: they are read and
        encoded while the check loads the SDK, and their requests wait for its answer, then leave."""
        from mmwatchd import config
        from mmwatchd.cli import _one_shot_daemon, _start_one_shot

        cfg = config.load(write_config(tmp_path, base_url=fake_vlm.base_url, endpoint={"concurrency": 2}))
        photos = [make_jpeg(tmp_path / "inbox" / f"{i}.jpg", (64, 48), seed=i) for i in range(5)]
        checked = threading.Event()
        fake_vlm.enqueue(json={"object": "list", "data": [{"id": "fake-vlm", "object": "model", "created": 0,
                                                            "owned_by": "t"}]}, hold=checked, path="/v1/models")  # fmt: skip
        daemon = _one_shot_daemon(cfg, decoders=len(photos))
        try:
            starting = threading.Thread(target=_start_one_shot, args=(daemon, iter(photos), daemon.submit_all))
            starting.start()
            # The check is held: the two slots' requests are ready (and more are encoded) before it answers.
            wait_until(lambda: daemon.pool.ready >= 2, timeout=30)
            assert fake_vlm.chat_requests == []
            checked.set()
            starting.join(30)
            daemon.wait_idle()
        finally:
            checked.set()
            daemon.close()
        assert daemon.counts["ok"] == len(photos) and len(fake_vlm.chat_requests) == len(photos)

    def test_the_first_files_are_encoded_before_the_client_is_made(
        self, tmp_path: Path, fake_vlm: FakeVLM, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Making the client loads the SDK, about half a second in a fresh process (this one has it loaded, so
        that half second is a wait here). A photo's plan asks what the endpoint takes, which must not wait for it:
        the first requests are ready before the client exists, and leave once it does."""
        from mmwatchd import cli, config

        real_client = cli._client
        made, loading = threading.Event(), threading.Event()

        def slow_client(*args: object, **kwargs: object) -> object:
            loading.wait(30)
            client = real_client(*args, **kwargs)  # type: ignore[arg-type]
            made.set()
            return client

        monkeypatch.setattr(cli, "_client", slow_client)
        cfg = config.load(write_config(tmp_path, base_url=fake_vlm.base_url, endpoint={"concurrency": 2}))
        photos = [make_jpeg(tmp_path / "inbox" / f"{i}.jpg", (64, 48), seed=i) for i in range(4)]
        daemon = cli._one_shot_daemon(cfg, decoders=2)
        try:
            starting = threading.Thread(target=cli._start_one_shot, args=(daemon, iter(photos), daemon.submit_all))
            starting.start()
            wait_until(lambda: daemon.pool.ready >= 2, timeout=30)
            assert not made.is_set()
            loading.set()
            starting.join(30)
            daemon.wait_idle()
        finally:
            loading.set()
            daemon.close()
        assert made.is_set() and daemon.counts["ok"] == len(photos)

    def test_once_describes_and_reports(
        self, tmp_path: Path, fake_vlm: FakeVLM, capsys: pytest.CaptureFixture[str]
    ) -> None:
        cfg = write_config(tmp_path, base_url=fake_vlm.base_url)
        photo = make_jpeg(tmp_path / "elsewhere" / "a.jpg", (300, 200))  # outside the watched folder is fine
        assert main(["once", "-c", str(cfg), str(photo)]) == 0
        assert sidecar(photo)["status"] == "ok"
        assert capsys.readouterr().out.startswith(f"ok       {photo}")
        # Up to date now; --force sends it again.
        assert main(["once", "-c", str(cfg), str(photo)]) == 0
        assert len(fake_vlm.chat_requests) == 1
        assert main(["once", "-c", str(cfg), "--force", str(photo)]) == 0
        assert len(fake_vlm.chat_requests) == 2

    def test_once_exit_1_when_a_file_fails(
        self, tmp_path: Path, fake_vlm: FakeVLM, capsys: pytest.CaptureFixture[str]
    ) -> None:
        cfg = write_config(tmp_path, base_url=fake_vlm.base_url)
        good = make_jpeg(tmp_path / "good.jpg", (64, 48))
        bad = make_named_text(tmp_path / "bad.jpg")
        assert main(["once", "-c", str(cfg), str(good), str(bad), str(tmp_path / "missing.jpg")]) == 1
        captured = capsys.readouterr()
        assert f"error    {bad}: bad.jpg: not an image: looks like text" in captured.out
        assert "missing.jpg: no such file" in captured.err
        assert sidecar(good)["status"] == "ok" and sidecar(bad)["status"] == "error"

    @pytest.mark.parametrize("command", ["once", "scan"])
    def test_a_gateway_without_models_is_used_all_the_same(
        self, tmp_path: Path, fake_vlm: FakeVLM, command: str
    ) -> None:
        cfg = write_config(tmp_path, base_url=fake_vlm.base_url)
        fake_vlm.enqueue(status=404, json=error_body("no route /v1/models"), path="/v1/models")
        photo = make_jpeg(tmp_path / "inbox" / "a.jpg", (32, 24))
        done: list[int] = []
        args = ["once", "-c", str(cfg), str(photo)] if command == "once" else ["scan", "-c", str(cfg)]
        worker = threading.Thread(target=lambda: done.append(main(args)), daemon=True)
        worker.start()
        worker.join(30)  # it used to wait for a gate that only a /models answer opened: forever
        assert done == [0]
        assert sidecar(photo)["status"] == "ok" and len(fake_vlm.chat_requests) == 1

    def test_endpoint_down_is_one_clear_line(
        self, tmp_path: Path, fake_vlm: FakeVLM, capsys: pytest.CaptureFixture[str]
    ) -> None:
        cfg = write_config(tmp_path, base_url=fake_vlm.base_url)
        fake_vlm.pause()
        photo = make_jpeg(tmp_path / "a.jpg", (64, 48))
        assert main(["once", "-c", str(cfg), str(photo)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("mmwatchd: ") and fake_vlm.base_url in err and "Traceback" not in err
        assert not (tmp_path / "a.jpg.json").exists()


class TestScan:
    def test_scan_describes_what_needs_it(
        self, tmp_path: Path, fake_vlm: FakeVLM, capsys: pytest.CaptureFixture[str]
    ) -> None:
        cfg = write_config(tmp_path, base_url=fake_vlm.base_url)
        inbox = tmp_path / "inbox"
        photos = [make_jpeg(inbox / f"{i}.jpg", (64, 48), seed=i) for i in range(3)]
        photos.append(make_jpeg(inbox / "sub" / "deep" / "x.jpg", (64, 48)))
        make_jpeg(inbox / ".hidden.jpg", (64, 48))
        make_jpeg(inbox / "copying.jpg.part", (64, 48))
        make_named_text(inbox / "notes.txt")
        assert main(["scan", "-c", str(cfg)]) == 0
        assert all(sidecar(p)["status"] == "ok" for p in photos)
        assert len(fake_vlm.chat_requests) == 4
        assert "scan done: 4 described, 0 failed" in capsys.readouterr().out
        # A second scan finds nothing to do.
        assert main(["scan", "-c", str(cfg)]) == 0
        assert len(fake_vlm.chat_requests) == 4

    def test_create_makes_a_missing_folder(self, tmp_path: Path, fake_vlm: FakeVLM) -> None:
        """The one place roots are made: the command, before anything walks or watches them (the service does the
        same before it starts and on each reload)."""
        root = tmp_path / "new" / "inbox"
        cfg = write_config(tmp_path, base_url=fake_vlm.base_url, watch=[{"path": str(root), "create": True}])
        assert main(["scan", "-c", str(cfg)]) == 0
        assert root.is_dir()

    def test_nothing_to_do_needs_no_endpoint_and_no_client(self, tmp_path: Path, fake_vlm: FakeVLM) -> None:
        cfg = write_config(tmp_path, base_url=fake_vlm.base_url)
        make_jpeg(tmp_path / "inbox" / "a.jpg", (64, 48))
        assert main(["scan", "-c", str(cfg)]) == 0
        fake_vlm.pause()  # the endpoint is down from here on
        code = (
            "import sys; from mmwatchd.cli import main; rc = main(['scan', '-c', sys.argv[1]]); "
            "print('openai loaded:', 'openai' in sys.modules); sys.exit(rc)"
        )
        run = subprocess.run([sys.executable, "-c", code, str(cfg)], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        assert "scan done: 0 described" in run.stdout and "openai loaded: False" in run.stdout
        make_jpeg(tmp_path / "inbox" / "b.jpg", (64, 48))  # now there is work: the endpoint is checked, and is down
        run = subprocess.run([sys.executable, "-c", code, str(cfg)], capture_output=True, text=True, timeout=60)
        assert run.returncode == 1 and "cannot reach the model endpoint" in run.stderr, run.stderr
        assert not (tmp_path / "inbox" / "b.jpg.json").exists()


class TestRun:
    def test_scans_watches_and_stops_cleanly(self, tmp_path: Path, fake_vlm: FakeVLM) -> None:
        cfg = write_config(tmp_path, base_url=fake_vlm.base_url)
        inbox = tmp_path / "inbox"
        old = make_jpeg(inbox / "old.jpg", (64, 48))
        proc = spawn_run(cfg, tmp_path, env=RUN_ENV)
        try:
            wait_until(lambda: (inbox / "old.jpg.json").exists())
            new = make_jpeg(tmp_path / "staging" / "new.jpg", (64, 48), seed=2)
            os.rename(new, inbox / "new.jpg")  # an atomic move-in counts as new
            wait_until(lambda: (inbox / "new.jpg.json").exists())
        finally:
            logs = stop_run(proc, tmp_path)
        assert sidecar(old)["status"] == "ok" and sidecar(inbox / "new.jpg")["status"] == "ok"
        events = [e["event"] for e in logs]
        assert events.count("job.done") == 2 and "daemon.stopped" in events
        assert not any("sk-secret-run" in json.dumps(e) for e in logs)
        assert sorted(os.listdir(inbox)) == ["new.jpg", "new.jpg.json", "old.jpg", "old.jpg.json"]

    def test_sigterm_during_a_slow_request_finishes_it(self, tmp_path: Path, fake_vlm: FakeVLM) -> None:
        cfg = write_config(tmp_path, base_url=fake_vlm.base_url)
        inbox = tmp_path / "inbox"
        fake_vlm.enqueue(json=chat_completion("slow answer"), delay_s=1.5, path="/v1/chat/completions")
        proc = spawn_run(cfg, tmp_path, env=RUN_ENV)
        try:
            make_jpeg(inbox / "a.jpg", (64, 48))
            fake_vlm.wait_for_requests(2, timeout=20)  # GET /models, then the chat request in flight
        finally:
            stop_run(proc, tmp_path)
        assert sidecar(inbox / "a.jpg")["response"]["text"] == "slow answer"
        assert sorted(os.listdir(inbox)) == ["a.jpg", "a.jpg.json"]

    def test_endpoint_down_at_start_pauses_work_until_it_is_back(self, tmp_path: Path, fake_vlm: FakeVLM) -> None:
        cfg = write_config(tmp_path, base_url=fake_vlm.base_url)
        inbox = tmp_path / "inbox"
        fake_vlm.pause()
        make_jpeg(inbox / "a.jpg", (64, 48))
        proc = spawn_run(cfg, tmp_path, env=RUN_ENV)
        try:
            # The daemon is up and has found the endpoint dead (a fixed sleep raced a slow start on a busy machine);
            # the file must not fail meanwhile.
            wait_until(lambda: b'"endpoint.unreachable"' in (tmp_path / "run.log").read_bytes(), timeout=60)
            assert not (inbox / "a.jpg.json").exists()
            fake_vlm.resume()
            wait_until(lambda: (inbox / "a.jpg.json").exists(), timeout=30)
        finally:
            logs = stop_run(proc, tmp_path)
        assert sidecar(inbox / "a.jpg")["status"] == "ok"
        unreachable = [e for e in logs if e["event"] == "endpoint.unreachable"]
        assert len(unreachable) == 1 and unreachable[0]["url"] == fake_vlm.base_url
        assert "endpoint.up" in [e["event"] for e in logs]


class TestStatus:
    def test_status_counts_per_root_and_last_errors(
        self, tmp_path: Path, fake_vlm: FakeVLM, capsys: pytest.CaptureFixture[str]
    ) -> None:
        cfg = write_config(tmp_path, base_url=fake_vlm.base_url)
        inbox = tmp_path / "inbox"
        make_jpeg(inbox / "a.jpg", (64, 48))
        make_named_text(inbox / "bad.jpg")
        assert main(["scan", "-c", str(cfg)]) == 1  # bad.jpg failed
        make_jpeg(inbox / "new.jpg", (64, 48), seed=5)  # arrived after the scan
        (inbox / "foreign.jpg.json").write_text("{}")
        make_jpeg(inbox / "foreign.jpg", (64, 48), seed=6)
        capsys.readouterr()
        assert main(["status", "-c", str(cfg), "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["roots"][str(inbox)] == {"done": 1, "failed": 1, "pending": 1, "retrying": 0, "foreign": 1}
        assert report["requests_today"] == 1
        (err,) = report["last_errors"]
        assert err["path"] == str(inbox / "bad.jpg") and err["kind"] == "unsupported"
        assert main(["status", "-c", str(cfg)]) == 0
        text = capsys.readouterr().out
        assert f"{inbox}: 1 done, 1 failed, 1 pending, 0 retrying, 1 blocked by a foreign file" in text
        assert "bad.jpg: unsupported: bad.jpg: not an image: looks like text" in text

    def test_status_counts_indexed_files_without_opening_them(
        self, tmp_path: Path, fake_vlm: FakeVLM, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        from mmwatchd import status

        cfg = write_config(tmp_path, base_url=fake_vlm.base_url)
        inbox = tmp_path / "inbox"
        for i in range(3):
            make_jpeg(inbox / f"{i}.jpg", (64, 48), seed=i)
        make_named_text(inbox / "bad.jpg")
        assert main(["scan", "-c", str(cfg)]) == 1  # bad.jpg gets an error sidecar
        make_jpeg(inbox / "new.jpg", (64, 48), seed=9)
        sniffed: list[Path] = []
        real_look = status.looked_at  # a stat and a sniff of the file's first bytes

        def counting_look(path: Path):  # type: ignore[no-untyped-def]
            sniffed.append(path)
            return real_look(path)

        monkeypatch.setattr(status, "looked_at", counting_look)
        capsys.readouterr()
        assert main(["status", "-c", str(cfg), "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["roots"][str(inbox)] == {"done": 3, "failed": 1, "pending": 1, "retrying": 0, "foreign": 0}
        assert sniffed == [inbox / "new.jpg"]  # the four answered files were counted from the index
        # An index made before it kept the answer: the first status reads those sidecars and fills it in.
        db = sqlite3.connect(tmp_path / "state" / "state.sqlite3")
        db.execute("UPDATE done SET status = NULL")
        db.commit()
        db.close()
        for expected in (5, 1):
            sniffed.clear()
            assert main(["status", "-c", str(cfg), "--json"]) == 0
            assert json.loads(capsys.readouterr().out)["roots"][str(inbox)]["done"] == 3
            assert len(sniffed) == expected


def test_sighup_reloads_a_running_daemon(tmp_path: Path, fake_vlm: FakeVLM) -> None:
    cfg = write_config(tmp_path, base_url=fake_vlm.base_url)
    inbox = tmp_path / "inbox"
    proc = spawn_run(cfg, tmp_path, env=RUN_ENV)
    try:
        make_jpeg(inbox / "a.jpg", (64, 48))
        wait_until(lambda: (inbox / "a.jpg.json").exists())
        write_config(tmp_path, base_url=fake_vlm.base_url, rule={"prompt": "Reloaded: {name}"})
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: len(fake_vlm.chat_requests) >= 2)
    finally:
        logs = stop_run(proc, tmp_path)
    assert fake_vlm.chat_requests[-1].content[0]["text"] == 'Reloaded: "a.jpg"'
    assert "config.reloaded" in [e["event"] for e in logs]


def test_rescans_skip_done_files_from_the_index_and_rebuild_it(
    tmp_path: Path, fake_vlm: FakeVLM, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path, base_url=fake_vlm.base_url)
    inbox = tmp_path / "inbox"
    photos = [make_jpeg(inbox / f"{i}.jpg", (32, 24), seed=i) for i in range(4)]
    assert main(["scan", "-c", str(cfg)]) == 0
    capsys.readouterr()
    # Indexed: not even handed to a worker (which would count it as skipped after reading its sidecar).
    assert main(["scan", "-c", str(cfg)]) == 0
    assert "0 described, 0 failed, 0 not reached, 0 skipped" in capsys.readouterr().out
    # A deleted sidecar is noticed (the sidecars are the truth), and so is a changed prompt.
    (inbox / "0.jpg.json").unlink()
    assert main(["scan", "-c", str(cfg)]) == 0
    assert "1 described" in capsys.readouterr().out
    # A lost index is rebuilt from the sidecars, without a single request.
    for f in (tmp_path / "state").iterdir():
        f.unlink()
    assert main(["scan", "-c", str(cfg)]) == 0
    assert "0 described, 0 failed, 0 not reached, 4 skipped" in capsys.readouterr().out
    assert main(["scan", "-c", str(cfg)]) == 0
    assert "0 described, 0 failed, 0 not reached, 0 skipped" in capsys.readouterr().out
    write_config(tmp_path, base_url=fake_vlm.base_url, rule={"prompt": "Other words for {name}."})
    assert main(["scan", "-c", str(cfg)]) == 0
    assert "4 described" in capsys.readouterr().out
    assert len(fake_vlm.chat_requests) == 4 + 1 + 4
    assert all(p.with_name(p.name + ".json").exists() for p in photos)


def test_a_complete_rescan_drops_the_index_entries_of_files_gone(
    tmp_path: Path, fake_vlm: FakeVLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mmwatchd.state import State

    cfg = write_config(tmp_path, base_url=fake_vlm.base_url)
    inbox = tmp_path / "inbox"
    keep = make_jpeg(inbox / "keep.jpg", (32, 24))
    gone = make_jpeg(inbox / "sub" / "gone.jpg", (32, 24), seed=1)
    assert main(["scan", "-c", str(cfg)]) == 0

    def indexed() -> set[str]:
        with State(tmp_path / "state" / "state.sqlite3") as state:
            return set(state.done_index())

    assert indexed() == {str(keep), str(gone)}
    gone.unlink()
    # While a folder cannot be listed (a share not mounted, permissions; made to fail by hand, since the tests may
    # run as root, who can list anything), its files are unseen, not gone: their entries stay.
    listing = os.scandir

    def scandir(path: str) -> Iterator[os.DirEntry[str]]:
        if os.fspath(path) == str(inbox / "sub"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return listing(path)

    monkeypatch.setattr(os, "scandir", scandir)
    assert main(["scan", "-c", str(cfg)]) == 0
    assert indexed() == {str(keep), str(gone)}
    monkeypatch.undo()
    assert main(["scan", "-c", str(cfg)]) == 0
    assert indexed() == {str(keep)}
    assert len(fake_vlm.chat_requests) == 2
