"""QuantizeLinear and DequantizeLinear on activations: a QDQ-quantized model's fake quantization.

The engine computes in float32: QuantizeLinear gives float32 tensors holding the integers onnxruntime would
(x / scale rounded half to even, plus the zero point, saturated to the zero point's type), DequantizeLinear
maps them back. The rounding's gradient is passed straight through (within the integer range, zero
outside it), as quantization-aware training does, so saliency, neuron scores and fine-tuning see through
the quantizers. A weight's DequantizeLinear is folded into a float parameter at load (`loader`).
"""
from __future__ import annotations

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax import lax

from ..quantization import along_axis, integer_range, quantize_values, scale_and_zero
from .registry import OpContext, is_static, register, static_array, xp

_INTEGER_TYPES = {np.dtype(t) for t in (np.uint8, np.int8, np.uint16, np.int16, np.int32, ml_dtypes.int4,
                                        ml_dtypes.uint4)}


def _quantized_type(zero_point, attrs: dict, ctx: OpContext) -> np.dtype:
    from ..errors import BadInputError

    if zero_point is not None:
        dtype = np.dtype(np.asarray(zero_point).dtype)
    else:
        from onnx.helper import tensor_dtype_to_np_dtype

        dtype = np.dtype(tensor_dtype_to_np_dtype(attrs["output_dtype"]) if attrs.get("output_dtype") else np.uint8)
    if dtype not in _INTEGER_TYPES:
        raise BadInputError(f"node {ctx.node_name!r} (QuantizeLinear): quantizing to {dtype} is not supported "
                            "(4, 8, 16 and 32-bit integers are)")
    return dtype


def _straight_through_round(value):
    """Round half to even with the identity's gradient (quantization-aware training's estimator)."""
    return value + lax.stop_gradient(jnp.round(value) - value)


def integer_steps(value, scale, zero_point, axis: int):
    """A weight (or bias) operand of an integer op in integer steps, its zero point taken off: an integer
    tensor has the zero point subtracted; a float parameter the loader folded from one ((q - zero point) x
    scale, `loader._fold_integer_weights`) is divided by `scale` and rounded as the file will store it
    (`Model.stored`), the gradient straight through. `scale` and `zero_point` are per tensor, along `axis`,
    or already of the operand's rank."""
    ndim = np.ndim(value)
    if scale is None or np.issubdtype(np.asarray(value).dtype if is_static(value) else np.float32, np.integer):
        if zero_point is None:
            return value if not is_static(value) else np.asarray(value, np.float32)
        zero = np.asarray(zero_point, np.float32) if is_static(zero_point) else zero_point
        return (np.asarray(value, np.float32) if is_static(value) else value) - along_axis(zero, axis, ndim)
    steps = value / along_axis(np.asarray(scale, np.float32), axis, ndim)
    return np.round(steps) if xp(value) is np else _straight_through_round(steps)


def _divide_exactly(a, b):
    """a / b rounded once, as onnxruntime divides: XLA rewrites a division by a broadcast scalar into a
    product with its reciprocal (one ulp off in most elements), which a barrier on a full-shape divisor
    stops; the divisor is built from `a` so that under vmap it carries the batch axis before the barrier."""
    return a / lax.optimization_barrier(a * np.float32(0.0) + b)


@register("QuantizeLinear", static_inputs=(1, 2))
def quantize_linear(inputs, attrs, ctx):
    x = inputs[0]
    zero_point = inputs[2] if len(inputs) > 2 and inputs[2] is not None else None
    dtype = _quantized_type(zero_point, attrs, ctx)
    axis, block_size = int(attrs.get("axis", 1)), int(attrs.get("block_size", 0))
    scale = static_array(inputs[1], "the QuantizeLinear scale", ctx)
    zero_point = np.zeros((), dtype) if zero_point is None else np.asarray(zero_point)
    if xp(x) is np:
        return quantize_values(x, scale, zero_point, axis, dtype, block_size).astype(np.float32)
    low, high = integer_range(dtype)
    scale, zero = scale_and_zero(scale, zero_point, axis, np.shape(x), block_size)
    rounded = _straight_through_round(_divide_exactly(x, scale))
    return jnp.clip(rounded + zero, low, high)


@register("DequantizeLinear", static_inputs=(1, 2))
def dequantize_linear(inputs, attrs, ctx):
    x = inputs[0]
    scale = static_array(inputs[1], "the DequantizeLinear scale", ctx)
    zero_point = inputs[2] if len(inputs) > 2 and inputs[2] is not None else np.zeros((), np.float32)
    scale, zero = scale_and_zero(scale, zero_point, int(attrs.get("axis", 1)), np.shape(x),
                                 int(attrs.get("block_size", 0)))
    m = xp(x)
    return (m.asarray(x, np.float32) - zero) * scale


@register("DynamicQuantizeLinear")
def dynamic_quantize_linear(inputs, attrs, ctx):
    """uint8 quantization over the tensor's own range (widened to hold 0), as onnxruntime computes it:
    scale (max - min) / 255 (1 when the range is empty), zero point -min / scale rounded and clipped to
    [0, 255]. The range covers the whole tensor, so a batch's inputs quantize together; the engine runs a
    model holding this op one input at a time (`ir.Model.per_input_ranges`). Scale and zero point carry no
    gradient; the rounding's passes straight through."""
    x = inputs[0]
    if xp(x) is np:
        low, high = min(float(np.min(x)), 0.0), max(float(np.max(x)), 0.0)
        scale = np.float32(1.0) if high == low else np.float32(high - low) / np.float32(255)
        zero = np.float32(np.clip(np.round(np.float32(0.0) - np.float32(low) / scale), 0, 255))
        return np.clip(np.round(x / scale) + zero, 0, 255).astype(np.float32), scale, zero
    low = jnp.minimum(jnp.min(x), 0.0)
    high = jnp.maximum(jnp.max(x), 0.0)
    scale = jnp.where(high == low, np.float32(1.0), _divide_exactly(high - low, np.float32(255.0)))
    zero = jnp.clip(jnp.round(0.0 - _divide_exactly(low, scale)), 0.0, 255.0)
    scale, zero = lax.stop_gradient(scale), lax.stop_gradient(zero)
    return jnp.clip(_straight_through_round(_divide_exactly(x, scale)) + zero, 0.0, 255.0), scale, zero


@register("MatMulInteger")
def matmul_integer(inputs, attrs, ctx):
    """(A - a_zero_point) @ (B - b_zero_point), in float32 holding the int32 result (exact while partial
    sums stay under 2^24). a's zero point is per tensor or per row, b's per tensor or per column."""
    a, b = inputs[0], inputs[1]
    a_zero = inputs[2] if len(inputs) > 2 else None
    b_zero = inputs[3] if len(inputs) > 3 else None
    if a_zero is not None:
        a = a - (a_zero if np.ndim(a_zero) == 0 else xp(a_zero).reshape(a_zero, (-1, 1)))
    b = integer_steps(b, attrs.get("weight_unit"), b_zero, -1)
    if xp(a, b) is np:
        return np.matmul(a, b).astype(np.float32)
    return jnp.matmul(a, b, precision=lax.Precision.HIGHEST)


@register("ConvInteger")
def conv_integer(inputs, attrs, ctx):
    """A convolution of (x - x_zero_point) with (w - w_zero_point) (per tensor or per output channel), in
    float32 holding the int32 result; attributes as Conv's."""
    from .nn import conv

    x, w = inputs[0], inputs[1]
    x_zero = inputs[2] if len(inputs) > 2 else None
    w_zero = inputs[3] if len(inputs) > 3 else None
    if x_zero is not None:
        x = x - x_zero
    conv_attrs = {k: v for k, v in attrs.items() if k != "weight_unit"}
    return conv([x, integer_steps(w, attrs.get("weight_unit"), w_zero, 0)], conv_attrs, ctx)
