"""JAX engine vs onnxruntime on PyTorch exports of every zoo architecture (random and real inputs)."""
from __future__ import annotations

import numpy as np
import pytest

from lancet import Forward, load_model
from lancet.runtime import ort_session

from .conftest import max_diff

CASES = [
    # (architecture, input channels, image size, opset, keep BatchNormalization nodes)
    ("mlp", 1, 28, 17, False),
    ("mlp", 1, 28, 9, False),
    ("mlp_deep", 1, 28, 17, False),
    ("lenet5", 1, 28, 17, False),
    ("lenet5", 1, 28, 11, False),
    ("vgg11", 3, 32, 17, True),
    ("resnet18", 3, 32, 17, False),
    ("resnet18", 3, 32, 13, True),
    ("mobilenetv2", 3, 32, 17, True),
    ("mobilenetv2", 3, 32, 11, False),
    ("densenet", 3, 32, 17, False),
    ("vit", 3, 32, 17, False),   # LayerNormalization op
    ("vit", 3, 32, 13, False),   # LayerNorm decomposed (ReduceMean, Pow, Sqrt), Split, Erf
]


@pytest.mark.parametrize("arch,channels,size,opset,keep_bn", CASES,
                         ids=[f"{a}-op{o}{'-bn' if k else ''}" for a, _, _, o, k in CASES])
def test_jax_matches_onnxruntime(arch, channels, size, opset, keep_bn, export_dir, real_inputs, torch_threads):
    from lancet.converters.torch_export import export_torch
    from lancet.models.torch_zoo import build

    net = build(arch, channels, size, seed=1)
    random_x = np.random.default_rng(0).normal(size=(32, channels, size, size)).astype(np.float32)
    path = export_torch(net, random_x[:2], export_dir / f"{arch}-{opset}-{keep_bn}.onnx", opset=opset,
                        keep_batchnorm=keep_bn)
    model = load_model(path)
    assert model.opset == opset
    if keep_bn:
        assert any(node.op_type == "BatchNormalization" for node in model.nodes)
    forward = Forward(model)
    session = ort_session(path)
    for x in (random_x, real_inputs[(channels, size)]):
        for batch in (1, 32):
            expected = session.run(None, {"input": x[:batch]})[0]
            got = forward.logits(x[:batch])
            assert got.shape == expected.shape
            assert max_diff(got, expected) <= 1e-4
