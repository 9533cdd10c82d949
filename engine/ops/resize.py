"""Resize (opset 10+) and Upsample (opset 7-9): nearest, linear and cubic interpolation, separable per axis;
GridSample: bilinear, nearest or bicubic sampling at data-dependent points.

Every output coordinate's source position is computed once from static shapes (numpy); the data is then
gathered along each resized axis (nearest) or blended from its two (linear) or four (cubic) neighbours,
which JAX differentiates. Cubic uses `cubic_coeff_a` (PyTorch writes -0.75, TensorFlow -0.5); neighbours
past the edge repeat the edge pixel, or with `exclude_outside` drop out and the rest are renormalised.
With `antialias` (opset 18; PyTorch's interpolate(antialias=True)) linear and cubic apply a per-axis
weight matrix whose filter is stretched when downscaling (`_antialias_matrix`).
`keep_aspect_ratio_policy` other than 'stretch' is refused with the node's name.
"""
from __future__ import annotations

import numpy as np

from .registry import OpContext, register, static_array, xp

MODES = ("nearest", "linear", "cubic")


def _unsupported(ctx: OpContext, what: str):
    from ..errors import BadInputError

    return BadInputError(f"node {ctx.node_name!r} (Resize): {what} is not supported (nearest, linear and cubic "
                         "are)")


def _source_positions(out_len: int, in_len: int, scale: float, mode: str) -> np.ndarray:
    """Where each output coordinate samples the input (`coordinate_transformation_mode`), in float32 as
    onnxruntime computes it (1.5 / 0.6 is 2.5 in float32, just under it in float64: another nearest pixel)."""
    index = np.arange(out_len, dtype=np.float32)
    scale = np.float32(scale)
    if mode == "half_pixel":
        return (index + 0.5) / scale - 0.5
    if mode == "pytorch_half_pixel":
        return (index + 0.5) / scale - 0.5 if out_len > 1 else np.zeros(out_len, np.float32)
    if mode == "align_corners":
        return index * np.float32(in_len - 1) / np.float32(out_len - 1) if out_len > 1 else np.zeros(out_len, np.float32)
    if mode == "asymmetric":
        return index / scale
    if mode == "tf_half_pixel_for_nn":
        return (index + 0.5) / scale
    raise ValueError(f"coordinate_transformation_mode {mode!r}")


def _nearest(position: np.ndarray, rule: str) -> np.ndarray:
    if rule == "round_prefer_floor":
        return np.where(position - np.floor(position) == 0.5, np.floor(position), np.round(position))
    if rule == "round_prefer_ceil":
        return np.floor(position + 0.5)
    if rule == "floor":
        return np.floor(position)
    if rule == "ceil":
        return np.ceil(position)
    raise ValueError(f"nearest_mode {rule!r}")


def _cubic_kernel(distance: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel with coefficient `a` at |distance| (0 from 2 on)."""
    a = distance.dtype.type(a)
    near = ((a + 2) * distance - (a + 3)) * distance * distance + 1
    far = ((a * distance - 5 * a) * distance + 8 * a) * distance - 4 * a
    return np.where(distance <= 1, near, np.where(distance < 2, far, 0)).astype(distance.dtype)


def _cubic_weights(position: np.ndarray, in_len: int, a: float, exclude_outside: bool) -> tuple[np.ndarray, np.ndarray]:
    """The four source indices (edge-clamped) and weights of each output coordinate, [out, 4] each."""
    base = np.floor(position)
    offsets = np.arange(-1, 3, dtype=np.float32)
    distance = np.abs(position[:, None] - (base[:, None] + offsets)).astype(np.float32)
    weights = _cubic_kernel(distance, a)
    index = base[:, None].astype(np.int64) + np.arange(-1, 3)
    if exclude_outside:
        weights = np.where((index >= 0) & (index < in_len), weights, 0)
        weights = (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)
    return np.clip(index, 0, in_len - 1), weights


def _antialias_matrix(position: np.ndarray, in_len: int, scale: float, mode: str, a: float,
                      exclude_outside: bool) -> np.ndarray:
    """[out, in] weights of an antialiased linear or cubic resize: the filter stretched by 1 / scale when
    downscaling (more input pixels per output), taps within the stretched support around each output's
    source position, beyond the edge dropped (`exclude_outside`) or counted on the edge pixel, each row
    normalised. onnxruntime's (PIL's) scheme, matched on both edge rules and every coordinate mode."""
    shrink = min(1.0, float(scale))
    support = (1.0 if mode == "linear" else 2.0) / shrink
    center = position.astype(np.float64) + 0.5
    low = np.floor(center - support + 0.5).astype(np.int64)
    width = int(np.max(np.floor(center + support + 0.5).astype(np.int64) - low))
    taps = low[:, None] + np.arange(width)                                  # [out, width]
    inside_support = taps < np.floor(center + support + 0.5)[:, None]
    distance = np.abs(taps + 0.5 - center[:, None]) * shrink
    weights = np.maximum(0.0, 1.0 - distance) if mode == "linear" else _cubic_kernel(distance, a)
    weights = np.where(inside_support, weights, 0.0)
    if exclude_outside:
        weights = np.where((taps >= 0) & (taps < in_len), weights, 0.0)
    matrix = np.zeros((len(position), in_len))
    rows = np.broadcast_to(np.arange(len(position))[:, None], taps.shape)
    np.add.at(matrix, (rows, np.clip(taps, 0, in_len - 1)), weights)
    return (matrix / matrix.sum(axis=1, keepdims=True)).astype(np.float32)


def _resize_axis(x, axis: int, out_len: int, scale: float, mode: str, coordinates: str, rule: str,
                 cubic: tuple[float, bool] = (-0.75, False), antialias: bool = False):
    in_len = np.shape(x)[axis]
    m = xp(x)
    position = _source_positions(out_len, in_len, scale, coordinates)
    if antialias and mode in ("linear", "cubic"):
        matrix = _antialias_matrix(position, in_len, scale, mode, cubic[0], cubic[1])
        return m.moveaxis(m.tensordot(x, matrix, axes=([axis], [1])), -1, axis)
    if mode == "cubic":
        index, weights = _cubic_weights(position, in_len, *cubic)
        shape = [-1 if a == axis else 1 for a in range(np.ndim(x))]
        return sum(m.take(x, index[:, k], axis=axis) * weights[:, k].reshape(shape) for k in range(4))
    if mode == "nearest":
        index = np.clip(_nearest(position, rule), 0, in_len - 1).astype(np.int64)
        return m.take(x, index, axis=axis)
    position = np.clip(position, 0, in_len - 1)
    low = np.floor(position).astype(np.int64)
    high = np.minimum(low + 1, in_len - 1)
    weight = (position - low).astype(np.float32).reshape([-1 if a == axis else 1 for a in range(np.ndim(x))])
    return m.take(x, low, axis=axis) * (1 - weight) + m.take(x, high, axis=axis) * weight


def resize(x, scales: list[float], sizes: list[int], mode: str, coordinates: str, rule: str, ctx: OpContext,
           cubic: tuple[float, bool] = (-0.75, False), antialias: bool = False):
    """`x` resized to `sizes` (with `scales` as the coordinate scale per axis); `cubic`: the cubic mode's
    (coefficient a, exclude_outside), which the antialiased linear mode's edge rule follows too."""
    if mode not in MODES:
        raise _unsupported(ctx, f"mode {mode!r}")
    for axis, (out_len, scale) in enumerate(zip(sizes, scales)):
        if out_len != np.shape(x)[axis] or scale != 1.0:
            x = _resize_axis(x, axis, out_len, scale, mode, coordinates, rule, cubic, antialias)
    return x


@register("Resize", static_inputs=(1, 2, 3))
def resize_op(inputs, attrs, ctx):
    x = inputs[0]
    rank = np.ndim(x)
    mode = attrs.get("mode", "nearest")
    if ctx.opset < 11:  # Resize-10: (X, scales), asymmetric coordinates, nearest rounds down
        scales = [float(s) for s in static_array(inputs[1], "scales", ctx).reshape(-1)]
        sizes = [int(np.floor(n * s)) for n, s in zip(np.shape(x), scales)]
        return resize(x, scales, sizes, mode, "asymmetric", "floor", ctx)
    if attrs.get("keep_aspect_ratio_policy", "stretch") != "stretch":
        raise _unsupported(ctx, f"keep_aspect_ratio_policy {attrs['keep_aspect_ratio_policy']!r}")
    axes = [a % rank for a in attrs.get("axes", range(rank))]
    shape = list(np.shape(x))
    given_scales = inputs[2] if len(inputs) > 2 and inputs[2] is not None and np.size(inputs[2]) else None
    given_sizes = inputs[3] if len(inputs) > 3 and inputs[3] is not None and np.size(inputs[3]) else None
    scales, sizes = [1.0] * rank, list(shape)
    if given_sizes is not None:
        for axis, size in zip(axes, static_array(given_sizes, "sizes", ctx).reshape(-1)):
            sizes[axis], scales[axis] = int(size), int(size) / shape[axis]
    elif given_scales is not None:
        for axis, scale in zip(axes, static_array(given_scales, "scales", ctx).reshape(-1)):
            scales[axis], sizes[axis] = float(scale), int(np.floor(shape[axis] * float(scale)))
    coordinates = attrs.get("coordinate_transformation_mode", "half_pixel")
    if coordinates == "tf_crop_and_resize":
        raise _unsupported(ctx, "coordinate_transformation_mode 'tf_crop_and_resize'")
    return resize(x, scales, sizes, mode, coordinates, attrs.get("nearest_mode", "round_prefer_floor"), ctx,
                  (float(attrs.get("cubic_coeff_a", -0.75)), bool(attrs.get("exclude_outside", 0))),
                  antialias=bool(attrs.get("antialias", 0)))


@register("Upsample", static_inputs=(1,))
def upsample(inputs, attrs, ctx):
    """Upsample (opsets 7-9): scales as an attribute (7-8) or an input (9); asymmetric coordinates."""
    x = inputs[0]
    scales = attrs.get("scales") if ctx.opset < 9 else static_array(inputs[1], "scales", ctx).reshape(-1)
    scales = [float(s) for s in scales]
    sizes = [int(np.floor(n * s)) for n, s in zip(np.shape(x), scales)]
    return resize(x, scales, sizes, attrs.get("mode", "nearest"), "asymmetric", "floor", ctx)


def _grid_coordinate(c, size: int, align_corners: bool, padding: str):
    """Normalised grid coordinates in [-1, 1] to pixel positions, with the padding mode's rule for those
    outside (border: clamped; reflection: mirrored at the edges, then clamped; zeros: left as they are)."""
    return _padded_coordinate(_unnormalized(c, size, align_corners), size, align_corners, padding)


def _unnormalized(c, size: int, align_corners: bool):
    return (c + 1) / 2 * (size - 1) if align_corners else ((c + 1) * size - 1) / 2


def _padded_coordinate(c, size: int, align_corners: bool, padding: str):
    """A pixel position under the padding mode's rule (see `_grid_coordinate`)."""
    import jax.numpy as jnp

    if padding == "reflection":
        low, span = (0.0, size - 1.0) if align_corners else (-0.5, float(size))
        if span <= 0:
            return jnp.zeros_like(c)
        distance = jnp.abs(c - low)
        extra, flips = jnp.fmod(distance, span), jnp.floor(distance / span)
        c = jnp.where(jnp.fmod(flips, 2) == 0, low + extra, low + span - extra)
    if padding in ("border", "reflection"):
        c = jnp.clip(c, 0, size - 1)
    return c


@register("GridSample")
def grid_sample(inputs, attrs, ctx):
    """Sample [N, C, H, W] at the grid's [N, Ho, Wo, (x, y)] points (a spatial transformer's warp):
    bilinear or nearest (half to even, as onnxruntime), padding zeros, border or reflection."""
    import jax.numpy as jnp

    x, grid = jnp.asarray(inputs[0]), jnp.asarray(inputs[1])
    mode = {"linear": "bilinear", "cubic": "bicubic"}.get(attrs.get("mode", "bilinear"), attrs.get("mode", "bilinear"))
    padding = attrs.get("padding_mode", "zeros")
    if mode not in ("bilinear", "nearest", "bicubic") or padding not in ("zeros", "border", "reflection") \
            or x.ndim != 4:
        from ..errors import BadInputError

        raise BadInputError(f"node {ctx.node_name!r} (GridSample): mode {mode!r}, padding {padding!r} on a "
                            f"{x.ndim}-D input is not supported (bilinear, nearest and bicubic, "
                            "zeros/border/reflection, 4-D are)")
    align = bool(attrs.get("align_corners", 0))
    n, _, height, width = x.shape
    if mode == "bicubic":
        return _grid_sample_bicubic(x, grid, align, padding)
    px = _grid_coordinate(grid[..., 0], width, align, padding)
    py = _grid_coordinate(grid[..., 1], height, align, padding)
    batch = jnp.arange(n).reshape(n, 1, 1)

    def pixels(iy, ix):  # [N, Ho, Wo, C]; zero where the index falls outside
        inside = (ix >= 0) & (ix < width) & (iy >= 0) & (iy < height)
        values = x[batch, :, jnp.clip(iy, 0, height - 1), jnp.clip(ix, 0, width - 1)]
        return jnp.where(inside[..., None], values, 0.0)

    if mode == "nearest":
        out = pixels(jnp.round(py).astype(jnp.int32), jnp.round(px).astype(jnp.int32))
    else:
        x0, y0 = jnp.floor(px), jnp.floor(py)
        wx, wy = (px - x0)[..., None], (py - y0)[..., None]
        ix, iy = x0.astype(jnp.int32), y0.astype(jnp.int32)
        out = ((pixels(iy, ix) * (1 - wx) + pixels(iy, ix + 1) * wx) * (1 - wy)
               + (pixels(iy + 1, ix) * (1 - wx) + pixels(iy + 1, ix + 1) * wx) * wy)
    return jnp.moveaxis(out, -1, 1)


def _grid_sample_bicubic(x, grid, align: bool, padding: str):
    """Bicubic GridSample as PyTorch and onnxruntime compute it: the 4 x 4 pixels around each point, Keys'
    kernel with a = -0.75, each tap's position put under the padding mode on its own (zeros: 0 outside)."""
    import jax.numpy as jnp

    n, _, height, width = x.shape
    px, py = _unnormalized(grid[..., 0], width, align), _unnormalized(grid[..., 1], height, align)
    x0, y0 = jnp.floor(px), jnp.floor(py)
    batch = jnp.arange(n).reshape(n, 1, 1)

    def weights(t):  # the four taps' weights for a fractional offset t
        a = -0.75
        near = lambda d: ((a + 2) * d - (a + 3)) * d * d + 1  # noqa: E731
        far = lambda d: ((a * d - 5 * a) * d + 8 * a) * d - 4 * a  # noqa: E731
        return [far(t + 1), near(t), near(1 - t), far(2 - t)]

    def tap(iy, ix):  # [N, Ho, Wo, C]
        cx = _padded_coordinate(ix, width, align, padding)
        cy = _padded_coordinate(iy, height, align, padding)
        jx, jy = cx.astype(jnp.int32), cy.astype(jnp.int32)
        inside = (jx >= 0) & (jx < width) & (jy >= 0) & (jy < height)
        values = x[batch, :, jnp.clip(jy, 0, height - 1), jnp.clip(jx, 0, width - 1)]
        return jnp.where(inside[..., None], values, 0.0)

    wx, wy = weights(px - x0), weights(py - y0)
    out = 0.0
    for i in range(4):
        row = sum(tap(y0 + i - 1, x0 + j - 1) * wx[j][..., None] for j in range(4))
        out = out + row * wy[i][..., None]
    return jnp.moveaxis(out, -1, 1)
