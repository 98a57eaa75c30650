"""Atomic writes: results, checkpoints, caches and saved models appear whole or not at all, so a
run killed mid-write never leaves a file that a later run (or a resume) would trust.

A write that fails (full disk, file-size limit, no permission) raises `WriteError`, one line that
names the file and the fix, after its temporary is removed. Temporaries a killed earlier run left
behind (`.X.tmp-<pid>`, `.X.old-<pid>` of a process that no longer exists) are removed the next
time `X` is written, or earlier by `remove_stale_temporaries`.

It is generic file I/O, yet lives in models/ because models/ is the bottom of the import order
(main.py -> eaquant_ext/ -> duquant/ -> models/) and its own layer streaming (models/lazy.py) and the
zoo trainer write files too; every package above imports it from here.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import resource
import shutil
import tempfile
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

# A failed write at least this close to the disk's end was the disk filling up.
NEARLY_FULL_BYTES = 1 << 20
FIXES = {
    errno.ENOSPC: "free disk space or choose a directory on another disk",
    errno.EFBIG: "raise the file-size limit (ulimit -f) or choose a smaller output",
    errno.EDQUOT: "free space within your disk quota",
    errno.EACCES: "choose a directory you can write to",
    errno.EPERM: "choose a directory you can write to",
    errno.EROFS: "choose a directory on a writable file system",
    errno.ENAMETOOLONG: "choose a shorter name",
}


class WriteError(OSError):
    """A file that could not be written; the message is one line that names it and the fix."""


class PathError(ValueError):
    """An output path that cannot work (a file, under a file, not writable, too long, no space)."""


def describe(e: OSError) -> str:
    """`e` as one line: what failed, on which file, and what to do about it."""
    if isinstance(e, WriteError):
        return str(e)
    what = e.strerror or (str(e).splitlines() or [type(e).__name__])[0]
    where = f" ({e.filename})" if e.filename else ""
    fix = FIXES.get(e.errno)
    return f"{what}{where}" + (f"; {fix}" if fix else "")


def _cause(e: BaseException, tmp: Path) -> int | None:
    """The errno behind a failed write, or None for a failure that is not an I/O one. Serializers
    report I/O failures as their own exception types: safetensors names the OS error in its message;
    torch.save does not, so the file-size limit and a full disk are recognised by their effect (the
    temporary reached the limit, or the disk is nearly full)."""
    if isinstance(e, OSError) and e.errno is not None:
        return e.errno
    rust = re.search(r"\(os error (\d+)\)", str(e))  # safetensors' I/O errors
    if rust:
        return int(rust.group(1))
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    files = [tmp] if tmp.is_file() else [p for p in tmp.rglob("*") if p.is_file()] if tmp.is_dir() else []
    if limit != resource.RLIM_INFINITY and any(p.stat().st_size >= limit for p in files):
        return errno.EFBIG
    try:
        if shutil.disk_usage(tmp.parent).free < NEARLY_FULL_BYTES:
            return errno.ENOSPC
    except OSError:
        pass
    return None


def _write_error(e: Exception, path: Path, tmp: Path) -> Exception:
    code = _cause(e, tmp)
    if code is None:
        return e
    fix = FIXES.get(code)
    error = WriteError(f"cannot write {path}: {os.strerror(code)}" + (f"; {fix}" if fix else ""))
    error.errno = code
    return error


def write_file_atomically(path: str | Path, write: Callable[[Path], None]) -> None:
    """write(tmp) fills a temporary sibling (same suffix, for writers that go by it), which then
    replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        try:
            write(tmp)
        except Exception as e:
            raise _write_error(e, path, tmp) from e
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_dir_atomically(out: str | Path, fill: Callable[[Path], None]) -> None:
    """fill(tmp) writes the directory's files into a temporary sibling, which then replaces `out`."""
    out = Path(out)
    remove_stale_temporaries(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        fill(tmp)
    except Exception as e:
        error = _write_error(e, out, tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        raise error from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Remove the temporaries of `path` left by killed processes; returns what was removed.

    A `.X.old-<pid>` with no `X` next to it is the previous `X` itself (the writer was killed
    between its two renames), so it is put back instead of removed."""
    path = Path(path)
    pattern = re.compile(rf"\.(?:{re.escape(path.stem)}\.tmp-(\d+){re.escape(path.suffix)}"
                         rf"|{re.escape(path.name)}\.(tmp|old)-(\d+))")
    try:
        siblings = list(path.parent.iterdir())
    except OSError:
        return []
    removed = []
    for p in siblings:
        m = pattern.fullmatch(p.name)
        if m is None or _alive(int(m.group(1) or m.group(3))):
            continue
        if m.group(2) == "old" and not os.path.lexists(path):
            os.replace(p, path)
            log.warning("restored %s from %s, left by a killed run", path, p.name)
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
        log.warning("removed %s, a temporary left by a killed run (process %s)", p, m.group(1) or m.group(3))
        removed.append(p)
    return removed


# Longest suffix a writer adds to a name (".X.tmp-<pid>.json"), kept free under the file system's limit.
NAME_MARGIN = 24


def _existing_ancestor(path: Path, option: str) -> Path:
    """The nearest of `path` and its parents that exists; it must be a directory."""
    for p in (path, *path.parents):
        try:
            if p.is_dir():
                return p
            if p.exists():
                where = "is a file" if p == path else f"is under {p}, which is a file"
                raise PathError(f"{option} {path} {where}, not a directory; choose another path")
        except OSError as e:
            if e.errno == errno.ENAMETOOLONG:
                raise PathError(f"{option} {path}: a name in it is too long for the file system; choose a "
                                "shorter path") from None
            raise PathError(f"{option} {path}: {describe(e)}") from None
    return Path(".")  # not reached: "." or "/" ends every list of parents


def check_output_dir(path: str | Path, option: str, need_bytes: int = 0) -> None:
    """Refuse, before any work, a directory that a run could not write into: one that is a file or
    under one, whose names are too long (with room for the temporaries' suffixes), that cannot be
    written, or whose disk has less than `need_bytes` free. Nothing is created."""
    path = Path(path)
    base = _existing_ancestor(path, option)
    name_max = os.pathconf(base, "PC_NAME_MAX")
    for name in (*path.parts[len(base.parts):], path.name):  # the names still to be created, and the last
        if len(os.fsencode(name)) + NAME_MARGIN > name_max:
            raise PathError(f"{option} {path}: the name {name[:40]}... is too long ({len(os.fsencode(name))} bytes; "
                            f"at most {name_max - NAME_MARGIN}); choose a shorter name")
    if len(os.fsencode(os.path.abspath(path))) + 2 * NAME_MARGIN > os.pathconf(base, "PC_PATH_MAX"):
        raise PathError(f"{option} {path}: the path is too long for the file system; choose a shorter one")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".write-check-", dir=base))
    except OSError as e:
        raise PathError(f"{option} {path}: cannot write in {base} ({e.strerror}); choose a writable directory") from None
    free = shutil.disk_usage(base).free
    if free < need_bytes:
        raise PathError(f"{option} {path}: needs at least {need_bytes / 2**20:.1f} MiB and {base} has "
                        f"{free / 2**20:.1f} MiB free; free space or choose another disk")
