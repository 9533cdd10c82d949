"""Peer defences on the digits LeNet-5 BadNets model: they run through the engine, change what they claim,
and their repaired parameters export through graph surgery and run in onnxruntime."""
from __future__ import annotations

import platform
import re
import shutil
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import lancet
from lancet import Forward, load_model
from lancet.case import Case, load_case
from lancet.defences import DEFENCES
from lancet.defences.common import trainable_parameters
from lancet.evaluate import OrtPredictor
from lancet.locate.common import predict_labels
from lancet.locate.restore import RestoreResult
from lancet.neurons import find_layers
from lancet.surgery import replace_parameters, verify_repaired


@pytest.fixture(scope="module")
def setup(backdoor_case):
    model = load_model(backdoor_case.model)
    forward = Forward(model)
    case = load_case(backdoor_case.case, model)
    heldout = dict(np.load(backdoor_case.heldout))
    return model, forward, case, heldout


def figures(forward, changed, heldout) -> tuple[float, float]:
    params = {**forward.params, **{k: jnp.asarray(v) for k, v in changed.items()}}
    acc = float(np.mean(predict_labels(forward, heldout["x_test"], params=params) == heldout["y_test"]))
    asr = float(np.mean(predict_labels(forward, heldout["x_error"], params=params) == int(heldout["target"])))
    return acc, asr


def test_trainable_parameters_are_neuron_parameters(setup):
    model, forward, _, _ = setup
    names = trainable_parameters(model, find_layers(model))
    layers = find_layers(model)
    assert set(names) == {layer.weight for layer in layers} | {layer.bias for layer in layers if layer.bias}


def test_finetuning_with_triggered_inputs_removes_the_backdoor(setup):
    model, forward, case, heldout = setup
    result = DEFENCES["finetuning"](forward, case, seed=0)
    acc, asr = figures(forward, result.changed, heldout)
    assert result.status == "repaired" and asr < 0.10
    assert acc > 0.90


def test_fine_pruning_zeroes_pruned_channels_and_exports(setup, backdoor_case, tmp_path):
    model, forward, case, heldout = setup
    result = DEFENCES["fine_pruning"](forward, case, seed=0)
    layer = next(layer for layer in find_layers(model) if layer.name == result.details["layer"])
    assert 0 < result.details["pruned"] < layer.channels
    kernel = result.changed[layer.weight]
    dead = np.flatnonzero(np.all(kernel.reshape(layer.channels, -1) == 0, axis=1))
    assert len(dead) == result.details["pruned"], "pruned channels must stay zero through fine-tuning"
    # Through graph surgery into onnxruntime: same outputs as the engine.
    proto = replace_parameters(backdoor_case.model, result.changed, {"method": "fine_pruning"})
    params = {**forward.params, **{k: jnp.asarray(v) for k, v in result.changed.items()}}
    x = case.x_clean[:64]
    assert verify_repaired(proto, x, np.asarray(forward.logits(x, params=params)), forward.model) <= 1e-4
    path = tmp_path / "fp.onnx"
    path.write_bytes(proto.SerializeToString())
    predictor = OrtPredictor(load_model(path), path)
    asr = float(np.mean(predictor.predict(heldout["x_error"]) == int(heldout["target"])))
    assert asr < 0.2


def test_nc_unlearning_with_the_true_trigger(setup):
    """Unlearning given a restored trigger (here the true one, to keep the test fast) removes the backdoor
    from clean data alone; with no flagged class it changes nothing."""
    model, forward, case, heldout = setup
    target = int(heldout["target"])
    shape = case.x_clean.shape[1:]
    masks = np.zeros((10, *shape), np.float32)
    patterns = np.zeros((10, *shape), np.float32)
    masks[target] = case.trigger_mask
    stamped = heldout["x_error"][0]
    patterns[target] = np.where(case.trigger_mask > 0, stamped, 0)
    restore = RestoreResult(masks, patterns, masks.reshape(10, -1).sum(1), np.zeros(10), np.zeros(10), target, 2.0)
    clean_only = Case(case.x_clean, case.y_clean)
    result = DEFENCES["nc_unlearning"](forward, clean_only, seed=0, restore=restore)
    acc, asr = figures(forward, result.changed, heldout)
    assert result.status == "repaired" and asr < 0.10 and acc > 0.90
    restore.flagged = None
    nothing = DEFENCES["nc_unlearning"](forward, clean_only, seed=0, restore=restore)
    assert nothing.status == "no_backdoor" and nothing.changed == {}


def test_anp_prunes_within_the_accuracy_bound(setup):
    model, forward, case, _ = setup
    clean_only = Case(case.x_clean, case.y_clean)
    result = DEFENCES["anp"](forward, clean_only, seed=0, steps=150, max_drop=2.0)
    before = float(np.mean(predict_labels(forward, case.x_clean) == case.y_clean))
    params = {**forward.params, **{k: jnp.asarray(v) for k, v in result.changed.items()}}
    after = float(np.mean(predict_labels(forward, case.x_clean, params=params) == case.y_clean))
    assert result.details["pruned"] > 0
    assert 100 * (before - after) <= 2.0 + 1e-9
    zeroed = sum(int(np.sum((np.asarray(v) == 0) & (np.asarray(model.params[k]) != 0))) for k, v in result.changed.items())
    assert zeroed > 0 and all(np.all((np.asarray(v) == 0) | (np.asarray(v) == np.asarray(model.params[k])))
                              for k, v in result.changed.items())


def benchmark_sample():
    """The benchmark module and one row of results with one record."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import repair as bench  # noqa: PLC0415

    before = {"c_acc": 0.9, "asr": 1.0, "r_acc": 0.0, "asr_floor": 0.01}
    record = {"setting": "clean", "method": "lancet-flip", "status": "repaired", "before": before,
              "after": {"c_acc": 0.895, "asr": 0.02, "r_acc": 0.9, "asr_floor": 0.015}, "der": 0.9875, "changed": 12, "seconds": 3.0}
    data = {"quick": True, "command": "python benchmarks/repair.py --quick", "seconds": 1.0,
            "environment": {"cpus": 2, "jax": "x", "jax_backend": "cpu"},
            "rows": {"r": {"description": "d", "recipe": {}, "before": before, "records": [record]}}}
    return bench, data, record


def test_benchmark_der_and_table():
    bench, data, _ = benchmark_sample()
    before = data["rows"]["r"]["before"]
    assert bench.der(before, {"c_acc": 0.9, "asr": 0.0}) == 1.0
    assert bench.der(before, {"c_acc": 0.8, "asr": 1.0}) == pytest.approx(0.45)
    table = bench.markdown(data)
    assert "| clean | lancet-flip | repaired | 89.5 | 2.0 | 1.5 | 90.0 |  | 0.988 | 12 | 3 | met |" in table  # issue 4
    assert "that produced the cells (`code` in each JSON record; `unrecorded`: run before 2026-12-01): unrecorded." in table
    data["rows"]["r"]["records"].append({**data["rows"]["r"]["records"][0], "setting": "error", "code": "abc1234",
                                         "cpu": "AMD EPYC (avx512)"})
    table = bench.markdown(data)
    assert "2026-12-01): abc1234, unrecorded." in table  # merged runs name each revision
    assert "AVX-512): AMD EPYC (avx512), unrecorded." in table  # and each CPU
    data["rows"]["r"]["records"].pop()
    record = data["rows"]["r"]["records"][0]
    record["before"] = {**record["before"], "class_acc": {"0": 0.9, "1": 0.8, "2": 0.7}}
    record["after"] = {**record["after"], "class_acc": {"0": 0.85, "1": 0.81, "2": 0.6}}
    assert "| 90.0 | 2: -10.0 | 0.988 |" in bench.markdown(data)  # the class losing most
    record["after"]["class_acc"] = {"0": 0.9, "1": 0.8, "2": 0.75}
    assert "| 90.0 | none | 0.988 |" in bench.markdown(data)
    record = data["rows"]["r"]["records"][0]
    for asr, c_acc, goal in [(0.025, 0.895, "**miss**"), (0.01, 0.895, "met, ASR <= 1 %"), (0.0, 0.889, "**miss**")]:
        record["after"] = {**record["after"], "asr": asr, "c_acc": c_acc}
        assert bench.markdown(data).split("| 3 | ")[1].startswith(goal + " |"), (asr, c_acc)


def test_benchmark_environment_names_the_code_revision():
    """Every benchmark figure names the code that made it: this checkout's commit and the package version."""
    bench, _, _ = benchmark_sample()
    from common import code_revision, environment  # noqa: PLC0415

    revision = code_revision()
    if shutil.which("git") and (Path(__file__).resolve().parents[1] / ".git").exists():
        assert revision and re.fullmatch(r"(.+-g)?[0-9a-f]{7,40}(-dirty)?", revision), revision
    env = environment()
    assert env["code"] == revision and env["lancet"] == lancet.__version__
    assert re.fullmatch(r".+ \((avx512|avx2|no avx2)\)", env["cpu"]) or env["cpu"] == platform.machine()


def test_benchmark_merge_replaces_records_one_by_one(tmp_path):
    """--from-json: a later file's record replaces the same row, setting and method; the rest are kept, in
    table order."""
    import json

    bench, data, record = benchmark_sample()

    earlier = {**data, "rows": {"r": {**data["rows"]["r"], "records": [
        {**record, "setting": "error"}, {**record, "method": "finetuning"}, record]}}}
    later = {**data, "command": "again", "rows": {"r": {**data["rows"]["r"], "records": [{**record, "changed": 99}]}}}
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for path, part in zip(paths, (earlier, later)):
        path.write_text(json.dumps(part))
    merged = bench.main(["--from-json", *map(str, paths), "--out", str(tmp_path / "m.json"),
                         "--markdown", str(tmp_path / "m.md"), "--plot", str(tmp_path / "m.png")])
    records = merged["rows"]["r"]["records"]
    assert [(r["setting"], r["method"], r["changed"]) for r in records] == [
        ("clean", "lancet-flip", 99), ("clean", "finetuning", 12), ("error", "lancet-flip", 12)]


def test_fine_pruning_without_convolutions_prunes_last_hidden_dense_layer():
    """An MLP has no convolution: Fine-Pruning ranks and prunes the neurons of its last hidden layer."""
    pytest.importorskip("torch")
    from lancet.models.recipes import Recipe, build_case

    built = build_case(Recipe(arch="mlp"))
    model = load_model(built.model)
    forward = Forward(model)
    result = DEFENCES["fine_pruning"](forward, load_case(built.case, model), seed=0)
    layers = find_layers(model)
    assert result.status == "repaired" and result.details["layer"] == layers[-2].name
    assert layers[-2].op_type in ("Gemm", "MatMul") and 0 < result.details["pruned"] < layers[-2].channels
