"""Quantized operators (onnxruntime's QOperator format): ops that read and write quantized tensors.

The engine holds a quantized tensor as float32 integers (as QuantizeLinear gives them). The layers compute
as onnxruntime's integer kernels do: the int32 accumulation of (x - x_zero_point) x (w - w_zero_point)
plus the int32 bias, exact in float32 while partial sums stay under 2^24, requantized with the per-channel
multiplier x_scale * w_scale / y_scale (float32, in onnxruntime's order), rounded half to even, plus the
output zero point, saturated. A weight and bias the loader folded into float parameters
(`loader._fold_integer_weights`) are divided back into integer steps by their scales and rounded; every
rounding passes its gradient straight through, so scores, ablation and fine-tuning see through them.
The elementwise and pooling ops dequantize, compute in float and requantize.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from ..quantization import along_axis
from .quantize import _straight_through_round, dequantize_linear, integer_steps, quantize_linear
from .registry import register, static_array, xp

MS = "com.microsoft"


def _static(value, what: str, ctx) -> np.ndarray:
    return static_array(value, what, ctx).astype(np.float32) if value is not None else np.zeros((), np.float32)


def _integer_type(zero_point) -> np.dtype:
    return np.dtype(np.asarray(zero_point).dtype) if zero_point is not None else np.dtype(np.uint8)


def _requantize(value, multiplier: np.ndarray, zero_point, axis: int):
    """value x multiplier rounded half to even, plus the zero point, saturated to the zero point's type."""
    info = np.iinfo(_integer_type(zero_point))
    scaled = value * along_axis(multiplier, axis, np.ndim(value))
    zero = along_axis(np.asarray(zero_point if zero_point is not None else 0, np.float32), axis, np.ndim(value))
    rounded = np.round(scaled) if xp(value) is np else _straight_through_round(scaled)
    return xp(value).clip(rounded + zero, info.min, info.max)


def _quantize(value, scale: np.ndarray, zero_point, ctx):
    """QuantizeLinear of a float tensor per tensor (to the zero point's type, uint8 without one)."""
    return quantize_linear([value, scale, zero_point], {}, ctx)


def _dequantize(value, scale: np.ndarray, zero_point, ctx):
    return dequantize_linear([value, scale, zero_point], {}, ctx)


def _input(inputs, slot):
    return inputs[slot] if len(inputs) > slot else None


@register("QLinearConv", static_inputs=(1, 2, 4, 5, 6, 7))
def qlinear_conv(inputs, attrs, ctx):
    from .nn import conv

    x, x_scale, x_zero = inputs[0], _static(inputs[1], "the x scale", ctx), inputs[2]
    w_scale, y_scale = _static(inputs[4], "the w scale", ctx), _static(inputs[6], "the y scale", ctx)
    x_steps = x - np.float32(np.asarray(x_zero if x_zero is not None else 0))
    acc = conv([x_steps, integer_steps(inputs[3], w_scale, inputs[5], 0)], attrs, ctx)
    bias = _input(inputs, 8)
    if bias is not None:
        acc = acc + integer_steps(bias, (x_scale * w_scale).astype(np.float32), None, 0).reshape((1, -1) + (1,) * (acc.ndim - 2))
    multiplier = (x_scale * w_scale / y_scale).astype(np.float32).reshape(-1)
    return _requantize(acc, multiplier if multiplier.size > 1 else multiplier[0], inputs[7], 1)


@register("QLinearMatMul", static_inputs=(1, 2, 4, 5, 6, 7))
def qlinear_matmul(inputs, attrs, ctx):
    a, a_scale, a_zero = inputs[0], _static(inputs[1], "the a scale", ctx), inputs[2]
    b_scale, y_scale = _static(inputs[4], "the b scale", ctx), _static(inputs[6], "the y scale", ctx)
    a_steps = a - np.float32(np.asarray(a_zero if a_zero is not None else 0))
    b_steps = integer_steps(inputs[3], b_scale, inputs[5], -1)
    acc = (np.matmul(a_steps, b_steps) if xp(a_steps, b_steps) is np
           else jnp.matmul(a_steps, b_steps, precision=lax.Precision.HIGHEST))
    multiplier = (a_scale * b_scale / y_scale).astype(np.float32).reshape(-1)
    return _requantize(acc, multiplier if multiplier.size > 1 else multiplier[0], inputs[7], -1)


@register("QGemm", static_inputs=(1, 2, 4, 5, 7, 8), domain=MS)
def qgemm(inputs, attrs, ctx):
    a, a_scale, a_zero = inputs[0], _static(inputs[1], "the A scale", ctx), inputs[2]
    b_scale = _static(inputs[4], "the B scale", ctx)
    trans_b = bool(attrs.get("transB", 0))
    a_steps = a - np.float32(np.asarray(a_zero if a_zero is not None else 0))
    if attrs.get("transA", 0):
        a_steps = a_steps.T
    b_steps = integer_steps(inputs[3], b_scale, inputs[5], 0 if trans_b else -1)
    if trans_b:
        b_steps = b_steps.T
    acc = (np.matmul(a_steps, b_steps) if xp(a_steps, b_steps) is np
           else jnp.matmul(a_steps, b_steps, precision=lax.Precision.HIGHEST))
    alpha = np.float32(attrs.get("alpha", 1.0))
    bias = _input(inputs, 6)
    if bias is not None:
        acc = acc + integer_steps(bias, (a_scale * b_scale).astype(np.float32), None, -1)
    y_scale = _input(inputs, 7)
    if y_scale is None:  # float output
        return acc * (alpha * a_scale * b_scale).astype(np.float32).reshape(-1)
    multiplier = (alpha * a_scale * b_scale / _static(y_scale, "the y scale", ctx)).astype(np.float32).reshape(-1)
    return _requantize(acc, multiplier if multiplier.size > 1 else multiplier[0], _input(inputs, 8), -1)


def _binary(fn):
    def handler(inputs, attrs, ctx):
        a = _dequantize(inputs[0], _static(inputs[1], "the A scale", ctx), inputs[2], ctx)
        b = _dequantize(inputs[3], _static(inputs[4], "the B scale", ctx), inputs[5], ctx)
        return _quantize(fn(a, b), _static(inputs[6], "the C scale", ctx), _input(inputs, 7), ctx)

    return handler


register("QLinearAdd", static_inputs=(1, 2, 4, 5, 6, 7), domain=MS)(_binary(lambda a, b: a + b))
register("QLinearMul", static_inputs=(1, 2, 4, 5, 6, 7), domain=MS)(_binary(lambda a, b: a * b))


def _unary(fn_of_attrs):
    """A quantized elementwise or pooling op: dequantize x (slots 0-2), apply the float op, quantize with
    the y scale and zero point (slots 3-4)."""
    def handler(inputs, attrs, ctx):
        x = _dequantize(inputs[0], _static(inputs[1], "the x scale", ctx), inputs[2], ctx)
        return _quantize(fn_of_attrs(x, attrs, ctx), _static(inputs[3], "the y scale", ctx), _input(inputs, 4), ctx)

    return handler


def _channels_first(fn):
    """`fn` on NCHW data also for a node with channels_last=1 (NHWC)."""
    def apply(x, attrs, ctx):
        if not attrs.get("channels_last", 0):
            return fn(x, attrs, ctx)
        order = (0, x.ndim - 1, *range(1, x.ndim - 1))
        back = (0, *range(2, x.ndim), 1)
        return xp(x).transpose(fn(xp(x).transpose(x, order), attrs, ctx), back)

    return apply


def _sigmoid(x, attrs, ctx):
    import jax

    return 1.0 / (1.0 + np.exp(-x)) if xp(x) is np else jax.nn.sigmoid(x)


def _leaky_relu(x, attrs, ctx):
    return xp(x).where(x >= 0, x, np.float32(attrs.get("alpha", 0.01)) * x)


def _average_pool(x, attrs, ctx):
    from .nn import average_pool

    return average_pool([x], {k: v for k, v in attrs.items() if k != "channels_last"}, ctx)


def _global_average_pool(x, attrs, ctx):
    return xp(x).mean(x, axis=tuple(range(2, x.ndim)), keepdims=True)


register("QLinearSigmoid", static_inputs=(1, 2, 3, 4), domain=MS)(_unary(_sigmoid))
register("QLinearLeakyRelu", static_inputs=(1, 2, 3, 4), domain=MS)(_unary(_leaky_relu))
register("QLinearAveragePool", static_inputs=(1, 2, 3, 4), domain=MS)(_unary(_channels_first(_average_pool)))
register("QLinearGlobalAveragePool", static_inputs=(1, 2, 3, 4), domain=MS)(
    _unary(_channels_first(_global_average_pool)))


@register("QLinearConcat", static_inputs=tuple(i for i in range(2 + 3 * 256) if i < 2 or (i - 2) % 3), domain=MS)
def qlinear_concat(inputs, attrs, ctx):
    """Inputs: y scale, y zero point, then (x, x scale, x zero point) per tensor; attribute axis."""
    parts = [_dequantize(inputs[i], _static(inputs[i + 1], "an input scale", ctx), inputs[i + 2], ctx)
             for i in range(2, len(inputs), 3)]
    m = xp(*parts)
    return _quantize(m.concatenate(parts, axis=int(attrs["axis"])), _static(inputs[0], "the y scale", ctx), inputs[1],
                     ctx)
