"""Export helpers: PyTorch and Keras models to ONNX, each checked against the framework's own output."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from lancet.errors import LancetError


class ConversionError(LancetError):
    """An export failed, or the exported ONNX model disagrees with the framework's own output."""


@contextmanager
def written_atomically(path: Path, what: str) -> Iterator[Path]:
    """A temporary file beside `path` for a conversion to write and check; renamed onto `path` when the
    block ends without error, removed otherwise. Any failure but a ConversionError becomes one that says
    `what` failed."""
    fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except ConversionError:
        raise
    except Exception as exc:
        raise ConversionError(f"{what} failed: {exc}") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


__all__ = ["ConversionError", "written_atomically"]
