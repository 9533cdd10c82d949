"""Single-node and small graphs built with onnx.helper, run by the JAX engine and by onnxruntime.

Covers the attribute forms that changed across opsets 9-21 (22-25 changed only tensor types) and the geometry of conv/pool ops.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from lancet import Forward
from lancet.loader import model_from_proto
from lancet.runtime import ort_session

from .conftest import max_diff

F = TensorProto.FLOAT


def make(nodes, inputs, opset, initializers=(), n_outputs=1, out_shape=None):
    """A model whose graph input(s) are float tensors of the given shapes; output shapes are inferred."""
    graph_inputs = [helper.make_tensor_value_info(name, F, list(shape)) for name, shape in inputs]
    outs = [helper.make_tensor_value_info(f"y{i}" if n_outputs > 1 else "y", F, out_shape)
            for i in range(n_outputs)]
    graph = helper.make_graph(nodes, "g", graph_inputs, outs,
                              initializer=[numpy_helper.from_array(v, k) for k, v in initializers])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = min(model.ir_version, 8 if opset <= 17 else 10)
    return onnx.shape_inference.infer_shapes(model)


def compare(model, feeds, atol=1e-5):
    session = ort_session(model.SerializeToString())
    expected = session.run(None, feeds)
    got = Forward(model_from_proto(model))(feeds)  # jitted, as the engine runs it
    names = [o.name for o in model.graph.output]
    for name, ref in zip(names, expected):
        assert np.asarray(got[name]).shape == ref.shape, name
        assert max_diff(got[name], ref) <= atol, name


def rand(*shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def i64(*values):
    return np.asarray(values, dtype=np.int64)


CASES = {
    "slice-op9-attrs": (9, [helper.make_node("Slice", ["x"], ["y"], starts=[1, 0], ends=[3, 100], axes=[1, 2])], {}),
    "slice-op13-neg-step": (13, [helper.make_node("Slice", ["x", "s", "e", "a", "st"], ["y"])],
                            {"s": i64(-1, 3), "e": i64(-1000, 0), "a": i64(2, 1), "st": i64(-2, -1)}),
    "squeeze-op11": (11, [helper.make_node("Unsqueeze", ["x"], ["u"], axes=[0, 3]),
                          helper.make_node("Squeeze", ["u"], ["y"], axes=[0])], {}),
    "squeeze-op13": (13, [helper.make_node("Unsqueeze", ["x", "a"], ["u"]),
                          helper.make_node("Squeeze", ["u", "b"], ["y"])], {"a": i64(-1), "b": i64(4)}),
    "clip-op9": (9, [helper.make_node("Clip", ["x"], ["y"], min=-0.5, max=0.7)], {}),
    "clip-op13": (13, [helper.make_node("Clip", ["x", "lo", "hi"], ["y"])],
                  {"lo": np.float32(-0.3), "hi": np.float32(0.2)}),
    "pad-op9-reflect": (9, [helper.make_node("Pad", ["x"], ["y"], pads=[0, 1, 2, 0, 0, 1, 1, 0], mode="reflect")],
                        {}),
    "pad-op13-constant": (13, [helper.make_node("Pad", ["x", "p", "v"], ["y"])],
                          {"p": i64(0, 0, 1, 2, 0, 0, 3, 0), "v": np.float32(0.5)}),
    "pad-op18-edge-axes": (18, [helper.make_node("Pad", ["x", "p", "", "a"], ["y"], mode="edge")],
                           {"p": i64(1, 2, 2, 0), "a": i64(2, 3)}),
    "softmax-op11-coerced": (11, [helper.make_node("Softmax", ["x"], ["y"], axis=1)], {}),
    "softmax-op13": (13, [helper.make_node("Softmax", ["x"], ["y"], axis=1)], {}),
    "logsoftmax-op13": (13, [helper.make_node("LogSoftmax", ["x"], ["y"])], {}),
    "reducemean-op13": (13, [helper.make_node("ReduceMean", ["x"], ["y"], axes=[1, -1], keepdims=0)], {}),
    "reducemean-op18": (18, [helper.make_node("ReduceMean", ["x", "a"], ["y"])], {"a": i64(2)}),
    "reducesum-op13": (13, [helper.make_node("ReduceSum", ["x", "a"], ["y"], keepdims=0)], {"a": i64(1, 3)}),
    "reducemax-op11": (11, [helper.make_node("ReduceMax", ["x"], ["y"])], {}),
    "split-op11": (11, [helper.make_node("Split", ["x"], ["s0", "s1"], axis=3, split=[2, 4]),
                        helper.make_node("Mul", ["s0", "s0"], ["y"])], {}),
    "split-op13": (13, [helper.make_node("Split", ["x", "sp"], ["s0", "s1"], axis=1),
                        helper.make_node("Add", ["s1", "s1"], ["y"])], {"sp": i64(1, 2)}),
    "split-op18-num-outputs": (18, [helper.make_node("Split", ["x"], ["s0", "s1"], axis=3, num_outputs=2),
                                    helper.make_node("Sub", ["s0", "s1"], ["y"])], {}),
    "gather-negative": (13, [helper.make_node("Gather", ["x", "i"], ["y"], axis=2)], {"i": i64(-1, 0, 2)}),
    "transpose-default": (13, [helper.make_node("Transpose", ["x"], ["y"])], {}),
    "flatten-axis2": (13, [helper.make_node("Flatten", ["x"], ["y"], axis=2)], {}),
    "expand-tile": (13, [helper.make_node("ReduceMax", ["x"], ["m"], axes=[1], keepdims=1),
                         helper.make_node("Expand", ["m", "sh"], ["e"]),
                         helper.make_node("Tile", ["e", "r"], ["y"])], {"sh": i64(2, 3, 1, 1), "r": i64(1, 1, 2, 1)}),
    "activations": (13, [helper.make_node("LeakyRelu", ["x"], ["a"], alpha=0.2),
                         helper.make_node("Elu", ["a"], ["b"], alpha=0.7),
                         helper.make_node("HardSigmoid", ["b"], ["c"]),
                         helper.make_node("Softplus", ["c"], ["d"]),
                         helper.make_node("Tanh", ["d"], ["e"]),
                         helper.make_node("Erf", ["x"], ["f"]),
                         helper.make_node("Sum", ["e", "f", "x"], ["y"])], {}),
    "hardswish-selu-prelu": (14, [helper.make_node("HardSwish", ["x"], ["a"]),
                                  helper.make_node("Selu", ["a"], ["b"]),
                                  helper.make_node("PRelu", ["b", "slope"], ["y"])],
                             {"slope": rand(3, 1, 1, seed=3)}),
    "gelu-op20": (20, [helper.make_node("Gelu", ["x"], ["a"]),
                       helper.make_node("Gelu", ["x"], ["b"], approximate="tanh"),
                       helper.make_node("Add", ["a", "b"], ["y"])], {}),
    "layernorm-op17": (17, [helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], axis=-2, epsilon=1e-3)],
                       {"g": rand(5, 6, seed=1), "b": rand(5, 6, seed=2)}),
    "instancenorm": (13, [helper.make_node("InstanceNormalization", ["x", "g", "b"], ["y"])],
                     {"g": rand(3, seed=1), "b": rand(3, seed=2)}),
    "batchnorm-op9": (9, [helper.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], ["y"], epsilon=1e-3)],
                      {"g": rand(3, seed=1), "b": rand(3, seed=2), "m": rand(3, seed=3),
                       "v": np.abs(rand(3, seed=4)) + 0.1}),
    "einsum-where-compare": (13, [helper.make_node("Einsum", ["x", "x"], ["e"], equation="bchw,bcgw->bchg"),
                                  helper.make_node("Greater", ["e", "z"], ["c"]),
                                  helper.make_node("Where", ["c", "e", "z"], ["y"])], {"z": np.float32(0.5)}),
    "gemm-trans-alpha-beta": (13, [helper.make_node("Flatten", ["x"], ["f"]),
                                   helper.make_node("Gemm", ["f", "w", "c"], ["y"], transB=1, alpha=0.5, beta=2.0)],
                              {"w": rand(7, 90, seed=5), "c": rand(7, seed=6)}),
    "shape-arith-reshape": (13, [helper.make_node("Shape", ["x"], ["s"]),
                                 helper.make_node("Gather", ["s", "zero"], ["n"]),
                                 helper.make_node("Unsqueeze", ["n", "zero1"], ["n1"]),
                                 helper.make_node("Concat", ["n1", "minus1"], ["target"], axis=0),
                                 helper.make_node("Reshape", ["x", "target"], ["y"])],
                            {"zero": np.asarray(0, np.int64), "zero1": i64(0), "minus1": i64(-1)}),
    "constantofshape-range-cast": (13, [helper.make_node("Shape", ["x"], ["s"], ),
                                        helper.make_node("Slice", ["s", "one", "two"], ["c"]),
                                        helper.make_node("ConstantOfShape", ["c"], ["k"],
                                                         value=numpy_helper.from_array(np.array([2.0], np.float32))),
                                        helper.make_node("Squeeze", ["c"], ["cs"]),
                                        helper.make_node("Range", ["zero", "cs", "one_s"], ["r"]),
                                        helper.make_node("Cast", ["r"], ["rf"], to=TensorProto.FLOAT),
                                        helper.make_node("Mul", ["k", "rf"], ["kr"]),
                                        helper.make_node("Reshape", ["kr", "shp"], ["kr4"]),
                                        helper.make_node("Add", ["x", "kr4"], ["y"])],
                                   {"one": i64(1), "two": i64(2), "zero": np.asarray(0, np.int64),
                                    "one_s": np.asarray(1, np.int64), "shp": i64(1, 3, 1, 1)}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_op_matches_onnxruntime(name):
    opset, nodes, consts = CASES[name]
    shape = (2, 5, 6) if name.startswith("layernorm") else (2, 3, 5, 6)
    out_shape = [2, 90] if name == "shape-arith-reshape" else None
    model = make(nodes, [("x", shape)], opset, initializers=list(consts.items()), out_shape=out_shape)
    onnx.checker.check_model(model)
    compare(model, {"x": rand(*shape)})


@settings(max_examples=25, deadline=None)
@given(kernel=st.integers(1, 4), stride=st.integers(1, 3), dilation=st.integers(1, 2), pad=st.integers(0, 1),
       ceil=st.booleans(), include_pad=st.booleans(), size=st.integers(6, 11), group=st.sampled_from([1, 3]))
def test_conv_and_pool_geometry(kernel, stride, dilation, pad, ceil, include_pad, size, group):
    pad = min(pad, kernel - 1) if kernel > 1 else 0
    assume((kernel - 1) * dilation + 1 <= size)
    x = rand(2, 3, size, size + 1)
    w = rand(6, 3 // group, kernel, kernel, seed=1)
    common = dict(kernel_shape=[kernel, kernel], strides=[stride, stride], pads=[pad] * 4)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], group=group, dilations=[dilation] * 2, **common),
        helper.make_node("MaxPool", ["x"], ["y0"], ceil_mode=int(ceil), dilations=[dilation] * 2, **common),
        helper.make_node("AveragePool", ["x"], ["y1"], ceil_mode=int(ceil), count_include_pad=int(include_pad),
                         **common),
        helper.make_node("ConvTranspose", ["x", "wt"], ["y2"], group=group, dilations=[dilation] * 2,
                         output_padding=[stride - 1, 0], **common),
        helper.make_node("Relu", ["c"], ["y3"]),
    ]
    model = make(nodes, [("x", x.shape)], 19, n_outputs=4,
                 initializers=[("w", w), ("b", rand(6, seed=2)), ("wt", rand(3, 6 // group, kernel, kernel, seed=3))])
    compare(model, {"x": x}, atol=1e-4)


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID"])
def test_auto_pad(auto_pad):
    x = rand(1, 2, 7, 8)
    nodes = [helper.make_node("Conv", ["x", "w"], ["y0"], auto_pad=auto_pad, strides=[2, 2]),
             helper.make_node("MaxPool", ["x"], ["y1"], auto_pad=auto_pad, kernel_shape=[2, 3], strides=[2, 2])]
    model = make(nodes, [("x", x.shape)], 13, n_outputs=2, initializers=[("w", rand(4, 2, 3, 2, seed=1))])
    compare(model, {"x": x})


@pytest.mark.parametrize("kernel, strides, dilations, pads", [
    ((2, 2), (2, 2), (1, 1), ((0, 0), (0, 0))),     # LeNet's
    ((3, 3), (2, 2), (1, 1), ((1, 1), (1, 1))),     # overlapping windows (ResNet stem)
    ((3, 2), (1, 3), (2, 1), ((1, 2), (0, 1))),     # dilated, uneven, extra end padding (ceil mode)
    ((3,), (2,), (1,), ((1, 1),)),                  # 1-D
    ((2, 2, 2), (1, 2, 2), (1, 1, 1), ((0, 0), (0, 1), (1, 0))),  # 3-D
])
def test_max_pool_gradient_goes_to_each_windows_first_maximum(kernel, strides, dilations, pads):
    """MaxPool's own backward sends each window's cotangent to its first maximum in row-major order, as
    XLA's select-and-scatter (lax.reduce_window's gradient, which has none for dilated windows) does: ties
    included (inputs on a coarse grid, many zeros as after a ReLU), under jit and vmap; checked against a
    loop over windows."""
    import jax
    import jax.numpy as jnp

    from lancet.ops.nn import _max_pool

    def loop_reference(x, cotangent):
        padded = np.pad(x, [(0, 0), (0, 0), *pads], constant_values=-np.inf)
        out = np.zeros(cotangent.shape, x.dtype)
        grad = np.zeros(padded.shape, x.dtype)
        for n, c, *where in np.ndindex(*cotangent.shape):
            cells = [tuple(w * s + o * d for w, s, o, d in zip(where, strides, offset, dilations))
                     for offset in np.ndindex(*kernel)]
            values = [padded[(n, c, *cell)] for cell in cells]
            first = cells[int(np.argmax(values))]
            out[(n, c, *where)] = max(values)
            grad[(n, c, *first)] += cotangent[(n, c, *where)]
        crop = tuple(slice(b, b + size) for size, (b, _) in zip(x.shape[2:], pads))
        return out, grad[(slice(None), slice(None), *crop)]

    def fast(x_):
        return _max_pool(x_, kernel, strides, dilations, pads)

    shape = (2, 3) + (7, 8, 6)[: len(kernel)]
    x = np.maximum(np.round(rand(*shape, seed=7) * 3) / 3, 0)
    got_out, got_vjp = jax.vjp(jax.jit(fast), jnp.asarray(x))
    cotangent = rand(*got_out.shape, seed=8)
    want_out, want_grad = loop_reference(x, cotangent)
    np.testing.assert_array_equal(got_out, want_out)
    np.testing.assert_allclose(got_vjp(jnp.asarray(cotangent))[0], want_grad, atol=1e-6)
    batched = jax.vjp(jax.vmap(fast), jnp.stack([x, -x]))[1](jnp.stack([cotangent, 2 * cotangent]))[0]
    np.testing.assert_allclose(batched[0], want_grad, atol=1e-6)
    np.testing.assert_allclose(batched[1], loop_reference(-x, 2 * cotangent)[1], atol=1e-6)


def _xla_conv_input_shapes(jaxpr) -> list[tuple[int, ...]]:
    """The input shape of every XLA convolution in a jaxpr and the jaxprs inside it."""
    import jax.extend.core

    found = [tuple(e.invars[0].aval.shape) for e in jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
    for sub in jax.extend.core.subjaxprs(jaxpr):
        found += _xla_conv_input_shapes(sub)
    return found


def _assert_cpu_conv_path_is_xlas_function(x, w, stride, dilation, pad, xla_inputs=()):
    """The Conv op on (x, w) with this geometry (uneven padding) takes its own path on CPU, whose forward
    runs XLA convolutions on inputs of exactly the shapes `xla_inputs` (none: no XLA convolution), and
    gives XLA's convolution's values and gradients."""
    import jax
    import jax.numpy as jnp

    from lancet.ops.nn import _xla_conv, conv

    attrs = {"strides": [stride] * 2, "dilations": [dilation] * 2, "pads": [pad, pad, pad + 1, pad]}

    class Ctx:
        node_name, num_outputs = "conv", 1

    fast = jax.jit(lambda x_, w_: conv([x_, w_], attrs, Ctx()))
    if jax.default_backend() == "cpu":
        assert _xla_conv_input_shapes(jax.make_jaxpr(fast)(x, w).jaxpr) == list(xla_inputs)
    reference = lambda x_, w_: _xla_conv(x_, w_, 1, (stride,) * 2, (dilation,) * 2, ((pad, pad + 1), (pad, pad)))  # noqa: E731
    want_out, want_vjp = jax.vjp(reference, x, w)
    got_out, got_vjp = jax.vjp(fast, x, w)
    np.testing.assert_allclose(got_out, want_out, atol=1e-5)
    cotangent = jnp.asarray(rand(*want_out.shape, seed=11))
    for got, want in zip(got_vjp(cotangent), want_vjp(cotangent)):
        np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("in_channels, out_channels, kernel, stride, dilation, pad", [
    (1, 6, 5, 1, 1, 0), (1, 4, 3, 2, 2, 1), (1, 3, 4, 3, 1, 2), (1, 30, 3, 1, 1, 1), (3, 16, 3, 1, 1, 1),
    (4, 5, 3, 2, 1, 1)])
def test_few_channel_conv_values_and_gradients_match_xla(in_channels, out_channels, kernel, stride, dilation,
                                                         pad):
    """A grey or small colour first layer (group 1, see FEW_CHANNELS) runs as shifted sums on CPU; its
    values and gradients (the input gradient as shifted sums for one channel up to SHIFTED_GRAD_TERMS
    terms, else XLA's) are XLA's convolution's."""
    import jax.numpy as jnp

    from lancet.ops.nn import FEW_CHANNELS, FEW_CHANNELS_TERMS, SHIFTED_GRAD_TERMS

    assert (out_channels * kernel * kernel > SHIFTED_GRAD_TERMS) == (out_channels == 30)
    x = jnp.asarray(rand(4, in_channels, 11, 10, seed=9))
    w = jnp.asarray(rand(out_channels, in_channels, kernel, kernel, seed=10))
    assert in_channels == 1 or (in_channels <= FEW_CHANNELS and w.size <= FEW_CHANNELS_TERMS)
    _assert_cpu_conv_path_is_xlas_function(x, w, stride, dilation, pad)


@pytest.mark.parametrize("size, kernel, stride, dilation, pad", [
    (2, 3, 1, 1, 1), (1, 3, 1, 1, 1), (3, 5, 1, 1, 2), (2, 2, 1, 2, 1), (3, 5, 2, 1, 2), (6, 1, 1, 1, 0),
    (5, 1, 1, 2, 1)])
def test_matrix_product_conv_matches_xla(size, kernel, stride, dilation, pad):
    """Inputs smaller than the kernel's reach and 1 x 1 stride-1 kernels take the matrix-product path
    (CPU); values and gradients are XLA's convolution's."""
    import jax.numpy as jnp

    x = jnp.asarray(rand(3, 5, size, size + 1, seed=12))
    w = jnp.asarray(rand(4, 5, kernel, kernel, seed=13))
    _assert_cpu_conv_path_is_xlas_function(x, w, stride, dilation, pad)


@pytest.mark.parametrize("in_channels", [5, 6, 7])
def test_channel_padded_conv_matches_xla(in_channels):
    """5-7 input channels run XLA's convolution on zero channels up to 8 (PAD_CHANNELS_TO) on CPU: XLA's
    convolution's values and gradients, the padding's gradient cut off."""
    import jax.numpy as jnp

    from lancet.ops.nn import PAD_CHANNELS_TO

    x = jnp.asarray(rand(3, in_channels, 9, 8, seed=14))
    w = jnp.asarray(rand(4, in_channels, 3, 3, seed=15))
    _assert_cpu_conv_path_is_xlas_function(x, w, 2, 1, 1, xla_inputs=[(3, PAD_CHANNELS_TO, 9, 8)])


@pytest.mark.parametrize("group, stride", [(1, 1), (4, 1), (4, 2)])
def test_one_channel_per_group_conv_gradients_match_xla(group, stride):
    """The CPU fast path (shifted sums; XLA gradients for group 1, its own for depthwise) is the same
    function as XLA's convolution, values and gradients, under jit and vmap."""
    import jax
    import jax.numpy as jnp

    from lancet.ops.nn import _xla_conv, conv

    x = jnp.asarray(rand(3, group, 9, 9, seed=4))
    w = jnp.asarray(rand(2 * group if group > 1 else 3, 1, 3, 3, seed=5))
    attrs = {"group": group, "strides": [stride, stride], "pads": [1, 1, 1, 1]}

    class Ctx:
        node_name, num_outputs = "conv", 1

    def fast(x_, w_):
        return conv([x_, w_], attrs, Ctx())

    def reference(x_, w_):
        return _xla_conv(x_, w_, group, (stride, stride), (1, 1), ((1, 1), (1, 1)))

    cotangent = jnp.asarray(rand(*reference(x, w).shape, seed=6))
    for f in (fast, jax.vmap(fast, in_axes=(None, 0))):
        ws = w if f is fast else jnp.stack([w, 2 * w])
        ref = reference if f is fast else jax.vmap(reference, in_axes=(None, 0))
        ct = cotangent if f is fast else jnp.stack([cotangent, cotangent])
        np.testing.assert_allclose(jax.jit(f)(x, ws), ref(x, ws), atol=1e-5)
        got = jax.jit(lambda x_, w_, c: jax.vjp(f, x_, w_)[1](c))(x, ws, ct)
        want = jax.vjp(ref, x, ws)[1](ct)
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, atol=1e-4)


SHAPED_CASES = {
    # name: (opset, input shape, nodes, initializers)
    "mish": (18, (2, 3, 5, 6), [helper.make_node("Mish", ["x"], ["y"])], {}),
    "celu": (12, (2, 3, 5, 6), [helper.make_node("Celu", ["x"], ["y"], alpha=0.7)], {}),
    "thresholded-relu": (10, (2, 3, 5, 6), [helper.make_node("ThresholdedRelu", ["x"], ["y"], alpha=0.3)], {}),
    "shrink": (9, (2, 3, 5, 6), [helper.make_node("Shrink", ["x"], ["y"], lambd=0.4, bias=0.1)], {}),
    "lrn-odd": (13, (2, 6, 5, 6), [helper.make_node("LRN", ["x"], ["y"], size=3, alpha=0.5, beta=0.6, bias=2.0)], {}),
    "lrn-5": (13, (2, 6, 5, 6), [helper.make_node("LRN", ["x"], ["y"], size=5)], {}),  # onnxruntime: odd only
    "depth-to-space-dcr": (13, (2, 8, 3, 4), [helper.make_node("DepthToSpace", ["x"], ["y"], blocksize=2)], {}),
    "depth-to-space-crd": (13, (2, 8, 3, 4),
                           [helper.make_node("DepthToSpace", ["x"], ["y"], blocksize=2, mode="CRD")], {}),
    "space-to-depth": (13, (2, 3, 4, 6), [helper.make_node("SpaceToDepth", ["x"], ["y"], blocksize=2)], {}),
    "gathernd": (13, (2, 3, 5, 6), [helper.make_node("GatherND", ["x", "i"], ["y"])],
                 {"i": np.array([[1, 2], [0, -1], [1, 0]], np.int64)}),
    "gathernd-batch": (13, (2, 3, 5, 6), [helper.make_node("GatherND", ["x", "i"], ["y"], batch_dims=1)],
                       {"i": np.array([[[2, 4], [0, -1]], [[1, 1], [2, 0]]], np.int64)}),
    # PyTorch's slice assignment (x[:, 0:2, 1] = ...): ScatterND with indices from shapes
    "scatternd": (13, (2, 3, 5, 6), [helper.make_node("Mul", ["x", "x"], ["sq"]),
                                     helper.make_node("Slice", ["sq", "s", "e", "a"], ["part"]),
                                     helper.make_node("ScatterND", ["x", "i", "part"], ["y"])],
                  {"i": np.array([[[1, 2]]], np.int64), "s": i64(1, 2), "e": i64(2, 3), "a": i64(0, 1)}),
    "scatternd-add": (16, (2, 3, 5, 6), [helper.make_node("Slice", ["x", "s", "e", "a"], ["part"]),
                                         helper.make_node("ScatterND", ["x", "i", "part"], ["y"], reduction="add")],
                      {"i": np.array([[1], [-2]], np.int64), "s": i64(0), "e": i64(2), "a": i64(0)}),
    "cumsum": (14, (2, 3, 5, 6), [helper.make_node("CumSum", ["x", "ax"], ["y"])], {"ax": i64(2)}),
    "cumsum-exclusive-reverse": (14, (2, 3, 5, 6), [helper.make_node("CumSum", ["x", "ax"], ["y"], exclusive=1,
                                                                     reverse=1)], {"ax": i64(-1)}),
    "topk-values-and-indices": (11, (2, 3, 5, 6), [helper.make_node("TopK", ["x", "k"], ["v", "idx"], axis=1),
                                                   helper.make_node("Cast", ["idx"], ["fi"], to=F),
                                                   helper.make_node("Add", ["v", "fi"], ["y"])], {"k": i64(2)}),
    "trigonometry": (9, (2, 3, 5, 6), [helper.make_node("Tanh", ["x"], ["t"]),  # into (-1, 1) for the inverses
                                       *[helper.make_node(op, ["t"], [op]) for op in
                                         ("Tan", "Asin", "Acos", "Atan", "Sinh", "Cosh", "Asinh", "Atanh")],
                                       helper.make_node("Cosh", ["x"], ["ch"]), helper.make_node("Acosh", ["ch"], ["ach"]),
                                       helper.make_node("Sum", ["Tan", "Asin", "Acos", "Atan", "Sinh", "Cosh", "Asinh",
                                                                "Atanh", "ach"], ["y"])], {}),
    "topk-smallest": (11, (2, 3, 5, 6), [helper.make_node("TopK", ["x", "k"], ["y", "idx"], largest=0)],
                      {"k": i64(4)}),
}


@pytest.mark.parametrize("name", sorted(SHAPED_CASES))
def test_more_ops_match_onnxruntime(name):
    """Ops PyTorch's exporters write for common modules (Mish, CELU, PixelShuffle, AdaptiveAvgPool2d to a size
    that does not divide the input: GatherND, slice assignment: ScatterND, torch.cumsum, torch.topk) and
    older graphs' LRN, under jit, and differentiable."""
    import jax
    import jax.numpy as jnp

    opset, shape, nodes, consts = SHAPED_CASES[name]
    model = make(nodes, [("x", shape)], opset, initializers=list(consts.items()))
    onnx.checker.check_model(model)
    compare(model, {"x": rand(*shape)})
    forward = Forward(model_from_proto(model))
    grad = jax.jit(jax.grad(lambda x: jnp.sum(forward.apply(forward.params, x)["y"] ** 2)))(jnp.asarray(rand(*shape)))
    assert np.all(np.isfinite(np.asarray(grad)))


RESIZE_GRID = [(mode, coordinates, rule, spec)
               for mode in ("nearest", "linear", "cubic")
               for coordinates in ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric",
                                   "tf_half_pixel_for_nn")
               for rule in (("round_prefer_floor", "round_prefer_ceil", "floor", "ceil") if mode == "nearest"
                            else ("round_prefer_floor",))
               for spec in (("scales", (1, 1, 0.5, 0.6)), ("sizes", (2, 3, 7, 4)))
               if not (mode != "nearest" and coordinates == "tf_half_pixel_for_nn")]


@pytest.mark.parametrize("mode, coordinates, rule, spec", RESIZE_GRID,
                         ids=[f"{m}-{c}-{r}-{s[0]}" for m, c, r, s in RESIZE_GRID])
def test_resize_matches_onnxruntime(mode, coordinates, rule, spec):
    """Resize's nearest, linear and cubic modes under every coordinate transformation and rounding rule, down
    by scales (0.6 of 6 columns: onnxruntime's float32 arithmetic picks the pixel) and up to sizes."""
    kind, values = spec
    inputs = ["x", "roi", "scales"] if kind == "scales" else ["x", "roi", "", "sizes"]
    consts = {"roi": np.zeros(0, np.float32),
              kind: np.array(values, np.float32 if kind == "scales" else np.int64)}
    node = helper.make_node("Resize", inputs, ["y"], mode=mode, coordinate_transformation_mode=coordinates,
                            nearest_mode=rule)
    compare(make([node], [("x", (2, 3, 5, 6))], 13, initializers=list(consts.items())), {"x": rand(2, 3, 5, 6)})


@pytest.mark.parametrize("coefficient, exclude_outside", [(-0.5, 0), (-0.75, 1), (-0.5, 1)])
def test_cubic_resize_options_match_onnxruntime(coefficient, exclude_outside):
    """Cubic with TensorFlow's coefficient (-0.5) and with the neighbours past the edge dropped."""
    consts = {"roi": np.zeros(0, np.float32), "sizes": np.array([2, 3, 9, 4], np.int64)}
    node = helper.make_node("Resize", ["x", "roi", "", "sizes"], ["y"], mode="cubic", cubic_coeff_a=coefficient,
                            exclude_outside=exclude_outside)
    compare(make([node], [("x", (2, 3, 5, 6))], 13, initializers=list(consts.items())), {"x": rand(2, 3, 5, 6)})


GRID_CASES = [(mode, padding, align) for mode in ("bilinear", "nearest", "bicubic")
              for padding in ("zeros", "border", "reflection")
              for align in (0, 1)]


@pytest.mark.parametrize("mode, padding, align", GRID_CASES, ids=[f"{m}-{p}-{a}" for m, p, a in GRID_CASES])
def test_grid_sample_matches_onnxruntime(mode, padding, align):
    """GridSample with grid points inside and up to 60 % past the edges (the padding rule decides those),
    grid read from the data as a spatial transformer's is; gradients reach the image and the grid."""
    import jax
    import jax.numpy as jnp

    node = helper.make_node("GridSample", ["x", "grid"], ["y"], mode=mode, padding_mode=padding, align_corners=align)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", F, [2, 3, 5, 6]),
                                            helper.make_tensor_value_info("grid", F, [2, 4, 7, 2])],
                              [helper.make_tensor_value_info("y", F, [2, 3, 4, 7])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)])
    model.ir_version = 8
    grid = np.random.default_rng(3).uniform(-1.6, 1.6, size=(2, 4, 7, 2)).astype(np.float32)
    compare(model, {"x": rand(2, 3, 5, 6), "grid": grid})
    forward = Forward(model_from_proto(model))
    grads = jax.grad(lambda x, g: jnp.sum(forward.apply(forward.params, {"x": x, "grid": g})["y"] ** 2), (0, 1))(
        jnp.asarray(rand(2, 3, 5, 6)), jnp.asarray(grid))
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads) and np.abs(np.asarray(grads[0])).max() > 0


ANTIALIAS_CASES = [(mode, exclude, coordinates, size) for mode in ("linear", "cubic") for exclude in (0, 1)
                   for coordinates in ("half_pixel", "align_corners", "asymmetric") for size in ((9, 10), (20, 13))]


@pytest.mark.parametrize("mode, exclude_outside, coordinates, size", ANTIALIAS_CASES,
                         ids=[f"{m}-x{e}-{c}-{s[0]}x{s[1]}" for m, e, c, s in ANTIALIAS_CASES])
def test_antialiased_resize_matches_onnxruntime(mode, exclude_outside, coordinates, size):
    """Opset 18's antialias (what PyTorch's interpolate(antialias=True) exports) down and up, both edge
    rules, every coordinate mode."""
    consts = {"sizes": np.array([2, 3, *size], np.int64)}
    node = helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], mode=mode, antialias=1,
                            exclude_outside=exclude_outside, coordinate_transformation_mode=coordinates,
                            cubic_coeff_a=-0.5)
    compare(make([node], [("x", (2, 3, 17, 23))], 18, initializers=list(consts.items())), {"x": rand(2, 3, 17, 23)})


@pytest.mark.parametrize("op, opset", [("Resize", 10), ("Upsample", 9)])
def test_old_resize_forms_match_onnxruntime(op, opset):
    for mode in ("nearest", "linear"):
        node = helper.make_node(op, ["x", "scales"], ["y"], mode=mode)
        model = make([node], [("x", (2, 3, 5, 6))], opset,
                     initializers=[("scales", np.array([1, 1, 2.0, 1.5], np.float32))])
        compare(model, {"x": rand(2, 3, 5, 6)})


ATTENTION_CASES = {
    # name: (attributes, Q shape, K shape, V shape, extra inputs {name: array}, outputs)
    "3d-grouped-heads": ({"q_num_heads": 4, "kv_num_heads": 2}, (2, 5, 16), (2, 6, 8), (2, 6, 12), {}, 1),
    "4d-causal-past": ({"is_causal": 1}, (2, 3, 4, 8), (2, 3, 4, 8), (2, 3, 4, 8),
                       {"past_key": rand(2, 3, 2, 8, seed=5), "past_value": rand(2, 3, 2, 8, seed=6)}, 3),
    "4d-bool-mask-scale-softcap": ({"scale": 0.3, "softcap": 2.0}, (1, 2, 4, 8), (1, 2, 5, 8), (1, 2, 5, 8),
                                   {"attn_mask": np.array([[1, 1, 0, 1, 0]] * 4, bool)}, 1),
    "4d-float-mask": ({}, (1, 2, 3, 4), (1, 2, 5, 4), (1, 2, 5, 4), {"attn_mask": rand(3, 5, seed=7)}, 1),
    "4d-nonpad-float-mask": ({}, (2, 2, 3, 4), (2, 2, 5, 4), (2, 2, 5, 4),
                             {"attn_mask": rand(3, 5, seed=8), "nonpad_kv_seqlen": np.array([2, 5], np.int64)}, 1),
    "3d-nonpad-causal": ({"is_causal": 1, "q_num_heads": 2, "kv_num_heads": 2}, (2, 3, 8), (2, 6, 8), (2, 6, 8),
                         {"nonpad_kv_seqlen": np.array([4, 6], np.int64)}, 1),
}


@pytest.mark.parametrize("name", sorted(ATTENTION_CASES))
def test_attention_matches_onnxruntime(name):
    """The standard Attention op (opset 23, PyTorch's export of nn.MultiheadAttention at that opset): grouped
    key/value heads, 3-D inputs, causal masking after a past key and value, boolean and float masks, scale
    and softcap, the present key and value outputs; opset 24's nonpad_kv_seqlen (keys per input), also causal
    (each input's queries end at its last valid key)."""
    attrs, q_shape, k_shape, v_shape, extra, n_out = ATTENTION_CASES[name]
    slots = ["Q", "K", "V", "attn_mask", "past_key", "past_value", "nonpad_kv_seqlen"]
    names = [s if s in ("Q", "K", "V") or s in extra else "" for s in slots]
    while names and not names[-1]:
        names.pop()
    node = helper.make_node("Attention", names, [f"y{i}" for i in range(n_out)] if n_out > 1 else ["y"], **attrs)
    inits = [(k, v) for k, v in extra.items()]
    opset = 24 if "nonpad_kv_seqlen" in extra else 23
    model = make([node], [("Q", q_shape), ("K", k_shape), ("V", v_shape)], opset, inits, n_outputs=n_out)
    compare(model, {"Q": rand(*q_shape, seed=1), "K": rand(*k_shape, seed=2), "V": rand(*v_shape, seed=3)})


def test_group_and_rms_normalization_match_onnxruntime():
    """GroupNormalization (opset 21: per-channel scale; the checker refuses the per-group form of opset 18) and
    RMSNormalization (opset 23), as PyTorch exports nn.GroupNorm and nn.RMSNorm at opset 23."""
    groups, channels, opset = 2, 6, 21
    scale = rand(channels, seed=4) + 1.5
    nodes = [helper.make_node("GroupNormalization", ["x", "s", "b"], ["y"], num_groups=groups, epsilon=1e-3)]
    model = make(nodes, [("x", (2, channels, 3, 4))], opset, [("s", scale), ("b", rand(scale.size, seed=5))],
                 out_shape=[2, channels, 3, 4])
    compare(model, {"x": rand(2, channels, 3, 4)})
    rms = make([helper.make_node("RMSNormalization", ["x", "s"], ["y"], axis=-2, epsilon=1e-4)], [("x", (2, 3, 4))], 23,
               [("s", rand(3, 4, seed=6))], out_shape=[2, 3, 4])
    compare(rms, {"x": rand(2, 3, 4)})


@pytest.mark.parametrize("kernel, strides, pads", [([2, 2], [2, 2], [0, 0, 0, 0]), ([3, 3], [2, 2], [1, 1, 1, 1]),
                                                   ([3, 3], [1, 1], [0, 0, 0, 0])])
def test_max_pool_indices_and_max_unpool_match_onnxruntime(kernel, strides, pads):
    """MaxPool's Indices output (flat row-major indices of each window's first maximum, ties included) and
    MaxUnpool scattering the pooled values back, with padding and overlapping windows."""
    shape = [2, 3, 7, 8]
    pooled = [2, 3] + [(shape[2 + a] + pads[a] + pads[a + 2] - kernel[a]) // strides[a] + 1 for a in range(2)]
    attrs = {"kernel_shape": kernel, "strides": strides, "pads": pads}
    nodes = [helper.make_node("MaxPool", ["x"], ["y0", "i"], **attrs),
             helper.make_node("MaxUnpool", ["y0", "i", "s"], ["y1"], **attrs),
             helper.make_node("Cast", ["i"], ["y2"], to=F)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, shape)],
                              [helper.make_tensor_value_info("y0", F, pooled), helper.make_tensor_value_info("y1", F, shape),
                               helper.make_tensor_value_info("y2", F, pooled)],
                              initializer=[numpy_helper.from_array(np.array(shape, np.int64), "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    x = rand(*shape)
    x[0, 0, 0, :4] = 1.0  # ties within a window
    compare(model, {"x": x}, atol=0.0)


@pytest.mark.parametrize("shape, kernel, strides, pads", [([2, 3, 9], [3], [2], [1, 1]),
                                                          ([2, 3, 7, 8], [3, 3], [2, 2], [1, 1, 1, 1]),
                                                          ([2, 2, 5, 6, 7], [2, 3, 2], [2, 1, 2], [0, 1, 0, 0, 1, 1])])
def test_max_pool_column_major_indices_match_onnxruntime(shape, kernel, strides, pads):
    """MaxPool's Indices with storage_order=1: each window's first maximum counted column-major within its
    (n, c) plane (the first spatial axis fastest), for one, two and three spatial axes."""
    rank = len(kernel)
    pooled = shape[:2] + [(shape[2 + a] + pads[a] + pads[a + rank] - kernel[a]) // strides[a] + 1 for a in range(rank)]
    nodes = [helper.make_node("MaxPool", ["x"], ["y0", "i"], kernel_shape=kernel, strides=strides, pads=pads,
                              storage_order=1),
             helper.make_node("Cast", ["i"], ["y1"], to=F)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, shape)],
                              [helper.make_tensor_value_info(name, F, pooled) for name in ("y0", "y1")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    compare(model, {"x": rand(*shape)}, atol=0.0)


@pytest.mark.parametrize("block, strides, dilations, pads", [([3, 3], [2, 2], [1, 1], [1, 1, 1, 1]),
                                                             ([2, 3], [1, 2], [2, 1], [0, 1, 0, 1])])
def test_col2im_matches_onnxruntime(block, strides, dilations, pads):
    """Col2Im (PyTorch's nn.Fold): overlapping blocks summed back, with strides, dilations and padding."""
    image = [9, 8]
    positions = [(image[a] + pads[a] + pads[a + 2] - dilations[a] * (block[a] - 1) - 1) // strides[a] + 1
                 for a in range(2)]
    shape = [2, 3 * block[0] * block[1], positions[0] * positions[1]]
    node = helper.make_node("Col2Im", ["x", "image", "block"], ["y"], strides=strides, dilations=dilations, pads=pads)
    model = make([node], [("x", shape)], 18, [("image", i64(*image)), ("block", i64(*block))], out_shape=[2, 3, *image])
    compare(model, {"x": rand(*shape)})


@pytest.mark.parametrize("direction", [0, 1])
def test_scan_matches_onnxruntime(direction):
    """Scan, unrolled: a tanh recurrence over axis 1 of a [batch, time, features] input, its weights read
    from the outer graph (weight-neuron layers, as a Loop's), forwards or backwards; the final state and
    the stacked outputs equal onnxruntime, and the weights get gradients."""
    import jax
    import jax.numpy as jnp

    from lancet.neurons import find_layers

    body = helper.make_graph(
        [helper.make_node("MatMul", ["h", "R"], ["hr"]), helper.make_node("MatMul", ["xt", "W"], ["xw"]),
         helper.make_node("Add", ["hr", "xw"], ["z"]), helper.make_node("Tanh", ["z"], ["h_out"]),
         helper.make_node("Identity", ["h_out"], ["y_t"])], "body",
        [helper.make_tensor_value_info("h", F, [2, 4]), helper.make_tensor_value_info("xt", F, [2, 3])],
        [helper.make_tensor_value_info("h_out", F, [2, 4]), helper.make_tensor_value_info("y_t", F, [2, 4])])
    node = helper.make_node("Scan", ["h0", "x"], ["y0", "y1"], body=body, num_scan_inputs=1,
                            scan_input_axes=[1], scan_output_axes=[1], scan_input_directions=[direction],
                            scan_output_directions=[direction])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("h0", F, [2, 4]),
                                            helper.make_tensor_value_info("x", F, [2, 5, 3])],
                              [helper.make_tensor_value_info("y0", F, [2, 4]), helper.make_tensor_value_info("y1", F, [2, 5, 4])],
                              initializer=[numpy_helper.from_array(rand(4, 4, seed=7) * 0.5, "R"),
                                           numpy_helper.from_array(rand(3, 4, seed=8), "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)])
    model.ir_version = 8
    feeds = {"h0": rand(2, 4, seed=1), "x": rand(2, 5, 3, seed=2)}
    compare(model, feeds)
    loaded = model_from_proto(model)
    assert {layer.weight for layer in find_layers(loaded, weight_only=True)} == {"R", "W"}
    forward = Forward(loaded)
    grads = jax.grad(lambda p: jnp.sum(forward.apply(p, feeds)["y1"] ** 2))(forward.params)
    assert all(np.abs(np.asarray(grads[name])).max() > 0 for name in ("R", "W"))
