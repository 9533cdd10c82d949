"""QuantizeLinear and DequantizeLinear on activations: a QDQ-quantized model's fake quantization.

The engine computes in float32: QuantizeLinear gives float32 tensors holding the integers onnxruntime would
(x / scale rounded half to even, plus the zero point, saturated to the zero point's type), DequantizeLinear
maps them back. The rounding's gradient is passed straight through (within the integer range, zero
outside it), as quantization-aware training does, so saliency, neuron scores and fine-tuning see through
the quantizers. A weight's DequantizeLinear is folded into a float parameter at load (`loader`).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from .registry import OpContext, register, static_array, xp

_INTEGER_TYPES = {np.dtype(t) for t in (np.uint8, np.int8, np.uint16, np.int16, np.int32)}


def _along(value: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    """A per-tensor (scalar) or per-axis (1-D) scale or zero point, shaped to broadcast along `axis`."""
    if value.size == 1:
        return value.reshape(())
    shape = [1] * ndim
    shape[axis % ndim] = value.size
    return value.reshape(shape)


def _quantized_type(zero_point, attrs: dict, ctx: OpContext) -> np.dtype:
    from ..errors import BadInputError

    if zero_point is not None:
        dtype = np.dtype(np.asarray(zero_point).dtype)
    else:
        from onnx.helper import tensor_dtype_to_np_dtype

        dtype = np.dtype(tensor_dtype_to_np_dtype(attrs["output_dtype"])) if attrs.get("output_dtype") else np.dtype(np.uint8)
    if dtype not in _INTEGER_TYPES:
        raise BadInputError(f"node {ctx.node_name!r} (QuantizeLinear): quantizing to {dtype} is not supported "
                            "(8, 16 and 32-bit integers are)")
    return dtype


def _check_blocks(attrs: dict, ctx: OpContext, op: str) -> None:
    if attrs.get("block_size", 0):
        from ..errors import BadInputError

        raise BadInputError(f"node {ctx.node_name!r} ({op}): blocked quantization (block_size) is not supported")


@register("QuantizeLinear", static_inputs=(1, 2))
def quantize_linear(inputs, attrs, ctx):
    _check_blocks(attrs, ctx, "QuantizeLinear")
    x = inputs[0]
    zero_point = inputs[2] if len(inputs) > 2 else None
    info = np.iinfo(_quantized_type(zero_point, attrs, ctx))
    ndim = np.ndim(x)
    axis = int(attrs.get("axis", 1))
    scale = _along(static_array(inputs[1], "the QuantizeLinear scale", ctx).astype(np.float32), axis, ndim)
    zero = _along(np.asarray(zero_point if zero_point is not None else 0, np.float32), axis, ndim)
    if xp(x) is np:
        return np.clip(np.round(np.asarray(x, np.float32) / scale) + zero, info.min, info.max).astype(np.float32)
    scaled = x / scale
    rounded = scaled + lax.stop_gradient(jnp.round(scaled) - scaled)  # straight-through rounding
    return jnp.clip(rounded + zero, info.min, info.max)


@register("DequantizeLinear", static_inputs=(1, 2))
def dequantize_linear(inputs, attrs, ctx):
    _check_blocks(attrs, ctx, "DequantizeLinear")
    x = inputs[0]
    ndim = np.ndim(x)
    axis = int(attrs.get("axis", 1))
    scale = _along(static_array(inputs[1], "the DequantizeLinear scale", ctx).astype(np.float32), axis, ndim)
    zero_point = inputs[2] if len(inputs) > 2 and inputs[2] is not None else np.zeros((), np.float32)
    zero = _along(np.asarray(zero_point, np.float32), axis, ndim)
    m = xp(x)
    return (m.asarray(x, np.float32) - zero) * scale
