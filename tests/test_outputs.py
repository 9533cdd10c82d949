"""Models with more than one output: the class scores are found (or named with --output) whatever the
outputs' order, and the repaired file keeps every output in its place."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from lancet.cli import main
from lancet.loader import load_model
from lancet.runtime import ort_session


def with_outputs(source, path, order):
    """`source` with a predicted label (ArgMax, int64) and probabilities (Softmax) beside its logits, as
    exports of deployed classifiers often carry, in the given order of output names."""
    model = onnx.load(source)
    logits = model.graph.output[0]
    model.graph.node.extend([helper.make_node("ArgMax", [logits.name], ["label"], axis=1, keepdims=0),
                             helper.make_node("Softmax", [logits.name], ["probs"], axis=1)])
    infos = {"label": helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
             "probs": helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 10]),
             logits.name: logits}
    del model.graph.output[:]
    model.graph.output.extend([infos[name] for name in order])
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_class_scores_are_the_first_float_output_or_the_named_one(backdoor_case, tmp_path):
    logits_name = onnx.load(backdoor_case.model).graph.output[0].name
    path = with_outputs(backdoor_case.model, tmp_path / "multi.onnx", ["label", "probs", logits_name])
    assert load_model(path).output.name == "probs"
    assert load_model(path, output=logits_name).output.name == logits_name
    plain = json.loads(run("eval", backdoor_case.model, "--data", backdoor_case.case, "--json").output)
    for backend in ("ort", "jax"):
        for named in ((), ("--output", logits_name)):
            result = run("eval", path, "--data", backdoor_case.case, "--backend", backend, "--json", *named)
            assert result.exit_code == 0, result.output
            report = json.loads(result.output)
            assert report["scores_output"] == (named[1] if named else "probs")
            assert (report["clean_accuracy"], report["error_accuracy"]) == (plain["clean_accuracy"],
                                                                            plain["error_accuracy"])
    info = json.loads(run("inspect", path, "--json").output)
    assert [o["name"] for o in info["outputs"]] == ["label", "probs", logits_name]  # the file's order
    assert info["scores_output"] == "probs"


def test_output_errors_name_the_outputs(backdoor_case, tmp_path):
    logits_name = onnx.load(backdoor_case.model).graph.output[0].name
    path = with_outputs(backdoor_case.model, tmp_path / "multi.onnx", ["label", "probs", logits_name])
    wrong = run("eval", path, "--data", backdoor_case.case, "--output", "label")
    assert wrong.exit_code == 2 and "'label'" in wrong.output and "int64, not class scores" in wrong.output
    missing = run("repair", path, "--data", backdoor_case.case, "--out", tmp_path / "o.onnx", "--output", "nope")
    assert missing.exit_code == 2 and "no output 'nope'" in missing.output and "probs (float32)" in missing.output
    assert not (tmp_path / "o.onnx").exists()
    labels_only = with_outputs(backdoor_case.model, tmp_path / "labels.onnx", ["label"])
    none = run("eval", labels_only, "--data", backdoor_case.case)
    assert none.exit_code == 2 and "no float output" in none.output and "label (int64)" in none.output


def test_repair_of_a_model_whose_first_output_is_the_label(backdoor_case, tmp_path):
    """Before: a bare traceback (the int64 label was read as the scores). Now the repair scores 'probs',
    checks parity on it, and writes a file with the same outputs in the same order, its label output the
    arg-max of its repaired scores, the backdoor gone on the held-out triggered inputs."""
    logits_name = onnx.load(backdoor_case.model).graph.output[0].name
    order = ["label", "probs", logits_name]
    path = with_outputs(backdoor_case.model, tmp_path / "multi.onnx", order)
    out, report_path = tmp_path / "fixed.onnx", tmp_path / "r.json"
    result = run("repair", path, "--data", backdoor_case.case, "--out", out, "--candidates", "1",
                 "--report", report_path)
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert report["accepted"] and report["locate"]["scores_output"] == "probs"
    original, repaired = onnx.load(path), onnx.load(out)
    assert [o.name for o in repaired.graph.output] == order
    assert [n.op_type for n in repaired.graph.node] == [n.op_type for n in original.graph.node]
    heldout = dict(np.load(backdoor_case.heldout))
    session = ort_session(out)
    name = session.get_inputs()[0].name
    label, probs, logits = session.run(None, {name: heldout["x_error"]})
    np.testing.assert_array_equal(label, np.argmax(logits, axis=1))
    assert np.mean(np.argmax(probs, axis=1) == heldout["target"]) <= 0.05
    before = ort_session(path).run(["label"], {name: heldout["x_error"]})[0]
    assert np.mean(before == heldout["target"]) > 0.9


def reshaped_head(source, path, shape):
    """`source` with its logits reshaped to `shape` (0: the batch), as a 1 x 1 convolution head with a
    global pool and no Flatten leaves them ([n, C, 1, 1]; channels-last [n, 1, 1, C])."""
    model = onnx.load(source)
    logits = model.graph.output[0].name
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(shape, np.int64), "head_shape"))
    model.graph.node.append(helper.make_node("Reshape", [logits, "head_shape"], ["scores"]))
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("scores", TensorProto.FLOAT,
                                                            ["batch", *shape[1:]]))
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def test_singleton_axes_beside_the_classes(backdoor_case, tmp_path):
    """Before: [n, 10, 1, 1] was read as one class ("labels outside the model's output range 0..0"). Now the
    scores are flattened to [n, 10] on both engines; the repaired file keeps its [n, 10, 1, 1] output."""
    plain = json.loads(run("eval", backdoor_case.model, "--data", backdoor_case.case, "--json").output)
    last = reshaped_head(backdoor_case.model, tmp_path / "nhwc.onnx", [0, 1, 1, 10])
    for backend in ("ort", "jax"):
        result = run("eval", last, "--data", backdoor_case.case, "--backend", backend, "--json")
        assert result.exit_code == 0, result.output
        assert json.loads(result.output)["clean_accuracy"] == plain["clean_accuracy"]
    path = reshaped_head(backdoor_case.model, tmp_path / "head.onnx", [0, 10, 1, 1])
    out = tmp_path / "fixed.onnx"
    result = run("repair", path, "--data", backdoor_case.case, "--out", out, "--candidates", "1")
    assert result.exit_code == 0, result.output
    heldout = dict(np.load(backdoor_case.heldout))
    session = ort_session(out)
    scores = session.run(None, {session.get_inputs()[0].name: heldout["x_error"]})[0]
    assert scores.shape == (len(heldout["x_error"]), 10, 1, 1)
    assert np.mean(np.argmax(scores[:, :, 0, 0], axis=1) == heldout["target"]) <= 0.05
    spatial = reshaped_head(backdoor_case.model, tmp_path / "map.onnx", [0, 5, 2, 1])
    refused = run("eval", spatial, "--data", backdoor_case.case)
    assert refused.exit_code == 2 and "'scores' has shape" in refused.output and "[n, classes]" in refused.output


@pytest.fixture(autouse=True)
def _needs_torch():
    pytest.importorskip("torch")
