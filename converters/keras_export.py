"""Keras 3 -> ONNX through tf2onnx, checked against Keras's own output.

With Keras 3 and tf2onnx 1.17, `tf2onnx.convert.from_keras` fails on some models (KeyError on a
keras_tensor); converting a `tf.function` wrapping the model with `from_function` works on all we tried.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from . import written_atomically
from .check import check_export


def export_keras(model, example: np.ndarray, path: str | Path, *, opset: int = 17, atol: float = 1e-4) -> Path:
    """Export a Keras model to `path` (batch axis dynamic); written only once onnxruntime matches Keras."""
    import tensorflow as tf  # noqa: PLC0415
    import tf2onnx  # noqa: PLC0415

    path = Path(path)
    example = np.ascontiguousarray(example, dtype=np.float32)
    spec = [tf.TensorSpec((None, *example.shape[1:]), tf.float32, name="input")]
    function = tf.function(lambda x: model(x, training=False))
    with written_atomically(path, f"tf2onnx export of Keras model {model.name!r} to {path}") as tmp:
        expected = np.asarray(model(example, training=False))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tf2onnx.convert.from_function(function, input_signature=spec, opset=opset, output_path=str(tmp))
        check_export(tmp, example, expected, atol, "Keras")
    return path
