"""Linear quantization arithmetic shared by the QuantizeLinear/DequantizeLinear ops and a quantized
parameter's write-back (`ir.QuantizedParam`): one rounding rule, one broadcasting rule."""
from __future__ import annotations

import numpy as np


def along_axis(value: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    """A per-tensor (one element) or per-axis (1-D) scale or zero point, shaped to broadcast along `axis`
    of an `ndim`-D tensor; one already `ndim`-D (a recurrent weight's per direction and gate column) as
    it is."""
    value = np.asarray(value)
    if value.size == 1:
        return value.reshape(())
    if value.ndim == ndim and ndim > 1:
        return value
    shape = [1] * ndim
    shape[axis % ndim] = value.size
    return value.reshape(shape)


def quantize_values(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int,
                    dtype: np.dtype) -> np.ndarray:
    """x / scale rounded half to even, plus the zero point, saturated to the integer `dtype` (as
    onnxruntime's QuantizeLinear), as that integer type."""
    x = np.asarray(x, np.float32)
    info = np.iinfo(dtype)
    scale = along_axis(np.asarray(scale, np.float32), axis, x.ndim)
    zero = along_axis(np.asarray(zero_point, np.float32), axis, x.ndim)
    return np.clip(np.round(x / scale) + zero, info.min, info.max).astype(dtype)


def dequantize_values(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int) -> np.ndarray:
    """(q - zero point) * scale in float32 (as onnxruntime's DequantizeLinear)."""
    q = np.asarray(q)
    scale = along_axis(np.asarray(scale, np.float32), axis, q.ndim)
    zero = along_axis(np.asarray(zero_point, np.float32), axis, q.ndim)
    return ((q.astype(np.float32) - zero) * scale).astype(np.float32)
