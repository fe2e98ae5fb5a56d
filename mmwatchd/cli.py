"""Command line: ``mmwatchd check | once | scan | backfill | run``. Exit codes: 0 success, 1 some file failed, 2 usage/config."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import errno
import importlib.util
import ipaddress
import itertools
import json
import os
import signal
import stat
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import urlsplit

from mmwatchd import config as config_mod, log as log_mod, sidecar
from mmwatchd.errors import ConfigError, MmwatchdError, StateError
from mmwatchd.model import Config
from mmwatchd.pipeline import Outcome, Pipeline
from mmwatchd.servers import EndpointKnowledge, endpoint_knowledge

if TYPE_CHECKING:
    from mmwatchd.daemon import Daemon
    from mmwatchd.progress import Reporter, Snapshot
    from mmwatchd.state import State
    from mmwatchd.vlm import RequestObserver, VLMClient

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
#: One-shot commands give a file this many tries at transient failures before reporting it failed.
ONE_SHOT_ATTEMPTS = 3


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.func(args))
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return EXIT_USAGE
    except MmwatchdError as exc:
        print(f"mmwatchd: {exc.message}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `mmwatchd status | head -1`: the reader is gone, which is not an error worth a traceback
        _stdout_to_devnull()
        return EXIT_FAILED


def _stdout_to_devnull() -> None:
    """Point stdout at /dev/null, so that flushing what is still buffered at exit cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def entry() -> NoReturn:
    """The ``mmwatchd`` command: :func:`main`, then a prompt exit.

    By the time ``main`` returns, everything the process owns is closed: worker threads joined, decoder processes
    stopped, the database closed. The atexit handlers still run here (logging, multiprocessing); what is skipped is
    the interpreter's module teardown, which frees the SDK's thousands of classes one by one: about 0.25 s that a
    scan, or a service being stopped, need not wait for.
    """
    _as_package_main()
    code = main()
    from mmwatchd.isolate import stop_shared_processes

    stop_shared_processes()  # the forkserver and resource tracker end before we do, not a moment after
    atexit._run_exitfuncs()  # private, no public equivalent: tests/test_isolate.py::TestPrivateStdlib checks it
    try:
        sys.stdout.flush()
    except BrokenPipeError:  # what was still buffered has no reader any more
        _stdout_to_devnull()
        code = code or EXIT_FAILED
    with contextlib.suppress(OSError):
        sys.stderr.flush()
    os._exit(code)


def _as_package_main() -> None:
    """Run as ``mmwatchd.__main__``, which the command is in effect (``python -m mmwatchd`` runs the same ``entry``).

    multiprocessing runs a script that is ``__main__`` again in every process it starts from the forkserver, the
    decoder processes included: for the ``mmwatchd`` console script that is the command's whole import (the config's
    pydantic models, structlog, the pipeline), about 0.3 s of CPU and 25 MB in each decoder, at every start and every
    replacement, on the cores the command's own start-up needs. A package's ``__main__`` is never run again, and the
    decoders need nothing from it: what they run lives in ``mmwatchd.encode``.
    """
    main = sys.modules.get("__main__")
    if main is not None and getattr(main, "__spec__", None) is None:
        main.__spec__ = importlib.util.find_spec("mmwatchd.__main__")


class _Version(argparse.Action):
    """``--version``, looked up only when asked for: finding the installed version costs every command start-up."""

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        import mmwatchd

        print(f"mmwatchd {mmwatchd.__version__}")
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmwatchd",
        description="Describe new photos and videos with an OpenAI-compatible vision model; JSON sidecars beside them.",
    )
    parser.add_argument("--version", action=_Version, nargs=0, help="show the version and exit")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-c",
        "--config",
        metavar="CONFIG",
        help="config file (default: $MMWATCHD_CONFIG, ./mmwatchd.yaml, $XDG_CONFIG_HOME/mmwatchd/config.yaml, "
        "/etc/mmwatchd/config.yaml)",
    )
    common.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="overrides log_level")
    common.add_argument(
        "--log-format", choices=["auto", "console", "json"], default="auto", help="auto: console on a TTY, else JSON"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("check", parents=[common], help="validate the config and exit")
    p.add_argument(
        "--endpoint",
        action="store_true",
        help="also ask the endpoint what it takes (images, video_url, json_schema, request size): a few tiny requests",
    )
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("doctor", parents=[common], help="the same as check --endpoint")
    p.set_defaults(func=cmd_check, endpoint=True)

    p = sub.add_parser("once", parents=[common], help="process the named files now, then exit")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument(
        "--dry-run", action="store_true", help="print what would be sent, as JSON; call nothing, write nothing"
    )
    p.add_argument("--force", action="store_true", help="describe files again even when their sidecar is up to date")
    p.set_defaults(func=cmd_once)

    p = sub.add_parser(
        "scan", parents=[common], help="process every file under the watched folders that needs it, then exit"
    )
    p.add_argument("--metrics-textfile", type=Path, metavar="PATH",
                   help="at the end, write the run's metrics there for node_exporter's textfile collector")  # fmt: skip
    p.set_defaults(func=cmd_scan)

    p = sub.add_parser(
        "backfill", parents=[common],
        help="describe the backlog a scan would send through a Batch API, or export it for vllm run-batch / Ray",
    )  # fmt: skip
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--batch", action="store_true",
                      help="send the backlog as Batch API batches, wait for them and write the sidecars "
                      "(resumes the batches a stopped run left)")  # fmt: skip
    what.add_argument("--export", type=Path, metavar="DIR",
                      help="write the backlog as JSONL shards into DIR, for vllm run-batch or Ray Data")  # fmt: skip
    what.add_argument("--import", dest="import_", type=Path, nargs="+", metavar="OUT",
                      help="apply output files of exported shards (vllm run-batch -o OUT)")  # fmt: skip
    what.add_argument("--status", action="store_true", help="list the batches and what they hold")
    what.add_argument("--cancel", action="store_true",
                      help="cancel the batches under way and drop exported shards not imported yet")  # fmt: skip
    p.add_argument("--endpoint", metavar="NAME", help="the endpoint to use (default: the config's endpoint)")
    p.add_argument("--no-wait", action="store_true",
                   help="with --batch: send the batches and exit; a later backfill --batch collects them")  # fmt: skip
    p.add_argument("--metrics-textfile", type=Path, metavar="PATH",
                   help="at the end, write the run's metrics there for node_exporter's textfile collector")  # fmt: skip
    p.set_defaults(func=cmd_backfill)

    p = sub.add_parser("run", parents=[common], help="scan, then watch the folders until SIGTERM/SIGINT")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("status", parents=[common], help="done/pending/failed/retrying per folder, and recent errors")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("search", parents=[common], help="find files by words of their captions, tags or paths")
    p.add_argument("query", metavar="WORDS", help='what to look for, e.g. "dog on a beach" (all words must match)')
    p.add_argument("--json", action="store_true", help="print the matches as JSON")
    p.add_argument("--limit", type=_positive_int, default=20, metavar="N", help="at most N matches (default 20)")
    p.add_argument("--reindex", action="store_true", help="rebuild the search index from the sidecars first")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("gallery", parents=[common], help="write a static HTML page to review the descriptions")
    p.add_argument("paths", nargs="*", metavar="PATH", help="files or folders to show (default: the watched folders)")
    p.add_argument(
        "-o",
        "--output",
        default="review.html",
        metavar="HTML",
        help="the page to write (default review.html); thumbnails go into HTML's name + _files/",
    )
    p.set_defaults(func=cmd_gallery)
    return parser


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _load(args: argparse.Namespace) -> Config:
    cfg = config_mod.load(config_mod.find_config(args.config))
    log_mod.setup(args.log_level or cfg.log_level, fmt=args.log_format)
    return cfg


def _client(cfg: Config, state: State | None = None, knowledge: EndpointKnowledge | None = None) -> VLMClient:
    """The VLM client; ``state`` keeps what it learns about the endpoint (video.mode: auto) across runs, in
    ``knowledge`` when that was made before it."""
    from mmwatchd.vlm import VLMClient

    if insecure_endpoint(cfg.endpoint.base_url):
        log_mod.get_logger().warning(
            "endpoint.plain_http",
            url=cfg.endpoint.base_url,
            note="photos and the API key cross the network unencrypted; use https:// for hosts other than this one",
        )
    return VLMClient(cfg.endpoint, api_key=api_key(cfg), store=state, knowledge=knowledge)


def insecure_endpoint(base_url: str) -> bool:
    """Plain HTTP to anything but this machine."""
    parts = urlsplit(base_url)
    if parts.scheme != "http":
        return False
    host = (parts.hostname or "").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True


#: The systemd credential read when endpoint.api_key_env is unset (the shipped unit's ``LoadCredential=`` name).
DEFAULT_CREDENTIAL = "OPENAI_API_KEY"


def api_key(cfg: Config, env: Mapping[str, str] = os.environ) -> str | None:
    """The key from the variable named by endpoint.api_key_env, else from a systemd credential, else from
    endpoint.api_key_file.

    The environment is read only when the config names a variable: a key exported in someone's shell is not meant
    for whatever server ``base_url`` points at. A credential is different: ``LoadCredential=`` hands it to this one
    service on purpose, so it is read under the name api_key_env gives, or as ``OPENAI_API_KEY`` when that is unset
    and no api_key_file is given (``LoadCredential=OPENAI_API_KEY:/etc/mmwatchd/OPENAI_API_KEY`` puts it in
    ``$CREDENTIALS_DIRECTORY``).
    """
    name = cfg.endpoint.api_key_env
    if name and env.get(name):
        return env[name]
    creds = env.get("CREDENTIALS_DIRECTORY")
    if name and creds and (Path(creds) / name).is_file():
        return (Path(creds) / name).read_text(encoding="utf-8").strip() or None
    if cfg.endpoint.api_key_file is not None:
        return _key_from_file(cfg)
    if not name and creds and (Path(creds) / DEFAULT_CREDENTIAL).is_file():
        return (Path(creds) / DEFAULT_CREDENTIAL).read_text(encoding="utf-8").strip() or None
    return None


def _key_from_file(cfg: Config) -> str | None:
    path = cfg.endpoint.api_key_file
    assert path is not None
    where = cfg.where(("endpoint", "api_key_file"))
    try:
        st = path.stat()
        if st.st_mode & 0o077:
            raise ConfigError(
                f"{where}: {path} can be read by other users (mode {stat.S_IMODE(st.st_mode):o}); run: chmod 600 {path}"
            )
        return path.read_text(encoding="utf-8").strip() or None
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {path}: {exc.strerror or exc}") from None


def cmd_check(args: argparse.Namespace) -> int:
    path = config_mod.find_config(args.config)
    cfg = config_mod.load(path)
    missing = _missing_roots(cfg)
    if missing:
        raise ConfigError(missing)
    print(f"config OK: {path} ({len(cfg.rules)} rule(s), {len(cfg.watch)} watched folder(s))")
    if getattr(args, "endpoint", False):
        return _check_endpoint(cfg, args)
    return EXIT_OK


def _check_endpoint(cfg: Config, args: argparse.Namespace) -> int:
    """``check --endpoint``: a short table of what each endpoint takes, in the order of the config; exit 1 when
    something the config uses fails at any of them (each is checked for the rules that may send to it)."""
    from dataclasses import replace

    from mmwatchd.doctor import check_endpoint, render
    from mmwatchd.encode.image import probe_pictures
    from mmwatchd.endpoint import rule_uses
    from mmwatchd.model import members

    log_mod.setup(args.log_level or "warning", fmt=args.log_format)
    every = members(cfg)
    failed = False
    with _state(cfg) as state:
        for i, member in enumerate(every):
            one = cfg if len(every) == 1 else replace(cfg, endpoint=member.spec)
            rules = [r for r in cfg.rules if rule_uses(r, member.name)]
            client = _client(one, state)
            try:
                rows = check_endpoint(one, client, pictures=probe_pictures, rules=rules)
            finally:
                client.close()
            name = member.name if len(every) > 1 else None
            print(("\n" if i else "") + render(member.spec.base_url, member.spec.model, rows, name=name), flush=True)
            failed |= any(r.ok is False and r.needed for r in rows)
    return EXIT_FAILED if failed else EXIT_OK


def cmd_once(args: argparse.Namespace) -> int:
    cfg = _load(args)
    paths = [Path(f) for f in args.files]
    if args.dry_run:
        plans = []
        failed = False
        for p, outcome in zip(paths, _dry_run(cfg, paths), strict=True):
            if outcome.plan is not None:
                plans.append({"status": "planned", "request_bytes": outcome.request_bytes, **outcome.plan})
            else:
                failed |= outcome.status == "error" or not Path(p).is_file()
                plans.append({"path": str(outcome.path), "status": outcome.status, "reason": outcome.reason})
        json.dump({"max_request_bytes": cfg.endpoint.max_request_bytes, "files": plans}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return EXIT_FAILED if failed else EXIT_OK
    missing = [p for p in paths if not p.is_file()]
    for p in missing:
        why = "not a regular file (a folder, pipe or device): nothing to describe" if p.exists() else "no such file"
        print(f"mmwatchd: {p}: {why}", file=sys.stderr)
    todo = [Path(os.path.abspath(p)) for p in paths if p not in missing]
    daemon = _one_shot_daemon(cfg, decoders=len(todo))
    try:
        with _progress(cfg, daemon, "once") if len(todo) > 1 else contextlib.nullcontext():
            with daemon.finding():
                _start_one_shot(daemon, iter(todo), lambda files: daemon.submit_all(files, explicit=True,
                                                                                   force=args.force))  # fmt: skip
            daemon.wait_idle()
    finally:
        daemon.close()
    _print_outcomes(daemon.outcomes, cfg)
    if daemon.halted:
        print(f"mmwatchd: stopped: {daemon.halted}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_FAILED if missing or any(o.failed for o in daemon.outcomes) else EXIT_OK


def _dry_run(cfg: Config, paths: list[Path]) -> list[Outcome]:
    """Plan ``paths`` as the daemon would, in its decoder processes (a damaged file cannot take the command down),
    on as many of them at once as there are cores, files and ``endpoint.concurrency`` allow; in order."""
    from concurrent.futures import ThreadPoolExecutor

    from mmwatchd.isolate import DECODER_PRELOAD, Isolator
    from mmwatchd.limiter import workers as endpoint_workers

    workers = max(1, min(len(paths), endpoint_workers(cfg.endpoint), os.cpu_count() or 1))
    with Isolator(workers=workers, preload=DECODER_PRELOAD, **cfg.limits.decoders) as isolator:
        isolator.prestart()
        processor = Pipeline(cfg, None, isolator=isolator)
        with ThreadPoolExecutor(workers, thread_name_prefix="mmwatchd-plan") as pool:
            return list(pool.map(lambda p: processor.process(p, explicit=True, dry_run=True), paths))


def cmd_scan(args: argparse.Namespace) -> int:
    cfg = _load(args)
    _require_roots(cfg)
    daemon = _one_shot_daemon(cfg, metrics=args.metrics_textfile is not None)
    try:
        todo = daemon.needing_work()
        first = next(todo, None)
        if first is not None:  # the endpoint is needed (and its client made) only once there is something to send
            with _progress(cfg, daemon, "scan"):
                _start_one_shot(daemon, itertools.chain([first], todo),
                                lambda files: daemon.submit_all(files, scanned=True))  # fmt: skip
                daemon.wait_idle()
    finally:
        daemon.close()
    if args.metrics_textfile is not None and not _write_textfile(daemon, args.metrics_textfile):
        return EXIT_FAILED
    _print_outcomes([o for o in daemon.outcomes if o.status in ("error", "retry")], cfg)
    c = daemon.counts
    print(f"scan done: {c['ok']} described, {c['error']} failed, {c['retry']} not reached, {c['skipped']} skipped")
    if daemon.halted:
        print(f"mmwatchd: scan stopped: {daemon.halted}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_FAILED if c["error"] or c["retry"] else EXIT_OK


def _print_busy(batch_ids: list[str], then: str) -> None:
    """The shards a backfill left alone because another backfill was acting on them."""
    for batch_id in dict.fromkeys(batch_ids):
        print(f"mmwatchd: {batch_id}: another backfill was sending, applying or cancelling it; left to that one "
              f"({then})", file=sys.stderr)  # fmt: skip


def _write_textfile(daemon: Daemon, path: Path) -> bool:
    """``--metrics-textfile``: the run's metrics for node_exporter; False (and said) when it cannot be written."""
    from mmwatchd.metrics import Metrics

    if not isinstance(daemon.metrics, Metrics):  # the command made its daemon without metrics: a bug, not the user's
        raise RuntimeError("--metrics-textfile needs a daemon made with metrics=True")
    try:
        daemon.metrics.write_textfile(path)
    except OSError as exc:
        print(f"mmwatchd: cannot write --metrics-textfile {path}: {exc.strerror or exc}", file=sys.stderr)
        return False
    return True


def cmd_backfill(args: argparse.Namespace) -> int:
    from mmwatchd.backfill import Backfill, choose_endpoint, render_status

    cfg = _load(args)
    choose_endpoint(cfg, args.endpoint)  # a wrong name is an error before anything is read or sent
    if args.status:
        with _state(cfg) as state:
            rows = state.batches()
            for line in render_status(rows, lambda batch_id: len(state.batch_items(batch_id))):
                print(line)
        return EXIT_OK
    if args.export is not None or args.batch:
        _require_roots(cfg)
    daemon = _one_shot_daemon(cfg, metrics=args.metrics_textfile is not None)
    try:
        backfill = Backfill(daemon, endpoint=args.endpoint)
        if args.cancel:
            cancelled = backfill.cancel()
            for row in cancelled:
                print(f"cancelled {row.id} ({row.requests} requests{', ' + row.remote_id if row.remote_id else ''})")
            _print_busy(backfill.summary.busy, "run backfill --cancel again")
            if not cancelled and not backfill.summary.busy:
                print("no batch under way")
            return EXIT_FAILED if backfill.summary.busy else EXIT_OK
        if args.export is not None:
            summary = backfill.export(args.export)
        elif args.import_:
            missing = [p for p in args.import_ if not p.is_file()]
            if missing:
                for p in missing:
                    print(f"mmwatchd: backfill --import: {p}: no such file", file=sys.stderr)
                return EXIT_USAGE
            summary = backfill.import_outputs(args.import_)
        else:
            summary = backfill.run(wait=not args.no_wait)
    finally:
        daemon.close()
    if args.metrics_textfile is not None and not _write_textfile(daemon, args.metrics_textfile):
        return EXIT_FAILED
    _print_outcomes([o for o in daemon.outcomes if o.status in ("error", "retry")], cfg)
    for shard in summary.shards:
        print(f"shard    {shard}")
    if summary.unknown:
        print(f"mmwatchd: {summary.unknown} output line(s) belong to no batch of this state store (imported before, "
              "or from another state directory): ignored", file=sys.stderr)  # fmt: skip
    _print_busy(summary.busy, "backfill --status shows how it ends")
    online = len(dict.fromkeys(summary.online))
    c, o = daemon.counts, summary.outcomes
    if args.export is not None:
        print(f"backfill exported: {summary.batched} requests in {len(summary.shards)} shard(s) under {args.export}; "
              f"{online} file(s) left for the online path (mmwatchd scan)")  # fmt: skip
        if summary.shards:
            print("run each with: vllm run-batch -i SHARD -o OUT --model MODEL; "
                  "then: mmwatchd backfill --import OUT...")  # fmt: skip
        return EXIT_OK
    if args.import_:
        print(f"backfill imported: {o.get('ok', 0)} described, {o.get('error', 0)} failed, "
              f"{o.get('skipped', 0)} skipped; {online} file(s) left for the online path (mmwatchd scan)")  # fmt: skip
        return EXIT_FAILED if o.get("error") else EXIT_OK
    print(f"backfill done: {summary.batched} batched; {c['ok']} described, {c['error']} failed, "
          f"{c['retry']} not reached, {c['skipped']} skipped; {online} went the online way")  # fmt: skip
    if args.no_wait:
        print("batches under way: mmwatchd backfill --status; collect them with mmwatchd backfill --batch")
    if daemon.halted:
        print(f"mmwatchd: backfill stopped: {daemon.halted}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_FAILED if c["error"] or c["retry"] else EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from mmwatchd.daemon import Daemon, SignalRelay
    from mmwatchd.notify import Notifier

    path = config_mod.find_config(args.config)
    cfg = _load(args)
    _require_roots(cfg)
    if not cfg.watch:
        raise ConfigError(f"{cfg.where(('watch',))}: nothing to watch; add a folder under watch:")

    def reload() -> Config:
        new = config_mod.load(path)
        _require_roots(new)
        return new

    stop = threading.Event()
    with _state(cfg) as state, Notifier() as notifier:
        daemon = Daemon(
            cfg, _client(cfg, state), state=state, notifier=notifier, reload=reload,
            make_client=lambda new: _client(new, state),
        )  # fmt: skip

        # These run on the relay's thread, not in a signal handler: logging and locks are safe here.
        def on_stop(signum: int) -> None:
            name = signal.Signals(signum).name
            if stop.is_set():  # a second signal: stop at once, in-flight requests or not
                removed = sidecar.discard_open_reservations()  # their answers will never arrive
                log_mod.get_logger().warning("daemon.stop_now", signal=name, unfinished=removed)
                os._exit(128 + signum)
            log_mod.get_logger().info("daemon.stopping", signal=name)
            daemon.request_stop()  # nothing new starts from this moment
            stop.set()

        def on_reload(signum: int) -> None:
            log_mod.get_logger().info("daemon.reloading", signal="SIGHUP", config=str(path))
            daemon.reload_requested.set()

        # The startup backlog shows like a scan's; once it is through, the log and STATUS= say how things go.
        def backlog_done(snap: Snapshot) -> bool:
            return daemon.walks_finished > 0 and snap.total is not None and snap.done >= snap.total

        with SignalRelay({signal.SIGTERM: on_stop, signal.SIGINT: on_stop, signal.SIGHUP: on_reload}), \
                _progress(cfg, daemon, "startup scan", until=backlog_done):  # fmt: skip
            daemon.run(stop)
        log_mod.get_logger().info("daemon.stopped", **dict(daemon.counts))
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    """The report; without a database yet (nothing ran with this state dir) it says so and counts the folders from
    their sidecars alone, from a throwaway database, rather than leave an empty one where the service's is expected."""
    import tempfile

    from mmwatchd import status
    from mmwatchd.state import FILENAME, State

    cfg = _load(args)
    path = _state_path(cfg)
    try:
        found = os.stat(path).st_size > 0
    except FileNotFoundError:
        found = False
    except OSError as exc:
        hint = ""
        if exc.errno == errno.EACCES:
            hint = " (the service's state belongs to its user: run mmwatchd status as root)"
        raise StateError(f"{path}: cannot read the state database: {exc.strerror or exc}{hint}") from None
    with contextlib.ExitStack() as stack:
        if found:
            state = stack.enter_context(State(path))
        else:
            scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix="mmwatchd-status-"))
            state = stack.enter_context(State(Path(scratch) / FILENAME))
        report = {**status.collect(cfg, state), "state_path": str(path), "state_found": found}
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        if not found:
            print(f"no state yet at {path} (nothing has run with this state_dir; "
                  "the system service keeps its state in /var/lib/mmwatchd)")  # fmt: skip
        print(status.render(report))
    return EXIT_OK


def cmd_search(args: argparse.Namespace) -> int:
    from mmwatchd import search

    cfg = _load(args)
    if search.fts_query(args.query) is None:
        print(f"mmwatchd: search: {args.query!r} has no words to look for", file=sys.stderr)
        return EXIT_USAGE
    hits, every, refreshed = search.search(cfg, args.query, limit=args.limit, reindex=args.reindex)
    for folder, why in refreshed.unreadable:
        print(f"mmwatchd: {folder}: cannot read this folder ({why}); its sidecars were not looked at", file=sys.stderr)
    if not every and hits:
        print("mmwatchd: no file matches every word; these match some of them", file=sys.stderr)
    if args.json:
        json.dump({"query": args.query, "every_word": every, "matches": [h.as_json() for h in hits]}, sys.stdout,
                  indent=2, ensure_ascii=False)  # fmt: skip
        sys.stdout.write("\n")
    elif hits:
        print(search.render(hits, tty=sys.stdout.isatty()))
    else:
        print(f"mmwatchd: nothing matches {args.query!r}", file=sys.stderr)
    return EXIT_OK if hits else EXIT_FAILED


def cmd_gallery(args: argparse.Namespace) -> int:
    from mmwatchd import gallery

    cfg = _load(args)
    paths = [Path(os.path.abspath(p)) for p in args.paths]
    missing = [p for p in paths if not p.exists()]
    if missing:
        for p in missing:
            print(f"mmwatchd: gallery: {p}: no such file or folder", file=sys.stderr)
        return EXIT_USAGE
    if not paths:
        _require_roots(cfg)
    summary = gallery.build(cfg, Path(args.output), paths)
    for line in summary.unreadable:
        print(f"mmwatchd: {line}", file=sys.stderr)
    print(summary.line())
    return EXIT_OK


def _progress(cfg: Config, daemon: Daemon, label: str, *, until: Callable[[Snapshot], bool] | None = None) -> Reporter:
    """A bar on stderr when it is a terminal, else a ``progress`` log line every ``progress_interval_s``."""
    from mmwatchd.progress import Reporter

    return Reporter(daemon.progress, clock=daemon.clock, interval_s=cfg.progress_interval_s, label=label, until=until)


def _state_path(cfg: Config, env: Mapping[str, str] = os.environ) -> Path:
    from mmwatchd.state import FILENAME, default_state_dir

    return (cfg.state_dir or default_state_dir(env, config=cfg.source)) / FILENAME


def _state(cfg: Config) -> State:
    from mmwatchd.state import State

    return State(_state_path(cfg))


def _missing_roots(cfg: Config) -> list[str]:
    """One line per watched folder that is not there (folders with ``create: true`` are not missing)."""
    return [
        f"{cfg.where(('watch', i, 'path'))}: {root.path} does not exist or is not a folder "
        "(create it, fix the path, or set create: true)"
        for i, root in enumerate(cfg.watch)
        if not root.create and not root.path.is_dir()
    ]


def _require_roots(cfg: Config) -> None:
    """Every watched folder must exist (those with ``create: true`` are made)."""
    problems = []
    for i, root in enumerate(cfg.watch):
        if root.create and not root.path.is_dir():
            try:
                root.path.mkdir(parents=True)
            except OSError as exc:
                problems.append(f"{cfg.where(('watch', i, 'path'))}: cannot create {root.path}: {exc.strerror}")
    problems += _missing_roots(cfg)
    if problems:
        raise ConfigError(problems)


def _one_shot_daemon(cfg: Config, *, metrics: bool = False, decoders: int | None = None) -> Daemon:
    """A daemon without a watcher whose files get a few tries; its client is made when first used. Start it with
    :func:`_start_one_shot`.

    ``metrics``: keep Prometheus metrics (for ``--metrics-textfile``). ``decoders``: the number of files, when known:
    no more decoder processes than that start (each is forked from the forkserver, about 10 ms of CPU, and holds its
    memory until the command ends).
    """
    from mmwatchd.daemon import Daemon

    state = _state(cfg)
    return Daemon(cfg, _LazyClient(cfg, state), state=state, one_shot_attempts=ONE_SHOT_ATTEMPTS,  # type: ignore[arg-type]
                  metrics=metrics, make_client=lambda c: _LazyClient(c, state),  # type: ignore[arg-type,return-value]
                  decoders=max(1, decoders) if decoders is not None else None)  # fmt: skip


def _start_one_shot(daemon: Daemon, files: Iterator[Path], submit: Callable[[Iterable[Path]], object]) -> None:
    """Start the decoders and the workers, ``submit`` the first ``files`` (as many as the workers take at once),
    probe the endpoint, then ``submit`` the rest.

    The workers read and encode those first files in the decoder processes while the probe loads the SDK (about
    half a second of this process's time), and their requests leave as soon as the probe has found the endpoint
    up. Unreachable, or a bad key or model: the probe raises, so the command says so at once, not once per file.
    """
    daemon.start(prober=False)
    submit(itertools.islice(files, daemon.worker_count))
    daemon.probe_once()
    submit(files)


class _LazyClient:
    """The VLM client, made on first use: making it loads the openai SDK (about half a second), which a scan that
    finds everything up to date never needs. Attribute access goes to the real client.

    What the endpoint takes (:attr:`knowledge`) is here from the start, and the client is made with it: each file's
    plan asks it which image types may go as they are, and that must not wait for the SDK (the first files are
    encoded while the endpoint check loads it). Only a clip's first ``video_url`` question makes the client."""

    #: As the real client: every HTTP request is reported to ``before_request`` and ``observer`` (set before or after
    #: it is made).
    counts_every_request = True

    def __init__(self, cfg: Config, state: State | None = None) -> None:
        self._cfg = cfg
        self._state = state
        self._client: VLMClient | None = None
        self._before_request: Callable[[], None] | None = None
        self._observer: RequestObserver | None = None
        self._lock = threading.Lock()
        self.knowledge = endpoint_knowledge(cfg.endpoint, identify=lambda: self.identify(), store=state)

    @property
    def before_request(self) -> Callable[[], None] | None:
        return self._before_request

    @before_request.setter
    def before_request(self, hook: Callable[[], None] | None) -> None:
        with self._lock:
            self._before_request = hook
            if self._client is not None:
                self._client.before_request = hook

    @property
    def observer(self) -> RequestObserver | None:
        return self._observer

    @observer.setter
    def observer(self, observer: RequestObserver | None) -> None:
        with self._lock:
            self._observer = observer
            if self._client is not None:
                self._client.observer = observer

    def __getattr__(self, name: str) -> Any:
        with self._lock:
            if self._client is None:
                self._client = _client(self._cfg, self._state, self.knowledge)
                self._client.before_request = self._before_request
                self._client.observer = self._observer
        return getattr(self._client, name)


def _print_outcomes(outcomes: list[Outcome], cfg: Config) -> None:
    for o in sorted(outcomes, key=lambda o: str(o.path)):
        if o.status == "ok":
            print(f"ok       {o.path} -> {o.path.name}{cfg.sidecar.suffix}")
        elif o.status == "skipped":
            print(f"skipped  {o.path}: {o.reason}")
        elif o.status == "error":
            print(f"error    {o.path}: {o.reason}")
        else:
            print(f"failed   {o.path}: {o.reason} (nothing written; try again later)")
