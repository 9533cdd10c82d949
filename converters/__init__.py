"""Export helpers: PyTorch and Keras models to ONNX, each checked against the framework's own output."""
from __future__ import annotations

from lancet.errors import LancetError


class ConversionError(LancetError):
    """An export failed, or the exported ONNX model disagrees with the framework's own output."""


__all__ = ["ConversionError"]
