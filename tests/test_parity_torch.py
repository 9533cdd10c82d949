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


@pytest.mark.parametrize("opset", [None, 25], ids=["default-opset", "opset25"])
@pytest.mark.parametrize("arch,channels,size", [("lenet5", 1, 28), ("resnet18", 3, 32), ("vit", 3, 32)])
def test_default_torch_export_with_its_fixed_batch_runs_on_any_batch(arch, channels, size, opset, export_dir,
                                                                      real_inputs, torch_threads):
    """`torch.onnx.export(net, (x,), path)` as a user calls it: torch 2.13's default (dynamo) exporter fixes
    the batch at the example's (4) and writes it into Reshape shapes. The engine runs it on 31 inputs (not a
    multiple of 4) equal to PyTorch; onnxruntime, fed groups of 4 (the last padded), agrees. Also at opset
    25, the newest that exporter writes (opsets 22-25 only widened tensor types)."""
    import warnings

    from lancet.evaluate import OrtPredictor
    from lancet.forward import hard_codes_batch, static_batch
    from lancet.models.torch_zoo import build

    torch = torch_threads
    net = build(arch, channels, size, seed=1).eval()
    path = export_dir / f"default-{arch}-{opset}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(4, channels, size, size),), str(path),
                          **({} if opset is None else {"opset_version": opset}))
    model = load_model(path)
    assert opset is None or model.opset == opset
    assert static_batch(model) == 4 and hard_codes_batch(model)
    x = real_inputs[(channels, size)][:31]
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    assert max_diff(Forward(model).logits(x), expected) < 1e-4
    assert max_diff(OrtPredictor(model, path).logits(x), expected) < 1e-4


MODULES = {  # modules whose export writes ops beyond the zoo's (Mish, Celu, DepthToSpace, GatherND, Resize)
    "mish": lambda nn: nn.Mish(),
    "celu": lambda nn: nn.CELU(0.8),
    "pixel-shuffle": lambda nn: nn.Sequential(nn.PixelShuffle(2), nn.Conv2d(2, 8, 1)),
    "adaptive-avg-7": lambda nn: nn.AdaptiveAvgPool2d(7),  # 16 -> 7: dynamo writes GatherND
    "group-norm-silu": lambda nn: nn.Sequential(nn.GroupNorm(2, 8), nn.SiLU()),
    "upsample-nearest": lambda nn: nn.Upsample(scale_factor=2),  # Resize
    "upsample-bilinear": lambda nn: nn.Upsample(scale_factor=1.5, mode="bilinear"),
    "upsample-bicubic": lambda nn: nn.Upsample(size=(11, 21), mode="bicubic"),  # Resize cubic, a = -0.75
    "downsample-antialiased": lambda nn: _Antialiased(nn),  # Resize antialias=1, opset 18+
    "max-pool-unpool": lambda nn: _PoolUnpool(nn),  # MaxPool's Indices output; MaxUnpool as ScatterND
    "unfold-fold": lambda nn: nn.Sequential(nn.Unfold(3, padding=1, stride=2), nn.Fold((16, 16), 3, padding=1,
                                                                                        stride=2)),  # Col2Im
}


def _Antialiased(nn):
    import torch.nn.functional as functional

    class Antialiased(nn.Module):
        def forward(self, x):
            return functional.interpolate(x, size=(7, 9), mode="bilinear", antialias=True) + \
                functional.interpolate(x, size=(7, 9), mode="bicubic", antialias=True)

    return Antialiased()


def _dynamo_export_matches(torch, net, x, **options):
    """Export `net` with torch's default (dynamo) exporter, batch free; assert onnxruntime equals PyTorch on
    `x` and the engine on its first 3 inputs (another batch size); return the ModelProto."""
    import io
    import warnings

    import onnx

    from lancet.loader import model_from_proto

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(net, (x,), dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},),
                                    verbose=False, **options)
        program.save(buffer)
    proto = onnx.load_from_string(buffer.getvalue())
    with torch.no_grad():
        expected = net(x).numpy()
    session = ort_session(proto.SerializeToString())
    got_ort = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    got = Forward(model_from_proto(proto)).logits(x.numpy()[:3])
    assert max_diff(got_ort, expected) < 1e-4 and max_diff(got, expected[:3]) < 1e-4
    return proto


def _PoolUnpool(nn):
    class PoolUnpool(nn.Module):
        def __init__(self):
            super().__init__()
            self.pool, self.unpool = nn.MaxPool2d(2, return_indices=True), nn.MaxUnpool2d(2)

        def forward(self, x):
            return self.unpool(*self.pool(x))

    return PoolUnpool()


@pytest.mark.parametrize("name", sorted(MODULES))
def test_exported_modules_match(name, torch_threads):
    """A small classifier around each module, exported by torch 2.13's default (dynamo) exporter with a free
    batch: the engine equals onnxruntime and PyTorch."""
    torch = torch_threads
    nn = torch.nn
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), MODULES[name](nn), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 10)).eval()
    _dynamo_export_matches(torch, net, torch.randn(5, 3, 16, 16))


def test_spatial_transformer_matches(torch_threads):
    """A spatial transformer (a localisation net predicts an affine warp per image; affine_grid, then
    grid_sample) exported by torch 2.13's default exporter: AffineGrid is written as plain ops, the warp as
    GridSample; equal to PyTorch."""
    import io
    import warnings

    import onnx

    from lancet.loader import model_from_proto

    torch = torch_threads
    nn, functional = torch.nn, torch.nn.functional
    torch.manual_seed(0)

    class SpatialTransformer(nn.Module):
        def __init__(self):
            super().__init__()
            self.localise = nn.Sequential(nn.Conv2d(1, 4, 5, stride=2), nn.ReLU(), nn.Flatten(), nn.LazyLinear(6))
            self.classify = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))

        def forward(self, x):
            theta = self.localise(x).view(-1, 2, 3) * 0.3 + torch.eye(2, 3)
            grid = functional.affine_grid(theta, list(x.shape), align_corners=False)
            return self.classify(functional.grid_sample(x, grid, align_corners=False))

    net = SpatialTransformer()
    x = torch.rand(5, 1, 16, 16)
    with torch.no_grad():
        expected = net(x).numpy()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net.eval(), (x,), dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},),
                          verbose=False).save(buffer)
    model = model_from_proto(onnx.load_from_string(buffer.getvalue()))
    assert "GridSample" in {node.op_type for node in model.nodes}
    assert max_diff(Forward(model).logits(x.numpy()[:3]), expected[:3]) < 1e-5


def test_torchscript_if_on_shapes_runs_inline(torch_threads):
    """TorchScript exports LocalResponseNorm with an If on the input's rank: the condition folds from shapes,
    the branch it picks runs inline (its outer tensors listed as the If's inputs), equal to PyTorch."""
    import io
    import warnings

    import onnx

    from lancet.loader import model_from_proto

    torch = torch_threads
    nn = torch.nn
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.LocalResponseNorm(3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 10)).eval()
    x = torch.randn(5, 3, 8, 8)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x[:2],), buffer, dynamo=False, opset_version=17, input_names=["input"],
                          dynamic_axes={"input": {0: "batch"}})
    proto = onnx.load_from_string(buffer.getvalue())
    assert "If" in {node.op_type for node in proto.graph.node}
    model = model_from_proto(proto)
    branch_reads = next(node for node in model.nodes if node.op_type == "If").inputs[1:]
    assert branch_reads  # the outer tensors the branches read
    with torch.no_grad():
        expected = net(x).numpy()
    assert max_diff(Forward(model).logits(x.numpy()), expected) < 1e-5


def test_opset23_export_of_attention_and_new_normalizations_matches(torch_threads):
    """torch 2.13's default exporter at opset 23 writes nn.MultiheadAttention as one Attention node and
    nn.GroupNorm / nn.RMSNorm as GroupNormalization / RMSNormalization: the engine equals PyTorch and
    onnxruntime, on another batch size than the export's."""
    torch = torch_threads
    nn = torch.nn
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.norm = nn.Conv2d(1, 8, 3, padding=1), nn.GroupNorm(2, 8)
            self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
            self.rms, self.head = nn.RMSNorm(8), nn.Linear(8, 10)

        def forward(self, x):
            tokens = self.norm(self.conv(x)).flatten(2).transpose(1, 2)  # [n, 64, 8]
            mixed, _ = self.attention(tokens, tokens, tokens, need_weights=False)
            return self.head(self.rms(mixed + tokens).mean(1))

    proto = _dynamo_export_matches(torch, Net().eval(), torch.randn(5, 1, 8, 8), opset_version=23)
    assert {"Attention", "GroupNormalization", "RMSNormalization"} <= {node.op_type for node in proto.graph.node}
