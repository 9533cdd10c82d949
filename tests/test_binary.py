"""Two-class models with one output column (a sigmoid probability or a logit): labels, locate and repair.

The model is an MLP on real MNIST digits, class 1 = digits 5-9, backdoored with a BadNets patch that sends
class 1 to class 0. It is trained with two logits and exported with one: z = l1 - l0 and a Sigmoid, the same
classifier (p > 0.5 exactly where l1 > l0).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest

from lancet import Forward, load_model
from lancet.case import load_case
from lancet.evaluate import OrtPredictor
from lancet.repair import repair


@dataclass
class BinaryCase:
    model: Path
    case: Path
    x_test: np.ndarray
    y_test: np.ndarray
    x_triggered: np.ndarray  # class-1 test images with the patch (the attack sends them to 0)
    torch_labels: np.ndarray  # PyTorch's labels for x_test
    torch_margin: np.ndarray  # |p - 0.5| of PyTorch's probabilities: labels are compared where it is not tiny


@pytest.fixture(scope="module")
def binary_case(digits, tmp_path_factory, torch_threads) -> BinaryCase:
    torch = torch_threads
    from torch import nn

    from lancet.converters.torch_export import export_torch
    from lancet.models.attacks import badnets_patch, poison
    from lancet.models.train import train_classifier

    x, digit = digits
    y = (digit >= 5).astype(np.int64)
    trigger = badnets_patch(x.shape[1:])
    train, defender, test = slice(0, 3000), slice(3000, 3500), slice(3500, 5000)
    x_train, y_train, _ = poison(x[train], y[train], trigger, target=0, rate=0.1, num_classes=2)
    two = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 2))
    train_classifier(two, x_train, y_train, epochs=8, lr=3e-3)
    head = nn.Linear(64, 1)
    with torch.no_grad():
        head.weight.copy_(two[3].weight[1:] - two[3].weight[:1])
        head.bias.copy_(two[3].bias[1:] - two[3].bias[:1])
    one = nn.Sequential(two[0], two[1], two[2], head, nn.Sigmoid()).eval()
    folder = tmp_path_factory.mktemp("binary")
    model = export_torch(one, x[:2], folder / "binary.onnx")
    xd, yd = x[defender], y[defender]
    ones = np.flatnonzero(yd == 1)[:100]
    case = folder / "case.npz"
    np.savez(case, x_clean=xd[:400], y_clean=yd[:400], x_error=trigger.apply(xd[ones]), y_error=yd[ones])
    x_test, y_test = x[test], y[test]
    with torch.no_grad():
        p = one(torch.from_numpy(x_test))[:, 0].numpy()
    return BinaryCase(model, case, x_test, y_test, trigger.apply(x_test[y_test == 1]), (p > 0.5).astype(np.int64),
                      np.abs(p - 0.5))


def test_one_output_column_is_two_classes(binary_case):
    """Labels from one sigmoid column: class 1 above 0.5, in onnxruntime and in JAX, as in PyTorch; the
    case's labels 0 and 1 are within the model's output range."""
    model = load_model(binary_case.model)
    assert model.outputs[0].shape[-1] == 1
    load_case(binary_case.case, model)
    clear = binary_case.torch_margin > 1e-5
    assert clear.mean() > 0.99
    for predictor in (OrtPredictor(model, binary_case.model), Forward(model)):
        assert np.array_equal(predictor.predict(binary_case.x_test)[clear], binary_case.torch_labels[clear])
    assert 0 < binary_case.torch_labels.mean() < 1


def test_two_class_backdoor_is_repaired(binary_case, tmp_path):
    """Locate and fine-tune on a one-column model: held-out attack success falls, clean accuracy holds,
    and the written file still ends in its Sigmoid with one column."""
    before = OrtPredictor(load_model(binary_case.model), binary_case.model)
    acc_before = np.mean(before.predict(binary_case.x_test) == binary_case.y_test)
    asr_before = np.mean(before.predict(binary_case.x_triggered) == 0)
    assert asr_before > 0.8
    out = tmp_path / "repaired.onnx"
    result = repair(binary_case.model, binary_case.case, out, method="finetune", progress=False)
    assert result.written
    after = OrtPredictor(load_model(out), out)
    acc_after = np.mean(after.predict(binary_case.x_test) == binary_case.y_test)
    asr_after = np.mean(after.predict(binary_case.x_triggered) == 0)
    assert asr_after <= 0.05, (asr_before, asr_after)
    assert 100 * (acc_before - acc_after) <= 2.0, (acc_before, acc_after)
    graph = onnx.load(str(out)).graph
    assert graph.node[-1].op_type == "Sigmoid" and graph.output[0].type.tensor_type.shape.dim[1].dim_value == 1


def test_clean_data_only_on_two_classes_says_what_to_give(binary_case, tmp_path):
    """Trigger restoration rates each class's trigger against the others': with two classes there is
    nothing to rate against, so a clean-data-only case is refused with what to add, not 'no backdoor'."""
    from click.testing import CliRunner

    from lancet.cli import main

    arrays = dict(np.load(binary_case.case))
    clean_only = tmp_path / "clean.npz"
    np.savez(clean_only, x_clean=arrays["x_clean"], y_clean=arrays["y_clean"])
    result = CliRunner().invoke(main, ["locate", str(binary_case.model), "--data", str(clean_only)])
    assert result.exit_code == 2 and "three classes" in result.output and "x_error" in result.output
    assert "Traceback" not in result.output
