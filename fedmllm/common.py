"""What data, partitioning, models and the server share, with no dependency of their own: the
cache directory, the offline-asset error, atomic directory writes."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


class MissingAssetError(RuntimeError):
    """An offline asset (package, file) that a preset needs is not installed."""


def cache_root() -> Path:
    """`$FEDMLLM_CACHE`, default `~/.cache/fedmllm`."""
    return Path(os.environ.get("FEDMLLM_CACHE", Path.home() / ".cache" / "fedmllm"))


def write_atomically(out: Path, fill, replace: bool = False) -> None:
    """`fill(tmp)` writes a directory's files into a temporary sibling of `out`, which is then
    renamed to `out`: a crash never leaves a half-written directory that later runs would trust.
    Cache entries (`replace=False`): concurrent writers do not collide, the first rename wins.
    `replace=True` (e.g. a rewritten partition): an existing `out` is renamed aside, the new one
    renamed into place, then the old one removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-" if replace else out.name + ".tmp", dir=out.parent))
    try:
        fill(tmp)
        if replace and out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old)
            return
        try:
            tmp.rename(out)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
