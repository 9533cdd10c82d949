"""Float ONNX model -> the file onnxruntime saves after optimising it (`SessionOptions.optimized_model_filepath`),
as a deployment pipeline ships it to skip optimisation at start-up.

Level 'extended' (portable: the 'all' level adds hardware-specific NCHWc layouts that onnxruntime itself
says to use only on the machine that wrote them): BatchNormalization folded into convolutions, a
convolution or Gemm and its activation fused (com.microsoft FusedConv, FusedGemm), GELU patterns fused
(BiasGelu, QuickGelu, ...). Checked before it is written: its outputs equal the source model's on the given
images (to `atol` of their scale).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from lancet.runtime import import_onnxruntime, ort_session

from . import ConversionError, written_atomically


def ort_optimized(source: str | Path, path: str | Path, check: np.ndarray, *, atol: float = 1e-4) -> Path:
    """Write `source` as onnxruntime's extended-level optimisation leaves it to `path` (atomically)."""
    ort = import_onnxruntime()
    source, path = Path(source), Path(path)
    check = np.ascontiguousarray(check, dtype=np.float32)
    with written_atomically(path, f"optimising {source} to {path}") as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(tmp)
        options.log_severity_level = 3
        ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
        float_session = ort_session(source)
        name = float_session.get_inputs()[0].name
        expected = float_session.run(None, {name: check})[0]
        got = ort_session(tmp).run(None, {name: check})[0]
        diff = float(np.max(np.abs(got - expected))) if got.size else 0.0
        if diff > atol * max(1.0, float(np.max(np.abs(expected)))):
            raise ConversionError(f"the optimised {source} differs from it by {diff:.2e} on the check images")
    return path
