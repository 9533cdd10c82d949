"""LSTM, GRU and RNN: hand-built nodes with every option against onnxruntime, and exports of recurrent
classifiers (PyTorch, Keras) against their framework."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lancet import Forward
from lancet.loader import model_from_proto
from lancet.runtime import ort_session

from .conftest import assert_backdoor_removed, max_diff

STEPS, BATCH, FEATURES, HIDDEN = 6, 3, 5, 4


def _rand(*shape, seed):
    return np.random.default_rng(seed).normal(scale=0.6, size=shape).astype(np.float32)


def _node_model(op: str, attrs: dict, layout: int = 0, lengths=None, initial=False, peepholes=False):
    """One recurrent node over a graph input `x`, its weights as initializers, every output a graph output."""
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
    directions = 2 if attrs.get("direction") == "bidirectional" else 1
    consts = {"W": _rand(directions, gates * HIDDEN, FEATURES, seed=1),
              "R": _rand(directions, gates * HIDDEN, HIDDEN, seed=2),
              "B": _rand(directions, 2 * gates * HIDDEN, seed=3)}
    names = ["x", "W", "R", "B", "", "", "", ""]
    if lengths is not None:
        consts["lens"], names[4] = np.asarray(lengths, np.int32), "lens"
    state_shape = (BATCH, directions, HIDDEN) if layout else (directions, BATCH, HIDDEN)
    if initial:
        states = [_rand(directions, BATCH, HIDDEN, seed=4), _rand(directions, BATCH, HIDDEN, seed=5)]
        if layout:
            states = [np.ascontiguousarray(np.swapaxes(v, 0, 1)) for v in states]
        consts["h0"], names[5] = states[0], "h0"
        if op == "LSTM":
            consts["c0"], names[6] = states[1], "c0"
    if peepholes:
        consts["P"], names[7] = _rand(directions, 3 * HIDDEN, seed=6), "P"
    while names[-1] == "":
        names.pop()
    outputs = ["y", "y_h", "y_c"] if op == "LSTM" else ["y", "y_h"]
    node = helper.make_node(op, names, outputs, hidden_size=HIDDEN, layout=layout, **attrs)
    x_shape = [BATCH, STEPS, FEATURES] if layout else [STEPS, BATCH, FEATURES]
    y_shape = [BATCH, STEPS, directions, HIDDEN] if layout else [STEPS, directions, BATCH, HIDDEN]
    shapes = [y_shape, state_shape, state_shape]
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, s) for o, s in zip(outputs, shapes)],
                              initializer=[numpy_helper.from_array(v, k) for k, v in consts.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model, x_shape


NODE_CASES = {
    "lstm": ("LSTM", {}, {}),
    "lstm-reverse-batch-first-states": ("LSTM", {"direction": "reverse"}, {"layout": 1, "initial": True}),
    "lstm-bidirectional-lengths": ("LSTM", {"direction": "bidirectional"}, {"lengths": [6, 2, 4], "initial": True}),
    "lstm-peepholes-clip": ("LSTM", {"clip": 0.7}, {"peepholes": True, "initial": True}),
    "lstm-input-forget": ("LSTM", {"input_forget": 1}, {}),
    "lstm-activations": ("LSTM", {"activations": ["HardSigmoid", "LeakyRelu", "ScaledTanh"],
                                  "activation_alpha": [0.3, 0.05, 1.5], "activation_beta": [0.4, 0.8]}, {}),
    "gru": ("GRU", {}, {}),
    "gru-linear-before-reset": ("GRU", {"linear_before_reset": 1}, {"initial": True}),
    "gru-bidirectional-lengths-batch-first": ("GRU", {"direction": "bidirectional", "linear_before_reset": 1},
                                              {"lengths": [3, 6, 1], "layout": 1}),
    "rnn": ("RNN", {}, {}),
    "rnn-reverse-relu": ("RNN", {"direction": "reverse", "activations": ["Relu"]}, {"initial": True}),
    "rnn-bidirectional-affine": ("RNN", {"direction": "bidirectional", "activations": ["Affine", "Tanh"],
                                         "activation_alpha": [0.5], "activation_beta": [0.1]}, {"lengths": [2, 6, 5]}),
}


@pytest.mark.parametrize("name", sorted(NODE_CASES))
def test_recurrent_node_matches_onnxruntime(name):
    """Every output (Y, Y_h and Y_c) under jit, with directions, layouts, initial states, per-sequence
    lengths (steps past a sequence's end leave its state alone and give zero outputs), peepholes, clip,
    coupled gates and parameterised activations; its gradient is finite. onnxruntime has no batch-first
    (layout 1) kernels: such a node is compared with onnxruntime on its layout-0 twin, axes swapped."""
    import jax
    import jax.numpy as jnp

    op, attrs, options = NODE_CASES[name]
    model, x_shape = _node_model(op, attrs, **options)
    x = _rand(*x_shape, seed=0)
    if options.get("layout"):
        twin, _ = _node_model(op, attrs, **{**options, "layout": 0})
        expected = ort_session(twin.SerializeToString()).run(None, {"x": np.swapaxes(x, 0, 1)})
        expected = [np.transpose(expected[0], (2, 0, 1, 3))] + [np.swapaxes(v, 0, 1) for v in expected[1:]]
    else:
        expected = ort_session(model.SerializeToString()).run(None, {"x": x})
    forward = Forward(model_from_proto(model))
    got = forward({"x": x})
    for output, ref in zip(model.graph.output, expected):
        assert np.asarray(got[output.name]).shape == ref.shape, output.name
        assert max_diff(got[output.name], ref) <= 1e-5, output.name
    grad = jax.jit(jax.grad(lambda p: jnp.sum(forward.apply(p, jnp.asarray(x))["y"] ** 2)))(forward.params)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grad.values())
    assert np.abs(np.asarray(grad["R"])).max() > 0


TORCH_CASES = {
    "lstm-2-layers-bidirectional": ("LSTM", {"num_layers": 2, "bidirectional": True}),
    "lstm-batch-first": ("LSTM", {"batch_first": True}),
    "gru-bidirectional": ("GRU", {"bidirectional": True, "batch_first": True}),
    "rnn-relu-2-layers": ("RNN", {"nonlinearity": "relu", "num_layers": 2}),
}


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("name", sorted(TORCH_CASES))
def test_torch_recurrent_classifier_matches(name, dynamo, torch_threads, digits):
    """A classifier reading the image's rows as a sequence (nn.LSTM / nn.GRU / nn.RNN, then a Linear on
    the last step), exported by both of torch 2.13's exporters with a free batch: equal to PyTorch."""
    import io
    import warnings

    torch = torch_threads
    nn = torch.nn
    kind, options = TORCH_CASES[name]

    class RowReader(nn.Module):
        def __init__(self):
            super().__init__()
            self.recurrent = getattr(nn, kind)(28, 16, **options)
            self.head = nn.Linear(16 * (2 if options.get("bidirectional") else 1), 10)
            self.batch_first = options.get("batch_first", False)

        def forward(self, x):
            rows = x[:, 0] if self.batch_first else x[:, 0].transpose(0, 1)
            out, _ = self.recurrent(rows)
            return self.head(out[:, -1] if self.batch_first else out[-1])

    torch.manual_seed(0)
    net = RowReader().eval()
    x = torch.from_numpy(digits[0][:7])
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(net, (x,), dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},),
                              verbose=False).save(buffer)
        else:
            torch.onnx.export(net, (x[:2],), buffer, dynamo=False, opset_version=17, input_names=["input"],
                              dynamic_axes={"input": {0: "batch"}})
    with torch.no_grad():
        expected = net(x).numpy()
    model = model_from_proto(onnx.load_from_string(buffer.getvalue()))
    assert kind in {node.op_type for node in model.nodes} or (dynamo and kind == "RNN")  # dynamo unrolls nn.RNN
    assert max_diff(Forward(model).logits(x.numpy()), expected) < 1e-5


@pytest.mark.tf
@pytest.mark.parametrize("bidirectional", [False, True], ids=["lstm", "bidirectional-lstm"])
def test_keras_lstm_export_matches(bidirectional, export_dir, digits):
    """tf2onnx turns a Keras LSTM into an ONNX LSTM node (Bidirectional: one node, both directions)."""
    pytest.importorskip("tensorflow")
    pytest.importorskip("tf2onnx")
    import keras

    from lancet.converters.keras_export import export_keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((28, 28, 1))
    lstm = keras.layers.LSTM(12)
    features = (keras.layers.Bidirectional(lstm) if bidirectional else lstm)(keras.layers.Reshape((28, 28))(inputs))
    net = keras.Model(inputs, keras.layers.Dense(10)(features))
    x = np.transpose(digits[0][:9], (0, 2, 3, 1))
    path = export_keras(net, x[:2], export_dir / f"keras-lstm-{bidirectional}.onnx")
    model = model_from_proto(onnx.load(path))
    assert "LSTM" in {node.op_type for node in model.nodes}
    assert max_diff(Forward(model).logits(x), np.asarray(net(x, training=False))) < 1e-5


@pytest.mark.tf
@pytest.mark.parametrize("layer", ["GRU", "SimpleRNN"])
def test_keras_recurrent_loop_export_matches(layer, export_dir, digits):
    """tf2onnx writes Keras's GRU and SimpleRNN as a Loop over the time steps (trip count and condition from
    shapes and counters): the engine unrolls it, equal to Keras and onnxruntime."""
    pytest.importorskip("tensorflow")
    pytest.importorskip("tf2onnx")
    import keras

    from lancet.converters.keras_export import export_keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((28, 28, 1))
    features = getattr(keras.layers, layer)(12)(keras.layers.Reshape((28, 28))(inputs))
    net = keras.Model(inputs, keras.layers.Dense(10)(features))
    x = np.transpose(digits[0][:9], (0, 2, 3, 1))
    path = export_keras(net, x[:2], export_dir / f"keras-{layer}.onnx")
    model = model_from_proto(onnx.load(path))
    assert "Loop" in {node.op_type for node in model.nodes}
    forward = Forward(model)
    assert max_diff(forward.logits(x), np.asarray(net(x, training=False))) < 1e-5
    assert max_diff(forward.logits(x), ort_session(path).run(None, {model.input.name: x})[0]) < 1e-5


def _loop_model(condition_from_data: bool):
    """y = x * w, accumulated over a Loop of trip count 5 whose body also stops after iteration 2 (its
    condition: i < 2), with a scan output per iteration; or with a condition read from the data."""
    f, i64, b = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL
    body_nodes = [helper.make_node("Mul", ["acc_in", "w"], ["acc_out"]),
                  helper.make_node("Add", ["acc_out", "x"], ["step_out"])]
    if condition_from_data:
        body_nodes.append(helper.make_node("ReduceSum", ["acc_out"], ["total"], keepdims=0))
        body_nodes.append(helper.make_node("Less", ["total", "limit"], ["cond_out"]))
    else:
        body_nodes.append(helper.make_node("Less", ["i", "two"], ["cond_out"]))
    body = helper.make_graph(
        body_nodes, "body",
        [helper.make_tensor_value_info("i", i64, []), helper.make_tensor_value_info("cond_in", b, []),
         helper.make_tensor_value_info("acc_in", f, ["N", 3])],
        [helper.make_tensor_value_info("cond_out", b, []), helper.make_tensor_value_info("acc_out", f, ["N", 3]),
         helper.make_tensor_value_info("step_out", f, ["N", 3])],
        initializer=[numpy_helper.from_array(np.array(2, np.int64), "two"),
                     numpy_helper.from_array(np.array(50.0, np.float32), "limit")])
    nodes = [helper.make_node("Loop", ["trips", "go", "x"], ["acc", "steps"], body=body, name="the_loop"),
             helper.make_node("ReduceSum", ["steps", "axis0"], ["stepsum"], keepdims=0),
             helper.make_node("Add", ["acc", "stepsum"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", f, ["N", 3])],
                              [helper.make_tensor_value_info("y", f, ["N", 3])],
                              initializer=[numpy_helper.from_array(np.array(5, np.int64), "trips"),
                                           numpy_helper.from_array(np.array([0], np.int64), "axis0"),
                                           numpy_helper.from_array(np.array(True), "go"),
                                           numpy_helper.from_array(np.array([1.5, -0.5, 2.0], np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def test_loop_unrolled_ends_where_its_condition_does():
    """Trip count 5, condition i < 2: three iterations (onnxruntime's count), carried value and stacked scan
    output equal to onnxruntime's; the outer tensors the body reads (x, w) arrive by name; w gets a gradient."""
    import jax
    import jax.numpy as jnp

    model = _loop_model(condition_from_data=False)
    x = _rand(4, 3, seed=0)
    expected = ort_session(model.SerializeToString()).run(None, {"x": x})[0]
    forward = Forward(model_from_proto(model))
    assert max_diff(forward({"x": x})["y"], expected) <= 1e-5
    grad = jax.grad(lambda p: jnp.sum(forward.apply(p, jnp.asarray(x))["y"]))(forward.params)
    assert np.abs(np.asarray(grad["w"])).max() > 0


def test_loop_on_the_data_with_scan_outputs_is_refused(tmp_path):
    """A Loop whose condition reads the data may stop at any iteration, so the length of its scan output
    would depend on the data: exit 2 naming the node (tests/test_control_flow.py: one without scan outputs
    runs)."""
    from .test_bad_input import assert_clean_failure, run_cli, save

    path = save(_loop_model(condition_from_data=True), tmp_path / "data-loop.onnx")
    np.savez(tmp_path / "case.npz", x_clean=_rand(6, 3, seed=1), y_clean=np.array([0, 1, 2, 0, 1, 2]))
    assert_clean_failure(*run_cli("eval", path, "--data", str(tmp_path / "case.npz"), "--backend", "jax"),
                         "the_loop", "Loop", "condition depends on the input", "scan outputs")


def test_lstm_classifier_repair_end_to_end(tmp_path):
    """A backdoored row-reading LSTM (the zoo's 'lstm': nn.LSTM then two dense layers) on MNIST digits,
    repaired by fine-tuning: the LSTM's input and recurrent weights are weight-neuron candidates beside the
    dense layers (gradients and ablations run through the scan); the written file keeps its node list and,
    on held-out data, the attack fails (measured on an AVX-512 EPYC: 99.9 -> 0.3 % ASR, accuracy 89.1 ->
    89.3 %, the set in the LSTM's input weights; with the dense layers only, before recurrent layers were
    candidates: 4.5 %)."""
    pytest.importorskip("torch")
    from lancet import load_model
    from lancet.models.recipes import Recipe, build_case
    from lancet.neurons import summary
    from lancet.repair import repair

    built = build_case(Recipe(arch="lstm"))
    out = tmp_path / "lstm-repaired.onnx"
    result = repair(built.model, built.case, out, method="finetune", progress=False)
    assert result.written, result.status
    assert {layer.name for layer in result.locate_result.scores.layers if layer.weight_only} == \
        {"/recurrent/LSTM:W", "/recurrent/LSTM:R"}
    changed = set(assert_backdoor_removed(dict(np.load(built.heldout)), built.model, out))
    assert changed and changed == {name for name, count in result.changed_parameters.items() if count}
    # `lancet inspect` lists the LSTM's W and R among the layers: nothing is left outside them
    info = summary(load_model(built.model))
    assert [layer["op_type"] for layer in info["layers"]] == ["LSTM", "LSTM", "Gemm", "Gemm"]
    assert info["outside_layers"] == {"parameters": 0, "read_by": {}}


def test_ablation_of_recurrent_weights_matches_a_plain_forward():
    """The ablation search evaluates a scope from the first node it changes, reusing the prefix; at an LSTM
    the live input is time-major ([steps, batch, features]), which the prefix cache cannot split by batch:
    the scope runs whole. Its clean accuracy per k equals a plain forward with those weights zeroed (with
    the prefix split along the wrong axis it did not, and the repair picked another scope)."""
    pytest.importorskip("torch")
    from lancet import load_model
    from lancet.case import load_case
    from lancet.locate import build_pairs, score_neurons
    from lancet.locate.ablation import Ablator
    from lancet.locate.common import predict_labels
    from lancet.models.recipes import Recipe, build_case
    from lancet.neurons import find_layers

    built = build_case(Recipe(arch="lstm"))
    model = load_model(built.model)
    forward = Forward(model)
    case = load_case(built.case, model)
    pairs = build_pairs(forward, case)
    scores = score_neurons(forward, pairs, case.x_clean, case.y_clean, find_layers(model, weight_only=True))
    ablator = Ablator(forward, scores, pairs, case.x_clean, case.y_clean)
    weight = next(layer.weight for layer in scores.layers if layer.name.endswith(":W"))
    ranks, _ = ablator.ranks(weight)
    ks = [16, 128]
    _, accuracy = ablator.evaluate(ranks, ks, weight, parts=("clean",))
    for k, got in zip(ks, accuracy):
        params = dict(forward.params)
        params[weight] = np.where(np.asarray(ranks[weight]) < k, 0.0, np.asarray(params[weight]))
        expected = np.mean(predict_labels(forward, case.x_clean, params=params) == case.y_clean)
        assert abs(got - expected) < 1e-9, (k, got, expected)


@pytest.mark.tf
def test_keras_gru_loop_weights_are_scored_and_ablated_through_the_loop(export_dir, digits):
    """A Keras GRU exported as a Loop: the kernel and recurrent kernel it reads are weight-neuron layers,
    their scores come from gradients through the unrolled Loop, and ablating a Loop scope's top weights
    (a time-major input again, so the scope runs whole) equals a plain forward with them zeroed."""
    pytest.importorskip("tensorflow")
    pytest.importorskip("tf2onnx")
    import keras

    from lancet.case import validate_case
    from lancet.converters.keras_export import export_keras
    from lancet.locate import build_pairs, score_neurons
    from lancet.locate.ablation import Ablator
    from lancet.locate.common import predict_labels
    from lancet.neurons import find_layers

    keras.utils.set_random_seed(0)
    inputs = keras.Input((28, 28, 1))
    net = keras.Model(inputs, keras.layers.Dense(10)(keras.layers.GRU(12)(keras.layers.Reshape((28, 28))(inputs))))
    x = np.transpose(digits[0][:200], (0, 2, 3, 1))
    model = model_from_proto(onnx.load(export_keras(net, x[:2], export_dir / "keras-gru-scores.onnx")))
    forward = Forward(model)
    loop_layers = [layer for layer in find_layers(model, weight_only=True) if layer.op_type == "Loop"]
    assert sorted(layer.weight_shape for layer in loop_layers) == [(2, 36), (12, 36), (28, 36)]
    # an untrained net's mistakes as "errors", each paired with an input it labels as the error's right label
    labels = predict_labels(forward, x)
    error, companion = [], []
    for i in range(len(x)):
        j = next((j for j in range(len(x)) if labels[j] != labels[i]), None)
        if j is not None and len(error) < 24:
            error.append(i)
            companion.append(j)
    case = validate_case({"x_clean": x[100:], "y_clean": labels[100:], "x_error": x[error],
                          "y_error": labels[companion], "x_companion": x[companion]}, model)
    pairs = build_pairs(forward, case)
    scores = score_neurons(forward, pairs, case.x_clean, case.y_clean, find_layers(model, weight_only=True))
    kernel = next(layer.weight for layer in loop_layers if layer.weight_shape == (28, 36))
    assert np.isfinite(scores.scores[kernel]).any()
    ablator = Ablator(forward, scores, pairs, case.x_clean, case.y_clean)
    ranks, _ = ablator.ranks(kernel)
    _, accuracy = ablator.evaluate(ranks, [8, 64], kernel, parts=("clean",))
    for k, got in zip([8, 64], accuracy):
        params = dict(forward.params)
        params[kernel] = np.where(np.asarray(ranks[kernel]) < k, 0.0, np.asarray(params[kernel]))
        expected = np.mean(predict_labels(forward, case.x_clean, params=params) == case.y_clean)
        assert abs(got - expected) < 1e-9, (k, got, expected)
