"""Compare an exported ONNX file with the framework's own output."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from lancet.runtime import ort_session

from . import ConversionError


def check_export(path: Path, example: np.ndarray, expected: np.ndarray, atol: float, framework: str) -> float:
    """Run the ONNX file in onnxruntime on `example`; raise ConversionError if it differs from `expected`."""
    session = ort_session(path)
    got = session.run(None, {session.get_inputs()[0].name: example})[0]
    if got.shape != expected.shape:
        raise ConversionError(f"{path}: ONNX output shape {got.shape} differs from {framework}'s {expected.shape}")
    diff = float(np.max(np.abs(got - expected))) if got.size else 0.0
    if not np.isfinite(diff) or diff > atol:
        raise ConversionError(f"{path}: ONNX output differs from {framework}'s by {diff:.3g} (tolerance {atol:g})")
    return diff
