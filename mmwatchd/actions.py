"""Post actions for a finished file (drop-folder automation): move it and its sidecar, then run a hook.

``run_actions`` never raises for a failed move or hook: it returns an ``ActionResult`` whose ``problems`` say what went
wrong, in one line each, for the log. Whatever fails, the media file and its sidecar are never lost:

- **Never overwrite.** Names in ``move_to`` are claimed with ``renameat2(RENAME_NOREPLACE)`` (Linux, via ctypes); where
  that is missing or the filesystem refuses it, with ``link`` + ``unlink``; where hard links are refused too, by
  reserving the name with an ``O_EXCL`` placeholder and renaming onto it. All three fail with EEXIST instead of
  replacing a file someone else put there, so several workers moving same-named files at once each get their own name.
- **Clashes get numbers:** ``IMG_1.jpg`` becomes ``IMG_1 (1).jpg``, ``IMG_1 (2).jpg``, ... choosing the first number for
  which both the file name and its sidecar name (``IMG_1 (1).jpg.json``) are free.
- **Across filesystems** (EXDEV) the file is copied to a hidden temp name in the target folder (the watcher and scans
  ignore ``sidecar.TEMP_MARK`` names), fsynced, claimed under its final name, the folder fsynced, and only then the
  source deleted: a crash leaves one or two copies, never none. A failed copy (ENOSPC, read-only target) removes the
  temp file and leaves the source untouched.
- **Mirrored sidecars** (``sidecar.dir``) move to the mirror of the file's new place, made as needed; a clash number
  is chosen so that name is free there too.
- **Order:** the media file moves first, then its sidecar. When the file moved but its sidecar cannot follow, the
  sidecar stays where it was (still readable, under its old name) and a problem says so. Moving the file back instead
  could fail for the same reason and would leave the file in a third state; a stray sidecar is harmless.
- **Containment:** the target is ``move_to`` plus the file's folder relative to its watch root. A relative path with
  ``..``, or a target folder that resolves (through symlinks) outside ``move_to``, is refused.

The hook runs after the move, without a shell, with the placeholders of prompts (``templates.PLACEHOLDERS``) plus
``{sidecar}`` and ``{status}``; ``{path}``, ``{name}``, ``{stem}`` and ``{folder}`` describe where the file is *now*
(``{relpath}`` stays relative to the watch root). Each argument gets the values as they are: prompts quote file names
(they are data there), but in an argv the argument boundary already does that, and quotes would become part of the
name the hook is given. It also runs when the move failed: it is then told the file's actual
place. The hook inherits the daemon's environment, which may include the variable named by ``endpoint.api_key_env``:
run the daemon with the key in a systemd credential (``LoadCredential=``) to keep it from hooks. The key is never in
the argv (it is not a placeholder).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import secrets
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from mmwatchd.model import ActionSpec
from mmwatchd.sidecar import TEMP_MARK, fsync_dir
from mmwatchd.templates import render

#: Highest clash number tried before the move is given up.
MAX_NUMBER = 9999
#: How many characters of a failing hook's stderr go into its problem line.
STDERR_CHARS = 200
#: After a timed-out hook's process group is killed, how long to wait for its pipes to close.
_REAP_S = 2.0
_COPY_CHUNK = 1 << 20
_DIR_MODE = 0o755

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
# Errors by which a filesystem (or an old kernel/libc) says "this kind of rename/link is not supported here".
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}
_NO_HARDLINKS = _UNSUPPORTED | {errno.EPERM, errno.EMLINK}


@dataclass(frozen=True, slots=True, kw_only=True)
class ActionResult:
    """Where the file and its sidecar are after the actions, and what went wrong."""

    #: Where the media file is now.
    path: Path
    #: Where its sidecar is now (None when it has none).
    sidecar: Path | None
    moved: bool
    #: The hook's exit code (negative: killed by that signal); None if it did not run or timed out.
    exec_code: int | None = None
    #: One human-readable line per problem, for the log.
    problems: tuple[str, ...] = ()


def run_actions(
    spec: ActionSpec,
    *,
    path: Path,
    sidecar: Path | None,
    root: Path | None,
    values: Mapping[str, object],
    status: str,
    sidecar_for: Callable[[Path], Path] | None = None,
) -> ActionResult:
    """Move ``path`` and ``sidecar`` into ``spec.move_to``, then run ``spec.exec``. Synchronous; thread-safe.

    ``root`` is the watch root holding ``path`` (its relative subfolder is kept under ``move_to``), None outside any
    root. ``values`` are the placeholders for this file, as plain strings (each is one argument; nothing is quoted);
    ``status`` is "ok" or "error". ``sidecar_for``: where the sidecar of a file at a given path belongs, when it does
    not sit beside the file (``sidecar.dir``); the sidecar then moves to the place that gives for the moved file.
    """
    problems: list[str] = []
    if sidecar is not None and not os.path.lexists(sidecar):
        sidecar = None
    new_path, new_sidecar, moved = path, sidecar, False
    if spec.move_to is not None:
        new_path, new_sidecar, moved = _move(
            spec.move_to, path=path, sidecar=sidecar, root=root, problems=problems, sidecar_for=sidecar_for
        )
    exec_code: int | None = None
    if spec.exec:
        hook_values = {
            **values,
            "path": str(new_path),
            "name": new_path.name,
            "stem": new_path.stem,
            "folder": new_path.parent.name,
            "sidecar": "" if new_sidecar is None else str(new_sidecar),
            "status": status,
        }
        exec_code = _run_hook(spec.exec, hook_values, timeout=spec.exec_timeout_s, problems=problems)
    return ActionResult(path=new_path, sidecar=new_sidecar, moved=moved, exec_code=exec_code, problems=tuple(problems))


# --------------------------------------------------------------------------------------------------------------------
# Moving


def _move(
    move_to: Path,
    *,
    path: Path,
    sidecar: Path | None,
    root: Path | None,
    problems: list[str],
    sidecar_for: Callable[[Path], Path] | None = None,
) -> tuple[Path, Path | None, bool]:
    suffix = ""
    if sidecar is not None and sidecar_for is None:
        if sidecar.parent != path.parent or not sidecar.name.startswith(path.name) or sidecar.name == path.name:
            problems.append(
                f"move_to: {sidecar} is not named after {path.name}; nothing was moved (the sidecar must sit beside "
                "the file and start with its name)"
            )
            return path, sidecar, False
        suffix = sidecar.name[len(path.name) :]

    def sidecar_target(media: Path) -> Path:
        return sidecar_for(media) if sidecar_for is not None else media.with_name(media.name + suffix)

    try:
        folder = _target_folder(move_to, path, root)
    except ValueError as exc:
        problems.append(f"move_to: {exc}; the file and its sidecar stay where they are")
        return path, sidecar, False
    try:
        _check_inside(move_to, folder)  # before creating anything through a symlink...
        _make_folders(folder)
        _check_inside(move_to, folder)  # ...and after, in case one appeared meanwhile
        if _same_folder(folder, path.parent):
            return path, sidecar, False  # already there: a number would only rename it
    except ValueError as exc:
        problems.append(f"move_to: {exc}; the file and its sidecar stay where they are")
        return path, sidecar, False
    except OSError as exc:
        problems.append(f"move_to: cannot create {folder}: {_why(exc)}; the file and its sidecar stay where they are")
        return path, sidecar, False

    def pair_free(name: str) -> bool:
        return sidecar is None or not os.path.lexists(sidecar_target(folder / name))

    names = _numbered(path.name)
    try:
        new_path = _place(path, folder, names, accept=pair_free)
    except OSError as exc:
        problems.append(
            f"move_to: cannot move {path} into {folder}: {_why(exc)}; the file and its sidecar stay where they are"
        )
        return path, sidecar, False
    if sidecar is None:
        return new_path, None, True

    for _ in range(MAX_NUMBER):
        target = sidecar_target(new_path)
        try:
            if sidecar_for is not None:
                _make_folders(target.parent)  # a mirror folder for the new place
            return new_path, _place(sidecar, target.parent, [target.name]), True
        except FileExistsError:
            # Something else took the sidecar's name after it was checked: move the file on to the next free pair.
            try:
                new_path = _place(new_path, folder, names, accept=pair_free)
            except OSError as exc:
                reason = _why(exc)
                break
        except OSError as exc:
            reason = _why(exc)
            break
    else:
        reason = "no free name"
    problems.append(
        f"move_to: moved {path.name} to {new_path} but not its sidecar: {reason}; the sidecar stays at {sidecar}"
    )
    return new_path, sidecar, True


def _target_folder(move_to: Path, path: Path, root: Path | None) -> Path:
    """``move_to`` plus the file's folder relative to ``root``; ValueError when that would leave ``move_to``."""
    if path.name in ("", ".", ".."):
        raise ValueError(f"{path} does not name a file")
    rel = Path()
    if root is not None:
        with contextlib.suppress(ValueError):
            rel = path.parent.relative_to(root)
    if rel.is_absolute() or ".." in rel.parts:
        raise ValueError(f"{path} is not inside its watch root {root}: refusing a target outside {move_to}")
    return move_to / rel


def _check_inside(move_to: Path, folder: Path) -> None:
    base, real = os.path.realpath(move_to), os.path.realpath(folder)
    if os.path.commonpath([base, real]) != base:
        raise ValueError(f"{folder} resolves to {real}, outside {move_to}: refusing to move there")


def _make_folders(folder: Path) -> None:
    """Create ``folder`` and its missing parents, each with mode 0o755 (less what the umask removes)."""
    missing: list[Path] = []
    current = folder
    while not os.path.isdir(current):
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for part in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another worker made it first
            os.mkdir(part, _DIR_MODE)


def _same_folder(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _numbered(name: str) -> Iterator[str]:
    """``IMG_1.jpg``, ``IMG_1 (1).jpg``, ``IMG_1 (2).jpg``, ... up to MAX_NUMBER."""
    yield name
    dot = name.rfind(".")
    stem, ext = (name[:dot], name[dot:]) if dot > 0 else (name, "")
    for n in range(1, MAX_NUMBER + 1):
        yield f"{stem} ({n}){ext}"


def _place(src: Path, folder: Path, names: Iterable[str], *, accept: Callable[[str], bool] | None = None) -> Path:
    """Move ``src`` into ``folder`` under the first free name of ``names`` that ``accept`` allows; never overwrites.

    Across filesystems the copy is made once and claimed under each candidate in turn. Raises FileExistsError when
    every name is taken, and OSError when the move fails, with ``src`` back where it was and no temp file left.
    """
    tmp: Path | None = None  # the copy, when crossing filesystems
    claimed = False
    try:
        for name in names:
            dst = folder / name
            if os.path.lexists(dst) or (accept is not None and not accept(name)):
                continue
            try:
                _rename_noreplace(tmp or src, dst)
            except FileExistsError:
                continue
            except OSError as exc:
                if exc.errno != errno.EXDEV or tmp is not None:
                    raise
                tmp = _copy_to_temp(src, folder)
                try:
                    _rename_noreplace(tmp, dst)
                except FileExistsError:
                    continue
            claimed = True
            break
        else:
            raise FileExistsError(errno.EEXIST, "no free name", str(folder / src.name))
        fsync_dir(folder)
        if tmp is not None:
            try:
                os.unlink(src)
            except OSError:
                os.unlink(dst)  # the copy is ours and unseen so far: undo rather than leave two files
                raise
        fsync_dir(src.parent)
        return dst
    finally:
        if tmp is not None and not claimed:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _copy_to_temp(src: Path, folder: Path) -> Path:
    """A durable copy of ``src`` (content, mode, times) under a hidden temp name in ``folder``."""
    tmp = folder / f".{src.name}{TEMP_MARK}{secrets.token_hex(4)}"
    try:
        with open(src, "rb") as fin:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
            with os.fdopen(fd, "wb") as fout:
                shutil.copyfileobj(fin, fout, _COPY_CHUNK)
                fout.flush()
                # Times matter: the sidecar's freshness check compares the file's mtime.
                shutil.copystat(src, tmp, follow_symlinks=False)
                os.fsync(fout.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


@functools.cache
def _renameat2() -> Callable[[int, bytes, int, bytes, int], int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not Linux, or glibc < 2.28 / musl without it
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``, raising FileExistsError instead of replacing an existing ``dst``."""
    fn = _renameat2()
    if fn is not None:
        if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in _UNSUPPORTED:
            raise OSError(err, os.strerror(err), str(src), None, str(dst))
    _link_noreplace(src, dst)


def _link_noreplace(src: Path, dst: Path) -> None:
    """``link`` + ``unlink``: the link fails with EEXIST when ``dst`` exists. Falls back when links are refused."""
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in _NO_HARDLINKS:
            raise
        _reserve_noreplace(src, dst)
        return
    try:
        os.unlink(src)
    except OSError:
        os.unlink(dst)
        raise


def _reserve_noreplace(src: Path, dst: Path) -> None:
    """Claim ``dst`` with an ``O_EXCL`` placeholder, then rename onto it: only ever replaces our own placeholder."""
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    os.close(fd)
    try:
        os.rename(src, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(dst)
        raise


def _why(exc: OSError) -> str:
    reason = exc.strerror or str(exc)
    where = exc.filename2 if exc.errno == errno.EEXIST and exc.filename2 else exc.filename
    text = f"{reason}: {where}" if where else reason
    if exc.errno in (errno.EACCES, errno.EPERM):
        text += " (mmwatchd needs write access to both folders)"
    return text


# --------------------------------------------------------------------------------------------------------------------
# The hook


def _run_hook(
    template: Sequence[str], values: Mapping[str, object], *, timeout: float, problems: list[str]
) -> int | None:
    try:
        argv = [render(arg, values) for arg in template]
    except ValueError as exc:
        problems.append(f"exec: cannot fill in the arguments: {exc}; the hook was not run")
        return None
    prog = argv[0]
    # Popen rather than subprocess.run: run() kills only the child on timeout, and the group must be killed before
    # the child is reaped, while its id still names the group.
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            close_fds=True,
            start_new_session=True,
        )
    except FileNotFoundError:
        problems.append(f"exec: program not found: {prog}")
        return None
    except PermissionError:
        problems.append(f"exec: {prog}: permission denied (is it executable?)")
        return None
    except OSError as exc:
        problems.append(f"exec: cannot start {prog}: {exc.strerror or exc}")
        return None
    with proc:
        try:
            _out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            try:
                _out, err = proc.communicate(timeout=_REAP_S)
            except subprocess.TimeoutExpired:  # something left the group and still holds the pipes
                err = b""
            problems.append(
                f"exec: {prog} still running after {timeout:g} s; killed it and its process group{_stderr_tail(err)}"
            )
            return None
    code = proc.returncode
    if code != 0:
        how = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
        problems.append(f"exec: {prog} {how}{_stderr_tail(err)}")
    return code


def _stderr_tail(err: bytes | None) -> str:
    text = (err or b"").decode("utf-8", "replace").strip()[:STDERR_CHARS]
    return f"; stderr: {text.replace(chr(10), ' | ')}" if text else ""
