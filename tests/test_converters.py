"""The exporters check the ONNX file against the framework's output and never leave a bad file behind."""
from __future__ import annotations

import numpy as np
import pytest

from lancet.converters import ConversionError


def test_torch_export_mismatch_is_an_error(tmp_path, torch_threads):
    from lancet.converters.torch_export import export_torch
    from lancet.models.torch_zoo import build

    x = np.random.default_rng(0).normal(size=(2, 1, 28, 28)).astype(np.float32)
    target = tmp_path / "m.onnx"
    with pytest.raises(ConversionError, match="differs from PyTorch"):
        export_torch(build("lenet5", 1, 28), x, target, atol=-1.0)  # no export can meet a negative tolerance
    assert not target.exists() and list(tmp_path.iterdir()) == []
    export_torch(build("lenet5", 1, 28), x, target)
    assert target.is_file()


def test_torch_export_failure_is_an_error(tmp_path, torch_threads):
    from lancet.converters.torch_export import export_torch
    from lancet.models.torch_zoo import build

    wrong_shape = np.zeros((2, 3, 28, 28), np.float32)
    with pytest.raises(ConversionError, match="failed"):
        export_torch(build("lenet5", 1, 28), wrong_shape, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []
