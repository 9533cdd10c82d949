"""`lancet inspect` and `lancet eval` on a real backdoored model."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from lancet.cli import main


def invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def test_inspect_json_and_table(backdoor_case):
    info = json.loads(invoke("inspect", backdoor_case.model, "--json"))
    assert info["supported"] and info["opset"] == 17
    assert [layer["channels"] for layer in info["layers"]] == [6, 16, 120, 84, 10]
    assert info["channel_neurons"] == 236
    assert info["parameters"] == sum(layer["parameters"] for layer in info["layers"])
    assert info["outside_layers"] == {"parameters": 0, "read_by": {}}
    assert all(entry["supported"] for entry in info["op_coverage"].values())
    table = invoke("inspect", backdoor_case.model)
    assert "neuron layers" in table and "Gemm" in table and "op coverage" in table


def test_eval_backends_agree(backdoor_case):
    results = {backend: json.loads(invoke("eval", backdoor_case.model, "--data", backdoor_case.case,
                                          "--backend", backend, "--json"))
               for backend in ("ort", "jax")}
    for key in ("clean_accuracy", "error_accuracy", "clean_class_accuracy"):
        assert results["ort"][key] == results["jax"][key]
    assert results["ort"]["clean_accuracy"] > 0.85   # a working classifier on real digits
    assert results["ort"]["error_accuracy"] < 0.2    # ...with a working backdoor: triggered inputs go wrong
    case = np.load(backdoor_case.case)
    assert results["ort"]["error_count"] == len(case["x_error"])
    per_class = results["ort"]["clean_class_accuracy"]
    counts = np.bincount(case["y_clean"])
    assert sorted(per_class, key=int) == [str(c) for c in np.flatnonzero(counts)]
    assert sum(per_class[str(c)] * counts[c] for c in np.flatnonzero(counts)) / counts.sum() == \
        pytest.approx(results["ort"]["clean_accuracy"])
    assert "clean_class_accuracy" in invoke("eval", backdoor_case.model, "--data", backdoor_case.case)
