"""The shipped system unit under a real systemd 252: a Debian bookworm container booted with ``systemd-nspawn``.

Opt-in (root, ``debootstrap``, ``systemd-nspawn`` and ``nsenter``; about a minute more the first time, for
debootstrap): ``MMWATCHD_NSPAWN=1 python -m pytest tests/test_nspawn.py`` or ``python -m pytest -m systemd``.
Otherwise it is skipped at once.

The project is installed the way the README's "System service" steps say (each step is checked to be in the README
word for word, then run in the container as root), against a fake OpenAI-compatible server with latency that runs in
this process on 127.0.0.1 (the container shares the host's network). The tests run in order on one container, each
setting up what it needs: start without a key, STATUS=, a key as a credential and in an environment file, a
person's folder through the README's ACL recipe, reload, a 150-file startup backlog under a 3 s watchdog, stop during
a backlog and when idle, whole sidecars, ``mmwatchd status`` from a root shell, the per-file journal lines; then the
user unit by the README's user-service steps.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import nspawn
import pytest
import yaml
from fakevlm import FakeVLM, Recorded, Scripted
from media import make_jpeg
from optin import opted_in

from mmwatchd.vlm import NO_KEY

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()

LATENCY_S = 0.3
CONCURRENCY = 4
TIMEOUT_S = 10
BACKLOG = 150
#: The drop-in's TimeoutStopSec= for a config with endpoint.timeout_s = TIMEOUT_S, by the README's rule (+ 30).
TIMEOUT_STOP_S = TIMEOUT_S + 30
UNIT = "mmwatchd.service"
DROPINS = Path("/etc/systemd/system/mmwatchd.service.d")
PHOTOS = Path("/srv/photos")
ALICE = Path("/home/alice/Pictures")

#: The README's system-service steps, run as written (``sudo`` dropped: the container's shell is root's).
INSTALL = (
    "sudo useradd --system --home-dir /var/lib/mmwatchd --no-create-home --shell /usr/sbin/nologin mmwatchd",
    "sudo python3 -m venv /opt/mmwatchd && sudo /opt/mmwatchd/bin/pip install .",
    "sudo ln -s /opt/mmwatchd/bin/mmwatchd /usr/local/bin/mmwatchd",
    "sudo install -D -m 0644 config.example.yaml /etc/mmwatchd/config.yaml",
)
UNIT_STEPS = ("sudo cp systemd/mmwatchd.service /etc/systemd/system/",)
DROPIN = "[Service]\nReadWritePaths=\nReadWritePaths=/srv/photos /home/alice/Pictures\n"
ACL = (
    "sudo setfacl -m u:mmwatchd:x /home/alice",
    "sudo setfacl -R -m u:mmwatchd:rwX -m d:u:mmwatchd:rwX /home/alice/Pictures",
)
START = (
    "sudo mmwatchd check -c /etc/mmwatchd/config.yaml",
    "sudo systemctl enable --now mmwatchd",
)
CREDENTIAL = (
    "sudo install -d -m 0700 /etc/credstore",
    "sudo install -m 0600 /dev/stdin /etc/credstore/OPENAI_API_KEY <<< 'sk-...'",
    "sudo systemctl restart mmwatchd",
)
VERIFY = "sudo systemd-analyze verify /etc/systemd/system/mmwatchd.service"


def _opted_in(config: pytest.Config) -> bool:
    return opted_in(config, "systemd", "MMWATCHD_NSPAWN")


pytestmark = [
    pytest.mark.systemd,
    pytest.mark.skipif("not _opted_in(config)", reason="boots a container: set MMWATCHD_NSPAWN=1 or pass -m systemd"),
    pytest.mark.skipif(os.geteuid() != 0, reason="systemd-nspawn needs root"),
    pytest.mark.skipif(bool(nspawn.missing_tools()), reason=f"missing: {' '.join(nspawn.missing_tools())} "
                       "(Debian: apt-get install debootstrap systemd-container util-linux)"),
]  # fmt: skip


class SlowVLM(FakeVLM):
    """The fake server, answering every chat request after ``latency_s``, like a real model."""

    def __init__(self, latency_s: float, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.latency_s = latency_s

    def _default(self, request: Recorded) -> Scripted:
        answer = super()._default(request)
        if request.path.endswith("/chat/completions"):
            answer = dataclasses.replace(answer, delay_s=self.latency_s)
        return answer


@pytest.fixture(scope="module")
def fake() -> Iterator[SlowVLM]:
    server = SlowVLM(LATENCY_S, models=["fake-vlm"]).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def box(fake: SlowVLM) -> Iterator[nspawn.Container]:
    started = time.monotonic()
    nspawn.cache_root().mkdir(parents=True, exist_ok=True)
    image = nspawn.rootfs(nspawn.cache_root() / "debootstrap.log")
    work = Path(tempfile.mkdtemp(prefix="mmwatchd-nspawn-", dir="/var/tmp"))
    try:
        box = nspawn.Container(work, image)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    try:
        _install(box, fake)
        print(f"\ncontainer ready in {time.monotonic() - started:.1f} s")
        yield box
    finally:
        box.close()


def _readme(*steps: str) -> list[str]:
    """The steps as root runs them; each must be in the README as written, so the two cannot drift apart."""
    for step in steps:
        assert step in README, f"the README no longer says: {step}"
    return [step.replace("sudo ", "") for step in steps]


def _install(box: nspawn.Container, fake: SlowVLM) -> None:
    src = box.root / "root" / "mmwatchd"
    _copy_worktree(src)
    _sh(box, "cd /root/mmwatchd", *_readme(*INSTALL), timeout=900)
    # The README's "edit the config" step: the example config with our folders and server.
    doc = yaml.safe_load((REPO / "config.example.yaml").read_text())
    doc["endpoint"].update(base_url=fake.base_url, model="fake-vlm", api_key_env="OPENAI_API_KEY",
                           concurrency=CONCURRENCY, timeout_s=TIMEOUT_S, max_retries=0)  # fmt: skip
    doc["watch"] = [{"path": str(PHOTOS)}, {"path": str(ALICE)}]
    doc["settle_s"] = 0.5
    (box.root / "etc/mmwatchd/config.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    # The folders: root's /srv/photos and alice's ~/Pictures (bookworm makes homes 0700), with the README's ACLs.
    _sh(box, "useradd --create-home alice", "chmod 0700 /home/alice", "install -d -m 0755 /srv/photos",
        "setpriv --reuid alice --regid alice --init-groups mkdir -p /home/alice/Pictures",
        *_readme(*ACL), "setfacl -R -m u:mmwatchd:rwX -m d:u:mmwatchd:rwX /srv/photos")  # fmt: skip
    _sh(box, "cd /root/mmwatchd", *_readme(*UNIT_STEPS))
    assert DROPIN in README.replace("```ini\n", "")
    (box.root / DROPINS.relative_to("/")).mkdir(parents=True)
    (box.root / DROPINS.relative_to("/") / "override.conf").write_text(DROPIN)  # what `systemctl edit` saves
    _sh(box, "systemctl daemon-reload")
    verify = box.sh(_readme(VERIFY)[0], check=False)
    assert verify.returncode == 0 and "mmwatchd" not in verify.stderr, verify
    _sh(box, *_readme(*START), timeout=120)


def _copy_worktree(dest: Path) -> None:
    """The checkout as a user has it: tracked files and new ones that are not ignored."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.split(b"\0")  # fmt: skip
    for name in filter(None, listed):
        source = REPO / os.fsdecode(name)
        if source.is_file():
            (dest / os.fsdecode(name)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / os.fsdecode(name))


def _sh(box: nspawn.Container, *lines: str, timeout: float = 120.0) -> str:
    return box.sh(" && ".join(lines), timeout=timeout).stdout


# -- helpers -----------------------------------------------------------------------------------------------------


def _host(box: nspawn.Container, path: Path) -> Path:
    """A path inside the container, as the host sees it."""
    return box.root / path.relative_to("/")


def _photos(box: nspawn.Container, folder: Path, n: int, *, seed: int = 0) -> list[Path]:
    """``n`` distinct JPEGs in ``folder`` (a container path), written from the host; their container paths."""
    out = []
    for i in range(n):
        path = folder / f"IMG_{seed + i:04d}.jpg"
        make_jpeg(_host(box, path), (96, 64), seed=seed + i)
        out.append(path)
    return out


def _sidecar(box: nspawn.Container, photo: Path) -> Path:
    return _host(box, photo.with_name(photo.name + ".json"))


def _wait(what: str, predicate: Callable[[], bool], box: nspawn.Container, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            props = box.show(UNIT, "ActiveState", "SubState", "Result", "NRestarts", "StatusText")
            raise AssertionError(f"not within {timeout} s: {what}\n{props}\n{box.journal(UNIT)[-3000:]}")
        time.sleep(0.1)


def _done(box: nspawn.Container, photos: list[Path]) -> int:
    return sum(_sidecar(box, p).exists() for p in photos)


def _status_done(text: str) -> int:
    match = re.search(r"(\d+) done", text)
    assert match, f"STATUS= is not the status line: {text!r}"
    return int(match.group(1))


def _requests_for(fake: SlowVLM, name: str) -> list[Recorded]:
    return [r for r in fake.chat_requests if name.encode() in r.body]


def _running(box: nspawn.Container) -> dict[str, str]:
    props = box.show(UNIT, "ActiveState", "SubState", "Result", "NRestarts", "MainPID", "StatusText")
    assert (props["ActiveState"], props["SubState"]) == ("active", "running"), props
    return props


def _restart_clean(box: nspawn.Container) -> None:
    """Back to the shipped unit plus the README's drop-in, running."""
    for extra in ("watchdog.conf", "stop.conf"):
        _host(box, DROPINS / extra).unlink(missing_ok=True)
    _sh(box, "systemctl daemon-reload", "systemctl reset-failed mmwatchd || true", "systemctl restart mmwatchd")


# -- the tests, in order ------------------------------------------------------------------------------------------


def test_starts_without_a_key(box: nspawn.Container, fake: SlowVLM) -> None:
    assert not _host(box, Path("/etc/credstore/OPENAI_API_KEY")).exists()
    assert not _host(box, Path("/etc/mmwatchd/env")).exists()
    props = _running(box)
    assert props["NRestarts"] == "0"
    (photo,) = _photos(box, PHOTOS, 1, seed=9000)
    _wait("the first photo's sidecar", _sidecar(box, photo).exists, box)
    (request,) = _requests_for(fake, photo.name)
    assert request.headers.get("authorization") == f"Bearer {NO_KEY}"  # the SDK's placeholder: no key was found


def test_status_text_shows_and_changes(box: nspawn.Container) -> None:
    before = _status_done(_running(box)["StatusText"])
    photos = _photos(box, PHOTOS / "status", 3, seed=9100)
    _wait("three sidecars", lambda: _done(box, photos) == 3, box)
    _wait("STATUS= counting them", lambda: _status_done(box.show(UNIT, "StatusText")["StatusText"]) >= before + 3,
          box, timeout=30)  # fmt: skip


def test_a_key_as_a_credential(box: nspawn.Container, fake: SlowVLM) -> None:
    steps = _readme(*CREDENTIAL)
    try:
        _sh(box, *(s.replace("'sk-...'", "'sk-credential-test'") for s in steps))
        _running(box)
        (photo,) = _photos(box, PHOTOS, 1, seed=9200)
        _wait("a sidecar", _sidecar(box, photo).exists, box)
        keys = [r.headers.get("authorization") for r in _requests_for(fake, photo.name)]
        assert keys == ["Bearer sk-credential-test"]
        assert "sk-credential-test" not in box.journal(UNIT)
    finally:
        _host(box, Path("/etc/credstore/OPENAI_API_KEY")).unlink(missing_ok=True)
        _restart_clean(box)


def test_a_key_in_an_environment_file(box: nspawn.Container, fake: SlowVLM) -> None:
    assert "`OPENAI_API_KEY=sk-...` into `/etc/mmwatchd/env` (mode 0600" in README
    try:
        _sh(box, "install -m 0600 /dev/stdin /etc/mmwatchd/env <<< 'OPENAI_API_KEY=sk-envfile-test'",
            "systemctl restart mmwatchd")  # fmt: skip
        _running(box)
        (photo,) = _photos(box, PHOTOS, 1, seed=9300)
        _wait("a sidecar", _sidecar(box, photo).exists, box)
        assert [r.headers.get("authorization") for r in _requests_for(fake, photo.name)] == ["Bearer sk-envfile-test"]
    finally:
        _host(box, Path("/etc/mmwatchd/env")).unlink(missing_ok=True)
        _restart_clean(box)


def test_a_persons_folder_through_the_readme_acl(box: nspawn.Container) -> None:
    """alice makes a new subfolder and copies a photo in, as herself: the default ACL lets mmwatchd write there."""
    _running(box)
    (staged,) = _photos(box, Path("/var/tmp"), 1, seed=9400)  # not /tmp: the container's is its own tmpfs
    box.run("sh", "-c", f"mkdir -p {ALICE}/2026/trip && cp {staged} {ALICE}/2026/trip/", user="alice")
    photo = ALICE / "2026" / "trip" / staged.name
    _wait("a sidecar in alice's new folder", _sidecar(box, photo).exists, box)
    assert json.loads(_sidecar(box, photo).read_text())["status"] == "ok"


def test_reload_keeps_it_running(box: nspawn.Container) -> None:
    pid = _running(box)["MainPID"]
    cursor = box.journal_cursor()
    box.run("systemctl", "reload", "mmwatchd")
    _wait("config.reloaded in the journal", lambda: "config.reloaded" in box.journal(UNIT, since_cursor=cursor), box)
    props = _running(box)
    assert props["MainPID"] == pid and props["NRestarts"] == "0"


def test_a_startup_backlog_under_a_short_watchdog(box: nspawn.Container) -> None:
    """150 files waiting at start, WatchdogSec=3s, 0.3 s per request at concurrency 4 (about 12 s of requests):
    pings and STATUS= go on through the backlog, nothing is killed or restarted."""
    box.run("systemctl", "stop", "mmwatchd")
    photos = _photos(box, PHOTOS / "backlog", BACKLOG, seed=0)
    _host(box, DROPINS / "watchdog.conf").write_text("[Service]\nWatchdogSec=3s\n")
    try:
        cursor = box.journal_cursor()
        _sh(box, "systemctl daemon-reload", "systemctl reset-failed mmwatchd || true", "systemctl start mmwatchd")
        pid = _running(box)["MainPID"]
        seen: set[int] = set()

        def finished() -> bool:
            props = box.show(UNIT, "MainPID", "NRestarts", "Result", "StatusText", "ActiveState")
            assert props["NRestarts"] == "0" and props["Result"] == "success" and props["MainPID"] == pid, (
                f"killed during the backlog: {props}\n{box.journal(UNIT, since_cursor=cursor)[-3000:]}"
            )
            seen.add(_status_done(props["StatusText"]))
            return _done(box, photos) == BACKLOG

        _wait(f"{BACKLOG} sidecars", finished, box, timeout=300)
        journal = box.journal(UNIT, since_cursor=cursor)
        assert "Watchdog timeout" not in journal and "watchdog" not in box.show(UNIT, "Result")["Result"]
        assert len(seen) >= 2, f"STATUS= never changed during the backlog: done counts seen {sorted(seen)}"
    finally:
        _restart_clean(box)


def test_stop_during_a_backlog_finishes_only_the_requests_in_flight(box: nspawn.Container, fake: SlowVLM) -> None:
    box.run("systemctl", "stop", "mmwatchd")
    photos = _photos(box, PHOTOS / "backlog2", BACKLOG, seed=1000)
    _host(box, DROPINS / "stop.conf").write_text(f"[Service]\nTimeoutStopSec={TIMEOUT_STOP_S}\n")
    try:
        _sh(box, "systemctl daemon-reload", "systemctl reset-failed mmwatchd || true", "systemctl start mmwatchd")
        _wait("the backlog under way", lambda: _done(box, photos) >= 2 * CONCURRENCY, box)
        cursor = box.journal_cursor()
        sent = len(fake.chat_requests)
        began = time.monotonic()
        box.run("systemctl", "stop", "mmwatchd", timeout=TIMEOUT_STOP_S + 30)
        took = time.monotonic() - began
        props = box.show(UNIT, "ActiveState", "Result", "ExecMainCode", "ExecMainStatus")
        journal = box.journal(UNIT, since_cursor=cursor)
        after = len(fake.chat_requests) - sent
        problems = [
            *([] if props["ActiveState"] == "inactive" and props["Result"] == "success" else [f"ended as {props}"]),
            *([] if props["ExecMainStatus"] == "0" else [f"exit status {props['ExecMainStatus']}"]),
            *([] if took < TIMEOUT_STOP_S / 2 else [f"the stop took {took:.1f} s (TimeoutStopSec={TIMEOUT_STOP_S})"]),
            *([] if after <= CONCURRENCY else [f"{after} requests sent after SIGTERM (concurrency {CONCURRENCY})"]),
            *([] if _done(box, photos) < BACKLOG else ["the whole backlog was done before the stop ended"]),
            *_kills_after_stop(journal),
        ]
        for photo in photos:  # what was written is whole
            if _sidecar(box, photo).exists():
                assert json.loads(_sidecar(box, photo).read_text())["status"] == "ok"
        assert not problems, "\n".join(problems) + f"\n(stop took {took:.1f} s)\n{journal[-3000:]}"
    finally:
        _restart_clean(box)


def _wait_idle(box: nspawn.Container, timeout: float = 300.0) -> None:
    """Running, every photo answered, and STATUS= (sent every 5 s) saying so."""
    if box.show(UNIT, "ActiveState")["ActiveState"] != "active":
        _restart_clean(box)
    photos = [p for root in (PHOTOS, ALICE) for p in _host(box, root).rglob("*.jpg")]

    def idle() -> bool:
        if not all(p.with_name(p.name + ".json").exists() for p in photos):
            return False
        return box.show(UNIT, "StatusText")["StatusText"].startswith("0 queued, 0 in flight")

    _wait("every photo answered and STATUS= idle", idle, box, timeout=timeout)


def test_an_idle_stop_leaves_nothing_to_kill(box: nspawn.Container) -> None:
    try:
        _wait_idle(box)
        cursor = box.journal_cursor()
        box.run("systemctl", "stop", "mmwatchd", timeout=TIMEOUT_S + 60)
        props = box.show(UNIT, "ActiveState", "Result", "ExecMainStatus")
        assert (props["ActiveState"], props["Result"], props["ExecMainStatus"]) == ("inactive", "success", "0"), props
        _no_kill_after_stop(box.journal(UNIT, since_cursor=cursor))
    finally:
        _restart_clean(box)


def _kills_after_stop(journal: str) -> list[str]:
    """What systemd had to kill (nothing: the daemon stops its decoder processes itself), and tracebacks."""
    signs = ("SIGKILL", "Killing process", "remains running", "Traceback", "timed out")
    return [line for line in journal.splitlines() if any(sign in line for sign in signs)]


def _no_kill_after_stop(journal: str) -> None:
    kills = _kills_after_stop(journal)
    assert not kills, "in the journal of the stop:\n" + "\n".join(kills)


def test_sidecars_are_whole(box: nspawn.Container) -> None:
    sidecars = [p for root in (PHOTOS, ALICE) for p in _host(box, root).rglob("*.json")]
    assert len(sidecars) >= BACKLOG
    for path in sidecars:
        doc = json.loads(path.read_text())
        assert doc["status"] == "ok", path
    leftovers = [p for root in (PHOTOS, ALICE) for p in _host(box, root).rglob("*") if ".tmp" in p.name]
    assert not leftovers


def test_status_from_a_root_shell_sees_the_services_state(box: nspawn.Container) -> None:
    _wait_idle(box)
    answered = sum(1 for _ in _host(box, PHOTOS).rglob("*.jpg.json"))
    out = box.run("mmwatchd", "status").stdout  # PATH has /usr/local/bin, HOME=/root; no $STATE_DIRECTORY
    assert "no state yet" not in out, out
    assert re.search(rf"^{PHOTOS}: {answered} done, 0 failed, 0 pending", out, flags=re.M), out
    requests = int(re.search(r"^requests today: (\d+)", out, flags=re.M).group(1))  # type: ignore[union-attr]
    assert requests >= answered, out
    assert not _host(box, Path("/root/.local/state/mmwatchd")).exists()
    # root's status left nothing behind that the service's user cannot open: it still starts and works
    _restart_clean(box)
    (photo,) = _photos(box, PHOTOS, 1, seed=9500)
    _wait("a sidecar after root's status", _sidecar(box, photo).exists, box)


def test_the_journal_has_a_line_per_file(box: nspawn.Container) -> None:
    lines = [json.loads(line) for line in box.journal(UNIT).splitlines() if line.startswith("{")]
    done = {e["path"] for e in lines if e.get("event") == "job.done"}
    photos = [str(p.relative_to(box.root).as_posix()) for p in _host(box, PHOTOS / "backlog").glob("*.jpg")]
    assert len(photos) == BACKLOG
    missing = [p for p in photos if "/" + p not in done]
    assert not missing, f"{len(missing)} files without a job.done line, e.g. {missing[:3]}"


#: The README's user-service steps, run as the user (the linger step first: without a login session, it is what
#: starts the user's service manager).
USER_STEPS = (
    "python3 -m venv ~/.local/share/mmwatchd/venv && ~/.local/share/mmwatchd/venv/bin/pip install .",
    "mkdir -p ~/.config/mmwatchd && cp config.example.yaml ~/.config/mmwatchd/config.yaml",
    "mkdir -p ~/.config/systemd/user && cp systemd/mmwatchd-user.service ~/.config/systemd/user/mmwatchd.service",
    "systemctl --user daemon-reload && systemctl --user enable --now mmwatchd",
)
USER_DROPIN = "[Service]\nReadWritePaths=\nReadWritePaths=%h/Photos\n"


def test_the_user_unit(box: nspawn.Container, fake: SlowVLM) -> None:
    """Without ~/Pictures and without a key file it starts; the README's drop-in names the folder it writes to;
    ``mmwatchd status`` from the user's shell finds the service's state (systemd 252: ~/.config/mmwatchd)."""
    assert 'loginctl enable-linger "$USER"' in README
    assert "`[Service]`, `ReadWritePaths=`, `ReadWritePaths=%h/Photos /mnt/nas`" in README
    _sh(box, "useradd --create-home bob", "loginctl enable-linger bob")
    manager = f"user@{box.sh('id -u bob').stdout.strip()}.service"
    _wait("bob's service manager", lambda: box.run("systemctl", "is-active", manager, check=False).stdout.strip()
          == "active", box)  # fmt: skip
    _sh(box, "cp -a /root/mmwatchd /home/bob/mmwatchd", "chown -R bob:bob /home/bob/mmwatchd",
        "install -d -o bob -g bob /home/bob/Photos")  # fmt: skip
    bob = Path("/home/bob")
    doc = yaml.safe_load((REPO / "config.example.yaml").read_text())
    doc["endpoint"].update(base_url=fake.base_url, model="fake-vlm", api_key_env="OPENAI_API_KEY")
    doc["watch"] = [{"path": str(bob / "Photos")}]
    doc["settle_s"] = 0.5
    steps = _readme(*USER_STEPS)
    box.run("bash", "-euo", "pipefail", "-c", " && ".join(["cd ~/mmwatchd", *steps[:2]]), user="bob", timeout=900)
    (box.root / "home/bob/.config/mmwatchd/config.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    box.run("bash", "-euo", "pipefail", "-c", " && ".join(["cd ~/mmwatchd", *steps[2:]]), user="bob", timeout=120)
    assert not _host(box, bob / "Pictures").exists() and not _host(box, bob / ".config/mmwatchd/env").exists()

    def show() -> dict[str, str]:
        out = box.run("systemctl", "--user", "show", "mmwatchd", "--property=ActiveState", "--property=SubState",
                      "--property=Result", user="bob").stdout  # fmt: skip
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    assert (show()["ActiveState"], show()["SubState"]) == ("active", "running"), show()
    dropin = _host(box, bob / ".config/systemd/user/mmwatchd.service.d/override.conf")
    dropin.parent.mkdir(parents=True)
    dropin.write_text(USER_DROPIN)  # what `systemctl --user edit mmwatchd` saves
    box.run("bash", "-c", "systemctl --user daemon-reload && systemctl --user restart mmwatchd", user="bob")
    staged = _photos(box, Path("/var/tmp"), 1, seed=9600)[0]
    box.run("cp", str(staged), str(bob / "Photos"), user="bob")
    photo = bob / "Photos" / staged.name
    _wait("a sidecar in bob's ~/Photos", _sidecar(box, photo).exists, box)
    assert json.loads(_sidecar(box, photo).read_text())["status"] == "ok"
    out = box.run(str(bob / ".local/share/mmwatchd/venv/bin/mmwatchd"), "status", user="bob").stdout
    assert "no state yet" not in out and f"{bob / 'Photos'}: 1 done" in out, out
    assert (
        _host(box, bob / ".config/mmwatchd/state.sqlite3").exists()
        or _host(box, bob / ".local/state/mmwatchd/state.sqlite3").exists()
    )
