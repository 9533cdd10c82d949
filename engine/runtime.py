"""onnxruntime access: a clear message when neither onnxruntime nor onnxruntime-gpu is installed."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .errors import BadInputError, LancetError

INSTALL_HINT = (
    "onnxruntime is not installed: install exactly one of the extras, "
    "`pip install 'onnx-lancet[cpu]'` (onnxruntime) or `pip install 'onnx-lancet[gpu]'` (onnxruntime-gpu); "
    "never both, they provide the same module"
)


def import_onnxruntime() -> Any:
    """Import onnxruntime or raise a LancetError saying how to install it."""
    try:
        import onnxruntime  # noqa: PLC0415
    except ImportError as exc:
        raise LancetError(INSTALL_HINT) from exc
    if not hasattr(onnxruntime, "InferenceSession"):
        raise LancetError("the onnxruntime module is broken (both onnxruntime and onnxruntime-gpu were "
                          "installed and one removed?): reinstall exactly one of them")
    return onnxruntime


def ort_session(model: str | Path | bytes, threads: int | None = None, optimize: bool = True) -> Any:
    """An onnxruntime CPU session for a model path or serialized bytes; errors name the model.
    `optimize=False` turns graph optimisations off: a quantized (QDQ) model then runs its Quantize and
    Dequantize nodes as written, in float, instead of fused integer kernels (the reference semantics)."""
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    try:
        source = str(model) if isinstance(model, Path) else model
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        name = model if not isinstance(model, bytes) else "the model"
        raise BadInputError(f"onnxruntime cannot load {name}: {exc}") from exc


def ort_run(session: Any, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run a session on named inputs and return all outputs as numpy arrays."""
    return session.run(None, inputs)


def as_input_type(x: np.ndarray, dtype: Any) -> np.ndarray:
    """`x` (float32, as the engine holds inputs) in a graph input's type: float16 for a half-precision
    file; rounded and clipped to the type's range for integer pixels (a restored trigger is not integral)."""
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(x), info.min, info.max).astype(dtype)
    return x.astype(dtype, copy=False)
