"""onnxruntime's fused float ops (com.microsoft domain), as its graph optimiser writes them into a file saved
after optimisation (`SessionOptions.optimized_model_filepath`, level extended): a convolution or Gemm with
its activation (FusedConv, FusedGemm), MatMul with transposes and a scale (FusedMatMul), and the GELU
family (Gelu, BiasGelu, FastGelu, QuickGelu), and from its transformer optimiser the residual Add with the
LayerNormalization after it (SkipLayerNormalization). Each computes what the unfused ops did.
"""
from __future__ import annotations

from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ..errors import BadInputError
from .registry import register, spec_of, xp

MS = "com.microsoft"


def activation_op(name, params: list[float]) -> tuple[str, dict, list[float]] | None:
    """The standard op a fused layer's activation is: (op type, attributes, Clip's bounds as inputs), or
    None for one with no standard op. Relu, Tanh, Sigmoid, LeakyRelu (alpha), HardSigmoid (alpha, beta),
    Clip (min, max). The loader splits fused layers with it (`loader._unfused`), the fused ops run it."""
    name = name.decode() if isinstance(name, bytes) else str(name or "")
    params = [float(p) for p in params]
    if name in ("Relu", "Tanh", "Sigmoid"):
        return name, {}, []
    if name == "LeakyRelu":
        return name, {"alpha": params[0] if params else 0.01}, []
    if name == "HardSigmoid":
        alpha, beta = (params + [0.2, 0.5][len(params):])[:2]
        return name, {"alpha": alpha, "beta": beta}, []
    if name == "Clip":
        return name, {}, params[:2]
    return None


def _activation(x, name, params: list[float], ctx):
    """The fused activation applied by its standard op's handler (none when the name is empty)."""
    if not (name.decode() if isinstance(name, bytes) else name):
        return x
    op = activation_op(name, params)
    if op is None:
        raise BadInputError(f"node {ctx.node_name!r}: fused activation {name!r} is not supported (Relu, LeakyRelu, "
                            "Tanh, Sigmoid, Clip, HardSigmoid are)")
    op_type, attrs, bounds = op
    if op_type == "Clip" and ctx.opset < 11:
        attrs = dict(zip(("min", "max"), bounds))
    return spec_of(op_type).fn([x, *(np.float32(b) for b in bounds)], attrs, ctx)


@register("FusedConv", domain=MS)
def fused_conv(inputs, attrs, ctx):
    """Conv (+ Z, the tensor an Add after it contributed) then the activation."""
    from .nn import conv

    conv_attrs = {k: v for k, v in attrs.items() if k not in ("activation", "activation_params")}
    out = conv([inputs[0], inputs[1], inputs[2] if len(inputs) > 2 else None], conv_attrs, ctx)
    if len(inputs) > 3 and inputs[3] is not None:
        out = out + inputs[3]
    return _activation(out, attrs.get("activation", ""), list(attrs.get("activation_params") or []), ctx)


@register("FusedGemm", domain=MS)
def fused_gemm(inputs, attrs, ctx):
    """Gemm then the activation (its parameters in activation_alpha, _beta)."""
    from .nn import gemm

    gemm_attrs = {k: v for k, v in attrs.items() if not k.startswith("activation")}
    params = [attrs[k] for k in ("activation_alpha", "activation_beta") if k in attrs]
    return _activation(gemm(inputs, gemm_attrs, ctx), attrs.get("activation", ""), params, ctx)


@register("FusedMatMul", domain=MS)
def fused_matmul(inputs, attrs, ctx):
    """alpha x MatMul(A or its last two axes swapped, B likewise)."""
    a, b = inputs[0], inputs[1]
    if attrs.get("transBatchA", 0) or attrs.get("transBatchB", 0):
        raise BadInputError(f"node {ctx.node_name!r} (FusedMatMul): transBatchA/transBatchB are not supported")
    if attrs.get("transA", 0):
        a = jnp.swapaxes(a, -1, -2)
    if attrs.get("transB", 0):
        b = jnp.swapaxes(b, -1, -2)
    out = jnp.matmul(a, b, precision=lax.Precision.HIGHEST)
    alpha = attrs.get("alpha", 1.0)
    return out if alpha == 1.0 else np.float32(alpha) * out


def _gelu_erf(x):
    return 0.5 * x * (1.0 + lax.erf(x * np.float32(1 / np.sqrt(2.0))))


@register("Gelu", domain=MS)
def gelu(inputs, attrs, ctx):
    return _gelu_erf(inputs[0])


@register("BiasGelu", domain=MS)
def bias_gelu(inputs, attrs, ctx):
    return _gelu_erf(inputs[0] + inputs[1])


@register("FastGelu", domain=MS)
def fast_gelu(inputs, attrs, ctx):
    """The tanh approximation of GELU, of x (+ bias)."""
    x = inputs[0] if len(inputs) < 2 or inputs[1] is None else inputs[0] + inputs[1]
    return 0.5 * x * (1.0 + jnp.tanh(np.float32(np.sqrt(2 / np.pi)) * (x + np.float32(0.044715) * x * x * x)))


@register("QuickGelu", domain=MS)
def quick_gelu(inputs, attrs, ctx):
    """x * sigmoid(alpha x), alpha 1.702 by default."""
    x = inputs[0]
    alpha = np.float32(attrs.get("alpha", 1.702))
    return x * (1.0 / (1.0 + np.exp(-alpha * x)) if xp(x) is np else jax.nn.sigmoid(alpha * x))


@register("SkipLayerNormalization", domain=MS)
def skip_layer_norm(inputs, attrs, ctx):
    """LayerNormalization over the last axis of input + skip (+ bias), as onnxruntime's transformer
    optimiser fuses a residual Add and the LayerNormalization after it. Outputs: the normalised tensor,
    mean, inverse standard deviation and the sum (input + skip + bias), as many as the node has."""
    from .nn import layer_norm

    total = inputs[0] + inputs[1]
    if len(inputs) > 4 and inputs[4] is not None:
        total = total + inputs[4]
    beta = inputs[3] if len(inputs) > 3 else None
    outputs = layer_norm([total, inputs[2], beta], {"axis": -1, "epsilon": attrs.get("epsilon", 1e-12)},
                         replace(ctx, num_outputs=3))
    result = (*outputs, total)
    return result[: ctx.num_outputs] if ctx.num_outputs > 1 else result[0]


@register("Attention", domain=MS)
def packed_attention(inputs, attrs, ctx):
    """onnxruntime's self-attention with the Q, K and V projections packed in one weight (its transformer
    optimiser's fusion): QKV = input @ weights + bias, split by `qkv_hidden_sizes` (default three equal
    parts), num_heads heads, scores Q K^T x scale (default 1/sqrt(head size)), `unidirectional` masking
    later keys, a mask_index of key lengths [batch] or of 0/1 per key [batch, keys] masking with
    mask_filter_value (default -10000), an attention_bias added; output [batch, sequence, v hidden]."""
    x, weights = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    mask = inputs[3] if len(inputs) > 3 else None
    if len(inputs) > 4 and inputs[4] is not None:
        raise BadInputError(f"node {ctx.node_name!r} (com.microsoft Attention): a past state is not supported")
    attention_bias = inputs[5] if len(inputs) > 5 else None
    if attrs.get("do_rotary", 0):
        raise BadInputError(f"node {ctx.node_name!r} (com.microsoft Attention): do_rotary is not supported")
    heads = int(attrs["num_heads"])
    qkv = jnp.matmul(x, weights, precision=lax.Precision.HIGHEST)
    if bias is not None:
        qkv = qkv + bias
    sizes = [int(s) for s in attrs.get("qkv_hidden_sizes") or [qkv.shape[-1] // 3] * 3]
    q, k, v = jnp.split(qkv, np.cumsum(sizes)[:2], axis=-1)
    batch, length = x.shape[0], x.shape[1]

    def split_heads(t):
        return jnp.transpose(t.reshape(batch, length, heads, -1), (0, 2, 1, 3))

    q, k, v = split_heads(q), split_heads(k), split_heads(v)
    scale = attrs.get("scale") or 1.0 / np.sqrt(q.shape[-1])
    scores = jnp.matmul(q, jnp.swapaxes(k, -1, -2), precision=lax.Precision.HIGHEST) * np.float32(scale)
    filler = np.float32(attrs.get("mask_filter_value", -10000.0))
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.ndim == 1:  # key lengths (right padding)
            keep = jnp.arange(length)[None, :] < mask[:, None]
        elif mask.ndim == 2:
            keep = mask > 0
        else:
            raise BadInputError(f"node {ctx.node_name!r} (com.microsoft Attention): a {mask.ndim}-D mask_index "
                                "is not supported (key lengths [batch] or 0/1 per key [batch, keys] are)")
        scores = scores + jnp.where(keep, 0.0, filler)[:, None, None, :]
    if attrs.get("unidirectional", 0):
        later = jnp.arange(length)[None, :] > jnp.arange(length)[:, None]
        scores = jnp.where(later, filler, scores)
    if attention_bias is not None:
        scores = scores + attention_bias
    y = jnp.matmul(jax.nn.softmax(scores, axis=-1), v, precision=lax.Precision.HIGHEST)
    return jnp.transpose(y, (0, 2, 1, 3)).reshape(batch, length, -1)


@register("DynamicQuantizeMatMul", static_inputs=(2, 3), domain=MS)
def dynamic_quantize_matmul(inputs, attrs, ctx):
    """onnxruntime's fusion of a dynamically quantized MatMul (DynamicQuantizeLinear, MatMulInteger, the
    rescaling and the bias): A quantized to uint8 over its own range, times the int8 B (zero point off),
    scaled by A's scale x B's (per column or per tensor), plus the bias. B folded into a float parameter
    (loader) is divided back into integer steps and rounded (straight-through gradient)."""
    from .quantize import dynamic_quantize_linear, integer_steps

    a, b = inputs[0], inputs[1]
    b_scale = np.asarray(inputs[2], np.float32)
    b_zero = inputs[3] if len(inputs) > 3 else None
    bias = inputs[4] if len(inputs) > 4 else None
    q, a_scale, a_zero = dynamic_quantize_linear([a], {}, ctx)
    acc = jnp.matmul(q - a_zero, integer_steps(b, b_scale, b_zero, -1), precision=lax.Precision.HIGHEST)
    out = acc * (a_scale * (b_scale.reshape(-1) if b_scale.size > 1 else b_scale.reshape(())))
    return out if bias is None else out + bias
