"""JAX engine vs onnxruntime on Keras (NHWC) models exported through tf2onnx."""
from __future__ import annotations

import numpy as np
import pytest

from lancet import Forward, load_model
from lancet.runtime import ort_session

from .conftest import max_diff

pytestmark = pytest.mark.tf


@pytest.mark.parametrize("name", ["keras_cnn_bn", "keras_separable"])
def test_keras_export_matches(name, export_dir, digits):
    pytest.importorskip("tensorflow")
    pytest.importorskip("tf2onnx")
    from lancet.converters.keras_export import export_keras
    from lancet.models.keras_zoo import KERAS_ARCHITECTURES

    net = KERAS_ARCHITECTURES[name]()
    real = np.transpose(digits[0][:32], (0, 2, 3, 1))  # NHWC
    random_x = np.random.default_rng(0).normal(size=real.shape).astype(np.float32)
    path = export_keras(net, real[:2], export_dir / f"{name}.onnx")
    model = load_model(path)
    assert model.input.shape[1:] == (28, 28, 1)
    forward = Forward(model)
    session = ort_session(path)
    for x in (random_x, real):
        for batch in (1, 32):
            expected = session.run(None, {model.input.name: x[:batch]})[0]
            assert max_diff(forward.logits(x[:batch]), expected) <= 1e-4
