"""Shape and indexing ONNX ops. Shape results are numpy (static), so jit sees only static shapes."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .registry import int_list, register, static_array, xp


@register("Shape")
def shape(inputs, attrs, ctx):
    dims = np.asarray(np.shape(inputs[0]), dtype=np.int64)
    start, end = attrs.get("start", 0), attrs.get("end")
    return dims[start:end]


@register("Size")
def size(inputs, attrs, ctx):
    return np.asarray(np.size(inputs[0]), dtype=np.int64)


@register("Constant")
def constant(inputs, attrs, ctx):
    for key in ("value", "value_float", "value_int", "value_floats", "value_ints"):
        if key in attrs:
            value = np.asarray(attrs[key])
            if key in ("value_float", "value_floats"):
                value = value.astype(np.float32)
            elif key in ("value_int", "value_ints"):
                value = value.astype(np.int64)
            return value
    raise NotImplementedError(f"Constant node {ctx.node_name!r}: unsupported attribute {sorted(attrs)}")


@register("Reshape", static_inputs=(1,))
def reshape(inputs, attrs, ctx):
    x, target = inputs
    dims = int_list(target, "the target shape", ctx)
    if not attrs.get("allowzero", 0):
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return xp(x).reshape(x, dims)


@register("Flatten")
def flatten(inputs, attrs, ctx):
    x = inputs[0]
    axis = attrs.get("axis", 1)
    axis = axis + x.ndim if axis < 0 else axis
    lead = int(np.prod(x.shape[:axis], dtype=np.int64))
    return xp(x).reshape(x, (lead, -1))


@register("Transpose")
def transpose(inputs, attrs, ctx):
    x = inputs[0]
    perm = attrs.get("perm") or list(reversed(range(x.ndim)))
    return xp(x).transpose(x, perm)


def _axes(inputs, attrs, ctx, slot: int = 1) -> list[int] | None:
    """Axes from an attribute (older opsets) or an optional input (newer ones)."""
    if "axes" in attrs:
        return list(attrs["axes"])
    if len(inputs) > slot and inputs[slot] is not None:
        return int_list(inputs[slot], "axes", ctx)
    return None


@register("Squeeze", static_inputs=(1,))
def squeeze(inputs, attrs, ctx):
    x = inputs[0]
    axes = _axes(inputs, attrs, ctx)
    if axes is None:
        axes = [i for i, d in enumerate(x.shape) if d == 1]
    return xp(x).squeeze(x, axis=tuple(a % x.ndim for a in axes))


@register("Unsqueeze", static_inputs=(1,))
def unsqueeze(inputs, attrs, ctx):
    x = inputs[0]
    axes = _axes(inputs, attrs, ctx)
    rank = np.ndim(x) + len(axes)
    m = xp(x)
    out = x
    for axis in sorted(a % rank for a in axes):
        out = m.expand_dims(out, axis)
    return out


@register("Concat")
def concat(inputs, attrs, ctx):
    values = [v for v in inputs if v is not None and np.size(v) > 0] or [inputs[0]]
    return xp(*values).concatenate(values, axis=attrs["axis"])


@register("Split", static_inputs=(1,))
def split(inputs, attrs, ctx):
    x = inputs[0]
    axis = attrs.get("axis", 0) % x.ndim
    sizes = attrs.get("split")
    if sizes is None and len(inputs) > 1 and inputs[1] is not None:
        sizes = int_list(inputs[1], "split", ctx)
    if sizes is None:
        parts = attrs.get("num_outputs", ctx.num_outputs)
        chunk = -(-x.shape[axis] // parts)
        sizes = [min(chunk, x.shape[axis] - i * chunk) for i in range(parts)]
    cuts = np.cumsum(sizes)[:-1].tolist()
    return tuple(xp(x).split(x, cuts, axis=axis))


@register("Gather")
def gather(inputs, attrs, ctx):
    x, indices = inputs
    axis = attrs.get("axis", 0) % np.ndim(x)
    m = xp(x, indices)
    indices = m.where(indices < 0, indices + x.shape[axis], indices)
    return m.take(x, indices, axis=axis)


@register("GatherElements")
def gather_elements(inputs, attrs, ctx):
    x, indices = inputs
    axis = attrs.get("axis", 0) % np.ndim(x)
    m = xp(x, indices)
    indices = m.where(indices < 0, indices + x.shape[axis], indices)
    return m.take_along_axis(x, indices, axis=axis)


@register("GatherND")
def gather_nd(inputs, attrs, ctx):
    """x[indices] with the last axis of `indices` indexing x's leading axes after `batch_dims` shared batch
    axes (negative indices count from the end)."""
    x, indices = inputs
    batch_dims = int(attrs.get("batch_dims", 0))
    m = xp(x, indices)
    depth = np.shape(indices)[-1]
    bounds = np.asarray(np.shape(x)[batch_dims:batch_dims + depth])
    indices = m.where(indices < 0, indices + bounds, indices)
    batch_shape = np.shape(x)[:batch_dims]
    rows = int(np.prod(batch_shape, dtype=np.int64))
    flat_x = x.reshape(rows, *np.shape(x)[batch_dims:])
    flat_i = indices.reshape(rows, -1, depth)
    row = m.arange(rows).reshape(rows, 1)
    out = flat_x[(row, *(flat_i[..., d] for d in range(depth)))]  # [rows, indices per row, *slice]
    return out.reshape(*batch_shape, *np.shape(indices)[batch_dims:-1], *np.shape(x)[batch_dims + depth:])


@register("ScatterND")
def scatter_nd(inputs, attrs, ctx):
    """A copy of `data` with the slices `indices` addresses set to (or combined by `reduction` with)
    `updates`: what PyTorch's exporters write for an assignment into a slice (x[:, 0] = ...)."""
    data, indices, updates = inputs
    depth = np.shape(indices)[-1]
    m = xp(data, indices, updates)
    bounds = np.asarray(np.shape(data)[:depth])
    indices = m.where(indices < 0, indices + bounds, indices)
    where = tuple(indices[..., d] for d in range(depth))
    reduction = attrs.get("reduction", "none")
    if m is np:
        out = np.array(data, copy=True)
        combine = {"none": None, "add": np.add, "mul": np.multiply, "max": np.maximum, "min": np.minimum}
        if reduction not in combine:
            raise ValueError(f"reduction {reduction!r}")
        if combine[reduction] is None:
            out[where] = updates
        else:
            combine[reduction].at(out, where, updates)
        return out
    target = jnp.asarray(data).at[where]
    methods = {"none": target.set, "add": target.add, "mul": target.multiply, "max": target.max, "min": target.min}
    if reduction not in methods:
        raise ValueError(f"reduction {reduction!r}")
    return methods[reduction](updates)


@register("CumSum", static_inputs=(1,))
def cumsum(inputs, attrs, ctx):
    """Running sum along a static axis; `exclusive` leaves each element out of its own sum, `reverse` sums
    from the end."""
    x = inputs[0]
    axis = int(static_array(inputs[1], "the CumSum axis", ctx).reshape(-1)[0]) % np.ndim(x)
    m = xp(x)
    if attrs.get("reverse", 0):
        x = m.flip(x, axis)
    out = m.cumsum(x, axis=axis)
    if attrs.get("exclusive", 0):
        out = out - x
    return m.flip(out, axis) if attrs.get("reverse", 0) else out


@register("TopK", static_inputs=(1,))
def top_k(inputs, attrs, ctx):
    """The k largest (or smallest) values along an axis and their indices, largest first (ties: the lower
    index first, as onnxruntime)."""
    x = jnp.asarray(inputs[0])
    k = int(static_array(inputs[1], "the TopK k", ctx).reshape(-1)[0]) if len(inputs) > 1 else int(attrs["k"])
    axis = int(attrs.get("axis", -1)) % x.ndim
    largest = int(attrs.get("largest", 1))
    moved = jnp.moveaxis(x, axis, -1)
    values, indices = jax.lax.top_k(moved if largest else -moved, k)
    values = values if largest else -values
    return jnp.moveaxis(values, -1, axis), jnp.moveaxis(indices, -1, axis)


@register("DepthToSpace")
def depth_to_space(inputs, attrs, ctx):
    x = inputs[0]
    block = int(attrs["blocksize"])
    n, c, h, w = np.shape(x)
    if attrs.get("mode", "DCR") == "CRD":
        parts = x.reshape(n, c // block**2, block, block, h, w).transpose(0, 1, 4, 2, 5, 3)
    else:
        parts = x.reshape(n, block, block, c // block**2, h, w).transpose(0, 3, 4, 1, 5, 2)
    return parts.reshape(n, c // block**2, h * block, w * block)


@register("SpaceToDepth")
def space_to_depth(inputs, attrs, ctx):
    x = inputs[0]
    block = int(attrs["blocksize"])
    n, c, h, w = np.shape(x)
    parts = x.reshape(n, c, h // block, block, w // block, block).transpose(0, 3, 5, 1, 2, 4)
    return parts.reshape(n, c * block**2, h // block, w // block)


@register("Slice", static_inputs=(1, 2, 3, 4))
def slice_(inputs, attrs, ctx):
    x = inputs[0]
    if ctx.opset < 10:
        starts, ends = attrs["starts"], attrs["ends"]
        axes, steps = attrs.get("axes"), None
    else:
        starts = int_list(inputs[1], "starts", ctx)
        ends = int_list(inputs[2], "ends", ctx)
        axes = int_list(inputs[3], "axes", ctx) if len(inputs) > 3 and inputs[3] is not None else None
        steps = int_list(inputs[4], "steps", ctx) if len(inputs) > 4 and inputs[4] is not None else None
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps or [1] * len(starts)
    index = [slice(None)] * np.ndim(x)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        index[axis % np.ndim(x)] = slice(start, end, step)
    return x[tuple(index)]


@register("Expand", static_inputs=(1,))
def expand(inputs, attrs, ctx):
    x, target = inputs
    out_shape = np.broadcast_shapes(np.shape(x), tuple(int_list(target, "shape", ctx)))
    return xp(x).broadcast_to(x, out_shape)


@register("Tile", static_inputs=(1,))
def tile(inputs, attrs, ctx):
    x, repeats = inputs
    return xp(x).tile(x, int_list(repeats, "repeats", ctx))


@register("ConstantOfShape", static_inputs=(0,))
def constant_of_shape(inputs, attrs, ctx):
    dims = int_list(inputs[0], "shape", ctx)
    value = np.asarray(attrs.get("value", np.zeros(1, np.float32))).reshape(-1)
    return np.full(dims, value[0], dtype=value.dtype)


@register("Range", static_inputs=(0, 1, 2))
def range_(inputs, attrs, ctx):
    start, limit, delta = (static_array(v, "range bound", ctx) for v in inputs)
    return np.arange(start, limit, delta, dtype=np.asarray(start).dtype)


@register("Pad", static_inputs=(1, 2, 3))
def pad(inputs, attrs, ctx):
    x = inputs[0]
    if ctx.opset < 11:
        pads, value, axes = attrs["pads"], attrs.get("value", 0.0), None
    else:
        pads = int_list(inputs[1], "pads", ctx)
        value = inputs[2] if len(inputs) > 2 and inputs[2] is not None else 0
        value = static_array(value, "constant_value", ctx).reshape(-1)[0] if np.size(value) else 0
        axes = int_list(inputs[3], "axes", ctx) if len(inputs) > 3 and inputs[3] is not None else None
    rank = np.ndim(x)
    axes = [a % rank for a in axes] if axes is not None else list(range(rank))
    widths = [(0, 0)] * rank
    half = len(pads) // 2
    for i, axis in enumerate(axes):
        widths[axis] = (pads[i], pads[i + half])
    mode = attrs.get("mode", "constant")
    m = xp(x)
    if mode == "constant":
        return m.pad(x, widths, mode="constant", constant_values=value)
    return m.pad(x, widths, mode={"reflect": "reflect", "edge": "edge", "wrap": "wrap"}[mode])


@register("Einsum")
def einsum(inputs, attrs, ctx):
    return xp(*inputs).einsum(attrs["equation"], *inputs)


@register("Trilu", static_inputs=(1,))
def trilu(inputs, attrs, ctx):
    x = inputs[0]
    k = int(static_array(inputs[1], "k", ctx)) if len(inputs) > 1 and inputs[1] is not None else 0
    m = xp(x)
    return m.triu(x, k) if attrs.get("upper", 1) else m.tril(x, k)
