"""Models that take integer pixels (uint8 images Cast and scaled inside the graph, as deployed models often
do): the engine feeds them float32 holding the same integers, onnxruntime the file's type."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from lancet import Forward, load_model
from lancet.case import load_case, validate_case
from lancet.cli import main
from lancet.evaluate import OrtPredictor


def taking_uint8(source, path):
    """`source` behind Cast(uint8 -> float) and a division by 255: its input becomes uint8 pixels."""
    model = onnx.load(source)
    graph_in = model.graph.input[0]
    for node in model.graph.node:
        node.input[:] = ["scaled" if name == graph_in.name else name for name in node.input]
    model.graph.initializer.append(numpy_helper.from_array(np.array(255.0, np.float32), "per_pixel"))
    model.graph.node.insert(0, helper.make_node("Div", ["as_float", "per_pixel"], ["scaled"]))
    model.graph.node.insert(0, helper.make_node("Cast", [graph_in.name], ["as_float"], to=TensorProto.FLOAT))
    graph_in.type.tensor_type.elem_type = TensorProto.UINT8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def as_pixels(arrays: dict) -> dict:
    return {key: np.rint(value * 255).astype(np.uint8) if key.startswith("x_") else value
            for key, value in arrays.items()}


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_uint8_model_evaluates_and_repairs(backdoor_case, tmp_path):
    """Before: refused ("no float input"). Now both engines agree with the float model on the same images,
    the repair is accepted, and the written file still takes uint8 with the backdoor gone on held-out data."""
    path = taking_uint8(backdoor_case.model, tmp_path / "pixels.onnx")
    case_path = tmp_path / "case.npz"
    np.savez(case_path, **as_pixels(dict(np.load(backdoor_case.case))))
    plain = json.loads(run("eval", backdoor_case.model, "--data", backdoor_case.case, "--json").output)
    for backend in ("ort", "jax"):
        result = run("eval", path, "--data", case_path, "--backend", backend, "--json")
        assert result.exit_code == 0, result.output
        report = json.loads(result.output)
        assert abs(report["clean_accuracy"] - plain["clean_accuracy"]) <= 0.005
        assert report["error_accuracy"] <= plain["error_accuracy"] + 0.02
    out = tmp_path / "fixed.onnx"
    result = run("repair", path, "--data", case_path, "--out", out, "--candidates", "1")
    assert result.exit_code == 0, result.output
    assert onnx.load(out).graph.input[0].type.tensor_type.elem_type == TensorProto.UINT8
    heldout = as_pixels(dict(np.load(backdoor_case.heldout)))
    repaired = OrtPredictor(load_model(out), out)
    x_error = heldout["x_error"].astype(np.float32)
    assert np.mean(repaired.predict(x_error) == int(np.load(backdoor_case.heldout)["target"])) <= 0.05


def test_scaled_images_for_a_pixel_model_are_refused(backdoor_case, tmp_path):
    """Images scaled to [0, 1] for a model that divides by 255 itself would be read as near-black: refused,
    naming the key and what the model takes."""
    path = taking_uint8(backdoor_case.model, tmp_path / "pixels.onnx")
    result = run("eval", path, "--data", backdoor_case.case)
    assert result.exit_code == 2
    assert "'x_clean'" in result.output and "not uint8 pixels" in result.output and "0..255" in result.output


def test_trigger_restoration_on_pixels_matches_the_float_model(backdoor_case, tmp_path):
    """Clean data only: the restoration flags the same target with the same mask sizes on pixels in 0..255
    as on the float model's 0..1 (the additive trigger model works in units of the input range)."""
    from lancet.locate.restore import restore_triggers

    float_model = load_model(backdoor_case.model)
    float_case = load_case(backdoor_case.case, float_model)
    pixel_model = load_model(taking_uint8(backdoor_case.model, tmp_path / "pixels.onnx"))
    pixels = validate_case(as_pixels({"x_clean": float_case.x_clean, "y_clean": float_case.y_clean}), pixel_model)
    pixel_forward = Forward(pixel_model)
    assert restore_triggers(pixel_forward, pixels.x_clean, 10, kind="mask", steps=100).flagged == 0
    on_floats = restore_triggers(Forward(float_model), float_case.x_clean, 10, kind="additive", steps=100)
    on_pixels = restore_triggers(pixel_forward, pixels.x_clean, 10, kind="additive", steps=100)
    assert on_pixels.flagged == on_floats.flagged
    np.testing.assert_allclose(on_pixels.norms, on_floats.norms, rtol=0.1)
    assert np.abs(on_pixels.patterns).max() > 10 * np.abs(on_floats.patterns).max()  # in pixel units


@pytest.fixture(autouse=True)
def _needs_torch():
    pytest.importorskip("torch")
