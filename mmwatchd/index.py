"""The done-index as a walk reads it: is this file done, from a ``stat`` and the folder listing alone?

The state store keeps, for every file that has its answer, the version answered (size, mtime, inode and ctime) and
the rule fingerprint (:meth:`mmwatchd.state.State.done_index`). A rescan (:meth:`mmwatchd.daemon.Daemon.needing_work`)
and ``mmwatchd status`` walk 100,000 files with it instead of opening 100,000 sidecars. The sidecars stay the truth:
an entry only counts while the file is still that version, its sidecar is still there and the rule that now applies
still has that fingerprint; anything else is left to the caller to look at properly.

Entries made before inodes and ctimes were kept are trusted on size and mtime, as they were when they were made, and
the walk collects the inode and ctime such a file has now in :attr:`DoneIndex.adopted`, for the caller to store
(:meth:`mmwatchd.state.State.adopt_identities`): an upgrade reads and sends nothing again, and from then on the entry
sees a same-size rewrite whose mtime was put back.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

from mmwatchd import outputs
from mmwatchd.done import Answer, is_done
from mmwatchd.model import Config, WatchRoot
from mmwatchd.rules import fingerprint, match as match_rule
from mmwatchd.sidecar import locate as sidecar_locate, sidecar_path
from mmwatchd.state import DoneRow
from mmwatchd.walk import ScanErrorCallback, scan_paths


class DoneIndex:
    """``rows`` (path → :class:`DoneRow`, from the state store) judged against ``config``'s rules and sidecars."""

    def __init__(self, config: Config, rows: dict[str, DoneRow]) -> None:
        self.config = config
        self.rows = rows
        #: Old entries (no inode/ctime) the walk found at their size and mtime: path → (inode, ctime_ns) now.
        self.adopted: dict[str, tuple[int, int]] = {}
        self._fingerprints: dict[tuple[str, str], str] = {}
        self._outputs = outputs.configured(config)

    def walk(
        self,
        root: WatchRoot,
        *,
        on_error: ScanErrorCallback | None = None,
        on_temp: Callable[[Path], None] | None = None,
    ) -> Iterator[tuple[str, DoneRow | None]]:
        """Every wanted file under ``root`` (:func:`mmwatchd.walk.scan_paths`, which takes ``on_error`` and
        ``on_temp``), with its entry when the index proves it done, else None."""
        sidecars: set[str] = set()
        prefix = len(os.path.join(root.path, ""))
        walk = scan_paths(root, sidecar_suffix=self.config.sidecar.suffix, on_error=on_error, on_temp=on_temp,
                          sidecars=sidecars)  # fmt: skip
        for path in walk:
            yield path, self._done(root.path, path, path[prefix:], sidecars)

    def _done(self, root: Path, path: str, rel: str, sidecars: set[str]) -> DoneRow | None:
        """The entry for ``path`` when it proves the file done, else None.

        ``rel`` is the path relative to ``root``; ``sidecars`` the sidecar paths the walk listed in the file's folder.
        Plain strings and one ``stat``: this runs for every file.
        """
        row = self.rows.get(path)
        if row is None:
            return None
        cfg = self.config
        try:
            st = os.stat(path)
        except OSError:
            return None
        if cfg.sidecar.dir is None:
            simple = path + cfg.sidecar.suffix  # what sidecar_path gives unless the name is too long
            if simple not in sidecars and str(sidecar_path(Path(path), cfg.sidecar.suffix)) not in sidecars:
                return None  # deleted: the sidecars are the truth
        elif not sidecar_locate(Path(path), suffix=cfg.sidecar.suffix, mirror=cfg.sidecar.dir, roots=[root]).exists():
            return None
        rule = match_rule(rel if os.sep == "/" else rel.replace(os.sep, "/"), row.media_kind, cfg.rules)
        if rule is None:
            return None
        key = (rule.name, row.media_kind)
        if key not in self._fingerprints:
            self._fingerprints[key] = fingerprint(rule, cfg.endpoint, row.media_kind)
        if not is_done(row, st, self._fingerprints[key], exact=True):
            return None  # its rule changed, or it was rewritten (or replaced) with its size and mtime kept
        answer: Answer = "error" if row.answer == "error" else "ok"
        if any(o.wants(answer) and not o.present(Path(path)) for o in self._outputs):
            return None  # turned on since, or its write failed: the pipeline writes it from the answer on record
        if row.size_and_mtime_only:
            self.adopted[path] = (st.st_ino, st.st_ctime_ns)
        return row
