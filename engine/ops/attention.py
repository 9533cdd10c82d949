"""Recent standard ops a PyTorch export at opset 23 writes: Attention (nn.MultiheadAttention,
scaled_dot_product_attention), GroupNormalization (nn.GroupNorm) and RMSNormalization (nn.RMSNorm), each as the
ONNX specification's reference computes it.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from ..errors import BadInputError
from .registry import register

HIGHEST = lax.Precision.HIGHEST


def _heads(x, heads: int):
    """[batch, sequence, heads x size] -> [batch, heads, sequence, size]."""
    batch, length, hidden = x.shape
    return jnp.transpose(x.reshape(batch, length, heads, hidden // heads), (0, 2, 1, 3))


@register("Attention")
def attention(inputs, attrs, ctx):
    """softmax(softcap(Q K^T x scale) + mask) V over heads (query heads grouped over fewer key/value heads, each
    repeated), 3-D inputs split into heads by q_num_heads / kv_num_heads; a past key and value are prepended
    (present_key, present_value); nonpad_kv_seqlen (keys per input) masks the keys after an input's count; is_causal
    masks keys after each query's position (offset by the past length, or with nonpad_kv_seqlen by the input's count
    less the query length); a boolean mask attends where True, a float one is added; a query row with every key
    masked gives zeros. Scale (default 1/sqrt(head size)) multiplies Q and K by its square root each. Outputs Y,
    present_key, present_value and the QK product (qk_matmul_output_mode 0-3)."""
    q, k, v = inputs[0], inputs[1], inputs[2]
    mask = inputs[3] if len(inputs) > 3 else None
    past_key = inputs[4] if len(inputs) > 4 else None
    past_value = inputs[5] if len(inputs) > 5 else None
    nonpad = inputs[6] if len(inputs) > 6 else None
    if nonpad is not None and past_key is not None:
        raise BadInputError(f"node {ctx.node_name!r} (Attention): nonpad_kv_seqlen with a past key and value")
    three_d = q.ndim == 3
    if three_d:
        if not attrs.get("q_num_heads") or not attrs.get("kv_num_heads"):
            raise BadInputError(f"node {ctx.node_name!r} (Attention): 3-D inputs need q_num_heads and kv_num_heads")
        q, k, v = _heads(q, attrs["q_num_heads"]), _heads(k, attrs["kv_num_heads"]), _heads(v, attrs["kv_num_heads"])
    scale = attrs.get("scale")
    root = np.float32(np.sqrt(scale if scale is not None else 1.0 / np.sqrt(q.shape[-1])))
    if past_key is not None:
        k = jnp.concatenate([past_key, k], axis=2)
        v = jnp.concatenate([past_value, v], axis=2)
    present_key, present_value = k, v
    q_len, kv_len = q.shape[2], k.shape[2]
    bias = jnp.zeros((q_len, kv_len), jnp.float32)
    if mask is not None:
        pad = kv_len - mask.shape[-1]
        is_bool = np.dtype(getattr(mask, "dtype", np.float32)) == np.bool_
        if pad > 0:
            mask = jnp.pad(mask, [(0, 0)] * (mask.ndim - 1) + [(0, pad)], constant_values=False if is_bool else -np.inf)
        bias = bias + (jnp.where(mask, 0.0, -jnp.inf) if is_bool else mask)
    counts = None if nonpad is None else jnp.asarray(nonpad).reshape(-1, 1, 1, 1)  # valid keys per input
    if counts is not None:  # keys from an input's count on are padding: bias [batch, 1, queries, keys]
        bias = jnp.where(jnp.arange(kv_len) < counts, bias, -jnp.inf)
    if attrs.get("is_causal", 0):
        # each query sees the keys up to its own position, counted from the last valid key (a static cache)
        offset = past_key.shape[2] if past_key is not None else 0
        if counts is not None:
            offset = counts - q_len
        allowed = jnp.arange(kv_len)[None, :] <= jnp.arange(q_len)[:, None] + offset
        bias = jnp.where(allowed, bias, -jnp.inf)
    if q.shape[1] != k.shape[1]:
        k = jnp.repeat(k, q.shape[1] // k.shape[1], axis=1)
        v = jnp.repeat(v, q.shape[1] // v.shape[1], axis=1)
    scores = jnp.matmul(q * root, jnp.swapaxes(k * root, -1, -2), precision=HIGHEST)
    softcap = attrs.get("softcap", 0.0)
    if softcap and softcap > 0:
        scores = jnp.tanh(scores / softcap) * softcap
    with_bias = scores + bias
    top = jnp.max(with_bias, axis=-1, keepdims=True)
    weights = jnp.exp(with_bias - jnp.where(jnp.isneginf(top), 0.0, top))
    total = jnp.sum(weights, axis=-1, keepdims=True)
    weights = weights / jnp.where(total == 0, 1.0, total)
    weights = jnp.where(jnp.isneginf(jnp.max(bias, axis=-1, keepdims=True)), 0.0, weights)
    y = jnp.matmul(weights, v, precision=HIGHEST)
    if three_d:
        y = jnp.transpose(y, (0, 2, 1, 3)).reshape(y.shape[0], y.shape[2], -1)
    mode = int(attrs.get("qk_matmul_output_mode", 0))
    qk = {0: scores, 1: scores, 2: with_bias, 3: weights}.get(mode, scores)
    outputs = (y, present_key, present_value, qk)
    return outputs[: ctx.num_outputs] if ctx.num_outputs > 1 else y


@register("GroupNormalization")
def group_norm(inputs, attrs, ctx):
    """Normalise each of num_groups channel groups over its channels and positions, then scale and shift
    per channel (opset 21; onnx.checker refuses opset 18's per-group form)."""
    x, scale, bias = inputs[0], inputs[1], inputs[2]
    groups = int(attrs["num_groups"])
    batch, channels = x.shape[0], x.shape[1]
    grouped = x.reshape(batch, groups, -1)
    mean = grouped.mean(axis=-1, keepdims=True)
    var = ((grouped - mean) ** 2).mean(axis=-1, keepdims=True)
    normal = ((grouped - mean) * lax.rsqrt(var + attrs.get("epsilon", 1e-5))).reshape(x.shape)
    shape = (1, channels) + (1,) * (x.ndim - 2)
    return normal * scale.reshape(shape) + bias.reshape(shape)


@register("RMSNormalization")
def rms_norm(inputs, attrs, ctx):
    """x / sqrt(mean(x^2) + epsilon) over the axes from `axis` on, times scale."""
    x, scale = inputs[0], inputs[1]
    axis = attrs.get("axis", -1) % x.ndim
    mean_square = jnp.mean(x * x, axis=tuple(range(axis, x.ndim)), keepdims=True)
    return x * lax.rsqrt(mean_square + attrs.get("epsilon", 1e-5)) * scale
