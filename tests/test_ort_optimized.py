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


@pytest.mark.parametrize("case", ["plain", "key-lengths", "raw-mask", "query-key-mask", "unidirectional"])
def test_packed_attention_matches_onnxruntime(case):
    """com.microsoft Attention (the transformer optimiser's self-attention with Q, K and V packed in one
    weight): without a mask, with key lengths, with a 0/1 mask per key or per query and key, causal; equal to onnxruntime, and its
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
    if case == "query-key-mask":  # 0/1 per query and key [batch, queries, keys]
        inits["m"], names = (rng.random((batch, length, length)) > 0.3).astype(np.int32), names + ["m"]
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


def _contrib_model(nodes, inputs, outputs, inits):
    """A model of `nodes` (default and com.microsoft domains) with float inputs (name, shape), float outputs
    (name, rank) and initializers."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(k, TensorProto.FLOAT, s) for k, s in inputs],
                              [helper.make_tensor_value_info(k, TensorProto.FLOAT, [f"{k}{i}" for i in range(rank)])
                               for k, rank in outputs],
                              initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    proto.ir_version = 8
    return proto


@pytest.mark.parametrize("case", ["self", "cross-mask", "query-key-mask", "key-lengths", "unidirectional",
                                  "attention-bias", "heads-kv", "packed-qkv", "packed-kv"])
def test_multi_head_attention_matches_onnxruntime(case):
    """com.microsoft MultiHeadAttention (the transformer optimiser's attention on projected Q, K and V): Q, K
    and V apart with the projections' bias, cross attention over another length with a 0/1 key padding
    mask, key lengths, causal, an attention bias, K and V already in heads; the output and present key and
    value equal onnxruntime's. Packed QKV and packed KV (which onnxruntime's CPU kernel refuses) equal
    onnxruntime on the same values laid out apart."""
    from onnx import helper

    from lancet.loader import model_from_proto
    from lancet.runtime import ort_session

    rng = np.random.default_rng(1)
    batch, length, keys, heads, size = 2, 5, 7, 4, 4
    hidden = heads * size
    kv_length = keys if case in ("cross-mask", "query-key-mask", "heads-kv", "packed-kv") else length
    feeds = {"q": rng.normal(size=(batch, length, hidden)), "k": rng.normal(size=(batch, kv_length, hidden)),
             "v": rng.normal(size=(batch, kv_length, hidden))}
    inits = {"bias": rng.normal(scale=0.3, size=3 * hidden).astype(np.float32)}
    names, attrs = ["q", "k", "v", "bias"], {"num_heads": heads}
    if case == "cross-mask":
        inits["mask"] = np.array([[1, 1, 0, 1, 1, 1, 0], [1, 0, 1, 1, 1, 1, 1]], np.int32)
        names.append("mask")
    if case == "query-key-mask":
        inits["mask"] = (rng.random((batch, length, kv_length)) > 0.3).astype(np.int32)
        names.append("mask")
    if case == "key-lengths":
        inits["mask"] = np.array([3, 5], np.int32)
        names.append("mask")
    if case == "unidirectional":
        attrs["unidirectional"] = 1
    if case == "attention-bias":
        feeds["ab"] = rng.normal(size=(1, heads, length, kv_length))
        names += ["", "ab"]
    if case in ("heads-kv", "packed-qkv", "packed-kv"):
        feeds["k"], feeds["v"] = (rng.normal(size=(batch, heads, kv_length, size)) for _ in range(2))
        names = ["q", "k", "v"]
    feeds = {k: v.astype(np.float32) for k, v in feeds.items()}
    outputs = [("y", 3), ("present_k", 4), ("present_v", 4)]

    def build(names, feeds):
        node = helper.make_node("MultiHeadAttention", names, [k for k, _ in outputs], domain="com.microsoft", **attrs)
        return _contrib_model([node], [(k, list(v.shape)) for k, v in feeds.items()], outputs, inits)

    expected = ort_session(build(names, feeds).SerializeToString()).run(None, feeds)
    if case.startswith("packed"):  # the same Q, K and V re-laid as the packed inputs
        q_heads = np.transpose(feeds["q"].reshape(batch, length, heads, size), (0, 2, 1, 3))
        if case == "packed-qkv":
            assert kv_length == length
            feeds = {"q": np.stack([np.transpose(t, (0, 2, 1, 3)) for t in (q_heads, feeds["k"], feeds["v"])], axis=3)}
            names = ["q"]
        else:
            feeds = {"q": feeds["q"], "k": np.stack([np.transpose(t, (0, 2, 1, 3)) for t in (feeds["k"], feeds["v"])],
                                                    axis=3)}
            names = ["q", "k"]
    got = Forward(model_from_proto(build(names, feeds)))(feeds)
    for (name, _), value in zip(outputs, expected):
        assert got[name].shape == value.shape, name
        assert max_diff(got[name], value) <= 1e-5, name


@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-column"])
def test_quantized_attention_matches_onnxruntime_and_writes_back(per_channel, tmp_path):
    """com.microsoft QAttention (onnxruntime's quantize_dynamic on a file with the packed Attention): the
    engine equals onnxruntime, the int8 packed weight is folded into a weight-neuron layer with its bias, and
    a changed weight written back by graph surgery (as int8 into the same initializer) runs in onnxruntime
    as in the engine."""
    import onnx
    from onnx import helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from lancet.neurons import find_layers
    from lancet.surgery import replace_parameters, verify_repaired

    rng = np.random.default_rng(2)
    batch, length, hidden = 3, 5, 16
    inits = {"w": rng.normal(scale=0.3, size=(hidden, 3 * hidden)), "b": rng.normal(scale=0.1, size=3 * hidden),
             "head": rng.normal(scale=0.3, size=(hidden, 4))}
    nodes = [helper.make_node("Attention", ["x", "w", "b"], ["a"], domain="com.microsoft", num_heads=4),
             helper.make_node("MatMul", ["a", "head"], ["y"])]
    proto = _contrib_model(nodes, [("x", [batch, length, hidden])], [("y", 3)],
                           {k: v.astype(np.float32) for k, v in inits.items()})
    onnx.save(proto, tmp_path / "float.onnx")
    quantize_dynamic(tmp_path / "float.onnx", tmp_path / "int8.onnx", weight_type=QuantType.QInt8,
                     per_channel=per_channel)
    model = load_model(tmp_path / "int8.onnx")
    assert "QAttention" in {node.op_type for node in model.nodes}
    layer = next(layer for layer in find_layers(model, weight_only=True) if layer.op_type == "QAttention")
    assert layer.bias == "b" and layer.weight in model.quantized
    x = rng.normal(size=(batch, length, hidden)).astype(np.float32)
    forward = Forward(model)
    expected = OrtPredictor(model, tmp_path / "int8.onnx").logits(x)
    assert max_diff(forward({"x": x})["y"], expected) <= 1e-5 * max(1.0, float(np.abs(expected).max()))
    changed = {layer.weight: np.asarray(forward.params[layer.weight]) * np.where(rng.random((hidden, 3 * hidden)) < 0.1,
                                                                                   -1.0, 1.0).astype(np.float32)}
    repaired = replace_parameters(tmp_path / "int8.onnx", model.file_values(changed), {"method": "test"})
    engine = np.asarray(forward({"x": x}, params={**forward.params, **model.stored(changed)})["y"])
    assert max_diff(engine, expected) > 0.01  # the change matters
    assert verify_repaired(repaired, x, engine, model) <= 1e-4
