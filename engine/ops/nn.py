"""Neural-network ONNX ops: convolution, dense, normalisation, pooling, softmax, reductions."""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .registry import int_list, register, xp

# Exact float32 products everywhere (TF32 on GPUs would break parity with onnxruntime).
PRECISION = lax.Precision.HIGHEST
# Single-input-channel convolutions up to this many out channels x kernel cells get a shifted-sum input gradient.
SHIFTED_GRAD_TERMS = 256
# Group-1 convolutions run as shifted sums on CPU with one input channel, or with up to FEW_CHANNELS (RGB,
# RGBA) and up to FEW_CHANNELS_TERMS weights: VGG-11's 3 -> 16 x 3 x 3 stem (432) took its forward from 2.78x
# to 2.48-2.53x onnxruntime's time; ResNet-18's 3 -> 64 (1,728) made its forward 28-33 % slower (368-380 ->
# 472-506 ms), though faster alone (2.2 against 4.2 ms at 64 inputs).
FEW_CHANNELS, FEW_CHANNELS_TERMS = 4, 512
# XLA's CPU convolution (YNNPACK) with 5-7 input channels runs faster given zero channels up to 8: alone, 256
# inputs 12 x 12, 16 out channels 5 x 5, 6 channels 1.23 ms against 0.97 with 8; LeNet-5's forward
# 2.13-2.17 -> 1.87-1.88 ms (two A/B runs of 7 alternating rounds). Not beyond: 12 -> 16, 20 -> 24, 36 -> 40
# channels took 7-16 % longer, and 3 -> 8 for a 3 -> 64 channel layer (ResNet-18's stem) twice as long.
PAD_CHANNELS_FROM, PAD_CHANNELS_TO = 5, 8


def _spatial_padding(x_spatial, kernel, strides, dilations, attrs) -> list[tuple[int, int]]:
    """Explicit (begin, end) padding per spatial axis from `pads` or `auto_pad`."""
    rank = len(kernel)
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = []
        for size, k, s, d in zip(x_spatial, kernel, strides, dilations):
            out = -(-size // s)
            total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
            small, big = total // 2, total - total // 2
            pads.append((small, big) if auto_pad == "SAME_UPPER" else (big, small))
        return pads
    if auto_pad == "VALID":
        return [(0, 0)] * rank
    flat = list(attrs.get("pads", [0] * (2 * rank)))
    return list(zip(flat[:rank], flat[rank:]))


def _dims(ndim: int) -> lax.ConvDimensionNumbers:
    axes = tuple(range(ndim))
    return lax.ConvDimensionNumbers(lhs_spec=axes, rhs_spec=axes, out_spec=axes)


def _conv_one_channel_per_group(x, w, group, strides, dilations, padding):
    """2-D conv with one input channel per group (grey first layers, depthwise) as a sum of shifted products.

    XLA's CPU convolution is 5-30x slower than this for such layers (benchmarks/forward.py); the result
    is the same up to float rounding.
    """
    n, _, height, width = x.shape
    out_channels, _, kh, kw = w.shape
    x = jnp.pad(x, [(0, 0), (0, 0), *padding])
    (sh, sw), (dh, dw) = strides, dilations
    oh = (x.shape[2] - (kh - 1) * dh - 1) // sh + 1
    ow = (x.shape[3] - (kw - 1) * dw - 1) // sw + 1
    xg = x.reshape(n, group, 1, x.shape[2], x.shape[3])
    wg = w.reshape(group, out_channels // group, 1, kh, kw)
    out = 0
    for i in range(kh):
        for j in range(kw):
            window = xg[..., i * dh: i * dh + (oh - 1) * sh + 1: sh, j * dw: j * dw + (ow - 1) * sw + 1: sw]
            out = out + window * wg[None, :, :, 0, i, j, None, None]
    return _materialized(out.reshape(n, out_channels, oh, ow), w)


def _conv_few_channels(x, w, strides, dilations, padding):
    """2-D conv (group 1) with few input channels (grey and colour first layers) as one sum of shifted
    products over input channels and kernel cells. XLA's CPU convolution is slower there: LeNet's grey
    conv1 5-30x (benchmarks/forward.py), VGG-11's 3 -> 16 channels 3 x 3 on 32 x 32 3.7x (2.97 against
    0.79 ms for 64 inputs); the result is the same up to float rounding."""
    kernel = w.shape[2:]
    out = 0
    for (i, j), view in zip(np.ndindex(*kernel), _windows(x, kernel, strides, dilations, padding, 0.0)):
        for c in range(w.shape[1]):
            out = out + view[:, c:c + 1] * w[None, :, c, i, j, None, None]
    return _materialized(out, w)


def _materialized(value, param):
    """`value` (an array or a pytree of them), computed into memory before its consumers run.

    XLA's CPU fusion otherwise recomputes the shifted sum inside a following pool's strided loop, which is
    4-5x slower for LeNet's conv1 + ReLU + MaxPool (benchmarks/forward.py). A conditional is a fusion
    boundary; its predicate is a tautology (x is NaN or is not), so the value is always `value`, but it
    reads a parameter, so XLA cannot fold it away (optimization_barrier does not stop CPU fusion). Under
    vmap with a batched parameter the conditional becomes a select: the same value, without the boundary.
    """
    first = param.ravel()[0]
    return lax.cond(jnp.isnan(first) | ~jnp.isnan(first), lambda v: v,
                    lambda v: jax.tree.map(jnp.zeros_like, v), value)


def _xla_conv(x, w, group, strides, dilations, padding):
    return lax.conv_general_dilated(x, w, window_strides=strides, padding=padding, rhs_dilation=dilations,
                                    dimension_numbers=_dims(x.ndim), feature_group_count=group,
                                    precision=PRECISION)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_fast_forward(x, w, strides, dilations, padding):
    """The shifted-sum forward of a group-1 layer with few input channels (`_conv_few_channels`), with
    the gradients below."""
    return _conv_few_channels(x, w, strides, dilations, padding)


def _conv_fast_fwd(x, w, strides, dilations, padding):
    return _conv_few_channels(x, w, strides, dilations, padding), (x, w)


def _conv_fast_bwd(strides, dilations, padding, residuals, cotangent):
    """XLA's weight gradient and, for one input channel up to SHIFTED_GRAD_TERMS (out channels x kernel
    cells) terms, the input gradient as shifted sums (`_one_channel_input_grad`): LeNet conv1 at 640
    inputs 10 ms against XLA's 32 ms (the shifted sum's own input gradient, one strided scatter per offset,
    takes 394 ms). Otherwise XLA's (an unrolled sum of 1->64 channels 3x3 grows too large to compile).
    The shifted sum's own weight gradient is faster alone (9 against 50 ms) but not inside the model: the
    pairs' weight scores on LeNet took 46 ms a batch with it, 20 ms with XLA's."""
    x, w = residuals
    _, vjp_w = jax.vjp(lambda w_: _xla_conv(x, w_, 1, strides, dilations, padding), w)
    if w.shape[1] == 1 and w.shape[0] * w.shape[2] * w.shape[3] <= SHIFTED_GRAD_TERMS:
        dx = _one_channel_input_grad(cotangent, w, x.shape, strides, dilations, padding)
    else:
        _, vjp_x = jax.vjp(lambda x_: _xla_conv(x_, w, 1, strides, dilations, padding), x)
        dx = vjp_x(cotangent)[0]
    return dx, vjp_w(cotangent)[0]


_conv_fast_forward.defvjp(_conv_fast_fwd, _conv_fast_bwd)


def _one_channel_input_grad(cotangent, w, x_shape, strides, dilations, padding):
    """The input gradient of a single-input-channel 2-D convolution: the cotangent, spread out by the
    stride (interior padding), correlated with the kernel flipped, as one unrolled sum of shifted
    products over output channels and kernel cells; then the forward's padding is cut off. Materialised:
    fused into a consumer that sums it over inputs (an additive trigger shared by a batch), XLA split the
    150-term sum of LeNet's conv1 into 17 passes over memory: that restoration step 48 -> 21 ms (640 inputs;
    the mask trigger's, and the weight and input gradients alone, unchanged)."""
    out_channels, _, kh, kw = w.shape
    (sh, sw), (dh, dw) = strides, dilations
    (top, bottom), (left, right) = padding
    height, width = x_shape[2] + top + bottom, x_shape[3] + left + right
    oh, ow = cotangent.shape[2:]
    reach_h, reach_w = (kh - 1) * dh, (kw - 1) * dw
    spread = lax.pad(cotangent, jnp.zeros((), cotangent.dtype),
                     ((0, 0, 0), (0, 0, 0), (reach_h, height - (oh - 1) * sh - 1, sh - 1),
                      (reach_w, width - (ow - 1) * sw - 1, sw - 1)))
    grad = 0
    for o in range(out_channels):
        for i in range(kh):
            for j in range(kw):
                rows, cols = reach_h - i * dh, reach_w - j * dw
                grad = grad + spread[:, o, rows: rows + height, cols: cols + width] * w[o, 0, i, j]
    return _materialized(grad[:, None, top: top + x_shape[2], left: left + x_shape[3]], w)


def _conv_as_matmul(x, w, strides, dilations, padding):
    """2-D convolution as one matrix product over the kernel's shifted views (im2col), on CPU for 1 x 1
    stride-1 kernels and for inputs smaller than the kernel's reach, where XLA's CPU convolution is slow.
    1 x 1 (MobileNetV2's expand and project layers, DenseNet's bottlenecks), 64 inputs, alone: forward
    1.4-3.7x, input gradient 1.3-6x, weight gradient 2-9x faster (32 -> 128 channels on 16 x 16: 2.3 / 4.1 /
    9.3 ms against 1.5 / 1.7 / 1.6); in the models: MobileNetV2-small forward 38-41 -> 31-34 ms, weight
    gradient 363-377 -> 303-311 ms; DenseNet-small 35-36 -> 31 ms, 256-278 -> 200-208 ms. Not for strided
    1 x 1 (ResNet-18's shortcuts): faster alone, the model's forward 26 -> 41 ms with it. Small inputs (the
    last stages of a VGG on 32 x 32 images: 128 -> 128 channels, 3 x 3 on 2 x 2): XLA falls to 8-16
    GFLOP/s (9.0 ms against 1.1 ms this way); on inputs as large as a 3 x 3 kernel XLA's is faster (3 x 3
    on 3 x 3: 1.2 against 1.9 ms)."""
    out_channels, in_channels, kh, kw = w.shape
    views = jnp.stack(list(_windows(x, (kh, kw), strides, dilations, padding, 0.0)), axis=2)
    return jnp.einsum("nckhw,ock->nohw", views, w.reshape(out_channels, in_channels, kh * kw), precision=PRECISION)


def shifted_sum_conv(w, group: int) -> bool:
    """Whether a convolution runs as shifted sums (`_conv_fast_forward`): on CPU, 2-D, group 1, with one
    input channel or up to FEW_CHANNELS of them and up to FEW_CHANNELS_TERMS weights."""
    return (w.ndim == 4 and group == 1 and jax.default_backend() == "cpu"
            and (w.shape[1] == 1 or (w.shape[1] <= FEW_CHANNELS and w.size <= FEW_CHANNELS_TERMS)))


def conv_geometry(x, w, attrs) -> tuple[tuple[int, ...], tuple[int, ...], tuple[tuple[int, int], ...], int]:
    """(strides, dilations, explicit (begin, end) padding per spatial axis, group) of a Conv node."""
    kernel = attrs.get("kernel_shape") or list(w.shape[2:])
    rank = len(kernel)
    strides = attrs.get("strides") or [1] * rank
    dilations = attrs.get("dilations") or [1] * rank
    padding = _spatial_padding(x.shape[2:], kernel, strides, dilations, attrs)
    pads = tuple((int(b), int(e)) for b, e in padding)
    return tuple(int(s) for s in strides), tuple(int(d) for d in dilations), pads, int(attrs.get("group", 1))


@register("Conv")
def conv(inputs, attrs, ctx):
    x, w = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    strides, dilations, pads, group = conv_geometry(x, w, attrs)
    kernel, rank = w.shape[2:], w.ndim - 2
    on_cpu = jax.default_backend() == "cpu"
    if shifted_sum_conv(w, group):
        out = _conv_fast_forward(x, w, strides, dilations, pads)
    elif rank == 2 and on_cpu and w.shape[1] == 1:  # depthwise
        out = _conv_one_channel_per_group(x, w, group, strides, dilations, pads)
    elif rank == 2 and group == 1 and on_cpu and ((tuple(kernel) == (1, 1) and strides == (1, 1)) or any(
            size < (k - 1) * d + 1 for size, k, d in zip(x.shape[2:], kernel, dilations))):
        out = _conv_as_matmul(x, w, strides, dilations, pads)
    elif rank == 2 and group == 1 and on_cpu and PAD_CHANNELS_FROM <= w.shape[1] < PAD_CHANNELS_TO:
        extra = [(0, 0), (0, PAD_CHANNELS_TO - w.shape[1]), (0, 0), (0, 0)]
        out = _xla_conv(jnp.pad(x, extra), jnp.pad(w, extra), 1, strides, dilations, pads)
    else:
        out = _xla_conv(x, w, group, strides, dilations, pads)
    if bias is not None:
        out = out + bias.reshape((1, -1) + (1,) * rank)
    return out


@register("ConvTranspose")
def conv_transpose(inputs, attrs, ctx):
    x, w = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    group = attrs.get("group", 1)
    kernel = attrs.get("kernel_shape") or list(w.shape[2:])
    rank = len(kernel)
    strides = attrs.get("strides") or [1] * rank
    dilations = attrs.get("dilations") or [1] * rank
    out_pad = attrs.get("output_padding") or [0] * rank
    flat = list(attrs.get("pads", [0] * (2 * rank)))
    if attrs.get("output_shape") or attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
        raise NotImplementedError(f"ConvTranspose {ctx.node_name!r}: output_shape/auto_pad are not supported")
    # Weight [C_in, C_out/group, k...] -> a forward conv kernel [C_out, C_in/group, k...], flipped.
    c_in = w.shape[0]
    wg = w.reshape((group, c_in // group) + w.shape[1:])
    wg = jnp.swapaxes(wg, 1, 2).reshape((-1, c_in // group) + w.shape[2:])
    wg = jnp.flip(wg, axis=tuple(range(2, 2 + rank)))
    padding = [((k - 1) * d - b, (k - 1) * d - e + op)
               for k, d, b, e, op in zip(kernel, dilations, flat[:rank], flat[rank:], out_pad)]
    out = lax.conv_general_dilated(
        x, wg, window_strides=[1] * rank, padding=padding, lhs_dilation=strides, rhs_dilation=dilations,
        dimension_numbers=_dims(x.ndim), feature_group_count=group, precision=PRECISION)
    if bias is not None:
        out = out + bias.reshape((1, -1) + (1,) * rank)
    return out


@register("Gemm")
def gemm(inputs, attrs, ctx):
    a, b = inputs[0], inputs[1]
    c = inputs[2] if len(inputs) > 2 else None
    if attrs.get("transA", 0):
        a = a.T
    if attrs.get("transB", 0):
        b = b.T
    out = attrs.get("alpha", 1.0) * jnp.matmul(a, b, precision=PRECISION)
    if c is not None:
        out = out + attrs.get("beta", 1.0) * c
    return out


@register("MatMul")
def matmul(inputs, attrs, ctx):
    a, b = inputs
    if xp(a, b) is np:
        return np.matmul(a, b)
    return jnp.matmul(a, b, precision=PRECISION)


def _channel_shape(x) -> tuple[int, ...]:
    return (1, -1) + (1,) * (x.ndim - 2)


@register("BatchNormalization")
def batch_norm(inputs, attrs, ctx):
    x, scale, bias, mean, var = inputs[:5]
    eps = attrs.get("epsilon", 1e-5)
    shape = _channel_shape(x)
    inv = scale.reshape(shape) * lax.rsqrt(var.reshape(shape) + eps)
    out = (x - mean.reshape(shape)) * inv + bias.reshape(shape)
    if ctx.num_outputs > 1:  # training-mode outputs of an inference graph: pass the statistics through
        return (out, mean, var)[: ctx.num_outputs]
    return out


@register("InstanceNormalization")
def instance_norm(inputs, attrs, ctx):
    x, scale, bias = inputs
    axes = tuple(range(2, x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    shape = _channel_shape(x)
    return (x - mean) * lax.rsqrt(var + attrs.get("epsilon", 1e-5)) * scale.reshape(shape) + bias.reshape(shape)


@register("LRN")
def local_response_norm(inputs, attrs, ctx):
    """y = x / (bias + alpha / size * sum of x^2 over `size` neighbouring channels) ** beta (the window
    reaching (size - 1) // 2 channels back and the rest forward, cut at the edges)."""
    x = inputs[0]
    size = int(attrs["size"])
    before, after = (size - 1) // 2, size - 1 - (size - 1) // 2
    squares = jnp.pad(x * x, [(0, 0), (before, after)] + [(0, 0)] * (x.ndim - 2))
    window = (1, size) + (1,) * (x.ndim - 2)
    total = lax.reduce_window(squares, 0.0, lax.add, window, (1,) * x.ndim, "VALID")
    scale = attrs.get("bias", 1.0) + attrs.get("alpha", 1e-4) / size * total
    return x / scale ** attrs.get("beta", 0.75)


@register("LayerNormalization")
def layer_norm(inputs, attrs, ctx):
    x, scale = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    axis = attrs.get("axis", -1) % x.ndim
    axes = tuple(range(axis, x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    inv = lax.rsqrt(var + attrs.get("epsilon", 1e-5))
    out = (x - mean) * inv * scale
    if bias is not None:
        out = out + bias
    return (out, mean, inv)[: ctx.num_outputs] if ctx.num_outputs > 1 else out


def _pool_geometry(x, attrs):
    kernel = list(attrs["kernel_shape"])
    rank = len(kernel)
    strides = attrs.get("strides") or [1] * rank
    dilations = attrs.get("dilations") or [1] * rank
    padding = _spatial_padding(x.shape[2:], kernel, strides, dilations, attrs)
    ceil_extra = [0] * rank
    if attrs.get("ceil_mode", 0):
        for i, (size, k, s, d, (b, e)) in enumerate(zip(x.shape[2:], kernel, strides, dilations, padding)):
            span = size + b + e - ((k - 1) * d + 1)
            out_ceil = -(-span // s) + 1
            if (out_ceil - 1) * s >= size + b:  # a window must start inside the input or left padding
                out_ceil -= 1
            ceil_extra[i] = max((out_ceil - 1) * s + (k - 1) * d + 1 - (size + b + e), 0)
    return kernel, strides, dilations, padding, ceil_extra


def output_sizes(sizes, kernel, strides, dilations, pads) -> list[int]:
    """Output length per spatial axis of a window op (convolution, pooling) over `sizes` padded by `pads`."""
    return [(size + b + e - (k - 1) * d - 1) // s + 1
            for size, k, s, d, (b, e) in zip(sizes, kernel, strides, dilations, pads)]


def _windows(x, kernel, strides, dilations, pads, fill):
    """Every kernel offset's strided view of the padded input: pooling as an element-wise reduction.

    On CPU this is 3x faster than lax.reduce_window for the usual 2x2/3x3 pools (benchmarks/forward.py).
    """
    out = output_sizes(x.shape[2:], kernel, strides, dilations, pads)
    x = jnp.pad(x, [(0, 0), (0, 0)] + list(pads), constant_values=fill)
    rank = len(kernel)
    for offset in np.ndindex(*kernel):
        index = [slice(None), slice(None)]
        for a in range(rank):
            begin = offset[a] * dilations[a]
            index.append(slice(begin, begin + (out[a] - 1) * strides[a] + 1, strides[a]))
        yield x[tuple(index)]


@register("MaxPool")
def max_pool(inputs, attrs, ctx):
    x = inputs[0]
    kernel, strides, dilations, padding, extra = _pool_geometry(x, attrs)
    pads = tuple((int(b), int(e + c)) for (b, e), c in zip(padding, extra))
    out = _max_pool(x, tuple(kernel), tuple(strides), tuple(dilations), pads)
    if ctx.num_outputs < 2:
        return out
    return out, _max_pool_indices(x, kernel, strides, dilations, pads, bool(attrs.get("storage_order", 0)))


def _max_pool_indices(x, kernel, strides, dilations, pads, column_major: bool = False):
    """MaxPool's Indices output: per window, the flat (whole-tensor) index of its first maximum, as int32
    (what MaxUnpool scatters back to). Within an (n, c) plane the spatial position counts row-major, or
    column-major with storage_order=1 (the first spatial axis fastest: h + w x H), as the specification's
    reference and onnxruntime do; the plane offset is (n x C + c) x plane size either way."""
    spatial = x.shape[2:]
    size = int(np.prod(spatial))
    if column_major:
        positions = np.arange(size, dtype=np.int32).reshape(spatial[::-1]).transpose().reshape((1, 1, *spatial))
    else:
        positions = np.arange(size, dtype=np.int32).reshape((1, 1, *spatial))
    best = index = None
    for view, where in zip(_windows(x, kernel, strides, dilations, pads, -jnp.inf),
                           _windows(positions, kernel, strides, dilations, pads, -1)):
        if best is None:
            best, index = view, jnp.broadcast_to(where, view.shape)
            continue
        better = view > best
        best, index = jnp.where(better, view, best), jnp.where(better, where, index)
    planes = (jnp.arange(x.shape[0] * x.shape[1], dtype=jnp.int32) * int(np.prod(spatial))).reshape(
        (x.shape[0], x.shape[1]) + (1,) * len(spatial))
    return lax.stop_gradient(index + planes)


@register("MaxUnpool", static_inputs=(2,))
def max_unpool(inputs, attrs, ctx):
    """Each value of X placed at its flat index (MaxPool's Indices) in a zero tensor of output_shape, or of
    the size the pooling came from: (in - 1) x stride + kernel - pads."""
    x, indices = inputs[0], inputs[1]
    output_shape = inputs[2] if len(inputs) > 2 else None
    kernel = list(attrs["kernel_shape"])
    rank = len(kernel)
    strides = attrs.get("strides") or [1] * rank
    flat_pads = attrs.get("pads") or [0] * (2 * rank)
    if output_shape is not None:
        shape = tuple(int(v) for v in np.asarray(output_shape).reshape(-1))
    else:
        shape = x.shape[:2] + tuple((size - 1) * s + k - flat_pads[a] - flat_pads[a + rank]
                                    for a, (size, s, k) in enumerate(zip(x.shape[2:], strides, kernel)))
    flat = jnp.zeros(int(np.prod(shape)), x.dtype).at[jnp.asarray(indices).reshape(-1).astype(jnp.int32)].set(
        x.reshape(-1))
    return flat.reshape(shape)


def _max_pool_windows(x, kernel, strides, dilations, pads):
    out = None
    for view in _windows(x, kernel, strides, dilations, pads, -jnp.inf):
        out = view if out is None else jnp.maximum(out, view)
    return out


@partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _max_pool(x, kernel, strides, dilations, pads):
    """Max pooling: shifted-view forward and backward (`_max_pool_bwd`)."""
    return _max_pool_windows(x, kernel, strides, dilations, pads)


def _max_pool_fwd(x, kernel, strides, dilations, pads):
    out = _max_pool_windows(x, kernel, strides, dilations, pads)
    return out, (x, out)


def _max_pool_bwd(kernel, strides, dilations, pads, residuals, cotangent):
    """Each window's cotangent goes to its first maximum in row-major order (as XLA's select-and-scatter,
    which lax.reduce_window's gradient is): per kernel offset, the strided view's cells equal to the
    window's maximum and not yet claimed by an earlier offset take it, placed back by interior padding.
    Element-wise, so XLA fuses it: LeNet's 2x2 pools at 640 inputs 3.7 ms and 1.0 ms against
    select-and-scatter's 24 ms and 3.4 ms; a 3x3 stride-2 pool (256 x 64 x 32 x 32) 180 ms against 260."""
    x, out = residuals
    padded_shape = [size + b + e for size, (b, e) in zip(x.shape[2:], pads)]
    zero = jnp.zeros((), cotangent.dtype)
    claimed = jnp.zeros(out.shape, bool)
    grad = jnp.zeros((*x.shape[:2], *padded_shape), cotangent.dtype)
    for offset, view in zip(np.ndindex(*kernel), _windows(x, kernel, strides, dilations, pads, -jnp.inf)):
        first = (view == out) & ~claimed
        claimed = claimed | first
        config = [(0, 0, 0), (0, 0, 0)]
        for axis, (cell, stride, dilation) in enumerate(zip(offset, strides, dilations)):
            low, span = cell * dilation, (out.shape[2 + axis] - 1) * stride + 1
            config.append((low, padded_shape[axis] - low - span, stride - 1))
        grad = grad + lax.pad(jnp.where(first, cotangent, zero), zero, config)
    crop = tuple(slice(b, b + size) for size, (b, _) in zip(x.shape[2:], pads))
    return (grad[(slice(None), slice(None), *crop)],)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


@register("Col2Im", static_inputs=(1, 2))
def col2im(inputs, attrs, ctx):
    """Sum of the sliding blocks back into an image (PyTorch's nn.Fold): input [N, C x prod(block), L], the
    block's cells varying fastest within a channel and L the block positions in row-major order."""
    x = inputs[0]
    image, block = int_list(inputs[1], "Col2Im's image_shape", ctx), int_list(inputs[2], "Col2Im's block_shape", ctx)
    rank = len(block)
    dilations = attrs.get("dilations") or [1] * rank
    strides = attrs.get("strides") or [1] * rank
    flat_pads = attrs.get("pads") or [0] * (2 * rank)
    pads = [(flat_pads[a], flat_pads[a + rank]) for a in range(rank)]
    positions = output_sizes(image, block, strides, dilations, pads)
    batch, channels = x.shape[0], x.shape[1] // int(np.prod(block))
    cols = x.reshape(batch, channels, *block, *positions)
    padded = jnp.zeros((batch, channels, *(size + b + e for size, (b, e) in zip(image, pads))), x.dtype)
    for offset in np.ndindex(*block):
        window = tuple(slice(cell * d, cell * d + (count - 1) * s + 1, s)
                       for cell, d, count, s in zip(offset, dilations, positions, strides))
        padded = padded.at[(slice(None), slice(None), *window)].add(cols[(slice(None), slice(None), *offset)])
    crop = tuple(slice(b, b + size) for size, (b, _) in zip(image, pads))
    return padded[(slice(None), slice(None), *crop)]


@register("AveragePool")
def average_pool(inputs, attrs, ctx):
    x = inputs[0]
    kernel, strides, dilations, padding, extra = _pool_geometry(x, attrs)
    pads = [(b, e + c) for (b, e), c in zip(padding, extra)]
    total = sum(_windows(x, kernel, strides, dilations, pads, 0.0))
    # Divisor: the window's cells inside the input, plus the explicit pads when count_include_pad=1
    # (the extra cells that ceil_mode adds never count).
    ones = jnp.ones((1, 1) + x.shape[2:], x.dtype)
    if attrs.get("count_include_pad", 0):
        ones = jnp.pad(ones, [(0, 0), (0, 0)] + padding, constant_values=1)
        pads = [(0, c) for c in extra]
    count = sum(_windows(ones, kernel, strides, dilations, pads, 0.0))
    return total / count


@register("GlobalAveragePool")
def global_average_pool(inputs, attrs, ctx):
    x = inputs[0]
    return x.mean(axis=tuple(range(2, x.ndim)), keepdims=True)


@register("GlobalMaxPool")
def global_max_pool(inputs, attrs, ctx):
    x = inputs[0]
    return x.max(axis=tuple(range(2, x.ndim)), keepdims=True)


def _softmax_like(fn):
    def handler(inputs, attrs, ctx):
        x = inputs[0]
        if ctx.opset < 13:  # coerced to 2-D at `axis` (default 1)
            axis = attrs.get("axis", 1) % x.ndim
            flat = x.reshape(int(np.prod(x.shape[:axis])), -1)
            return fn(flat, axis=-1).reshape(x.shape)
        return fn(x, axis=attrs.get("axis", -1))

    return handler


register("Softmax")(_softmax_like(jax.nn.softmax))
register("LogSoftmax")(_softmax_like(jax.nn.log_softmax))


def _reduce(fn_name: str, axes_input_from: int):
    def handler(inputs, attrs, ctx):
        x = inputs[0]
        m = xp(x)
        if ctx.opset >= axes_input_from:
            axes = int_list(inputs[1], "axes", ctx) if len(inputs) > 1 and inputs[1] is not None else None
        else:
            axes = attrs.get("axes")
        if not axes:
            if attrs.get("noop_with_empty_axes", 0):
                return x
            axes = list(range(np.ndim(x)))
        keep = bool(attrs.get("keepdims", 1))
        axes = tuple(a % np.ndim(x) for a in axes)
        if fn_name == "l2":
            return m.sqrt(m.sum(x * x, axis=axes, keepdims=keep))
        if fn_name == "sumsquare":
            return m.sum(x * x, axis=axes, keepdims=keep)
        if fn_name == "logsumexp":
            return jax.nn.logsumexp(x, axis=axes, keepdims=keep)
        return getattr(m, fn_name)(x, axis=axes, keepdims=keep)

    return handler


register("ReduceSum", static_inputs=(1,))(_reduce("sum", 13))
for _op, _fn in [("ReduceMean", "mean"), ("ReduceMax", "max"), ("ReduceMin", "min"), ("ReduceProd", "prod"),
                 ("ReduceL2", "l2"), ("ReduceSumSquare", "sumsquare"), ("ReduceLogSumExp", "logsumexp")]:
    register(_op, static_inputs=(1,))(_reduce(_fn, 18))


def _arg(fn_name: str):
    def handler(inputs, attrs, ctx):
        x = inputs[0]
        m = xp(x)
        axis = attrs.get("axis", 0) % x.ndim
        if attrs.get("select_last_index", 0):
            flipped = m.flip(x, axis=axis)
            out = x.shape[axis] - 1 - getattr(m, fn_name)(flipped, axis=axis)
        else:
            out = getattr(m, fn_name)(x, axis=axis)
        if m is np:  # static shape arithmetic; traced indices keep JAX's default int (int32 without x64)
            out = out.astype(np.int64)
        return m.expand_dims(out, axis) if attrs.get("keepdims", 1) else out

    return handler


register("ArgMax")(_arg("argmax"))
register("ArgMin")(_arg("argmin"))
