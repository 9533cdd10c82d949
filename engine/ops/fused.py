"""Fused Conv -> Relu -> MaxPool for the shifted-sum convolutions on CPU (LeNet's, VGG's first stage).

A non-overlapping max pool (kernel = stride) over a convolution keeps, per window, the largest of
kernel-cell many convolution outputs. Computed per pool offset straight from the input's polyphase
components (the input split by the convolution stride times the pool stride), the convolution output is
never written out and every shifted view is contiguous. LeNet's conv1 + ReLU + pool at 256 inputs:
0.59-0.66 against 1.02-1.09 ms unfused; the forwards of the models (median of 7 alternating rounds):
LeNet-5 at 256 inputs 2.29 -> 2.06 ms (1.77x -> 1.59x onnxruntime's time), VGG-11 at 64 8.94 -> 8.59 ms.
Max and ReLU commute with adding the bias (rounding is monotonic) and the products are summed in the
unfused order, so the result is the unfused one bit for bit. Gradients are those of the unfused ops (the
forward under differentiation runs them).
"""
from __future__ import annotations

from functools import partial
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .nn import (_conv_fast_forward, _materialized, _max_pool, _pool_geometry, conv_geometry, output_sizes,
                 shifted_sum_conv)


class ConvReluPool(NamedTuple):
    """Positions, in a node list, of a Conv whose only reader is a Relu whose only reader is a MaxPool."""

    conv: int
    relu: int
    pool: int


def find_conv_relu_pools(model, nodes: Sequence) -> dict[int, ConvReluPool]:
    """The fusable chains of `nodes` (the model's, or a suffix of them), keyed by the Conv's position: the
    Conv and Relu outputs are read by nothing else and are not graph outputs (the caller still checks
    taps and edits, and the shapes)."""
    position = {id(node): index for index, node in enumerate(nodes)}
    readers = model.consumers_of()
    graph_outputs = {info.name for info in model.outputs}
    chains = {}
    for index, node in enumerate(nodes):
        if node.op_type != "Conv" or len(node.outputs) != 1:
            continue
        hops = [node]
        for op_type in ("Relu", "MaxPool"):
            tensor = hops[-1].outputs[0]
            after = readers.get(tensor, [])
            if tensor in graph_outputs or len(after) != 1 or after[0].op_type != op_type \
                    or len(after[0].outputs) != 1:
                break
            hops.append(after[0])
        else:
            chains[index] = ConvReluPool(*(position[id(hop)] for hop in hops))
    return chains


def _tiling_pool(conv_out: tuple[int, ...], pool_attrs: dict):
    """The pool's kernel when its windows tile a convolution output of shape `conv_out` without overlap or
    padding (2-D), else None."""
    if len(pool_attrs.get("kernel_shape", ())) != 2:
        return None
    kernel, strides, dilations, padding, extra = _pool_geometry(jax.ShapeDtypeStruct(conv_out, jnp.float32),
                                                                 pool_attrs)
    if list(strides) != list(kernel) or list(dilations) != [1, 1] or any(extra) or any(b or e for b, e in padding):
        return None
    return tuple(int(k) for k in kernel)


def conv_relu_max_pool(x, w, bias, conv_attrs: dict, pool_attrs: dict):
    """MaxPool(Relu(Conv(x, w, bias))) in one pass, or None where the fused form does not apply (not a
    shifted-sum convolution, or a pool that is not a plain tiling)."""
    strides, dilations, pads, group = conv_geometry(x, w, conv_attrs)
    if not shifted_sum_conv(w, group):
        return None
    conv_out = (x.shape[0], w.shape[0], *output_sizes(x.shape[2:], w.shape[2:], strides, dilations, pads))
    pool = _tiling_pool(conv_out, pool_attrs)
    if pool is None:
        return None
    if bias is None:
        bias = jnp.zeros(w.shape[0], w.dtype)
    return _fused(x, w, bias, strides, dilations, pads, pool)


def _unfused(x, w, bias, strides, dilations, pads, pool):
    conv = _conv_fast_forward(x, w, strides, dilations, pads) + bias.reshape(1, -1, 1, 1)
    return _max_pool(jax.nn.relu(conv), pool, pool, (1, 1), ((0, 0), (0, 0)))


@partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _fused(x, w, bias, strides, dilations, pads, pool):
    out_channels, channels, kh, kw = w.shape
    pooled = [size // p for size, p in zip(output_sizes(x.shape[2:], (kh, kw), strides, dilations, pads), pool)]
    x = jnp.pad(x, [(0, 0), (0, 0), *pads])
    period = tuple(s * p for s, p in zip(strides, pool))
    # Polyphase components: component (r, c) holds rows r, r + period, ... and columns likewise;
    # materialized (read by every term; fused into them, LeNet's stage took 2.04 ms, not 0.59).
    phases = _materialized({(r, c): x[:, :, r::period[0], c::period[1]]
                            for r in range(period[0]) for c in range(period[1])}, w)
    best = None
    for a, b in np.ndindex(*pool):
        out = 0
        for i, j in np.ndindex(kh, kw):
            row, col = a * strides[0] + i * dilations[0], b * strides[1] + j * dilations[1]
            view = phases[(row % period[0], col % period[1])][
                :, :, row // period[0]: row // period[0] + pooled[0], col // period[1]: col // period[1] + pooled[1]]
            for c in range(channels):
                out = out + view[:, c:c + 1] * w[None, :, c, i, j, None, None]
        best = out if best is None else jnp.maximum(best, out)
    # Materialized: fused into the next layer's layout copy, LeNet's forward took 3.5 ms, not 2.1.
    return _materialized(jax.nn.relu(best + bias.reshape(1, -1, 1, 1)), w)


def _fused_fwd(x, w, bias, strides, dilations, pads, pool):
    return jax.vjp(lambda *args: _unfused(*args, strides, dilations, pads, pool), x, w, bias)


def _fused_bwd(strides, dilations, pads, pool, vjp, cotangent):
    return vjp(cotangent)


_fused.defvjp(_fused_fwd, _fused_bwd)
