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

from ..quantization import along_axis, quantize_values
from .registry import OpContext, register, static_array, xp

_INTEGER_TYPES = {np.dtype(t) for t in (np.uint8, np.int8, np.uint16, np.int16, np.int32)}


def _quantized_type(zero_point, attrs: dict, ctx: OpContext) -> np.dtype:
    from ..errors import BadInputError

    if zero_point is not None:
        dtype = np.dtype(np.asarray(zero_point).dtype)
    else:
        from onnx.helper import tensor_dtype_to_np_dtype

        dtype = np.dtype(tensor_dtype_to_np_dtype(attrs["output_dtype"]) if attrs.get("output_dtype") else np.uint8)
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
    zero_point = inputs[2] if len(inputs) > 2 and inputs[2] is not None else None
    dtype = _quantized_type(zero_point, attrs, ctx)
    axis = int(attrs.get("axis", 1))
    scale = static_array(inputs[1], "the QuantizeLinear scale", ctx)
    zero_point = np.zeros((), dtype) if zero_point is None else np.asarray(zero_point)
    if xp(x) is np:
        return quantize_values(x, scale, zero_point, axis, dtype).astype(np.float32)
    info = np.iinfo(dtype)
    scaled = x / along_axis(scale.astype(np.float32), axis, np.ndim(x))
    rounded = scaled + lax.stop_gradient(jnp.round(scaled) - scaled)  # straight-through rounding
    return jnp.clip(rounded + along_axis(zero_point.astype(np.float32), axis, np.ndim(x)), info.min, info.max)


@register("DequantizeLinear", static_inputs=(1, 2))
def dequantize_linear(inputs, attrs, ctx):
    _check_blocks(attrs, ctx, "DequantizeLinear")
    x = inputs[0]
    ndim = np.ndim(x)
    axis = int(attrs.get("axis", 1))
    scale = along_axis(static_array(inputs[1], "the DequantizeLinear scale", ctx).astype(np.float32), axis, ndim)
    zero_point = inputs[2] if len(inputs) > 2 and inputs[2] is not None else np.zeros((), np.float32)
    zero = along_axis(np.asarray(zero_point, np.float32), axis, ndim)
    m = xp(x)
    return (m.asarray(x, np.float32) - zero) * scale
