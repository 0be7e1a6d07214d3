"""Atomic writes: every file and directory dynamize writes appears whole or not at all.

A file is written under a temporary sibling name and renamed over the target (`os.replace` is atomic on POSIX).
A directory (a run, a checkpoint) is filled under a temporary sibling and swapped in by two renames; a reader that
finds it half-swapped finds the previous version under a `.old-*` name (see `newest_complete`).
"""
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..errors import OutputError


def write_file(path: Path, write: Callable[[Path], object]) -> None:
    """Write one file through a temporary sibling and a rename, so no reader ever sees it half-written."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    write_file(path, lambda tmp: tmp.write_text(text))


def write_json(path: Path, obj: dict) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def check_output_dir(path: str | Path) -> None:
    """Raise an OutputError if `path` exists as something other than a directory, or if its nearest existing
    ancestor denies this user writing (the run is written beside it and renamed in)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"output {path} exists and is not a directory; choose another -o")
    ancestor = next(p for p in path.absolute().parents if p.exists())
    if not ancestor.is_dir():
        raise OutputError(f"{ancestor} is a file, so {path} cannot be made; choose another -o")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write to {ancestor} (permission denied); choose another -o")


def write_dir(path: str | Path, write: Callable[[Path], None], keep: Callable[[Path], bool] | None = None
              ) -> Path:
    """Create or replace the directory `path` as one step: `write` fills a temporary sibling that is renamed in.

    Args:
        path: the directory to create or replace.
        write: fills the temporary directory it is given.
        keep: entries of the old directory to carry over into the new one (hard-linked, so the old directory stays
            whole until the swap), e.g. the checkpoints and metrics of a run whose final weights are written.

    Raises:
        OutputError: `path` is a file, or its parent cannot be written.
    """
    path = Path(path)
    check_output_dir(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        newest_complete(path)
        for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a process killed mid-write
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    except OSError as e:
        raise OutputError(f"cannot write to {path.parent} ({e.strerror}); choose another -o") from None
    try:
        write(tmp)
        _as_umask_allows(tmp)
        if path.exists() and keep is not None:
            for entry in path.iterdir():
                if entry.name != _COMPLETE and keep(entry) and not (tmp / entry.name).exists():
                    _link(entry, tmp / entry.name)
        (tmp / _COMPLETE).touch()
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        (path / _COMPLETE).unlink()
        shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(f"cannot write {path} ({e.strerror}); choose another -o") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


_COMPLETE = ".complete"


def _as_umask_allows(root: Path) -> None:
    """Give a directory and what was written into it the permissions of a plain `mkdir` / `open` under this process's
    umask: `mkdtemp` and safetensors create them private (0700 / 0600), so others could not read a shared run."""
    umask = os.umask(0)
    os.umask(umask)
    root.chmod(0o777 & ~umask)
    for entry in root.rglob("*"):
        entry.chmod((0o777 if entry.is_dir() else 0o666) & ~umask)


def _link(src: Path, dest: Path) -> None:
    """Hard-link a file or a directory tree (no data is copied; dynamize never rewrites a file in place)."""
    if src.is_dir():
        shutil.copytree(src, dest, copy_function=os.link)
    else:
        os.link(src, dest)


def newest_complete(path: str | Path) -> Path:
    """`path`, restored first if a `write_dir` was killed between its two renames.

    The newest complete version is then the new one (a temporary sibling marked complete) or the old one
    (`.NAME.old-*`); it is renamed back to `path`, and the older leftovers are removed.
    """
    path = Path(path)
    if path.exists() or not path.parent.is_dir():
        return path
    olds = sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime)
    done = sorted((t for t in path.parent.glob(f".{path.name}.tmp-*") if (t / _COMPLETE).is_file()),
                  key=lambda p: p.stat().st_mtime)
    candidates = olds + done  # a complete new version is newer than any old one it was to replace
    if candidates:
        candidates[-1].rename(path)
        (path / _COMPLETE).unlink(missing_ok=True)
        for older in candidates[:-1]:
            shutil.rmtree(older, ignore_errors=True)
    return path
