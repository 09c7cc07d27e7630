"""Atomic folder writes: build in a temporary sibling folder, then rename into place.

A killed writer leaves only a hidden `.NAME.tmp-PID-*` folder behind (the next writer deletes it), never a
half-written folder under the final name that could be taken for a complete checkpoint. Replacing an existing folder takes two renames (the old
one aside to `.NAME.old-PID`, the new one in); a writer killed between them leaves no folder under the name,
so the next writer or reader (`recover_directory`) moves the old one back. Every file and folder is fsynced
before the rename, and the parent after it, so a power loss cannot leave a renamed but empty folder.

`pause_point` is a test hook: with `DEEPSEEK_VL_HF_TEST_PAUSE` set to a point's name, the writer stops there
(saying so on stderr) so that a test can SIGKILL it at exactly that moment of a save.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)
PAUSE_ENV = "DEEPSEEK_VL_HF_TEST_PAUSE"


def pause_point(name: str) -> None:
    """Tests only: when `DEEPSEEK_VL_HF_TEST_PAUSE` equals `name`, print `paused at NAME` to stderr and sleep
    (until killed); a no-op otherwise. Points: `before-rename FOLDER`, `between-renames FOLDER` (here) and
    `trainer-checkpoint checkpoint-N` (training.checkpoints)."""
    if os.environ.get(PAUSE_ENV) == name:
        print(f"paused at {name}", file=sys.stderr, flush=True)
        time.sleep(3600)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """Flush every file under `root`, then each folder (children before parents), to stable storage."""
    folders = []
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync_path(Path(folder) / name)
        folders.append(Path(folder))
    for folder in reversed(folders):
        _fsync_path(folder)


def _writer_alive(pid: int) -> bool:
    """Whether process `pid` (another one) still runs, i.e. may be between its two renames right now."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def recover_directory(target: str | os.PathLike) -> bool:
    """Undo a killed writer: with no folder at `target`, move the newest `.NAME.old-PID` of a dead writer back
    (killed between its two renames); delete its other leftovers (`.NAME.old-PID` when the name holds a folder,
    unfinished `.NAME.tmp-PID-*`). True when it moved a folder back.
    """
    target = Path(target).absolute()
    if not target.parent.is_dir():
        return False
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(old|tmp)-(\d+)")
    leftovers, partial = [], []
    for path in target.parent.iterdir():
        match = pattern.match(path.name)
        if match and path.is_dir() and not _writer_alive(int(match.group(2))):
            (leftovers if match.group(1) == "old" else partial).append(path)
    for path in partial:  # a dead writer's unfinished new folder
        shutil.rmtree(path, ignore_errors=True)
    restored = False
    if leftovers and not target.exists():
        newest = max(leftovers, key=lambda path: path.stat().st_mtime)
        os.replace(newest, target)
        _fsync_path(target.parent)
        leftovers.remove(newest)
        restored = True
        logger.warning("%s: restored the previous folder from %s (a writer was killed mid-replace)", target, newest.name)
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    return restored


@contextmanager
def atomic_directory(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to `target`; on success it replaces `target` in one rename.

    An existing `target` is refused unless `overwrite` is set; then it is moved aside first and deleted only
    after the new folder is in place.
    """
    target = Path(target).resolve()
    recover_directory(target)
    if target.exists() and not overwrite and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"{target} already exists; choose another output folder or pass --overwrite")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        pause_point(f"before-rename {target.name}")
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
            pause_point(f"between-renames {target.name}")
        os.replace(tmp, target)
        _fsync_path(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
