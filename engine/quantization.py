"""Linear quantization arithmetic shared by the QuantizeLinear/DequantizeLinear ops and a quantized
parameter's write-back (`ir.QuantizedParam`): one rounding rule, one broadcasting rule. Integer types
include the 4-bit ones (ml_dtypes int4 / uint4, as onnx reads them)."""
from __future__ import annotations

import ml_dtypes
import numpy as np


FOUR_BIT_TYPES = (np.dtype(ml_dtypes.int4), np.dtype(ml_dtypes.uint4))


def is_integer_type(dtype) -> bool:
    """Whether `dtype` is an integer type, the 4-bit ones included (numpy does not count those)."""
    dtype = np.dtype(dtype)
    return np.issubdtype(dtype, np.integer) or dtype in FOUR_BIT_TYPES


def integer_range(dtype) -> tuple[int, int]:
    """The smallest and largest value of an integer type (4-bit ones included)."""
    info = ml_dtypes.iinfo(np.dtype(dtype))
    return int(info.min), int(info.max)


def expand_blocks(value: np.ndarray, axis: int, block_size: int, shape: tuple[int, ...]) -> np.ndarray:
    """A blocked scale or zero point (opset 21's block_size: one element per `block_size` consecutive
    elements along `axis`, the last block possibly short) repeated to the full `shape`."""
    value = np.asarray(value)
    axis = axis % len(shape)
    return np.repeat(value, block_size, axis=axis).take(np.arange(shape[axis]), axis=axis)


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


def scale_and_zero(scale, zero_point, axis: int, shape: tuple[int, ...], block_size: int = 0):
    """Scale and zero point as float32, shaped to broadcast over a tensor of `shape`: per tensor, along
    `axis`, or per block of `block_size` along it."""
    scale, zero = np.asarray(scale, np.float32), np.asarray(zero_point, np.float32)
    if block_size:
        return (expand_blocks(scale, axis, block_size, shape),
                expand_blocks(zero, axis, block_size, shape) if zero.size > 1 else zero.reshape(()))
    return along_axis(scale, axis, len(shape)), along_axis(zero, axis, len(shape))


def quantize_values(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int,
                    dtype: np.dtype, block_size: int = 0) -> np.ndarray:
    """x / scale rounded half to even, plus the zero point, saturated to the integer `dtype` (as
    onnxruntime's QuantizeLinear), as that integer type."""
    x = np.asarray(x, np.float32)
    low, high = integer_range(dtype)
    scale, zero = scale_and_zero(scale, zero_point, axis, x.shape, block_size)
    return np.clip(np.round(x / scale) + zero, low, high).astype(dtype)


def dequantize_values(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int,
                      block_size: int = 0) -> np.ndarray:
    """(q - zero point) * scale in float32 (as onnxruntime's DequantizeLinear)."""
    q = np.asarray(q)
    scale, zero = scale_and_zero(scale, zero_point, axis, q.shape, block_size)
    return ((q.astype(np.float32) - zero) * scale).astype(np.float32)


def unpack_bits(packed: np.ndarray, bits: int = 4) -> np.ndarray:
    """uint8 bytes holding 8 / `bits` values each (2, 4 or 8 bits; the lowest bits first, as MatMulNBits
    stores its weights and zero points) -> uint8 values, that many times as many along the last axis."""
    packed = np.asarray(packed, np.uint8)
    if bits == 8:
        return packed.copy()
    low = (1 << bits) - 1
    parts = [(packed >> (bits * i)) & low for i in range(8 // bits)]
    return np.stack(parts, axis=-1).reshape(*packed.shape[:-1], -1).astype(np.uint8)


def pack_bits(values: np.ndarray, bits: int = 4) -> np.ndarray:
    """The inverse of `unpack_bits`: groups of 8 / `bits` values (a whole number of groups along the last
    axis) into bytes."""
    values = np.asarray(values, np.uint8)
    per = 8 // bits
    packed = np.zeros(values.shape[:-1] + (values.shape[-1] // per,), np.uint8)
    for i in range(per):
        packed |= (values[..., i::per] << (bits * i)).astype(np.uint8)
    return packed
