"""Half-precision models: float16 weights and inputs (a model halved for deployment), and mixed precision
(float32 input Cast to float16 inside). The engine computes them in float32; onnxruntime runs the file as it
is; the repaired file keeps its float16 weights and input type."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from lancet import Forward, load_model
from lancet.cli import main
from lancet.evaluate import OrtPredictor


def halved(source, path, keep_io_types=False):
    """`source` with every float initializer in float16; its input and output in float16 too, or (with
    `keep_io_types`) float32 with a Cast to float16 after the input and back before the output."""
    model = onnx.load(source)
    for index, init in enumerate(model.graph.initializer):
        if init.data_type == TensorProto.FLOAT:
            half = numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name)
            model.graph.initializer[index].CopyFrom(half)
    del model.graph.value_info[:]
    graph_in, graph_out = model.graph.input[0], model.graph.output[0]
    if keep_io_types:
        for node in model.graph.node:
            node.input[:] = ["x16" if name == graph_in.name else name for name in node.input]
            node.output[:] = ["y16" if name == graph_out.name else name for name in node.output]
        model.graph.node.insert(0, helper.make_node("Cast", [graph_in.name], ["x16"], to=TensorProto.FLOAT16))
        model.graph.node.append(helper.make_node("Cast", ["y16"], [graph_out.name], to=TensorProto.FLOAT))
    else:
        graph_in.type.tensor_type.elem_type = graph_out.type.tensor_type.elem_type = TensorProto.FLOAT16
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("keep_io_types", [False, True], ids=["float16-io", "mixed"])
def test_half_model_runs_in_both_engines(backdoor_case, tmp_path, keep_io_types):
    """Before: onnxruntime was fed float32 ("expected: (tensor(float16))", a bare traceback) and the JAX
    forward mixed float32 activations with float16 kernels in one convolution."""
    path = halved(backdoor_case.model, tmp_path / "half.onnx", keep_io_types)
    model = load_model(path)
    assert model.half_precision and set(map(str, model.param_dtypes.values())) == {"float16"}
    assert all(value.dtype == np.float32 for value in model.params.values())  # computed in float32
    x = np.load(backdoor_case.case)["x_clean"][:64]
    scores = np.asarray(Forward(model).logits(x))
    reference = OrtPredictor(model, path).logits(x)
    assert scores.dtype == reference.dtype == np.float32
    assert np.max(np.abs(scores - reference)) <= 1e-2 * max(1.0, np.max(np.abs(reference)))
    full = OrtPredictor(load_model(backdoor_case.model), backdoor_case.model).predict(x)
    assert np.mean(np.argmax(reference, axis=1) == full) >= 0.98


def test_half_model_repaired_in_its_own_precision(backdoor_case, tmp_path):
    source = halved(backdoor_case.model, tmp_path / "half.onnx")
    out, report_path = tmp_path / "fixed.onnx", tmp_path / "r.json"
    result = CliRunner().invoke(main, [str(a) for a in ("repair", source, "--data", backdoor_case.case, "--out", out,
                                                          "--candidates", "1", "--report", report_path)])
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert report["accepted"] and 0 < report["parity_max_abs_diff"] <= 0.5
    before = {t.name: numpy_helper.to_array(t) for t in onnx.load(source).graph.initializer}
    written = onnx.load(out)
    after = {t.name: numpy_helper.to_array(t) for t in written.graph.initializer}
    assert all(after[name].dtype == before[name].dtype for name in before)
    changed = {name for name in before if not np.array_equal(before[name], after[name])}
    assert changed == set(report["changed_parameters"])
    assert written.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    heldout = dict(np.load(backdoor_case.heldout))
    predictor = OrtPredictor(load_model(out), out)
    original = OrtPredictor(load_model(source), source)
    acc_before = np.mean(original.predict(heldout["x_test"]) == heldout["y_test"])
    acc_after = np.mean(predictor.predict(heldout["x_test"]) == heldout["y_test"])
    asr_after = np.mean(predictor.predict(heldout["x_error"]) == heldout["target"])
    assert asr_after <= 0.05 and acc_before - acc_after <= 0.02, (acc_before, acc_after, asr_after)


def test_stored_values_are_rounded_to_the_parameters_type(backdoor_case, tmp_path):
    """What a repair is judged on is what the file will hold: float16 parameters rounded to float16."""
    model = load_model(halved(backdoor_case.model, tmp_path / "half.onnx"))
    name = next(iter(model.param_dtypes))
    value = np.full(model.params[name].shape, 0.1 + 1e-5, np.float32)
    stored = model.stored({name: value})[name]
    assert stored.dtype == np.float32 and np.all(stored == np.float32(np.float16(0.1 + 1e-5)))
    assert np.all(stored != value)


@pytest.fixture(autouse=True)
def _needs_torch():
    pytest.importorskip("torch")
