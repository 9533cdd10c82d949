"""QDQ-quantized models (onnxruntime.quantization's default format for deployment): int8 weights behind
DequantizeLinear, activations through QuantizeLinear/DequantizeLinear pairs."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lancet import Forward, load_model
from lancet.evaluate import OrtPredictor
from lancet.loader import model_from_proto
from lancet.runtime import ort_session

from .conftest import assert_backdoor_removed, max_diff


@pytest.fixture(scope="module", params=[False, True], ids=["per-tensor", "per-channel"])
def quantized_lenet(request, backdoor_case, tmp_path_factory):
    """The test LeNet-5 (BadNets on MNIST digits) quantized statically by onnxruntime (converters.quantize):
    uint8 activations, int8 weights, calibrated on 128 of the defender's clean images."""
    from lancet.converters.quantize import quantize_qdq

    path = tmp_path_factory.mktemp("quantized") / f"lenet-qdq-{request.param}.onnx"
    return quantize_qdq(backdoor_case.model, path, np.load(backdoor_case.case)["x_clean"][:128],
                        per_channel=request.param)


def test_quantized_model_runs_as_onnxruntime_does(quantized_lenet, backdoor_case):
    """Each weight's and bias's DequantizeLinear is folded into a float parameter (layers found as in the
    float file); the engine equals onnxruntime with graph optimisations off (its QDQ nodes in float) to
    1e-5, and agrees on the labels with its fused integer kernels (which round a few activations a step
    apart)."""
    model = load_model(quantized_lenet)
    assert len(model.quantized) == 10 and all(q.dtype in (np.int8, np.int32) for q in model.quantized.values())
    from lancet.neurons import summary

    assert summary(model)["quantization"] == "qdq"
    from lancet.neurons import find_layers

    assert [layer.op_type for layer in find_layers(model)] == ["Conv", "Conv", "Gemm", "Gemm", "Gemm"]
    x = np.load(backdoor_case.heldout)["x_test"][:300]
    got = np.asarray(Forward(model).logits(x))
    assert max_diff(got, OrtPredictor(model, quantized_lenet, optimize=False).logits(x)) <= 1e-5
    deployed = OrtPredictor(model, quantized_lenet).logits(x)
    assert np.mean(deployed.argmax(1) == got.argmax(1)) >= 0.99


@pytest.mark.parametrize("method", ["finetune", "flip"])
def test_quantized_model_repaired_in_its_integers(quantized_lenet, backdoor_case, method, tmp_path):
    """The repair is judged on weights rounded to their int8 steps and written as int8 into the same
    initializers (scales, zero points, node list untouched); the written file, run by onnxruntime as
    deployed, has lost the backdoor on held-out data (measured on an AVX-512 EPYC: ASR 99.8 -> 0.0-0.8 %,
    accuracy 95.4-95.5 -> 95.1-95.8 %)."""
    from lancet.repair import repair

    out = tmp_path / f"{method}.onnx"
    result = repair(quantized_lenet, backdoor_case.case, out, method=method, progress=False)
    assert result.written, result.reasons
    assert result.details["parity_max_abs_diff"] <= 1e-4
    model = load_model(quantized_lenet)
    if method == "flip":  # weight neurons name the integer initializer that stores them
        assert all(ein["stored_in"] == model.quantized[ein["initializer"]].source for ein in result.eins)
    changed = assert_backdoor_removed(dict(np.load(backdoor_case.heldout)), quantized_lenet, out)
    assert changed and all(name.endswith("_quantized") for name in changed), sorted(changed)
    assert all(after.dtype == before.dtype for before, after in changed.values())
    assert {name: int(np.sum(after != before)) for name, (before, after) in changed.items()} == \
        {name: count for name, count in result.changed_parameters.items() if count}


def _fake_quantized_square(shape: tuple[int, ...], consts: dict, attrs: dict, opset: int) -> onnx.ModelProto:
    """x * x through QuantizeLinear and DequantizeLinear with `consts` scale and zero point and `attrs`."""
    nodes = [helper.make_node("Mul", ["x", "x"], ["sq"]),
             helper.make_node("QuantizeLinear", ["sq", "scale", "zero"], ["q"], **attrs),
             helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["y"], **attrs)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))],
                              initializer=[numpy_helper.from_array(v, k) for k, v in consts.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 8 if opset < 21 else 10
    return proto


@pytest.mark.parametrize("zero_type, axis", [(np.uint8, None), (np.int8, 1), (np.int8, 0)])
def test_quantize_dequantize_ops_match_onnxruntime(zero_type, axis):
    """Fake quantization of a computed tensor, per tensor or per axis: equal to onnxruntime (graph
    optimisations off); the rounding passes its gradient straight through."""
    import jax
    import jax.numpy as jnp

    shape = (2, 3, 4, 5)
    count = 1 if axis is None else shape[axis]
    consts = {"scale": np.linspace(0.02, 0.05, count).astype(np.float32).reshape(() if axis is None else (count,)),
              "zero": np.full(() if axis is None else (count,), 3, zero_type)}
    proto = _fake_quantized_square(shape, consts, {} if axis is None else {"axis": axis}, opset=13)
    x = np.random.default_rng(0).normal(scale=1.5, size=shape).astype(np.float32)
    expected = ort_session(proto.SerializeToString(), optimize=False).run(None, {"x": x})[0]
    forward = Forward(model_from_proto(proto))
    assert max_diff(forward({"x": x})["y"], expected) <= 1e-6
    grad = jax.grad(lambda v: jnp.sum(forward.apply(forward.params, v)["y"]))(jnp.asarray(x))
    assert np.abs(np.asarray(grad)).max() > 0  # straight through, not round's zero gradient


@pytest.mark.parametrize("zero_type, axis, block", [("int4", 3, 2), ("uint4", 1, 2), ("int8", 2, 3)])
def test_blocked_quantize_dequantize_match_onnxruntime(zero_type, axis, block):
    """Opset 21's blocked quantization (a scale and zero point per `block` elements along `axis`, the last
    block short where the axis does not divide) to 4 and 8-bit integers: equal to onnxruntime."""
    import ml_dtypes

    dtype = {"int4": ml_dtypes.int4, "uint4": ml_dtypes.uint4, "int8": np.int8}[zero_type]
    shape = (2, 3, 4, 5)
    blocks = list(shape)
    blocks[axis] = -(-shape[axis] // block)
    consts = {"scale": np.linspace(0.1, 0.3, int(np.prod(blocks))).astype(np.float32).reshape(blocks),
              "zero": np.full(blocks, 1, dtype)}
    proto = _fake_quantized_square(shape, consts, {"axis": axis, "block_size": block}, opset=21)
    x = np.random.default_rng(0).normal(scale=0.8, size=shape).astype(np.float32)
    expected = ort_session(proto.SerializeToString(), optimize=False).run(None, {"x": x})[0]
    assert max_diff(Forward(model_from_proto(proto))({"x": x})["y"], expected) <= 1e-6


@pytest.mark.parametrize("fmt, ops", [("qdq", {"QuantizeLinear", "DequantizeLinear"}),
                                      ("qoperator", {"QLinearConv", "QGemm"}),
                                      ("dynamic", {"DynamicQuantizeLinear", "ConvInteger", "MatMulInteger"})])
def test_recipe_builds_a_quantized_model(fmt, ops):
    """Recipe(quantize=...) trains the float model and quantizes it in that format (static formats calibrated
    on training images), under its own cache name; the recipes without it keep their cache keys."""
    pytest.importorskip("torch")
    from lancet.models.recipes import Recipe, build_case

    assert Recipe().key() == Recipe(quantize="none").key() != Recipe(quantize=fmt).key()
    built = build_case(Recipe(quantize=fmt))
    assert f"-{fmt}-" in built.model.parent.name
    model = load_model(built.model)
    assert model.is_quantized and ops <= {n.op_type for n in model.nodes}
    heldout = np.load(built.heldout)
    labels = OrtPredictor(model, built.model).predict(heldout["x_test"])
    assert np.mean(labels == heldout["y_test"]) > 0.9


# Dynamic quantization (onnxruntime's quantize_dynamic): int8 weights read by ConvInteger / MatMulInteger,
# activations quantized over their own range at run time (DynamicQuantizeLinear).

@pytest.fixture(scope="module", params=[False, True], ids=["per-tensor", "per-column"])
def dynamic_lenet(request, backdoor_case, tmp_path_factory):
    """The test LeNet-5 dynamically quantized by onnxruntime (converters.quantize): its convolutions become
    ConvInteger, its Gemm layers MatMulInteger, weights int8 per tensor or (dense layers) per column."""
    from lancet.converters.quantize import quantize_dynamic_int8

    path = tmp_path_factory.mktemp("dynamic") / f"lenet-dynamic-{request.param}.onnx"
    return quantize_dynamic_int8(backdoor_case.model, path, np.load(backdoor_case.case)["x_clean"][:128],
                                 per_channel=request.param)


def test_dynamic_quantized_model_runs_as_onnxruntime_does(dynamic_lenet, backdoor_case):
    """Each integer weight becomes a float parameter ((q - zero point) x its scale, found in the Mul that
    rescales the layer's result), so the layers are found with their biases; each input is computed alone
    (its ranges its own, the same in any batch) and equals onnxruntime run on it alone to 1e-4 of the
    logits' scale but for a few inputs with an activation one rounding step away (surgery.STEP_APART_SHARE);
    onnxruntime as deployed computes as written. On a batch onnxruntime quantizes the inputs together."""
    from lancet.neurons import find_layers

    model = load_model(dynamic_lenet)
    assert model.per_input_ranges and model.is_quantized
    from lancet.neurons import summary

    assert summary(model)["quantization"] == "dynamic"
    assert sorted(q.source for q in model.quantized.values()) == sorted(model.quantized)  # own names
    layers = find_layers(model)
    assert [layer.op_type for layer in layers] == ["ConvInteger"] * 2 + ["MatMulInteger"] * 3
    assert all(layer.bias for layer in layers[2:])
    x = np.load(backdoor_case.heldout)["x_test"][:200]
    forward = Forward(model)
    got = np.asarray(forward.logits(x))
    written = OrtPredictor(model, dynamic_lenet, optimize=False).logits(x)  # one input at a time
    scale = max(1.0, float(np.abs(written).max()))
    apart = np.max(np.abs(got - written), axis=1) > 1e-4 * scale  # an activation a rounding step away
    assert np.mean(apart) <= 0.02 and max_diff(got, written) <= 1e-2 * scale
    assert np.mean(got.argmax(1) == written.argmax(1)) >= 0.99
    assert max_diff(OrtPredictor(model, dynamic_lenet).logits(x), written) <= 1e-4 * scale
    assert max_diff(np.asarray(forward.logits(x[:7])), got[:7]) <= 1e-6
    together = ort_session(dynamic_lenet).run(None, {model.input.name: x[:64]})[0]
    assert max_diff(together, written[:64]) > 1e-3


def test_dynamic_quantized_model_repaired_in_its_integers(dynamic_lenet, backdoor_case, request, tmp_path):
    """Fine-tuning and flip on the dynamically quantized LeNet write int8 values into the weights'
    initializers only; onnxruntime, each input run alone, sees the backdoor gone on held-out data
    (measured on an AVX-512 EPYC, ASR 99.8 % before: per tensor fine-tuned 1.6 % at 95.6 -> 94.4 %
    accuracy, flipped 0.2 % at 94.4 %; per column fine-tuned 0.1 % at 95.7 -> 95.9 %, flipped 0.2 % at
    94.5 %; the test runs one method per variant)."""
    from lancet.repair import repair

    method = "finetune" if "per-tensor" in request.node.callspec.id else "flip"  # one repair per variant
    out = tmp_path / f"{method}.onnx"
    result = repair(dynamic_lenet, backdoor_case.case, out, method=method, progress=False)
    assert result.written, result.reasons
    changed = assert_backdoor_removed(dict(np.load(backdoor_case.heldout)), dynamic_lenet, out)
    assert changed and all(name.endswith("_quantized") and after.dtype == np.int8 for name, (_, after) in changed.items())
    assert {name: int(np.sum(after != before)) for name, (before, after) in changed.items()} == \
        {name: count for name, count in result.changed_parameters.items() if count}


def test_dynamic_quantize_linear_matches_onnxruntime():
    """Scale, zero point and integers equal onnxruntime's for inputs of either sign, one sign only and all
    zeros; also vmapped (the engine runs such models one input per group), where XLA would otherwise divide
    by a reciprocal; the rounding's gradient passes straight through."""
    import jax
    import jax.numpy as jnp

    shape = [4, 3, 5]
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Sub", ["x", "r"], ["n"]),
             helper.make_node("Add", ["n", "r"], ["z"]),  # computed, so the engine traces it
             helper.make_node("DynamicQuantizeLinear", ["z"], ["q", "s", "zp"]),
             helper.make_node("Cast", ["q"], ["qf"], to=TensorProto.FLOAT),
             helper.make_node("Cast", ["zp"], ["zpf"], to=TensorProto.FLOAT)]
    outputs = ("qf", "s", "zpf")
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    proto.ir_version = 8
    session = ort_session(proto.SerializeToString(), optimize=False)
    forward = Forward(model_from_proto(proto))
    rng = np.random.default_rng(0)
    xs = [(rng.normal(size=shape) * rng.uniform(0.01, 10)).astype(np.float32) for _ in range(40)]
    xs += [np.abs(xs[0]), -np.abs(xs[1]), np.zeros(shape, np.float32)]
    vmapped = jax.jit(jax.vmap(lambda v: forward.apply(forward.params, v)))(np.stack(xs))
    for i, x in enumerate(xs):
        expected = dict(zip(outputs, session.run(None, {"x": x})))
        got = forward({"x": x})
        for name in outputs:
            assert max_diff(got[name], expected[name]) == 0, (i, name)
            assert max_diff(vmapped[name][i], expected[name]) == 0, (i, name, "vmapped")
    grad = jax.grad(lambda v: jnp.sum(forward.apply(forward.params, v)["qf"]))(jnp.asarray(xs[2]))
    assert np.abs(np.asarray(grad)).max() > 0


@pytest.mark.parametrize("op", ["MatMulInteger", "ConvInteger"])
def test_integer_ops_match_onnxruntime(op):
    """MatMulInteger and ConvInteger on uint8 data and an int8 weight left as integers (no rescaling Mul
    to fold it by), zero points per tensor and (MatMulInteger's weight) per column: equal to onnxruntime."""
    rng = np.random.default_rng(1)
    if op == "MatMulInteger":
        a_shape, w = [3, 6], rng.integers(-127, 128, (6, 4)).astype(np.int8)
        zeros = {"a_zero": np.array(7, np.uint8), "w_zero": rng.integers(-3, 4, 4).astype(np.int8)}
        attrs = {}
    else:
        a_shape, w = [2, 3, 7, 7], rng.integers(-127, 128, (4, 3, 3, 3)).astype(np.int8)
        zeros = {"a_zero": np.array(11, np.uint8), "w_zero": np.array(2, np.int8)}
        attrs = {"pads": [1, 1, 0, 0], "strides": [2, 1]}
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["a", "a_scale", "a_zp"]),
             helper.make_node(op, ["a", "w", "a_zero", "w_zero"], ["acc"], **attrs),
             helper.make_node("Cast", ["acc"], ["y"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, a_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(v, k) for k, v in {"w": w, **zeros}.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    proto.ir_version = 8
    x = rng.normal(size=a_shape).astype(np.float32)
    model = model_from_proto(proto)
    assert not model.quantized  # nothing rescales the result: the weight stays an integer constant
    expected = ort_session(proto.SerializeToString(), optimize=False).run(None, {"x": x})[0]
    assert max_diff(Forward(model)({"x": x})["y"], expected) == 0


# The QOperator format (onnxruntime's quantize_static with QuantFormat.QOperator): quantized operators on
# uint8 tensors, int8 weights and int32 biases read by QLinearConv / com.microsoft QGemm.

@pytest.fixture(scope="module")
def qoperator_lenet(backdoor_case, tmp_path_factory):
    """The test LeNet-5 quantized statically in the QOperator format, per channel, calibrated on 128 of the
    defender's clean images."""
    from lancet.converters.quantize import quantize_qoperator

    path = tmp_path_factory.mktemp("qoperator") / "lenet-qoperator.onnx"
    return quantize_qoperator(backdoor_case.model, path, np.load(backdoor_case.case)["x_clean"][:128])


def test_qoperator_model_runs_as_onnxruntime_does(qoperator_lenet, backdoor_case):
    """Weights and biases become float parameters under their initializers' names; the layers are
    weight-neuron layers (a quantized output around its zero point cannot be ablated by scaling); the engine
    computes as onnxruntime's integer kernels, exactly."""
    from lancet.neurons import find_layers

    model = load_model(qoperator_lenet)
    assert {node.op_type for node in model.nodes} >= {"QLinearConv", "QGemm", "QuantizeLinear"}
    assert len(model.quantized) == 10 and model.is_quantized and not model.per_input_ranges
    from lancet.neurons import summary

    assert summary(model)["quantization"] == "qoperator"
    layers = find_layers(model, weight_only=True)
    assert [layer.op_type for layer in layers] == ["QLinearConv"] * 2 + ["QGemm"] * 3
    assert all(layer.weight_only and layer.bias for layer in layers) and not find_layers(model)
    x = np.load(backdoor_case.heldout)["x_test"][:300]
    got = np.asarray(Forward(model).logits(x))
    assert max_diff(got, OrtPredictor(model, qoperator_lenet).logits(x)) <= 1e-6
    from lancet.errors import BadInputError
    from lancet.locate.pipeline import locate

    with pytest.raises(BadInputError, match="weight neurons only"):
        locate(model, backdoor_case.case, granularity="channel", progress=False)


@pytest.mark.parametrize("method", ["finetune", "flip"])
def test_qoperator_model_repaired_in_its_integers(qoperator_lenet, backdoor_case, method, tmp_path):
    """The repair writes int8 weights (and int32 biases) into their initializers and nothing else; the
    written file, run by onnxruntime, has lost the backdoor on held-out data (measured on an AVX-512 EPYC:
    ASR 99.8 -> 0.8 % fine-tuned, 0.0 % flipped, accuracy 95.5 -> 95.5 / 95.1 %)."""
    from lancet.repair import repair

    out = tmp_path / f"{method}.onnx"
    result = repair(qoperator_lenet, backdoor_case.case, out, method=method, progress=False)
    assert result.written, result.reasons
    assert result.details["parity_max_abs_diff"] <= 1e-5
    changed = assert_backdoor_removed(dict(np.load(backdoor_case.heldout)), qoperator_lenet, out)
    assert changed and all(after.dtype == before.dtype and after.dtype in (np.int8, np.int32)
                           for before, after in changed.values())


def test_qoperator_elementwise_and_pooling_ops_match_onnxruntime(tmp_path):
    """A residual block (QLinearAdd), average pooling (QLinearAveragePool), sigmoid gating (QLinearSigmoid,
    QLinearMul) and a concatenation (QLinearConcat) as onnxruntime's QOperator quantizer writes them from a
    PyTorch module: the engine equals onnxruntime exactly."""
    torch = pytest.importorskip("torch")
    from torch import nn

    from lancet.converters.quantize import quantize_qoperator

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.bn = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.conv1, self.conv2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
            self.pool, self.fc = nn.AvgPool2d(2), nn.Linear(8, 10)

        def forward(self, x):
            h = self.pool(torch.relu(self.bn(self.stem(x))))
            h = torch.relu(h + self.conv2(torch.relu(self.conv1(h))))
            h = torch.cat([h, torch.sigmoid(h) * h], 1)[:, :8]
            return self.fc(h.mean((2, 3)))

    torch.manual_seed(0)
    x = np.random.default_rng(0).uniform(0, 1, (256, 1, 16, 16)).astype(np.float32)
    source = tmp_path / "block.onnx"
    torch.onnx.export(Block().eval(), torch.tensor(x[:2]), str(source), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "n"}}, opset_version=17, dynamo=False)
    path = quantize_qoperator(source, tmp_path / "block-qoperator.onnx", x[:128])
    model = load_model(path)
    assert {"QLinearAdd", "QLinearAveragePool", "QLinearSigmoid", "QLinearMul", "QLinearConcat"} <= \
        {node.op_type for node in model.nodes}
    assert max_diff(Forward(model).logits(x), OrtPredictor(model, path).logits(x)) <= 1e-6


def test_qoperator_matmul_layers_match_onnxruntime(tmp_path):
    """MatMul layers (as Keras and hand-written graphs have them) become QLinearMatMul, their bias Add a
    QLinearAdd: weight-neuron layers, per-column weights, equal to onnxruntime exactly."""
    from lancet.converters.quantize import quantize_qoperator
    from lancet.neurons import find_layers

    rng = np.random.default_rng(0)
    weights = {"w1": rng.normal(scale=0.3, size=(20, 16)).astype(np.float32),
               "b1": rng.normal(scale=0.1, size=16).astype(np.float32),
               "w2": rng.normal(scale=0.3, size=(16, 5)).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["hb"]),
             helper.make_node("Relu", ["hb"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 20])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5])],
                              initializer=[numpy_helper.from_array(v, k) for k, v in weights.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.save(proto, tmp_path / "mlp.onnx")
    x = rng.uniform(0, 1, (300, 20)).astype(np.float32)
    path = quantize_qoperator(tmp_path / "mlp.onnx", tmp_path / "mlp-qoperator.onnx", x[:100])
    model = load_model(path)
    assert [layer.op_type for layer in find_layers(model, weight_only=True)] == ["QLinearMatMul"] * 2
    assert max_diff(Forward(model).logits(x), OrtPredictor(model, path).logits(x)) <= 1e-6


def test_dynamic_quantized_lstm_runs_and_is_repaired(tmp_path):
    """quantize_dynamic turns an LSTM into com.microsoft DynamicQuantizeLSTM (int8 W and R, transposed, the
    input sequence and each step's hidden state quantized over their own ranges). The engine equals
    onnxruntime per input but for a few inputs a rounding step apart; its W and R are weight-neuron
    layers, repaired in their integers (measured on an AVX-512 EPYC, the test recipe's LSTM: ASR 99.9 ->
    0.3 % fine-tuned at 89.5 -> 89.3 % accuracy, 0.4 % flipped at 89.1 %, both in the input weights)."""
    pytest.importorskip("torch")
    from lancet.converters.quantize import quantize_dynamic_int8
    from lancet.models.recipes import Recipe, build_case
    from lancet.neurons import find_layers
    from lancet.repair import repair

    built = build_case(Recipe(arch="lstm"))
    path = quantize_dynamic_int8(built.model, tmp_path / "lstm-dynamic.onnx", np.load(built.case)["x_clean"][:128])
    model = load_model(path)
    assert "DynamicQuantizeLSTM" in {node.op_type for node in model.nodes} and model.per_input_ranges
    assert [layer.op_type for layer in find_layers(model, weight_only=True)] == \
        ["DynamicQuantizeLSTM"] * 2 + ["MatMulInteger"] * 2
    heldout = dict(np.load(built.heldout))
    x = heldout["x_test"][:300]
    got, written = np.asarray(Forward(model).logits(x)), OrtPredictor(model, path).logits(x)
    apart = np.max(np.abs(got - written), axis=1) > 1e-4 * max(1.0, float(np.abs(written).max()))
    assert np.mean(apart) <= 0.03 and np.mean(got.argmax(1) == written.argmax(1)) >= 0.99

    out = tmp_path / "repaired.onnx"
    result = repair(path, built.case, out, method="finetune", progress=False)
    assert result.written, result.reasons
    changed = assert_backdoor_removed(heldout, path, out)
    assert changed and all(after.dtype == np.int8 for _, after in changed.values())


def test_optimised_dynamic_model_runs_as_onnxruntime_does(dynamic_lenet, backdoor_case, tmp_path):
    """onnxruntime's optimiser fuses a dynamically quantized MatMul with its rescaling and bias into
    com.microsoft DynamicQuantizeMatMul: its int8 weight is folded and a weight-neuron layer with its bias;
    the engine equals onnxruntime per input but for a few inputs a rounding step apart."""
    from lancet.converters.optimize import ort_optimized
    from lancet.neurons import find_layers

    x = np.load(backdoor_case.heldout)["x_test"][:300]
    path = ort_optimized(dynamic_lenet, tmp_path / "optimised.onnx", x[:64])
    model = load_model(path)
    assert "DynamicQuantizeMatMul" in {node.op_type for node in model.nodes} and model.per_input_ranges
    fused = [layer for layer in find_layers(model, weight_only=True) if layer.op_type == "DynamicQuantizeMatMul"]
    assert len(fused) == 3 and all(layer.bias and layer.weight in model.quantized for layer in fused)
    got, written = np.asarray(Forward(model).logits(x)), OrtPredictor(model, path).logits(x)
    apart = np.max(np.abs(got - written), axis=1) > 1e-4 * max(1.0, float(np.abs(written).max()))
    assert np.mean(apart) <= 0.02 and np.mean(got.argmax(1) == written.argmax(1)) >= 0.99


def test_optimised_qdq_model_is_the_qoperator_format(quantized_lenet, backdoor_case, tmp_path):
    """onnxruntime's optimiser turns a QDQ file into quantized operators (QLinearConv, QGemm): saved so, it
    runs in the engine exactly as in onnxruntime."""
    from lancet.converters.optimize import ort_optimized

    x = np.load(backdoor_case.heldout)["x_test"][:200]
    path = ort_optimized(quantized_lenet, tmp_path / "optimised.onnx", x[:64])
    model = load_model(path)
    assert {"QLinearConv", "QGemm"} <= {node.op_type for node in model.nodes}
    assert max_diff(Forward(model).logits(x), OrtPredictor(model, path).logits(x)) <= 1e-6


def test_parity_check_allows_a_few_inputs_a_step_apart_only_where_activations_are_rounded(quantized_lenet,
                                                                                          backdoor_case):
    """Before writing, onnxruntime must reproduce the engine: for a model that rounds activations to integer
    steps (a float sum in another order can land one a step apart) up to 5 % of the check inputs may be
    off; not more, and none for a float model."""
    from lancet.errors import RepairRejectedError
    from lancet.surgery import verify_repaired

    x = np.load(backdoor_case.case)["x_clean"][:64]
    for path, allowed in ((quantized_lenet, 3), (backdoor_case.model, 0)):
        model = load_model(path)
        assert model.requantizes == bool(allowed)
        expected = OrtPredictor(model, path, optimize=False).logits(x)
        proto = onnx.load(path)
        off = expected.copy()
        off[:allowed] += 0.05
        if allowed:
            assert verify_repaired(proto, x, off, model) >= 0.05
        off[: allowed + 1] += 0.05
        with pytest.raises(RepairRejectedError, match="disagree"):
            verify_repaired(proto, x, off, model)


# Weight-only 4-bit quantization (onnxruntime's MatMulNBitsQuantizer, QDQ format): a transformer's MatMul
# weights as uint4 in blocks, each with a scale and zero point, behind opset 21's blocked DequantizeLinear.

def test_int4_vit_runs_and_is_repaired_in_its_blocks(tmp_path):
    """The test recipe's ViT (BadNets on MNIST digits) with its MatMul weights in uint4 blocks of 32: the
    blocked DequantizeLinears fold into float parameters (weight-neuron layers of their MatMuls), the engine
    equals onnxruntime with graph optimisations off and agrees on labels with its fused 4-bit kernels; the
    repair is written as uint4 into the same initializers, scales and zero points untouched, and removes
    most of the backdoor on held-out data as deployed (measured on an AVX-512 EPYC: ASR 100 -> 3.4 % at
    85.2 -> 85.2 %; the float ViT of the recipe, 100 -> 5.6 % at 85.5 -> 84.3 %: this small ViT is
    repaired less cleanly than the LeNet-5)."""
    pytest.importorskip("torch")
    import ml_dtypes

    from lancet.models.recipes import Recipe, build_case
    from lancet.neurons import find_layers
    from lancet.repair import repair

    built = build_case(Recipe(arch="vit", quantize="int4"))
    model = load_model(built.model)
    blocked = {name: q for name, q in model.quantized.items() if q.block_size}
    assert blocked and all(q.dtype == ml_dtypes.uint4 and q.block_size == 32 for q in blocked.values())
    assert set(blocked) <= {layer.weight for layer in find_layers(model, weight_only=True)}
    from lancet.neurons import summary

    assert summary(model)["quantization"] == "int4-weights"
    heldout = dict(np.load(built.heldout))
    x = heldout["x_test"][:300]
    got = np.asarray(Forward(model).logits(x))
    assert max_diff(got, OrtPredictor(model, built.model, optimize=False).logits(x)) <= 1e-4
    assert np.mean(OrtPredictor(model, built.model).predict(x) == got.argmax(1)) >= 0.98

    out = tmp_path / "repaired.onnx"
    result = repair(built.model, built.case, out, method="finetune", progress=False)
    assert result.written, result.reasons
    changed = assert_backdoor_removed(heldout, built.model, out, max_asr=0.05)
    sources = {q.source for q in model.quantized.values()}
    assert changed and set(changed) <= sources | set(model.params)
    assert {q.source for q in blocked.values()} & set(changed)  # 4-bit weights among the repaired ones
    assert all(after.dtype == before.dtype for before, after in changed.values())


def _packed(values: np.ndarray, bits: int) -> np.ndarray:
    """Values of `bits` bits packed 8 / bits to a byte along the last axis, the first in the lowest bits."""
    per = 8 // bits
    return sum(values[..., i::per].astype(np.uint16) << (bits * i) for i in range(per)).astype(np.uint8)


@pytest.mark.parametrize("zero_points, k, bits", [("packed", 70, 4), ("none", 64, 4), ("float", 40, 4),
                                                  ("shared", 48, 4), ("packed", 70, 8), ("none", 64, 8),
                                                  ("packed", 70, 2), ("none", 40, 2)])
def test_matmul_nbits_matches_onnxruntime(zero_points, k, bits):
    """com.microsoft MatMulNBits (blocks of 32 along K; 4 bits, the low nibble first, and 2 and 8 bits; zero
    points packed, absent (2^(bits - 1)) or float; K not a multiple of the block): its B folds into a float
    [K, N] weight that writes back to the same bytes, and the engine equals onnxruntime at accuracy_level 0.
    A B read by two nodes ('shared') is not folded but unpacked in the op, with the same result."""
    from lancet.ops.nbits import MS

    rng = np.random.default_rng(0)
    n, block, top = 6, 32, 1 << bits
    blocks = -(-k // block)
    q = rng.integers(0, top, (n, blocks * block)).astype(np.uint8)
    scales = rng.uniform(0.01, 0.1, (n, blocks)).astype(np.float32)
    inits = {"B": _packed(q, bits).reshape(n, blocks, block * bits // 8), "scales": scales.reshape(-1)}
    if zero_points == "packed":
        per = 8 // bits
        zq = np.zeros((n, per * -(-blocks // per)), np.uint8)
        zq[:, :blocks] = rng.integers(0, top, (n, blocks))
        inits["zeros"] = _packed(zq, bits).reshape(-1)
    elif zero_points == "float":
        inits["zeros"] = rng.uniform(6, 9, n * blocks).astype(np.float32)
    inits["bias"] = rng.normal(size=n).astype(np.float32)
    inputs = ["a", "B", "scales", "zeros" if "zeros" in inits else "", "", "bias"]
    nodes = [helper.make_node("MatMulNBits", inputs, ["y"], domain=MS, K=k, N=n, bits=bits, block_size=block)]
    if zero_points == "shared":
        nodes = [helper.make_node("MatMulNBits", inputs, [out], domain=MS, K=k, N=n, bits=bits, block_size=block)
                 for out in ("y1", "y2")] + [helper.make_node("Add", ["y1", "y2"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])],
                              initializer=[numpy_helper.from_array(v, name) for name, v in inits.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)])
    proto.ir_version = 8
    model = model_from_proto(proto)
    if zero_points == "shared":
        assert "B" not in model.params and "B" not in model.quantized
    else:
        assert model.params["B"].shape == (k, n) and "B" in model.quantized
        assert np.array_equal(model.quantized["B"].quantize(model.params["B"]), inits["B"])
    a = rng.normal(size=(5, k)).astype(np.float32)
    expected = ort_session(proto.SerializeToString()).run(None, {"a": a})[0]
    assert max_diff(Forward(model)({"a": a})["y"], expected) <= 1e-6 * max(10.0, float(np.abs(expected).max()))


def test_optimised_int4_vit_in_matmul_nbits_is_repaired(tmp_path):
    """The int4 ViT saved after onnxruntime's optimisation holds MatMulNBits (accuracy_level 4: its kernel
    rounds activations to int8 per block); the engine computes in float and equals onnxruntime at
    accuracy_level 0, agrees on labels as deployed; the repair writes the packed 4-bit bytes and removes the
    backdoor as deployed."""
    pytest.importorskip("torch")
    from lancet.converters.optimize import ort_optimized
    from lancet.models.recipes import Recipe, build_case
    from lancet.neurons import find_layers, summary
    from lancet.repair import repair
    from lancet.surgery import _in_float

    built = build_case(Recipe(arch="vit", quantize="int4"))
    heldout = dict(np.load(built.heldout))
    x = heldout["x_test"][:300]
    path = ort_optimized(built.model, tmp_path / "optimised.onnx", x[:64])
    model = load_model(path)
    nbits = [node for node in onnx.load(path).graph.node if node.op_type == "MatMulNBits"]
    assert nbits and all(node.input[1] in model.quantized for node in nbits)
    assert summary(model)["quantization"] == "int4-weights"
    assert {node.name for node in nbits} <= {layer.node for layer in find_layers(model, weight_only=True)}
    got = np.asarray(Forward(model).logits(x))
    assert max_diff(got, OrtPredictor(model, _in_float(onnx.load(path)), optimize=False).logits(x)) <= 1e-4
    assert np.mean(OrtPredictor(model, path).predict(x) == got.argmax(1)) >= 0.98

    out = tmp_path / "repaired.onnx"
    result = repair(path, built.case, out, method="finetune", progress=False)
    assert result.written, result.reasons
    changed = assert_backdoor_removed(heldout, path, out, max_asr=0.05)
    assert {node.input[1] for node in nbits} & set(changed)
    assert all(after.dtype == before.dtype and after.shape == before.shape for before, after in changed.values())


@pytest.mark.parametrize("bits", [8, 2])
def test_matmul_nbits_at_other_widths_runs_as_onnxruntime_does(bits, tmp_path):
    """The test recipe's float ViT through onnxruntime's MatMulNBitsQuantizer at 8 and 2 bits (its default
    format): every MatMulNBits weight is folded into a weight-neuron layer, lancet inspect names the width,
    and the engine equals onnxruntime (measured: 3.8e-6 at 8 bits, 4.7e-6 at 2 bits, 200 inputs)."""
    pytest.importorskip("torch")
    from lancet.converters.quantize import quantize_int4_weights
    from lancet.models.recipes import Recipe, build_case
    from lancet.neurons import find_layers, summary

    built = build_case(Recipe(arch="vit"))
    x = np.load(built.heldout)["x_test"][:200]
    path = quantize_int4_weights(built.model, tmp_path / f"vit-{bits}.onnx", x[:100], quant_format="nbits", bits=bits,
                                 min_agreement=0.5 if bits == 2 else 0.9)
    model = load_model(path)
    nbits = [node for node in model.nodes if node.op_type == "MatMulNBits"]
    assert nbits and all(node.inputs[1] in model.quantized and model.quantized[node.inputs[1]].bits == bits
                         for node in nbits)
    assert {node.name for node in nbits} <= {layer.node for layer in find_layers(model, weight_only=True)}
    assert summary(model)["quantization"] == f"int{bits}-weights"
    expected = OrtPredictor(model, path, optimize=False).logits(x)
    assert max_diff(Forward(model).logits(x), expected) <= 1e-5 * max(1.0, float(np.abs(expected).max()))
