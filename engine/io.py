"""Atomic file output: write to a temporary file in the target folder, then rename over the target."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import BadInputError


def check_output_path(path: Path, inputs: tuple[Path, ...] = ()) -> Path:
    """Refuse an output in a missing or unwritable folder, or one that would overwrite an input."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise BadInputError(f"output folder {folder} does not exist (for {path})")
    if not os.access(folder, os.W_OK):
        raise BadInputError(f"output folder {folder} is not writable (for {path})")
    for source in inputs:
        if path.resolve() == Path(source).resolve():
            raise BadInputError(f"output {path} is the input file: the input is never overwritten")
    return path


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    """Write `data` to `path` atomically; no partial file is left behind on failure."""
    path = Path(path)
    check_output_path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_text_atomic(path: Path, text: str) -> Path:
    """Write text atomically (UTF-8)."""
    return write_bytes_atomic(path, text.encode("utf-8"))
