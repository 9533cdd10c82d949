"""Files saved by onnxruntime after its graph optimisation (level extended): com.microsoft FusedConv,
FusedGemm and BiasGelu in place of the convolutions, Gemms and GELUs they fused."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from lancet import Forward, load_model
from lancet.evaluate import OrtPredictor

from .conftest import assert_backdoor_removed, max_diff


@pytest.mark.parametrize("arch, fused", [("lenet5", {"FusedConv", "FusedGemm"}), ("mobilenetv2", {"FusedConv"}),
                                         ("vit", {"BiasGelu"})])
def test_optimised_zoo_exports_run_as_onnxruntime_does(arch, fused, tmp_path):
    """Untrained zoo architectures (Relu, ReLU6 as Clip, GELU) optimised by onnxruntime: the engine equals
    onnxruntime; FusedConv and FusedGemm are split back into their layer and activation in the IR, so the
    layers have channel neurons before the activation, under the fused nodes' names."""
    pytest.importorskip("torch")
    from lancet.converters.optimize import ort_optimized
    from lancet.converters.torch_export import export_torch
    from lancet.models.torch_zoo import build
    from lancet.neurons import find_layers

    x = np.random.default_rng(0).uniform(0, 1, (32, 1, 28, 28)).astype(np.float32)
    export_torch(build(arch, 1, 28).eval(), x[:4], tmp_path / "model.onnx")
    path = ort_optimized(tmp_path / "model.onnx", tmp_path / "optimised.onnx", x)
    model = load_model(path)
    assert fused <= {node.op_type for node in onnx.load(path).graph.node if node.domain == "com.microsoft"}
    fused_names = {node.name for node in onnx.load(path).graph.node if node.op_type in ("FusedConv", "FusedGemm")}
    layers = find_layers(model)
    assert fused_names <= {layer.node for layer in layers}
    assert all(layer.name.endswith("::preact") for layer in layers if layer.node in fused_names)
    expected = OrtPredictor(model, path).logits(x)
    assert max_diff(Forward(model).logits(x), expected) <= 1e-5 * max(1.0, float(np.abs(expected).max()))


def test_optimised_model_repaired(backdoor_case, tmp_path):
    """The test LeNet-5 as onnxruntime saves it optimised (FusedConv, FusedGemm) is repaired by fine-tuning:
    the written file keeps the fused nodes, only weights change, and the backdoor is gone on held-out data
    (measured on an AVX-512 EPYC: ASR 99.8 -> 0.1 %, accuracy 95.4 -> 96.1 %; flip 0.6 % at 94.9 %; the same
    with channel neurons after the split)."""
    from lancet.converters.optimize import ort_optimized
    from lancet.repair import repair

    path = ort_optimized(backdoor_case.model, tmp_path / "optimised.onnx", np.load(backdoor_case.case)["x_clean"][:64])
    out = tmp_path / "repaired.onnx"
    result = repair(path, backdoor_case.case, out, method="finetune", progress=False)
    assert result.written, result.reasons
    changed = assert_backdoor_removed(dict(np.load(backdoor_case.heldout)), path, out)
    assert any(n.op_type == "FusedConv" for n in onnx.load(out).graph.node)
    assert set(changed) == {name for name, count in result.changed_parameters.items() if count}


def test_transformer_optimised_vit_runs_as_onnxruntime_does(tmp_path):
    """onnxruntime's transformer optimiser on the zoo ViT fuses each residual Add with the LayerNormalization
    after it (com.microsoft SkipLayerNormalization, four outputs) and the MLP's bias with its GELU: the engine
    equals onnxruntime."""
    pytest.importorskip("torch")
    from onnxruntime.transformers.optimizer import optimize_model

    from lancet.converters.torch_export import export_torch
    from lancet.models.torch_zoo import build

    x = np.random.default_rng(0).uniform(0, 1, (32, 1, 28, 28)).astype(np.float32)
    export_torch(build("vit", 1, 28).eval(), x[:4], tmp_path / "vit.onnx")
    optimize_model(str(tmp_path / "vit.onnx"), model_type="vit", num_heads=2, hidden_size=32,
                   opt_level=1).save_model_to_file(str(tmp_path / "vit-optimised.onnx"))
    path = tmp_path / "vit-optimised.onnx"
    assert {"SkipLayerNormalization", "BiasGelu"} <= {n.op_type for n in onnx.load(path).graph.node}
    model = load_model(path)
    expected = OrtPredictor(model, path).logits(x)
    assert max_diff(Forward(model).logits(x), expected) <= 1e-5 * max(1.0, float(np.abs(expected).max()))


@pytest.mark.parametrize("case", ["plain", "key-lengths", "raw-mask", "unidirectional"])
def test_packed_attention_matches_onnxruntime(case):
    """com.microsoft Attention (the transformer optimiser's self-attention with Q, K and V packed in one
    weight): without a mask, with key lengths, with a 0/1 mask per key, causal; equal to onnxruntime, and its
    packed weight is a weight-neuron layer."""
    from onnx import TensorProto, helper, numpy_helper

    from lancet.loader import model_from_proto
    from lancet.neurons import find_layers
    from lancet.runtime import ort_session

    rng = np.random.default_rng(0)
    batch, length, hidden = 2, 5, 16
    inits = {"w": rng.normal(scale=0.3, size=(hidden, 3 * hidden)).astype(np.float32),
             "b": rng.normal(scale=0.1, size=3 * hidden).astype(np.float32)}
    names, attrs = ["x", "w", "b"], {"num_heads": 4}
    if case == "key-lengths":
        inits["m"], names = np.array([3, 5], np.int32), names + ["m"]
    if case == "raw-mask":
        inits["m"], names = np.array([[1, 1, 0, 1, 1], [1, 0, 1, 1, 1]], np.int32), names + ["m"]
    if case == "unidirectional":
        attrs["unidirectional"] = 1
    graph = helper.make_graph([helper.make_node("Attention", names, ["y"], domain="com.microsoft", **attrs)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, length, hidden])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, length, hidden])],
                              initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    proto.ir_version = 8
    x = rng.normal(size=(batch, length, hidden)).astype(np.float32)
    expected = ort_session(proto.SerializeToString()).run(None, {"x": x})[0]
    model = model_from_proto(proto)
    assert max_diff(Forward(model)({"x": x})["y"], expected) <= 1e-5
    assert [(layer.op_type, layer.weight, layer.bias) for layer in find_layers(model, weight_only=True)] == \
        [("Attention", "w", "b")]
