"""Atomic writes: results, checkpoints, caches and saved models appear whole or not at all, so a
run killed mid-write never leaves a file that a later run (or a resume) would trust."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable


def write_file_atomically(path: str | Path, write: Callable[[Path], None]) -> None:
    """write(tmp) fills a temporary sibling (same suffix, for writers that go by it), which then
    replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_dir_atomically(out: str | Path, fill: Callable[[Path], None]) -> None:
    """fill(tmp) writes the directory's files into a temporary sibling, which then replaces `out`."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
