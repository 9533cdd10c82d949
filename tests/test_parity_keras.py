"""JAX engine vs onnxruntime on Keras (NHWC) models exported through tf2onnx."""
from __future__ import annotations

import numpy as np
import pytest

from lancet import Forward, load_model
from lancet.runtime import ort_session

from .conftest import max_diff

pytestmark = pytest.mark.tf


@pytest.mark.parametrize("name", ["keras_cnn_bn", "keras_separable", "keras_gru"])
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


def test_keras_export_with_a_fixed_batch_runs_on_any_batch(export_dir, digits):
    """tf2onnx with a fixed batch of 1 in the input signature folds it into the graph's Reshape shapes;
    the engine runs the file on 7 inputs equal to Keras."""
    tf = pytest.importorskip("tensorflow")
    tf2onnx = pytest.importorskip("tf2onnx")
    from lancet.forward import hard_codes_batch
    from lancet.models.keras_zoo import KERAS_ARCHITECTURES

    net = KERAS_ARCHITECTURES["keras_cnn_bn"]()
    path = export_dir / "keras_cnn_bn-batch1.onnx"
    spec = [tf.TensorSpec((1, 28, 28, 1), tf.float32, name="input")]
    tf2onnx.convert.from_function(tf.function(lambda x: net(x, training=False)), input_signature=spec, opset=17,
                                  output_path=str(path))
    model = load_model(path)
    assert hard_codes_batch(model)
    x = np.transpose(digits[0][:7], (0, 2, 3, 1))
    assert max_diff(Forward(model).logits(x), np.asarray(net(x, training=False))) <= 1e-4
