"""Write a whole output folder atomically: build it beside the target, then rename."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _normal_permissions(root: Path) -> None:
    """mkdtemp makes 0700 folders; give the result the usual permissions under the umask."""
    mask = _umask()
    os.chmod(root, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o777 & ~mask)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o666 & ~mask)


def write_dir_atomic(
    out: str | os.PathLike, write: Callable[[Path], None], replaces: Callable[[str], bool]
) -> Path:
    """Fill a temporary sibling with `write(tmp)`, then swap it in for `out`.

    Files already in `out` that `write` did not produce and `replaces(name)` does not
    claim (e.g. a tokenizer or README put there by the caller) are carried over. An
    interrupted write never leaves a half-written folder where a good one was.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write(tmp)
        if out.exists():
            for f in out.iterdir():
                if not replaces(f.name) and not (tmp / f.name).exists():
                    (shutil.copytree if f.is_dir() else shutil.copy2)(f, tmp / f.name)
        _normal_permissions(tmp)
        if not out.exists():
            tmp.rename(out)
            return out
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
        return out
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_file_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Write a file through `write(f)` on a temporary sibling, fsync, rename into place.

    A crash or error leaves the previous file (or none), never a half-written one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write a text file through a temporary sibling and a rename (never half-written)."""
    return write_file_atomic(path, lambda f: f.write(text.encode("utf-8")))
