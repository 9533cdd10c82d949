"""Element-wise ONNX ops: arithmetic, comparisons, logic and activations."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .registry import is_static, register, xp


def _binary(fn_name: str):
    def handler(inputs, attrs, ctx):
        a, b = inputs
        return getattr(xp(a, b), fn_name)(a, b)

    return handler


for _op, _fn in [("Add", "add"), ("Sub", "subtract"), ("Mul", "multiply"), ("Equal", "equal"),
                 ("Less", "less"), ("Greater", "greater"), ("LessOrEqual", "less_equal"),
                 ("GreaterOrEqual", "greater_equal"), ("Xor", "logical_xor"), ("BitShift", "left_shift")]:
    register(_op)(_binary(_fn))


def _logical(fn_name: str, deciding: bool):
    """And / Or, folded to a constant where a static operand decides the result alone (And with all False,
    Or with all True): a Loop's continue-condition `counter < n and <test on the data>` then ends the loop
    at trace time (`control.loop`)."""
    def handler(inputs, attrs, ctx):
        a, b = inputs
        for value in (a, b):
            if is_static(value) and np.all(np.asarray(value) == deciding):
                return np.full(np.broadcast_shapes(np.shape(a), np.shape(b)), deciding)
        return getattr(xp(a, b), fn_name)(a, b)

    return handler


register("And")(_logical("logical_and", False))
register("Or")(_logical("logical_or", True))


@register("Div")
def div(inputs, attrs, ctx):
    a, b = inputs
    m = xp(a, b)
    if np.issubdtype(np.asarray(a).dtype if m is np else a.dtype, np.integer):
        # ONNX integer division truncates toward zero; numpy's // floors.
        return m.sign(a) * m.sign(b) * (m.abs(a) // m.abs(b))
    return m.divide(a, b)


@register("Pow")
def power(inputs, attrs, ctx):
    a, b = inputs
    m = xp(a, b)
    return m.power(a, b).astype(m.asarray(a).dtype)


@register("Mod")
def mod(inputs, attrs, ctx):
    a, b = inputs
    m = xp(a, b)
    return m.fmod(a, b) if attrs.get("fmod", 0) else m.mod(a, b)


def _unary(fn_name: str):
    def handler(inputs, attrs, ctx):
        (x,) = inputs[:1]
        return getattr(xp(x), fn_name)(x)

    return handler


for _op, _fn in [("Neg", "negative"), ("Abs", "abs"), ("Sqrt", "sqrt"), ("Exp", "exp"), ("Log", "log"),
                 ("Floor", "floor"), ("Ceil", "ceil"), ("Sign", "sign"), ("Round", "round"),
                 ("Not", "logical_not"), ("Sin", "sin"), ("Cos", "cos"), ("Tanh", "tanh"),
                 ("IsNaN", "isnan"), ("Tan", "tan"), ("Asin", "arcsin"), ("Acos", "arccos"), ("Atan", "arctan"),
                 ("Sinh", "sinh"), ("Cosh", "cosh"), ("Asinh", "arcsinh"), ("Acosh", "arccosh"),
                 ("Atanh", "arctanh")]:
    register(_op)(_unary(_fn))


@register("Reciprocal")
def reciprocal(inputs, attrs, ctx):
    return 1.0 / inputs[0]


@register("Identity", "Dropout")
def identity(inputs, attrs, ctx):
    x = inputs[0]
    if ctx.num_outputs > 1:  # Dropout's mask output: all kept at inference
        return x, xp(x).ones(x.shape, dtype=bool)
    return x


@register("Erf")
def erf(inputs, attrs, ctx):
    return lax.erf(inputs[0])


@register("Sigmoid")
def sigmoid(inputs, attrs, ctx):
    return jax.nn.sigmoid(inputs[0])


@register("Relu")
def relu(inputs, attrs, ctx):
    return jax.nn.relu(inputs[0])


@register("LeakyRelu")
def leaky_relu(inputs, attrs, ctx):
    x = inputs[0]
    return jnp.where(x >= 0, x, x * attrs.get("alpha", 0.01))


@register("PRelu")
def prelu(inputs, attrs, ctx):
    x, slope = inputs
    return jnp.where(x >= 0, x, x * slope)


@register("Elu")
def elu(inputs, attrs, ctx):
    x = inputs[0]
    alpha = attrs.get("alpha", 1.0)
    return jnp.where(x > 0, x, alpha * jnp.expm1(jnp.minimum(x, 0)))


@register("Selu")
def selu(inputs, attrs, ctx):
    x = inputs[0]
    alpha = attrs.get("alpha", 1.67326319217681884765625)
    gamma = attrs.get("gamma", 1.05070102214813232421875)
    return gamma * jnp.where(x > 0, x, alpha * jnp.expm1(jnp.minimum(x, 0)))


@register("HardSigmoid")
def hard_sigmoid(inputs, attrs, ctx):
    x = inputs[0]
    return jnp.clip(attrs.get("alpha", 0.2) * x + attrs.get("beta", 0.5), 0, 1)


@register("HardSwish")
def hard_swish(inputs, attrs, ctx):
    x = inputs[0]
    return x * jnp.clip(x / 6 + 0.5, 0, 1)


@register("Softplus")
def softplus(inputs, attrs, ctx):
    return jax.nn.softplus(inputs[0])


@register("Mish")
def mish(inputs, attrs, ctx):
    x = inputs[0]
    return x * jnp.tanh(jax.nn.softplus(x))


@register("Celu")
def celu(inputs, attrs, ctx):
    x = inputs[0]
    alpha = attrs.get("alpha", 1.0)
    return jnp.maximum(x, 0) + jnp.minimum(0, alpha * jnp.expm1(jnp.minimum(x, 0) / alpha))


@register("ThresholdedRelu")
def thresholded_relu(inputs, attrs, ctx):
    x = inputs[0]
    return jnp.where(x > attrs.get("alpha", 1.0), x, 0)


@register("Shrink")
def shrink(inputs, attrs, ctx):
    x = inputs[0]
    lambd, bias = attrs.get("lambd", 0.5), attrs.get("bias", 0.0)
    return jnp.where(x < -lambd, x + bias, jnp.where(x > lambd, x - bias, 0))


@register("Softsign")
def softsign(inputs, attrs, ctx):
    x = inputs[0]
    return x / (1 + jnp.abs(x))


@register("Gelu")
def gelu(inputs, attrs, ctx):
    return jax.nn.gelu(inputs[0], approximate=attrs.get("approximate", "none") == "tanh")


@register("Clip")
def clip(inputs, attrs, ctx):
    x = inputs[0]
    if ctx.opset < 11:
        low, high = attrs.get("min"), attrs.get("max")
    else:
        low = inputs[1] if len(inputs) > 1 else None
        high = inputs[2] if len(inputs) > 2 else None
    m = xp(x, low, high)
    if low is not None:
        x = m.maximum(x, m.asarray(low, dtype=x.dtype) if m is np else low)
    if high is not None:
        x = m.minimum(x, m.asarray(high, dtype=x.dtype) if m is np else high)
    return x


def _variadic(fn_name: str):
    def handler(inputs, attrs, ctx):
        m = xp(*inputs)
        out = inputs[0]
        for value in inputs[1:]:
            out = getattr(m, fn_name)(out, value)
        return out

    return handler


register("Max")(_variadic("maximum"))
register("Min")(_variadic("minimum"))
register("Sum")(_variadic("add"))


@register("Mean")
def mean(inputs, attrs, ctx):
    return _variadic("add")(inputs, attrs, ctx) / len(inputs)


@register("Where")
def where(inputs, attrs, ctx):
    cond, a, b = inputs
    return xp(cond, a, b).where(cond, a, b)


def _computed(dtype) -> Any:
    """The type a traced tensor of `dtype` is computed in: every float type in float32 (a float16 model's
    Casts, as mixed-precision exports write them, stay in the engine's precision; JAX has no float64
    without x64), other types as they are."""
    kind = np.dtype(dtype)
    return np.float32 if np.issubdtype(kind, np.floating) or kind.name == "bfloat16" else dtype


@register("Cast")
def cast(inputs, attrs, ctx):
    from onnx.helper import tensor_dtype_to_np_dtype

    x = inputs[0]
    dtype = tensor_dtype_to_np_dtype(attrs["to"])
    return np.asarray(x).astype(dtype) if xp(x) is np else x.astype(_computed(dtype))


@register("CastLike")
def cast_like(inputs, attrs, ctx):
    x, like = inputs
    return np.asarray(x).astype(like.dtype) if xp(x) is np else x.astype(_computed(like.dtype))
