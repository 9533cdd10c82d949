"""The fused Conv -> Relu -> MaxPool (CPU shifted-sum convolutions): where it applies, and that it is the
unfused chain's function, values bit for bit and gradients, and onnxruntime's."""
from __future__ import annotations

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from onnx import helper

from lancet import Edit, Forward
from lancet.loader import model_from_proto
from lancet.ops.fused import ConvReluPool, find_conv_relu_pools
from lancet.runtime import ort_session

from .conftest import max_diff
from .test_ops import make, rand

CPU = jax.default_backend() == "cpu"


def chain_model(channels, out_channels, kernel, size, conv_attrs, pool_attrs, bias=True, extra_reader=False):
    """Conv -> Relu -> MaxPool on a (2, channels, height, width) input (`size`); with `extra_reader` the Conv output
    is also added to the graph output's sum (a second reader: no fusion)."""
    weights = [("w", rand(out_channels, channels, kernel, kernel, seed=1))]
    if bias:
        weights.append(("b", rand(out_channels, seed=2)))
    nodes = [helper.make_node("Conv", ["x", *(name for name, _ in weights)], ["c"], **conv_attrs),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["p" if extra_reader else "y"], **pool_attrs)]
    if extra_reader:
        nodes += [helper.make_node("ReduceMax", ["c"], ["m"], keepdims=1),
                  helper.make_node("Add", ["p", "m"], ["y"])]
    return make(nodes, [("x", (2, channels, *size))], 13, weights)


GEOMETRIES = {  # (channels, out channels, kernel, (height, width), conv attrs, pool attrs, bias)
    "lenet-conv1": (1, 6, 5, (28, 29), {}, {"kernel_shape": [2, 2], "strides": [2, 2]}, True),
    "vgg-stem": (3, 16, 3, (12, 14), {"pads": [1, 1, 1, 1]}, {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1}, True),
    "strided-dilated-pool3": (1, 4, 3, (23, 24), {"strides": [2, 2], "dilations": [2, 2], "pads": [1, 2, 0, 1]},
                              {"kernel_shape": [3, 3], "strides": [3, 3]}, False),
    "two-channels-odd": (2, 3, 2, (9, 10), {"pads": [0, 1, 1, 0]}, {"kernel_shape": [2, 2], "strides": [2, 2]}, True),
}


def _shapes(jaxpr) -> set[tuple[int, ...]]:
    """Every array shape a jaxpr (and the jaxprs inside it) computes."""
    found = {tuple(v.aval.shape) for equation in jaxpr.eqns for v in equation.outvars}
    for sub in jax.extend.core.subjaxprs(jaxpr):
        found |= _shapes(sub)
    return found


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_fused_chain_is_the_unfused_function(name):
    channels, out_channels, kernel, size, conv_attrs, pool_attrs, bias = GEOMETRIES[name]
    proto = chain_model(channels, out_channels, kernel, size, conv_attrs, pool_attrs, bias)
    model = model_from_proto(proto)
    assert find_conv_relu_pools(model, model.nodes) == {0: ConvReluPool(0, 1, 2)}
    forward = Forward(model)
    x = jnp.asarray(rand(2, channels, *size, seed=3))

    def fused(params, x_):
        return forward.apply(params, x_)["y"]

    def unfused(params, x_):  # a tap on the Relu output keeps the chain apart
        return forward.apply(params, x_, taps=("r",))["y"]

    conv_shape = tuple(forward(x, taps=("c",))["c"].shape)
    if CPU:  # fused: the convolution's full-resolution output is never formed
        assert conv_shape not in _shapes(jax.make_jaxpr(fused)(forward.params, x).jaxpr)
    assert conv_shape in _shapes(jax.make_jaxpr(unfused)(forward.params, x).jaxpr)
    got, want = fused(forward.params, x), unfused(forward.params, x)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert max_diff(got, ort_session(proto.SerializeToString()).run(None, {"x": np.asarray(x)})[0]) <= 1e-5
    cotangent = jnp.asarray(rand(*got.shape, seed=4))
    for a, b in zip(jax.vjp(jax.jit(fused), forward.params, x)[1](cotangent),
                    jax.vjp(jax.jit(unfused), forward.params, x)[1](cotangent)):
        for leaf_a, leaf_b in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_allclose(leaf_a, leaf_b, atol=1e-5)


def test_chains_not_fused_where_they_must_not_be():
    """A second reader of the Conv output, overlapping or remainder-leaving pools, and edits of the hidden
    tensors all run the ops one by one, and agree with onnxruntime."""
    lenet = GEOMETRIES["lenet-conv1"]
    shared = model_from_proto(chain_model(*lenet[:6], extra_reader=True))
    assert find_conv_relu_pools(shared, shared.nodes) == {}
    x = rand(2, 1, 28, 29, seed=5)
    for pool in ({"kernel_shape": [3, 3], "strides": [2, 2]}, {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1}):
        proto = chain_model(1, 6, 5, (28, 29), {}, pool)  # 24 x 25 conv output: ceil mode leaves a partial window
        forward = Forward(model_from_proto(proto))
        conv_shape = (2, 6, 24, 25)
        if CPU:
            assert conv_shape in _shapes(jax.make_jaxpr(lambda p, x_: forward.apply(p, x_)["y"])(forward.params, x).jaxpr)
        assert max_diff(forward.logits(x), ort_session(proto.SerializeToString()).run(None, {"x": x})[0]) <= 1e-5
    forward = Forward(model_from_proto(chain_model(*lenet[:6])))
    scale = jnp.asarray(np.array([1, 0, 1, -1, 1, 1], np.float32))
    edited = forward(x, edits={"c": Edit(scale=scale)})["y"]
    params = {**forward.params, "w": forward.params["w"] * scale[:, None, None, None],
              "b": forward.params["b"] * scale}
    assert max_diff(edited, forward(x, params=params)["y"]) <= 1e-5
    assert max_diff(edited, forward(x)["y"]) > 1e-3
