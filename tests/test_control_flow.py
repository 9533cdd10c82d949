"""An If on the input data, as PyTorch's torch.cond exports it: both branches run and the taken one's outputs
are selected, each input alone (one condition per batch couples the inputs of a batch); the weights the
branches read are weight-neuron layers, located and repaired like any other."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from lancet import Forward, load_model
from lancet.evaluate import OrtPredictor

from .conftest import assert_backdoor_removed, max_diff


def _polarity_gated_lenet(torch, onnx_path, out):
    """The test LeNet-5 (its weights read from `onnx_path`) behind a torch.cond that inverts light-on-dark
    inputs: cond(mean > 0.5, net(1 - x), net(x)), exported by torch's default (dynamo) exporter, batch free."""
    import warnings

    from onnx import numpy_helper

    from lancet.models.torch_zoo import lenet5

    net = lenet5(1, 28).eval()
    state = {init.name: torch.from_numpy(numpy_helper.to_array(init).copy())
             for init in onnx.load(onnx_path).graph.initializer}
    net.load_state_dict(state)

    class PolarityGated(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return torch.cond(x.mean() > 0.5, lambda t: self.net(1.0 - t), lambda t: self.net(t), (x,))

    gated = PolarityGated().eval()
    example = torch.zeros(2, 1, 28, 28)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(gated, (example,), dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},),
                          verbose=False).save(str(out))
    return gated, out


def test_if_on_the_data_equals_pytorch_input_by_input(backdoor_case, torch_threads, tmp_path):
    """A batch mixing dark and inverted (light) digits: each input takes its own branch, as PyTorch given it
    alone; the engine equals PyTorch and onnxruntime (both run input by input), and the layers inside the
    branches are weight-neuron layers whose weights get gradients."""
    import jax
    import jax.numpy as jnp

    from lancet.neurons import find_layers, summary

    torch = torch_threads
    gated, path = _polarity_gated_lenet(torch, backdoor_case.model, tmp_path / "gated.onnx")
    x = np.load(backdoor_case.case)["x_clean"][:8].copy()
    x[1::2] = 1.0 - x[1::2]
    assert "If" in {node.op_type for node in onnx.load(path).graph.node}
    model = load_model(path)
    assert model.data_control and model.batch_coupled
    assert "control flow on the data" in summary(model)["batch"]["coupled_by"]
    with torch.no_grad():
        expected = np.concatenate([gated(torch.from_numpy(x[i:i + 1])).numpy() for i in range(len(x))])
    assert max_diff(OrtPredictor(model, path).logits(x), expected) < 1e-4
    forward = Forward(model)
    assert max_diff(forward.logits(x), expected) < 1e-4
    layers = find_layers(model, weight_only=True)
    assert {layer.weight for layer in layers} >= {"net.0.weight", "net.3.weight", "net.7.weight", "net.11.weight"}
    grads = jax.grad(lambda p: jnp.sum(forward.logits(x, params=p)[:, 0]))(forward.params)
    assert all(float(jnp.abs(grads[layer.weight]).max()) > 0 for layer in layers)


def test_if_on_the_data_repaired(backdoor_case, torch_threads, tmp_path):
    """The polarity-gated backdoored LeNet-5 repaired by fine-tuning: the written file keeps its If and
    branches, the weights the branches read change, and the backdoor is gone on held-out data, on dark
    triggered digits and on their inverted copies (the other branch, sharing the weights)."""
    pytest.importorskip("torch")
    from lancet.repair import repair

    torch = torch_threads
    _, path = _polarity_gated_lenet(torch, backdoor_case.model, tmp_path / "gated.onnx")
    out = tmp_path / "repaired.onnx"
    result = repair(path, backdoor_case.case, out, method="finetune", progress=False)
    assert result.written, result.reasons
    heldout = dict(np.load(backdoor_case.heldout))
    changed = assert_backdoor_removed(heldout, path, out)
    assert changed and all(name.startswith("net.") for name in changed)
    inverted = {**heldout, "x_test": 1.0 - heldout["x_test"], "x_error": 1.0 - heldout["x_error"]}
    assert_backdoor_removed(inverted, path, out)


def _refine_until_confident(torch):
    """A classifier that refines its hidden state until its top score passes 1 or 4 steps have run
    (torch.while_loop: the continue-condition reads the data), exported by torch's default exporter."""
    import io
    import warnings

    from torch._higher_order_ops.while_loop import while_loop

    nn = torch.nn

    class Refine(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.block, self.head = nn.Linear(16, 12), nn.Linear(12, 12), nn.Linear(12, 5)

        def forward(self, x):
            def unsure(step, h):
                return (step < 4) & (self.head(h).max() < 1.0)

            def refine(step, h):
                return step + 1, h + torch.relu(self.block(h))

            _, h = while_loop(unsure, refine, (torch.zeros((), dtype=torch.int64), torch.relu(self.stem(x))))
            return self.head(h)

    torch.manual_seed(0)
    net = Refine().eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(2, 16),), dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},),
                          verbose=False).save(buffer)
    return net, onnx.load_from_string(buffer.getvalue())


def test_loop_on_the_data_stops_where_onnxruntime_does(torch_threads):
    """torch.while_loop's Loop: each input stops after its own number of refinements (0 to 4 here); the
    engine, unrolled with a running flag, equals PyTorch and onnxruntime input by input, and the weights
    read inside the loop get gradients."""
    import jax
    import jax.numpy as jnp

    from lancet.loader import model_from_proto
    from lancet.neurons import find_layers

    torch = torch_threads
    net, proto = _refine_until_confident(torch)
    x = (np.random.default_rng(0).standard_normal((12, 16)) * np.linspace(0.2, 4.0, 12)[:, None]).astype(np.float32)
    steps = []
    with torch.no_grad():
        for row in torch.from_numpy(x):
            h, step = torch.relu(net.stem(row[None])), 0
            while step < 4 and float(net.head(h).max()) < 1.0:
                h, step = h + torch.relu(net.block(h)), step + 1
            steps.append(step)
        expected = np.concatenate([net(torch.from_numpy(x[i:i + 1])).numpy() for i in range(len(x))])
    assert set(steps) == {0, 1, 2, 3, 4}, steps  # inputs stop at every point
    model = model_from_proto(proto)
    assert model.data_control and model.batch_coupled
    forward = Forward(model)
    assert max_diff(forward.logits(x), expected) < 1e-5
    session = OrtPredictor(model, proto.SerializeToString())
    assert max_diff(session.logits(x), expected) < 1e-5
    assert "block.weight" in {layer.weight for layer in find_layers(model, weight_only=True)}
    grads = jax.grad(lambda p: jnp.sum(forward.logits(x, params=p)))(forward.params)
    assert float(jnp.abs(grads["block.weight"]).max()) > 0 and all(
        bool(jnp.all(jnp.isfinite(g))) for g in grads.values())


def test_unbounded_loop_on_the_data_is_refused(torch_threads, tmp_path):
    """A torch.while_loop on the data alone (no counter, no trip count): nothing bounds the unrolling, so
    `lancet eval` exits 2 naming the Loop, quickly."""
    import warnings

    from torch._higher_order_ops.while_loop import while_loop

    from .test_bad_input import assert_clean_failure, run_cli

    torch = torch_threads

    class UntilLarge(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(8, 8)

        def forward(self, x):
            (h,) = while_loop(lambda h: h.abs().sum() < 1e9, lambda h: (torch.tanh(self.layer(h)) * 2.0,), (x,))
            return h

    path = tmp_path / "until_large.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(UntilLarge().eval(), (torch.randn(3, 8),), dynamo=True,
                          dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False).save(str(path))
    np.savez(tmp_path / "case.npz", x_clean=np.ones((4, 8), np.float32), y_clean=np.zeros(4, np.int64))
    assert_clean_failure(*run_cli("eval", path, "--data", tmp_path / "case.npz", "--backend", "jax"),
                         "(Loop)", "depends on the input data", "within 1000 iterations")
