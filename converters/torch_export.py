"""PyTorch -> ONNX with a dynamic batch axis, checked against PyTorch's own output."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from . import written_atomically
from .check import check_export


def export_torch(model: torch.nn.Module, example: np.ndarray, path: str | Path, *, opset: int = 17,
                 keep_batchnorm: bool = False, atol: float = 1e-4) -> Path:
    """Export `model` (eval mode) to `path` with the TorchScript exporter, batch axis dynamic.

    `keep_batchnorm` keeps BatchNormalization nodes instead of folding them into the convolutions.
    The file is written atomically and only after onnxruntime reproduces PyTorch's output within `atol`.
    """
    path = Path(path)
    model = model.eval()
    x = torch.from_numpy(np.ascontiguousarray(example, dtype=np.float32))
    with written_atomically(path, f"torch.onnx.export of {type(model).__name__} to {path}") as tmp:
        with torch.no_grad():
            expected = model(x).numpy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, (x,), str(tmp), dynamo=False, opset_version=opset, input_names=["input"],
                output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                do_constant_folding=not keep_batchnorm,
                training=torch.onnx.TrainingMode.PRESERVE if keep_batchnorm else torch.onnx.TrainingMode.EVAL)
        check_export(tmp, x.numpy(), expected, atol, "PyTorch")
    return path
