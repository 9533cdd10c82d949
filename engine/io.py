"""Atomic file output: write to a temporary file in the target folder, then rename over the target."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx

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


EXTERNAL_THRESHOLD = 1024  # bytes: smaller tensors stay inline (onnx.save_model's default)


def external_data_path(path: Path) -> Path:
    """Where a model written at `path` with external data keeps it: `<file name>.data` beside it (the
    name torch.onnx.export gives it)."""
    path = Path(path)
    return path.with_name(path.name + ".data")


def write_model_atomic(path: Path, proto: "onnx.ModelProto", external: bool = False) -> list[Path]:
    """Write an ONNX model to `path`, inline or with its tensors of EXTERNAL_THRESHOLD bytes or more in one
    external-data file (`external_data_path`); returns the files written. Both are written whole in a
    temporary folder beside `path`, then renamed into place, the data file first (removed again should the
    model's rename fail), so that no partial file is ever at either name and a failure leaves neither, nor
    the temporary folder, behind."""
    import onnx
    from onnx.external_data_helper import convert_model_to_external_data

    path = Path(path)
    check_output_path(path)
    if not external:
        write_bytes_atomic(path, proto.SerializeToString())
        return [path]
    data = external_data_path(path)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or "."))
    try:
        copy = onnx.ModelProto()
        copy.CopyFrom(proto)
        convert_model_to_external_data(copy, all_tensors_to_one_file=True, location=data.name,
                                       size_threshold=EXTERNAL_THRESHOLD)
        onnx.save_model(copy, str(staging / path.name))
        moved = (staging / data.name).exists()  # not when every tensor is under the threshold
        if moved:
            os.replace(staging / data.name, data)
        try:
            os.replace(staging / path.name, path)
        except BaseException:
            if moved:
                data.unlink(missing_ok=True)
            raise
        return [path, data] if moved else [path]
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_text_atomic(path: Path, text: str) -> Path:
    """Write text atomically (UTF-8)."""
    return write_bytes_atomic(path, text.encode("utf-8"))
