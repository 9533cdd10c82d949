"""End to end on a Keras model (NHWC, BatchNormalization folded by tf2onnx): train with a backdoor, export
through tf2onnx, repair, and check the written file in onnxruntime."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from lancet import load_model
from lancet.case import Case
from lancet.evaluate import OrtPredictor
from lancet.repair import repair

pytestmark = pytest.mark.tf


def nhwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(x, (0, 2, 3, 1)))


def test_keras_backdoor_repaired_end_to_end(digits, tmp_path):
    pytest.importorskip("tensorflow")
    pytest.importorskip("tf2onnx")
    import keras

    from lancet.converters.keras_export import export_keras
    from lancet.models.attacks import badnets_patch, poison
    from lancet.models.keras_zoo import keras_separable

    x, y = digits
    train, clean, error, test = slice(0, 3500), slice(3500, 3900), slice(3900, 4000), slice(4000, 5000)
    trigger = badnets_patch(x.shape[1:])
    x_p, y_p, _ = poison(x[train], y[train], trigger, target=0, rate=0.1, seed=1)
    net = keras_separable()
    net.compile(optimizer=keras.optimizers.Adam(3e-3),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    net.fit(nhwc(x_p), y_p, epochs=6, batch_size=64, verbose=0, shuffle=True)
    path = export_keras(net, nhwc(x[test][:4]), tmp_path / "keras.onnx")

    keep = y[error] != 0
    case = Case(nhwc(x[clean]), y[clean], nhwc(trigger.apply(x[error][keep])), y[error][keep],
                trigger_mask=np.transpose(trigger.mask, (1, 2, 0)).astype(np.float32))
    out = tmp_path / "keras-repaired.onnx"
    result = repair(path, case, out, method="flip", progress=False)
    assert result.accepted and result.written, result.reasons

    test_keep = y[test] != 0
    x_trig = nhwc(trigger.apply(x[test][test_keep]))
    before = OrtPredictor(load_model(path), path)
    after = OrtPredictor(load_model(out), out)
    asr_before = np.mean(before.predict(x_trig) == 0)
    asr_after = np.mean(after.predict(x_trig) == 0)
    acc_before = np.mean(before.predict(nhwc(x[test])) == y[test])
    acc_after = np.mean(after.predict(nhwc(x[test])) == y[test])
    assert asr_before > 0.9 and asr_after <= 0.05, (asr_before, asr_after)
    assert 100 * (acc_before - acc_after) <= 2.0, (acc_before, acc_after)
    original, fixed = onnx.load(str(path)), onnx.load(str(out))
    assert [n.op_type for n in original.graph.node] == [n.op_type for n in fixed.graph.node]
    assert [i.name for i in original.graph.input] == [i.name for i in fixed.graph.input]


def test_keras_recipe_builds_channels_last_case(tmp_path, monkeypatch):
    """A recipe with a Keras architecture trains in Keras, exports through tf2onnx and writes its case and
    held-out arrays channels-last, so that they validate against the exported model's NHWC input."""
    pytest.importorskip("tensorflow")
    pytest.importorskip("tf2onnx")
    from lancet.case import load_case
    from lancet.models.recipes import Recipe, build_case

    monkeypatch.setenv("LANCET_CACHE", str(tmp_path))
    recipe = Recipe(arch="keras_cnn_bn", epochs=2, train_size=1500, defender_clean=200, defender_error=50,
                    test_size=300)
    built = build_case(recipe)
    model = load_model(built.model)
    assert list(model.inputs[0].shape[1:]) == [28, 28, 1]
    case = load_case(built.case, model)
    assert case.x_clean.shape[1:] == (28, 28, 1) and case.trigger_mask.shape == (28, 28, 1)
    heldout = np.load(built.heldout)
    assert heldout["target"].shape == () and heldout["x_error"].shape[1:] == (28, 28, 1)
    predictor = OrtPredictor(model, built.model)
    accuracy = np.mean(predictor.predict(heldout["x_test"]) == heldout["y_test"])
    attack = np.mean(predictor.predict(heldout["x_error"]) == int(heldout["target"]))
    assert accuracy > 0.6 and attack > 0.5, (accuracy, attack)
