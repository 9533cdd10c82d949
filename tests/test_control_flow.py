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
    assert model.data_branches and model.batch_coupled
    assert "If on the data" in summary(model)["batch"]["coupled_by"]
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
