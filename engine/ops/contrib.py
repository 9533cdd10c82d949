"""onnxruntime's fused float ops (com.microsoft domain), as its graph optimiser writes them into a file saved
after optimisation (`SessionOptions.optimized_model_filepath`, level extended): a convolution or Gemm with
its activation (FusedConv, FusedGemm), MatMul with transposes and a scale (FusedMatMul), and the GELU
family (Gelu, BiasGelu, FastGelu, QuickGelu), and from its transformer optimiser the residual Add with the
LayerNormalization after it (SkipLayerNormalization) and self-attention with Q, K and V packed in one weight
(Attention) or projected apart (MultiHeadAttention); the packed attention dynamically quantized (QAttention)
and DynamicQuantizeMatMul. Each computes what the unfused ops did.
"""
from __future__ import annotations

from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ..errors import BadInputError
from .attention import _heads
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


def _attend(q, k, v, attrs, ctx, op: str, key_mask=None, attention_bias=None):
    """onnxruntime's CPU attention over heads split already, q [batch, heads, queries, size], k and v [batch, heads,
    keys, size]: scores Q K^T x scale (default 1/sqrt(head size)); a key mask of key lengths [batch] (right
    padding), of 0/1 per key [batch, keys] or per query and key [batch, queries, keys] adds mask_filter_value
    (default -10000) where it masks, `unidirectional` masks later keys, an attention_bias is added; softmax; output
    [batch, queries, heads x v size]."""
    batch, queries, keys = q.shape[0], q.shape[2], k.shape[2]
    scale = attrs.get("scale") or 1.0 / np.sqrt(q.shape[-1])
    scores = jnp.matmul(q, jnp.swapaxes(k, -1, -2), precision=lax.Precision.HIGHEST) * np.float32(scale)
    filler = np.float32(attrs.get("mask_filter_value", -10000.0))
    if key_mask is not None:
        key_mask = jnp.asarray(key_mask)
        if key_mask.ndim == 1 and key_mask.shape[0] == batch:  # key lengths (right padding)
            keep = (jnp.arange(keys)[None, :] < key_mask[:, None])[:, None, :]
        elif key_mask.ndim == 2 and key_mask.shape == (batch, keys):
            keep = (key_mask > 0)[:, None, :]
        elif key_mask.ndim == 3 and key_mask.shape == (batch, queries, keys):
            keep = key_mask > 0
        else:
            raise BadInputError(f"node {ctx.node_name!r} ({op}): a key mask of shape {tuple(key_mask.shape)} is not "
                                f"supported (key lengths [batch], 0/1 per key [batch, keys] or per query and key "
                                f"[batch, queries, keys] are)")
        scores = scores + jnp.where(keep, 0.0, filler)[:, None, :, :]
    if attrs.get("unidirectional", 0):
        later = jnp.arange(keys)[None, :] > jnp.arange(queries)[:, None] + (keys - queries)
        scores = jnp.where(later, filler, scores)
    if attention_bias is not None:
        scores = scores + attention_bias
    y = jnp.matmul(jax.nn.softmax(scores, axis=-1), v, precision=lax.Precision.HIGHEST)
    return jnp.transpose(y, (0, 2, 1, 3)).reshape(batch, queries, -1)


def _split_qkv(qkv, bias, attrs):
    """Q, K and V split into heads from one projection (plus its bias), cut by `qkv_hidden_sizes` (default
    three equal parts)."""
    heads = int(attrs["num_heads"])
    if bias is not None:
        qkv = qkv + bias
    sizes = [int(s) for s in attrs.get("qkv_hidden_sizes") or [qkv.shape[-1] // 3] * 3]
    return [_heads(t, heads) for t in jnp.split(qkv, np.cumsum(sizes)[:2], axis=-1)]


def _optional(inputs, slot: int):
    return inputs[slot] if len(inputs) > slot else None


@register("Attention", domain=MS)
def packed_attention(inputs, attrs, ctx):
    """onnxruntime's self-attention with the Q, K and V projections packed in one weight (its transformer
    optimiser's fusion): `_split_qkv`, then `_attend` with num_heads heads, a mask_index of key lengths
    or of 0/1 per key and an attention_bias; output [batch, sequence, v hidden]."""
    op = "com.microsoft Attention"
    if _optional(inputs, 4) is not None:
        raise BadInputError(f"node {ctx.node_name!r} ({op}): a past state is not supported")
    if attrs.get("do_rotary", 0):
        raise BadInputError(f"node {ctx.node_name!r} ({op}): do_rotary is not supported")
    qkv = jnp.matmul(inputs[0], inputs[1], precision=lax.Precision.HIGHEST)
    q, k, v = _split_qkv(qkv, _optional(inputs, 2), attrs)
    return _attend(q, k, v, attrs, ctx, op, _optional(inputs, 3), _optional(inputs, 5))


@register("QAttention", static_inputs=(4, 7), domain=MS)
def quantized_attention(inputs, attrs, ctx):
    """onnxruntime's dynamically quantized packed self-attention (quantize_dynamic on a file with the
    packed Attention): the uint8 input less its zero point times the int8 weight less its zero point, in
    integers, scaled by input scale x weight scale (per tensor or per column), plus the float bias; then as
    Attention. The weight folded into a float parameter (loader) is divided back into integer steps and
    rounded (straight-through gradient), as DynamicQuantizeMatMul's."""
    from .quantize import integer_steps

    op = "com.microsoft QAttention"
    if _optional(inputs, 8) is not None:
        raise BadInputError(f"node {ctx.node_name!r} ({op}): a past state is not supported")
    if attrs.get("do_rotary", 0):
        raise BadInputError(f"node {ctx.node_name!r} ({op}): do_rotary is not supported")
    x, weight, bias = inputs[0], inputs[1], inputs[2]
    x_scale, w_scale = inputs[3], np.asarray(inputs[4], np.float32)
    x_zero, w_zero = _optional(inputs, 6), _optional(inputs, 7)
    steps = jnp.asarray(x, jnp.float32) - (0.0 if x_zero is None else jnp.asarray(x_zero, jnp.float32))
    acc = jnp.matmul(steps, integer_steps(weight, w_scale, w_zero, -1), precision=lax.Precision.HIGHEST)
    projected = acc * (jnp.reshape(x_scale, ()) * (w_scale.reshape(-1) if w_scale.size > 1 else w_scale.reshape(())))
    q, k, v = _split_qkv(projected, bias, attrs)
    return _attend(q, k, v, attrs, ctx, op, _optional(inputs, 5))


@register("MultiHeadAttention", domain=MS)
def multi_head_attention(inputs, attrs, ctx):
    """onnxruntime's multi-head self or cross attention on projected Q, K and V (its transformer optimiser's fusion
    with use_multi_head_attention; diffusion and CLIP models): query [batch, sequence, hidden] with key and value
    [batch, keys, hidden] or already in heads [batch, heads, keys, size], or packed QKV [batch, sequence, heads, 3,
    size], or packed KV [batch, keys, heads, 2, size] (re-laid only: onnxruntime's CPU kernel refuses packing, so a
    bias with them, whose use there could not be checked, is refused); the projections' bias [Q | K | V] added to
    3-D parts; then `_attend` with the key padding mask (lengths, or 0/1 per key or per query and key) and attention
    bias. Outputs: the result and present_key / present_value (K and V in heads). Past states and the qk output are
    refused."""
    op = "com.microsoft MultiHeadAttention"
    if any(_optional(inputs, slot) is not None for slot in (6, 7, 8, 9)):
        raise BadInputError(f"node {ctx.node_name!r} ({op}): past key/value, past_sequence_length and "
                            "cache_indirection are not supported")
    if ctx.num_outputs > 3:
        raise BadInputError(f"node {ctx.node_name!r} ({op}): the qk output is not supported")
    heads = int(attrs["num_heads"])
    query, key, value, bias = (_optional(inputs, slot) for slot in range(4))
    if query.ndim == 5:  # packed QKV [batch, sequence, heads, 3, size]
        if key is not None or value is not None:
            raise BadInputError(f"node {ctx.node_name!r} ({op}): packed QKV with a separate key or value")
        if bias is not None:
            raise BadInputError(f"node {ctx.node_name!r} ({op}): packed QKV with a bias is not supported")
        q, k, v = (jnp.transpose(query[:, :, :, i], (0, 2, 1, 3)) for i in range(3))
    else:
        if query.ndim != 3 or key is None:
            raise BadInputError(f"node {ctx.node_name!r} ({op}): a query of shape {tuple(query.shape)} without a key "
                                "is not supported")
        hidden = query.shape[-1]
        q_bias = k_bias = v_bias = None
        if bias is not None:
            q_bias, k_bias, v_bias = bias[:hidden], bias[hidden:2 * hidden], bias[2 * hidden:]
        q = _heads(query if q_bias is None else query + q_bias, heads)
        if key.ndim == 5:  # packed KV [batch, keys, heads, 2, size]
            if value is not None:
                raise BadInputError(f"node {ctx.node_name!r} ({op}): packed KV with a separate value")
            if bias is not None:
                raise BadInputError(f"node {ctx.node_name!r} ({op}): packed KV with a bias is not supported")
            k, v = (jnp.transpose(key[:, :, :, i], (0, 2, 1, 3)) for i in range(2))
        elif key.ndim == 4:  # already in heads [batch, heads, keys, size]: no bias is added to them
            k, v = key, value
        else:
            k = _heads(key if k_bias is None else key + k_bias, heads)
            v = _heads(value if v_bias is None else value + v_bias, heads)
    y = _attend(q, k, v, attrs, ctx, op, _optional(inputs, 4), _optional(inputs, 5))
    outputs = (y, k, v)
    return outputs[: ctx.num_outputs] if ctx.num_outputs > 1 else y


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
