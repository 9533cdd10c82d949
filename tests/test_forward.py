"""The forward pass is jittable, differentiable in params and intermediates, and taps/edits work."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lancet import Edit, Forward, load_model
from lancet.neurons import find_layers

from .conftest import max_diff


@pytest.fixture(scope="module")
def lenet(backdoor_case):
    model = load_model(backdoor_case.model)
    return model, Forward(model), np.load(backdoor_case.case)["x_clean"][:16]


def test_layers_found(lenet):
    model, _, _ = lenet
    layers = find_layers(model)
    assert [layer.op_type for layer in layers] == ["Conv", "Conv", "Gemm", "Gemm", "Gemm"]
    assert [layer.channels for layer in layers] == [6, 16, 120, 84, 10]
    assert [layer.channel_axis for layer in layers] == [1, 1, -1, -1, -1]


def test_taps_return_intermediates(lenet):
    model, forward, x = lenet
    layers = find_layers(model)
    out = forward(x, taps=[layers[0].name, layers[2].name])
    assert out[layers[0].name].shape == (16, 6, 24, 24)
    assert out[layers[2].name].shape == (16, 120)
    with pytest.raises(Exception, match="no tensor named"):
        forward(x, taps=["not-a-tensor"])


def test_channel_ablation_equals_zeroed_parameters(lenet):
    model, forward, x = lenet
    layer = find_layers(model)[1]
    scale = np.ones(layer.channels, np.float32)
    scale[[3, 7]] = 0
    edited = forward.logits(x, edits={layer.name: Edit(scale=jnp.asarray(scale))})
    params = dict(forward.params)
    params[layer.weight] = params[layer.weight].at[jnp.array([3, 7])].set(0)
    params[layer.bias] = params[layer.bias].at[jnp.array([3, 7])].set(0)
    assert max_diff(edited, forward.logits(x, params=params)) <= 1e-5
    assert max_diff(edited, forward.logits(x)) > 1e-3


def test_edit_values_do_not_retrace(lenet):
    model, forward, x = lenet
    layer = find_layers(model)[2]
    forward.logits(x)
    own = forward._own_weights()[0]  # the own-weights forward (params=None)
    before = own._cache_size(), forward._jitted._cache_size()
    for k in range(3):
        scale = jnp.ones(layer.channels).at[k].set(0)
        forward.logits(x, edits={layer.name: Edit(scale=scale)})
        forward.logits(x, edits={layer.name: Edit(scale=scale)}, params=dict(forward.params))
    assert own._cache_size() - before[0] <= 1 and forward._jitted._cache_size() - before[1] <= 1


def test_own_weights_forward_is_the_forward_with_params(lenet):
    """params=None runs a forward with the XLA-path conv kernels closed over as constants (CPU): the same
    values as passing the weights, and it follows a replaced weight."""
    model, _, x = lenet
    forward = Forward(model)
    layer = find_layers(model)[1]  # conv2: 6 input channels, XLA's path
    given = dict(forward.params)  # another dict: the params path (the own dict itself takes the own path)
    np.testing.assert_array_equal(np.asarray(forward.logits(x)), np.asarray(forward.logits(x, params=given)))
    assert forward._jitted._cache_size() >= 1
    if jax.default_backend() == "cpu":
        assert set(forward._own[2]) == {layer.weight}
    forward.params[layer.weight] = -forward.params[layer.weight]
    flipped = dict(forward.params)
    assert max_diff(forward.logits(x), forward.logits(x, params=flipped)) == 0.0
    forward.params[layer.weight] = -forward.params[layer.weight]
    assert max_diff(forward.logits(x), forward.logits(x, params=flipped)) > 1e-3


def test_gradient_wrt_params_matches_finite_difference(lenet):
    model, forward, x = lenet
    layer = find_layers(model)[2]

    def loss(params):
        return jnp.sum(forward.logits(x, params=params)[:, 3])

    grads = jax.jit(jax.grad(loss))(forward.params)
    assert set(grads) == set(forward.params)
    index = (5, 100)
    eps = 1e-2
    bumped = dict(forward.params)
    bumped[layer.weight] = bumped[layer.weight].at[index].add(eps)
    lowered = dict(forward.params)
    lowered[layer.weight] = lowered[layer.weight].at[index].add(-eps)
    numeric = (loss(bumped) - loss(lowered)) / (2 * eps)
    assert abs(float(grads[layer.weight][index]) - float(numeric)) <= 1e-2 * max(1.0, abs(float(numeric)))


def test_gradient_wrt_intermediate_via_shift(lenet):
    model, forward, x = lenet
    layer = find_layers(model)[1]
    shape = forward(x, taps=[layer.name])[layer.name].shape

    def loss(shift):
        return jnp.sum(forward.logits(x, edits={layer.name: Edit(shift=shift)})[:, 0])

    grad = jax.grad(loss)(jnp.zeros(shape))
    assert grad.shape == shape and float(jnp.abs(grad).sum()) > 0
    # One element at a time: a random direction over the whole tensor crosses ReLU/max-pool kinks.
    flat = np.argsort(-np.abs(np.asarray(grad)).reshape(-1))[:3]
    for index in flat:
        direction = jnp.zeros(grad.size).at[index].set(1.0).reshape(shape)
        eps = 1e-2
        numeric = (loss(eps * direction) - loss(-eps * direction)) / (2 * eps)
        assert abs(float(grad.reshape(-1)[index]) - float(numeric)) <= 2e-2 * max(1.0, abs(float(numeric)))


def test_batch_shapes_and_predict(lenet):
    model, forward, x = lenet
    full = forward.predict(np.concatenate([x] * 20), batch_size=64)
    assert full.shape == (320,)
    assert np.array_equal(full[:16], np.asarray(jnp.argmax(forward.logits(x), -1)))


def test_allocator_tuning_is_on_by_default_and_can_be_turned_off():
    """`Forward` raises glibc's malloc thresholds once per process (engine/allocator.py) unless
    LANCET_MALLOC_TUNING=0; elsewhere than glibc it does nothing."""
    import os
    import platform
    import subprocess
    import sys

    code = "from lancet.allocator import tune_allocator; print(tune_allocator(), tune_allocator())"
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    for setting, expected in (("1", glibc), ("0", False)):
        env = {**os.environ, "LANCET_MALLOC_TUNING": setting}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.split() == [str(expected)] * 2


def _fixed_batch_graph(batch: int, hard_coded: bool):
    """Conv -> Relu -> (Reshape to [batch, -1] | Flatten) -> Gemm, the file's input batch fixed at `batch`:
    what torch.onnx.export writes without a dynamic axis for `x.view(x.size(0), -1)` (or `flatten`)."""
    from onnx import TensorProto, helper, numpy_helper

    from lancet.loader import model_from_proto

    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.normal(size=(3, 2, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(size=(4, 27)).astype(np.float32), "fc"),
             numpy_helper.from_array(np.array([batch, -1], np.int64), "shape")]
    flat = (helper.make_node("Reshape", ["r", "shape"], ["f"]) if hard_coded
            else helper.make_node("Flatten", ["r"], ["f"]))
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Relu", ["c"], ["r"]), flat,
             helper.make_node("Gemm", ["f", "fc"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 2, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4])],
                              initializer=inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return proto, model_from_proto(proto)


@pytest.mark.parametrize("batch", [1, 2])
def test_fixed_batch_graph_runs_on_any_batch(batch):
    """A graph that hard-codes its file's batch runs on any number of inputs (vmapped over groups of it):
    outputs equal onnxruntime's, one group at a time; taps keep one batch axis; per-input edits and input
    gradients equal those of the same graph with a free batch."""
    from lancet.forward import hard_codes_batch, static_batch
    from lancet.runtime import ort_session

    proto, fixed = _fixed_batch_graph(batch, hard_coded=True)
    _, free = _fixed_batch_graph(batch, hard_coded=False)
    assert static_batch(fixed) == static_batch(free) == batch
    assert hard_codes_batch(fixed) and not hard_codes_batch(free)
    from lancet.neurons import summary  # what `lancet inspect` says

    assert summary(fixed)["batch"] == {"fixed": batch, "hard_coded": True, "coupled_by": None}
    assert summary(free)["batch"] == {"fixed": batch, "hard_coded": False, "coupled_by": None}
    x = np.random.default_rng(2).normal(size=(7, 2, 5, 5)).astype(np.float32)  # 7: not a multiple of 2
    session = ort_session(proto.SerializeToString())
    padded = np.concatenate([x, np.zeros(((batch - 7 % batch) % batch, 2, 5, 5), np.float32)])
    expected = np.concatenate([session.run(None, {"x": padded[i:i + batch]})[0]
                               for i in range(0, len(padded), batch)])[:7]
    forward, twin = Forward(fixed), Forward(free)
    out = forward(x, taps=("r",))
    assert max_diff(out["y"], expected) < 1e-4 and out["r"].shape == (7, 3, 3, 3)
    shift = np.random.default_rng(3).normal(size=(7, 3, 3, 3)).astype(np.float32)
    assert max_diff(forward.logits(x, edits={"r": Edit(shift=shift)}),
                    twin.logits(x, edits={"r": Edit(shift=shift)})) < 1e-4

    def input_grad(fw):
        return jax.jit(jax.grad(lambda v: jnp.sum(fw.apply(fw.params, v)["y"] ** 2)))(jnp.asarray(x))

    assert max_diff(input_grad(forward), input_grad(twin)) < 1e-3
