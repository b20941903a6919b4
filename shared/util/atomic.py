"""Crash-safe file writes: a reader sees the old file or the new one, never a mix."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def secret_file(path: Path, nbytes: int = 32) -> bytes:
    """``nbytes`` random bytes kept at ``path`` (mode 0600), made on first use and never
    replaced while whole: a concurrent first use keeps one secret. A torn one (wrong
    length) is replaced by a fresh one."""
    path = Path(path)
    if path.is_file():
        secret = path.read_bytes()
        if len(secret) == nbytes:
            return secret
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:  # mkstemp makes it 0600
            fh.write(os.urandom(nbytes))
            fh.flush()
            os.fsync(fh.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)  # never replaces an existing secret
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path.read_bytes()


def json_safe(value: Any) -> Any:
    """NaN and Inf are not JSON: they become null (recursively)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json_atomic(path: Path, obj: Any, *, sort_keys: bool = True) -> None:
    write_text_atomic(path, json.dumps(json_safe(obj), indent=1, sort_keys=sort_keys,
                                       default=str) + "\n")


def replace_dir(staging: Path, target: Path) -> None:
    """Move a fully written ``staging`` directory to ``target``, replacing what is there.

    The old directory is renamed aside first and removed only after the new one
    is in place, so an interruption leaves one complete version at ``target``
    (or, at worst, the old one beside it), never a mix.
    """
    staging, target = Path(staging), Path(target)
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, target)
