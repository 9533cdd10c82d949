"""Repair end to end: flip and fine-tune, graph surgery, the written file, bounds and faults."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from lancet import Forward, load_model
from lancet.case import load_case
from lancet.errors import BadInputError, RepairRejectedError
from lancet.evaluate import OrtPredictor
from lancet.locate.common import predict_labels
from lancet.repair import FLIP_MARGINS, repair
from lancet.surgery import replace_parameters, verify_repaired


def digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def heldout_figures(path, heldout) -> tuple[float, float]:
    predictor = OrtPredictor(load_model(path), path)
    acc = float(np.mean(predictor.predict(heldout["x_test"]) == heldout["y_test"]))
    asr = float(np.mean(predictor.predict(heldout["x_error"]) == int(heldout["target"])))
    return acc, asr


@pytest.fixture(scope="module")
def repaired(backdoor_case, tmp_path_factory):
    folder = tmp_path_factory.mktemp("repair")
    before = digest(backdoor_case.model)
    results = {method: repair(backdoor_case.model, backdoor_case.case, folder / f"{method}.onnx", method=method,
                              progress=False) for method in ("flip", "finetune")}
    assert digest(backdoor_case.model) == before, "the input model was modified"
    return folder, results


@pytest.mark.parametrize("method", ["flip", "finetune"])
def test_repair_removes_backdoor_on_heldout(backdoor_case, repaired, method):
    folder, results = repaired
    result = results[method]
    assert result.accepted and result.written and result.status == "repaired"
    heldout = dict(np.load(backdoor_case.heldout))
    acc_before, asr_before = heldout_figures(backdoor_case.model, heldout)
    acc_after, asr_after = heldout_figures(folder / f"{method}.onnx", heldout)
    assert asr_before > 0.9
    assert asr_after <= 0.025, f"{method}: held-out ASR {asr_after:.3f}"
    assert 100 * (acc_before - acc_after) <= 1.5, f"{method}: clean accuracy {acc_before:.3f} -> {acc_after:.3f}"
    report = result.to_json()
    json.dumps(report)
    assert report["after"]["error_fix_rate"] >= 0.95
    assert set(report["seconds"]) >= {"load", "locate", "fix", "export", "total"}
    # Both methods change a margin over the EINs: fine-tuning trains 2k, flip flips up to 1.5k.
    changed_at_most = report["finetune_neurons"] if method == "finetune" else report["flip"]["neurons"]
    assert 0 < report["changed_parameter_count"] <= changed_at_most
    if method == "finetune":
        tried = report["finetune_tried"]
        assert tried[0]["neurons"] == 2 * len(report["eins"])  # the search's set first, with its margin
        kept = [t for t in tried if (t["scope"], t["neurons"]) == (report["finetune_scope"], changed_at_most)]
        assert kept and kept[0]["accepted"]
        # Trained from both starts; the one with the lower held-back loss is kept, and the kept-values start
        # never wins untrained (that would hand back the backdoored weights).
        starts = report["finetune"]["starts"]
        assert set(starts) == {"ablated", "keep"} and starts["keep"]["best_epoch"] >= 1
        assert report["finetune"]["start"] == min(starts, key=lambda init: starts[init]["heldback_loss"])
    else:
        margin = report["flip"]["margin"]
        assert margin in FLIP_MARGINS and changed_at_most >= len(report["eins"])
        picked = [o for o in report["flip"]["options"]
                  if o["margin"] == margin and o["scope"] == report["flip"]["scope"]]
        assert picked and picked[0]["k"] == changed_at_most and picked[0]["drop_points"] <= 2.0


def test_repair_table_says_how_the_set_was_fine_tuned(repaired):
    from rich.console import Console

    from lancet.report import repair_tables

    report = repaired[1]["finetune"].to_json()
    console = Console(record=True, width=200)
    repair_tables(report, console)
    start = "zero" if report["finetune"]["start"] == "ablated" else "their values"
    assert f"trained from {start}" in console.export_text()


def test_heldback_error_inputs_are_counted_on_the_written_file(backdoor_case, repaired):
    """The error inputs fine-tuning never trained on: the report's count is what onnxruntime gives on the
    written file, its bound the Clopper-Pearson one, and the table says both."""
    from rich.console import Console

    from lancet.evaluate import error_rate_upper_bound
    from lancet.report import repair_tables

    folder, results = repaired
    report = results["finetune"].to_json()
    held = report["after"]["heldback_error"]
    case = np.load(backdoor_case.case)
    rows = np.asarray(held["rows"])
    assert held["inputs"] == len(rows) > 0 and len(set(held["rows"])) == len(rows)
    assert len(rows) < len(case["x_error"])  # a held-back share, not all of them
    x, y = case["x_error"][rows], case["y_error"][rows]
    before = OrtPredictor(load_model(backdoor_case.model), backdoor_case.model).predict(x)
    after = OrtPredictor(load_model(folder / "finetune.onnx"), folder / "finetune.onnx").predict(x)
    assert np.all(before != y)  # only inputs the model got wrong count
    assert held["fixed"] == int(np.sum(after != before))
    assert held["fix_rate"] == pytest.approx(held["fixed"] / held["inputs"])
    assert held["unfixed_upper_95"] == pytest.approx(error_rate_upper_bound(held["inputs"] - held["fixed"],
                                                                            held["inputs"]))
    console = Console(record=True, width=200)
    repair_tables(report, console)
    assert f"{held['fixed']}/{held['inputs']} fixed (never trained on" in console.export_text()


def test_error_rate_upper_bound_is_clopper_pearson():
    from lancet.evaluate import error_rate_upper_bound

    for n in (1, 24, 110):  # none wrong: the closed form 1 - alpha^(1/n)
        assert error_rate_upper_bound(0, n) == pytest.approx(1 - 0.05 ** (1 / n), abs=1e-9)
    assert error_rate_upper_bound(1, 10) == pytest.approx(0.3942, abs=1e-4)  # tabulated one-sided 95 %
    assert error_rate_upper_bound(5, 100, confidence=0.99) > error_rate_upper_bound(5, 100) > 0.05
    bounds = [error_rate_upper_bound(k, 50) for k in range(0, 51, 5)]
    assert bounds == sorted(bounds) and bounds[-1] == 1.0
    assert error_rate_upper_bound(0, 0) == 1.0


@pytest.mark.parametrize("method", ["flip", "finetune"])
def test_report_gives_each_class_and_the_one_losing_most(backdoor_case, repaired, method):
    """Per-class accuracy on x_clean before and after, checked against onnxruntime on the written file."""
    folder, results = repaired
    report = results[method].to_json()
    case = np.load(backdoor_case.case)
    x, y = case["x_clean"], case["y_clean"]
    for when, path in (("before", backdoor_case.model), ("after", folder / f"{method}.onnx")):
        pred = OrtPredictor(load_model(path), path).predict(x)
        expected = {str(c): float(np.mean(pred[y == c] == c)) for c in np.unique(y)}
        assert report[when]["clean_class_accuracy"] == pytest.approx(expected, abs=1e-9)
    drops = {c: 100 * (report["before"]["clean_class_accuracy"][c] - report["after"]["clean_class_accuracy"][c])
             for c in report["before"]["clean_class_accuracy"]}
    worst = report["after"]["largest_class_drop"]
    assert worst["drop_points"] == pytest.approx(max(drops.values()))
    assert drops[str(worst["class"])] == pytest.approx(worst["drop_points"])
    assert worst["images"] == int(np.sum(y == worst["class"]))
    from rich.console import Console

    from lancet.report import repair_tables

    console = Console(record=True, width=200)
    repair_tables(report, console)
    assert "class losing most" in console.export_text()


@pytest.mark.parametrize("method", ["flip", "finetune"])
def test_repair_plot_is_written_from_the_report(repaired, method, tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    from lancet.plots import plot_repair

    report = repaired[1][method].to_json()
    right = report["flip"]["options"] if method == "flip" else report["finetune"]["history"]
    assert right, "the right-hand panel has something to show"
    plot_repair(report, tmp_path / "r.png")
    image = imread(tmp_path / "r.png")
    assert image.shape[0] > 300 and image.shape[1] > 800
    assert [p.name for p in tmp_path.iterdir()] == ["r.png"], "no temporary file left behind"


def test_class_drop_bound_holds_for_what_the_flip_search_picks(backdoor_case, repaired):
    """The flip search sees each option's per-class accuracy (the same as judging the flipped model), and
    with `max_class_drop` below what the picked option costs a class, it picks another or rejects."""
    flipped = repaired[1]["flip"]
    located, worst = flipped.locate_result, flipped.after["largest_class_drop"]
    picked = [o for o in flipped.details["flip"]["options"]
              if (o["scope"], o["margin"]) == (flipped.details["flip"]["scope"], flipped.details["flip"]["margin"])]
    assert picked[0]["class_drop_points"] == pytest.approx(worst["drop_points"])
    assert worst["drop_points"] > 0, "the flip costs some class accuracy on this model"
    bound = worst["drop_points"] - 0.01
    strict = repair(backdoor_case.model, backdoor_case.case, method="flip", progress=False, reuse=located,
                    max_class_drop=bound)
    if strict.accepted:
        assert strict.after["largest_class_drop"]["drop_points"] <= bound
        assert (strict.details["flip"]["scope"], strict.details["flip"]["margin"]) != \
               (flipped.details["flip"]["scope"], flipped.details["flip"]["margin"])
    else:  # no option keeps the bound: the located EINs are flipped as they are, and judged
        assert strict.reasons and not strict.details["flip"]["options"]
    loose = repair(backdoor_case.model, backdoor_case.case, method="flip", progress=False, reuse=located,
                   max_class_drop=worst["drop_points"] + 0.01)
    assert loose.accepted and loose.after["largest_class_drop"] == worst


def test_finetune_report_marks_the_kept_candidate_and_prints_every_one(repaired):
    """Exactly one tried set is marked chosen, the one the report names; `lancet repair` prints every
    candidate with what the pick weighed, the kept one starred."""
    from rich.console import Console

    from lancet.report import repair_tables

    report = repaired[1]["finetune"].to_json()
    tried = report["finetune_tried"]
    chosen = [t for t in tried if t["chosen"]]
    assert len(chosen) == 1 and chosen[0]["accepted"]
    assert (chosen[0]["scope"], chosen[0]["neurons"]) == (report["finetune_scope"], report["finetune_neurons"])
    # Each candidate's held-back loss is the one its kept start reached (the chosen one's: the report's).
    finetune = report["finetune"]
    assert chosen[0]["heldback_loss"] == pytest.approx(finetune["starts"][finetune["start"]]["heldback_loss"])
    assert all(np.isfinite(t["heldback_loss"]) for t in tried)
    assert not any(t["reads_pixels"] for t in tried)  # a LeNet's first layer is a convolution
    console = Console(record=True, width=200)
    repair_tables(report, console)
    text = console.export_text()
    if len(tried) > 1:
        rows = [line for line in text.splitlines() if f" {report['finetune_scope']} " in line and "│" in line]
        assert "fine-tuning candidates" in text and any(line.lstrip("│ ").startswith("*") for line in rows)
        assert sum(line.lstrip("│ ").startswith("*") for line in text.splitlines()) == 1
    else:
        assert "fine-tuning candidates" not in text


def test_mlp_first_layer_set_reads_the_pixels_and_is_kept(tmp_path):
    """An MLP's first layer is dense over the whole input, each weight tied to one pixel: its set is marked
    `reads_pixels` (no other is) and, the case holding real triggered inputs, kept over deeper accepted sets
    within the tolerances."""
    pytest.importorskip("torch")
    from lancet.models.recipes import Recipe, build_case
    from lancet.neurons import find_layers

    built = build_case(Recipe(arch="mlp"))
    result = repair(built.model, built.case, tmp_path / "mlp.onnx", method="finetune", progress=False)
    tried = result.to_json()["finetune_tried"]
    first = find_layers(load_model(built.model))[0].weight
    assert any(t["scope"] == first for t in tried)
    assert any(t["reads_pixels"] and t["accepted"] for t in tried), tried  # the rule below is exercised
    for attempt in tried:
        assert attempt["reads_pixels"] == (attempt["scope"] == first) or attempt["scope"] == "global"
    from lancet.repair import FIX_TOLERANCE, HELDBACK_TOLERANCE

    chosen = [t for t in tried if t["chosen"]][0]
    accepted = [t for t in tried if t["accepted"]]
    best_heldback = max(t["heldback_accuracy"] for t in accepted)
    best_fix = max(t["error_fix_rate"] for t in accepted if t["heldback_accuracy"] >= best_heldback - HELDBACK_TOLERANCE)
    if any(t["reads_pixels"] and t["heldback_accuracy"] >= best_heldback - HELDBACK_TOLERANCE
           and t["error_fix_rate"] >= best_fix - FIX_TOLERANCE for t in accepted):
        assert chosen["reads_pixels"], tried


def test_finetune_candidates_bound_the_sets_trained(backdoor_case, repaired, tmp_path):
    """`finetune_candidates=1` (`--candidates 1`) trains the search's set alone; fewer than 1 is bad input."""
    located = repaired[1]["finetune"].locate_result
    full = repaired[1]["finetune"].details["finetune_tried"]
    one = repair(backdoor_case.model, backdoor_case.case, method="finetune", progress=False, reuse=located,
                 finetune_candidates=1)
    tried = one.details["finetune_tried"]
    assert len(full) > 1 and len(tried) == 1 and tried[0]["chosen"]
    assert (tried[0]["scope"], tried[0]["neurons"]) == (full[0]["scope"], full[0]["neurons"])
    with pytest.raises(BadInputError, match="finetune_candidates"):
        repair(backdoor_case.model, backdoor_case.case, method="finetune", progress=False, reuse=located,
               finetune_candidates=0)
    run = run_cli("repair", backdoor_case.model, "--data", backdoor_case.case, "--out", tmp_path / "x.onnx",
                  "--method", "finetune", "--candidates", "0")
    assert run.returncode == 2 and "--candidates" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "x.onnx").exists()


def test_finetune_candidates_are_judged_by_the_class_bound(backdoor_case, repaired):
    """Every fine-tuned candidate records its largest class drop; with a bound of 0 points the ones that
    cost any class accuracy are rejected for it, and the repair is accepted only if some candidate costs none."""
    located = repaired[1]["finetune"].locate_result
    strict = repair(backdoor_case.model, backdoor_case.case, method="finetune", progress=False, reuse=located,
                    max_class_drop=0.0)
    tried = strict.details["finetune_tried"]
    assert tried
    for attempt in tried:
        names_class = any(r.startswith("class ") and "accuracy drops" in r for r in attempt["reasons"])
        assert names_class == (attempt["largest_class_drop"] > 0), attempt
    assert strict.accepted == any(not attempt["reasons"] for attempt in tried)
    # One set is reported whether or not any was accepted: an accepted one if any, else the last one tried.
    chosen = [attempt for attempt in tried if attempt["chosen"]]
    assert len(chosen) == 1 and (chosen[0]["accepted"] if strict.accepted else chosen[0] is tried[-1])
    assert (chosen[0]["scope"], chosen[0]["neurons"]) == (strict.details["finetune_scope"],
                                                          strict.details["finetune_neurons"])


def test_class_drop_bound_rejects_a_judged_repair():
    """The judge names the class, its drop and image count; no bound, no reason."""
    from lancet.repair import _judge

    class Stub:  # a forward whose repaired params mislabel two of class 1's four images
        def logits(self, x, params=None, edits=None):
            labels = np.asarray(x)[:, 0].astype(int)
            if params == "repaired":
                labels = np.where(np.asarray(x)[:, 1] > 0, 0, labels)
            return np.eye(3, dtype=np.float32)[labels]

    from lancet.case import Case

    y = np.array([0, 0, 1, 1, 1, 1, 2, 2])
    x = np.stack([y, [0, 0, 1, 1, 0, 0, 0, 0]], axis=1).astype(np.float32)
    case = Case(x, y)
    from lancet.repair import _evaluate

    before = _evaluate(Stub(), None, case, None, None)
    after, reasons = _judge(Stub(), "repaired", case, None, None, before, None, 100.0, 0.95, max_class_drop=40)
    assert after["largest_class_drop"] == {"class": 1, "before": 1.0, "after": 0.5, "drop_points": 50.0, "images": 4}
    assert reasons == ["class 1 accuracy drops 50.00 points on its 4 clean images (bound 40)"]
    assert _judge(Stub(), "repaired", case, None, None, before, None, 100.0, 0.95)[1] == []


@pytest.mark.parametrize("method", ["flip", "finetune"])
def test_surgery_changes_only_ein_weights(backdoor_case, repaired, method):
    folder, results = repaired
    original, fixed = onnx.load(str(backdoor_case.model)), onnx.load(str(folder / f"{method}.onnx"))
    onnx.checker.check_model(fixed)
    assert [(n.op_type, list(n.input), list(n.output)) for n in original.graph.node] == \
           [(n.op_type, list(n.input), list(n.output)) for n in fixed.graph.node]
    assert [i.name for i in original.graph.input] == [i.name for i in fixed.graph.input]
    assert [o.name for o in original.graph.output] == [o.name for o in fixed.graph.output]
    old = {t.name: onnx.numpy_helper.to_array(t) for t in original.graph.initializer}
    new = {t.name: onnx.numpy_helper.to_array(t) for t in fixed.graph.initializer}
    differing = {name: int(np.sum(old[name] != new[name])) for name in old if not np.array_equal(old[name], new[name])}
    assert differing == results[method].changed_parameters
    meta = {p.key: p.value for p in fixed.metadata_props}
    assert meta["lancet.method"] == method and int(meta["lancet.ein_count"]) == len(results[method].eins)
    # onnxruntime on the written file equals the JAX forward of the repaired params.
    x = np.load(backdoor_case.case)["x_clean"][:32]
    forward = results[method].locate_result.forward
    expected = np.asarray(forward.logits(x, params=results[method].repaired_params))
    assert np.max(np.abs(OrtPredictor(load_model(folder / f"{method}.onnx"), folder / f"{method}.onnx").logits(x)
                         - expected)) <= 1e-4


def test_repair_is_deterministic(backdoor_case, repaired, tmp_path):
    folder, _ = repaired
    again = repair(backdoor_case.model, backdoor_case.case, tmp_path / "again.onnx", method="finetune",
                   progress=False)
    assert again.written and digest(tmp_path / "again.onnx") == digest(folder / "finetune.onnx")


def test_nan_repair_is_never_written(backdoor_case, tmp_path):
    model = load_model(backdoor_case.model)
    name = next(iter(model.params))
    broken = np.array(model.params[name])
    broken.reshape(-1)[0] = np.nan
    proto = replace_parameters(backdoor_case.model, {name: broken})
    x = np.load(backdoor_case.case)["x_clean"][:8]
    with pytest.raises(RepairRejectedError, match="NaN"):
        verify_repaired(proto, x, np.zeros((8, 10), np.float32), load_model(backdoor_case.model))


def test_output_path_faults(backdoor_case, tmp_path):
    with pytest.raises(BadInputError, match="does not exist"):
        repair(backdoor_case.model, backdoor_case.case, tmp_path / "missing" / "out.onnx")
    with pytest.raises(BadInputError, match="is the input file"):
        repair(backdoor_case.model, backdoor_case.case, backdoor_case.model)


def run_cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "lancet.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write to read-only folders")
def test_cli_read_only_folder_exit_2(backdoor_case, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    run = run_cli("repair", backdoor_case.model, "--data", backdoor_case.case, "--out", folder / "x.onnx")
    assert run.returncode == 2 and "not writable" in run.stderr


def test_cli_out_equals_input_exit_2(backdoor_case):
    before = digest(backdoor_case.model)
    run = run_cli("repair", backdoor_case.model, "--data", backdoor_case.case, "--out", backdoor_case.model)
    assert run.returncode == 2 and "input" in run.stderr and "Traceback" not in run.stderr
    assert digest(backdoor_case.model) == before


def test_cli_repair_fine_tunes_by_default_and_writes_a_better_model(backdoor_case, tmp_path):
    """`lancet repair` with no --method fine-tunes (the method that meets the held-out goal most often), exits
    0, and writes a file that onnxruntime runs with the backdoor gone on held-out triggered inputs."""
    out, report_path = tmp_path / "fixed.onnx", tmp_path / "r.json"
    run = run_cli("repair", backdoor_case.model, "--data", backdoor_case.case, "--out", out, "--candidates", "1",
                  "--report", report_path)
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(report_path.read_text())
    assert report["method"] == "finetune" and report["accepted"] and report["written"]
    heldout = dict(np.load(backdoor_case.heldout))
    acc_before, asr_before = heldout_figures(backdoor_case.model, heldout)
    acc_after, asr_after = heldout_figures(out, heldout)
    assert asr_before > 0.9 and asr_after <= 0.05 and acc_before - acc_after <= 0.02


def test_cli_rejected_repair_exit_3_and_force(backdoor_case, tmp_path):
    out = tmp_path / "strict.onnx"
    # No repair can fix every error input while keeping every clean one: target 1.0 on a
    # clean-accuracy bound of 0 points with channel flips is out of reach on this model.
    args = ["repair", backdoor_case.model, "--data", backdoor_case.case, "--out", out, "--method", "flip",
            "--granularity", "channel",
            "--max-acc-drop", "0", "--max-class-drop", "0", "--report", tmp_path / "r.json", "--plot",
            tmp_path / "r.png"]
    run = run_cli(*args)
    assert run.returncode == 3, run.stdout + run.stderr
    assert "rejected" in run.stderr and not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".strict")], "partial file left behind"
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["accepted"] is False and report["written"] is False and report["reasons"]
    assert report["plot"] == str(tmp_path / "r.png") and (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if report["after"]["largest_class_drop"]["drop_points"] > 0:  # --max-class-drop reached the judge
        assert any("accuracy drops" in r and r.startswith("class ") for r in report["reasons"])
    forced = run_cli(*args, "--force")
    assert forced.returncode == 3 and out.exists() and "written anyway" in forced.stderr


def test_finetune_tries_the_best_set_within_the_bound_then_the_smallest_reaching_the_target():
    from lancet.locate.ablation import AblationResult
    from lancet.locate.pipeline import LocateResult
    from lancet.repair import _finetune_scopes

    def scope(name, k, success, k_target):
        return AblationResult(name, "weight", 1000, k, 0.5, 0.8, 0.85, success, k_target=k_target)

    failing = [scope("global", 4, False, 300), scope("conv2.weight", 16, False, 176),
               scope("fc.weight", 2, False, None)]
    located = LocateResult(None, None, "weight", None, None, failing[1], failing, {}, 0.85)
    assert _finetune_scopes(located) == [("conv2.weight", 16), ("conv2.weight", 176)]
    good = scope("fc.weight", 40, True, 40)
    located = LocateResult(None, None, "weight", None, None, good, [*failing, good], {}, 0.85)
    assert _finetune_scopes(located) == [("fc.weight", 40)]
    none = [scope("global", 8, False, None)]
    located = LocateResult(None, None, "weight", None, None, none[0], none, {}, 0.85)
    assert _finetune_scopes(located) == [("global", 8)]


def test_finetune_tries_the_deepest_scopes_reaching_the_target_next():
    from lancet.locate.ablation import AblationResult
    from lancet.locate.pipeline import LocateResult
    from lancet.repair import _finetune_scopes

    def scope(name, k, success, k_target):
        return AblationResult(name, "weight", 1000, k, 0.5, 0.8, 0.85, success, k_target=k_target)

    results = [scope("global", 300, True, 300), scope("conv1.weight", 7, True, 7),
               scope("fc1.weight", 120, False, 150), scope("fc2.weight", 60, False, None),
               scope("fc3.weight", 20, False, 25)]
    depth = {"global": 0, "conv1.weight": 0, "fc1.weight": 9, "fc2.weight": 11, "fc3.weight": 13}
    located = LocateResult(None, None, "weight", None, None, results[1], results, {}, 0.85)
    # the smallest set, then the deepest scopes reaching the target but the output layer
    assert _finetune_scopes(located, depth) == [("conv1.weight", 7), ("fc1.weight", 150), ("global", 300)]
    assert _finetune_scopes(located) == [("conv1.weight", 7)]  # no depths known: the search's set alone
    assert _finetune_scopes(located, depth, limit=2) == [("conv1.weight", 7), ("fc1.weight", 150)]
    # A dense first layer over the pixels (an MLP's) comes right after the search's set, as the pick ranks it.
    mlp = LocateResult(None, None, "weight", None, None, results[1], results + [scope("fc0.weight", 30, True, 30)],
                       {}, 0.85)
    depth["fc0.weight"] = 5
    assert _finetune_scopes(mlp, depth) == [("conv1.weight", 7), ("fc1.weight", 150), ("fc0.weight", 30),
                                            ("global", 300)]
    assert _finetune_scopes(mlp, depth, {"fc0.weight"}) == [("conv1.weight", 7), ("fc0.weight", 30),
                                                            ("fc1.weight", 150), ("global", 300)]


def test_finetune_pick_keeps_the_deepest_safe_set_whose_backdoor_is_gone():
    from lancet.repair import FIX_TOLERANCE, HELDBACK_TOLERANCE, _pick_finetuned, _Trained

    def trained(scope, depth, heldback, residual, fix=1.0):
        return _Trained({}, {}, {"error_fix_rate": fix}, [], scope, 10, {}, heldback,
                        {"anomaly_index": residual}, depth)

    shallow, fc1 = trained("conv2.weight", 3, 0.94, 0.4), trained("fc1.weight", 7, 0.935, 0.7)
    fc2, across = trained("fc2.weight", 9, 0.92, 0.0), trained("global", 7, 0.945, -0.5)
    assert _pick_finetuned([across, fc2, fc1, shallow], 2.0) is fc2  # the deepest within the tolerance
    # A deep set that costs held-back accuracy beyond the tolerance is ruled out.
    costly = trained("fc2.weight", 9, 0.945 - 1.5 * HELDBACK_TOLERANCE, -1.0)
    assert _pick_finetuned([across, costly, fc1, shallow], 2.0) is fc1  # fc1 and the global set: both at 7
    # Restored trigger: a set whose residual trigger is still anomalous is passed over while another's is not...
    flagged = trained("fc2.weight", 9, 0.94, 3.0)
    assert _pick_finetuned([flagged, fc1], 2.0) is fc1
    # ... and when every one's is, the held-back accuracy and depth decide alone.
    assert _pick_finetuned([flagged, trained("fc1.weight", 7, 0.94, 2.5)], 2.0) is flagged
    # Real error inputs (no threshold): no residual trigger; a set that fixes fewer of the given inputs than
    # the best by more than the tolerance is passed over.
    assert _pick_finetuned([flagged, fc1], None) is flagged
    weak = trained("fc2.weight", 9, 0.94, None, fix=1.0 - 2 * FIX_TOLERANCE)
    assert _pick_finetuned([weak, fc1, shallow], None) is fc1
    assert _pick_finetuned([trained("fc2.weight", 9, 0.94, None, fix=1.0 - FIX_TOLERANCE / 2), fc1],
                           None).depth == 9
    assert _pick_finetuned([weak, trained("fc1.weight", 7, 0.94, None, fix=0.955)], None) is weak  # best of those
    # At equal depth, a single-layer set before one across layers, then the higher held-back accuracy.
    assert _pick_finetuned([trained("global", 9, 0.95, 0.1), fc2], 2.0) is fc2
    better = trained("fc2.weight", 9, 0.93, 0.2)
    assert _pick_finetuned([fc2, better], 2.0) is better
    # With real error inputs, a dense first layer over the whole input (an MLP's) ranks above every deeper
    # set, within the same filters...
    first = trained("fc0.weight", 1, 0.93, None)._replace(reads_pixels=True)
    deep = trained("fc2.weight", 9, 0.92, None)
    assert _pick_finetuned([deep, first, fc1], None) is first
    assert _pick_finetuned([deep, first._replace(heldback_accuracy=0.92 - 1.5 * HELDBACK_TOLERANCE)], None) is deep
    assert _pick_finetuned([deep, first._replace(after={"error_fix_rate": 1.0 - 2 * FIX_TOLERANCE})], None) is deep
    # ... but not with a restored trigger, which holds only part of the real trigger's pixels: depth decides.
    restored_first = first._replace(residual={"anomaly_index": 0.3})
    assert _pick_finetuned([fc2, restored_first, fc1], 2.0) is fc2
    assert _pick_finetuned([restored_first, fc2._replace(residual={"anomaly_index": 3.0})], 2.0) is restored_first
    # Grown sets (`_finetune_rounds`): only the largest size's accepted sets are weighed; a smaller one, though
    # deeper, within the fix tolerance and better held back, fell short of the growth's fix rate.
    small = trained("fc2.weight", 9, 0.95, None, fix=0.96)
    grown = trained("fc1.weight", 7, 0.93, None, fix=0.98)._replace(margin=4.0)
    assert _pick_finetuned([small, grown], None) is grown
    assert _pick_finetuned([small], None) is small


def test_flip_takes_the_largest_margin_within_the_bound_then_the_smallest_drop():
    from lancet.repair import FlipOption, _pick_flip

    options = [FlipOption("conv2.weight", 1.5, 168, 1.0, 2.5), FlipOption("conv2.weight", 1.25, 140, 1.0, 1.5),
               FlipOption("conv2.weight", 1.0, 112, 1.0, 1.6), FlipOption("fc.weight", 1.5, 60, 0.98, 0.5),
               FlipOption("fc.weight", 1.25, 50, 1.0, 0.4), FlipOption("fc.weight", 1.0, 40, 1.0, 0.2)]
    # 1.5x: conv2 breaks the bound, fc misses the fix target; at 1.25x fc costs less accuracy.
    assert _pick_flip(options, 2.0, 0.99) == options[4]
    assert _pick_flip(options, 0.3, 0.99) == options[5]  # only the minimal fc set keeps a 0.3-point bound
    assert _pick_flip(options, 0.1, 0.99) is None
    assert _pick_flip(options, 3.0, 0.99) == options[0]  # a larger margin beats a smaller drop
    # A per-class bound rules out an option whose overall drop is small but one class pays for it.
    for option, class_drop in zip(options, (30.0, 20.0, 20.0, 5.0, 12.0, 4.0)):
        option.class_drop_points = class_drop
    assert _pick_flip(options, 2.0, 0.99, max_class_drop=5.0) == options[5]
    assert _pick_flip(options, 2.0, 0.99, max_class_drop=3.0) is None


def test_finetune_passes_over_a_set_whose_repair_fails(backdoor_case, monkeypatch):
    """A set too small to repair is tried and rejected on the defender's data; an accepted set is kept."""
    import lancet.repair as repair_module

    real = repair_module._finetune_scopes
    monkeypatch.setattr(repair_module, "_finetune_scopes",
                        lambda located, depth=None, pixel_tied=frozenset(), limit=4: [
                            (located.chosen.scope, 1), *real(located, depth, pixel_tied, limit)][:limit])
    model = load_model(backdoor_case.model)
    case, forward = load_case(backdoor_case.case, model), Forward(model)

    def observe(attempt, params):  # each candidate's own parameters: its accuracy is the entry's
        attempt["observed_accuracy"] = float(np.mean(predict_labels(forward, case.x_clean, params=params)
                                                     == case.y_clean))

    result = repair(backdoor_case.model, case, method="finetune", progress=False, observe=observe)
    tried = result.details["finetune_tried"]
    assert not tried[0]["accepted"] and tried[0]["neurons"] == 2 and tried[1]["accepted"]
    kept = [t for t in tried if t["neurons"] == result.details["finetune_neurons"]
            and t["scope"] == result.details["finetune_scope"]]
    assert result.accepted and kept and all(t["accepted"] for t in kept)
    assert [t["observed_accuracy"] for t in tried] == pytest.approx([t["clean_accuracy"] for t in tried])
    # every set is held back on the same split, so the untouched model's figure there is one number
    originals = {t["heldback_accuracy_original"] for t in tried}
    assert len(originals) == 1 and 0.0 < originals.pop() <= 1.0


def test_finetune_grows_its_sets_while_none_fixes_the_given_inputs():
    """With real error inputs, the candidate scopes are trained again at twice the margin (2 -> 4 -> 8) while no
    accepted set fixes FINETUNE_GROW_BELOW of the given error inputs; a set already trained is skipped; with a
    restored trigger (grow False), or once a set fixes enough, no further round."""
    from lancet.repair import FINETUNE_GROW_BELOW, FINETUNE_MARGIN, FINETUNE_MAX_MARGIN, _finetune_rounds

    def sets_at(margin):  # scope "a" has 10 elements at most: from margin 4 on its set stops growing
        return [([{}] * min(10, int(3 * margin)), "a", 1, False), ([{}] * int(5 * margin), "b", 2, False)]

    def run(fix_rates, grow=True):
        tried, order = [], []
        for margin, trained, scope, *_ in _finetune_rounds(sets_at, tried, grow):
            order.append((margin, scope, len(trained)))
            fix, accepted = fix_rates[len(tried)]
            tried.append({"error_fix_rate": fix, "accepted": accepted})
        return order

    low = FINETUNE_GROW_BELOW - 0.01
    assert FINETUNE_MARGIN == 2 and FINETUNE_MAX_MARGIN == 8
    assert run([(low, True)] * 5) == [(2, "a", 6), (2, "b", 10), (4, "a", 10), (4, "b", 20), (8, "b", 40)]
    # A set that fixes enough but is rejected (e.g. on accuracy) does not stop the growth; an accepted one does.
    assert len(run([(1.0, False), (low, True), (1.0, True), (low, True)])) == 4
    assert run([(FINETUNE_GROW_BELOW, True), (low, True)]) == [(2, "a", 6), (2, "b", 10)]
    assert run([(low, True)] * 2, grow=False) == [(2, "a", 6), (2, "b", 10)]


def test_growth_replay_stops_where_the_threshold_would_and_keeps_the_picked_set():
    """benchmarks/growth_replay.py replays the growth stop and the pick at another threshold from a record's
    `finetune_tried`: sets fixing 0.97 at 2x, 0.98 at 4x and 0.99 at 8x stop at 4x below 0.98 and at 8x below
    0.985; a record whose growth stopped earlier than a higher threshold would is `not_run`; a record grown
    without its sizes recorded is not replayed."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from growth_replay import replay  # noqa: PLC0415

    def attempt(scope, margin, fix, asr, depth=1):
        return {"scope": scope, "margin": margin, "neurons": int(10 * margin), "accepted": True, "depth": depth,
                "error_fix_rate": fix, "heldback_accuracy": 0.9, "heldout": {"c_acc": 0.9, "asr": asr}}

    tried = [attempt("a", 2.0, 0.97, 0.05), attempt("b", 2.0, 0.96, 0.06, depth=2),
             attempt("a", 4.0, 0.98, 0.03), attempt("a", 8.0, 0.99, 0.01)]
    record = {"before": {"c_acc": 0.9}, "details": {"finetune_tried": tried}}
    at_098, at_0985 = replay(record, 0.98), replay(record, 0.985)
    assert (at_098["margin"], at_098["asr"], at_098["met"]) == (4.0, 0.03, False)
    assert (at_0985["margin"], at_0985["asr"], at_0985["met"]) == (8.0, 0.01, True)
    assert replay(record, 0.5)["scope"] == "b"  # 2x only: the deeper set, within the fix tolerance
    assert replay({**record, "details": {"finetune_tried": tried[:3]}}, 0.985) == {"not_run": True}
    unsized = [{**t, "margin": None} for t in tried]
    assert replay({**record, "details": {"finetune_tried": unsized}}, 0.98) == {"unrecorded": True}


def fixed_batch_copy(source, destination) -> None:
    """The model as torch.onnx.export writes it without a dynamic axis and with `x.view(x.size(0), -1)`:
    input and output batch fixed at 1, the Flatten a Reshape to the constant [1, -1]."""
    from onnx import helper, numpy_helper

    proto = onnx.load(str(source))
    graph = proto.graph
    index = next(i for i, node in enumerate(graph.node) if node.op_type == "Flatten")
    flatten = graph.node[index]
    graph.initializer.append(numpy_helper.from_array(np.array([1, -1], np.int64), "fixed_batch_shape"))
    graph.node.remove(flatten)
    graph.node.insert(index, helper.make_node("Reshape", [flatten.input[0], "fixed_batch_shape"],
                                              list(flatten.output), name=flatten.name))
    for info in list(graph.input) + list(graph.output):
        dim = info.type.tensor_type.shape.dim[0]
        dim.ClearField("dim_param")
        dim.dim_value = 1
    del graph.value_info[:]
    onnx.save(proto, str(destination))


def test_fixed_batch_export_repairs_like_the_free_one(backdoor_case, tmp_path):
    """A file that hard-codes batch 1 (PyTorch's default export) computes what the free-batch file does (in
    JAX, on any batch) and is repaired within the same bounds; the written file keeps its fixed-batch graph
    and runs in onnxruntime. (Not compared bit for bit: the vmapped graph may sum in another order.)"""
    fixed = tmp_path / "fixed.onnx"
    fixed_batch_copy(backdoor_case.model, fixed)
    case = load_case(backdoor_case.case, load_model(backdoor_case.model))
    free_logits = Forward(load_model(backdoor_case.model)).logits(case.x_clean)
    assert float(np.max(np.abs(np.asarray(Forward(load_model(fixed)).logits(case.x_clean)) - free_logits))) < 1e-4
    result = repair(fixed, backdoor_case.case, tmp_path / "out.onnx", method="flip", progress=False)
    assert result.written and result.accepted
    out = onnx.load(str(tmp_path / "out.onnx"))
    assert [n.op_type for n in out.graph.node] == [n.op_type for n in onnx.load(str(fixed)).graph.node]
    assert out.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    heldout = dict(np.load(backdoor_case.heldout))
    acc_before, _ = heldout_figures(backdoor_case.model, heldout)
    acc_after, asr_after = heldout_figures(tmp_path / "out.onnx", heldout)
    assert asr_after <= 0.025 and 100 * (acc_before - acc_after) <= 1.5, (acc_before, acc_after, asr_after)


@pytest.mark.parametrize("method", ["flip", "finetune"])
def test_sklearn_digits_mlp_backdoor_repaired(method, tmp_path):
    """scikit-learn's 8x8 digits (1,797 images): an MLP with a 2x2 BadNets corner patch, the defender holding
    60 clean images (5 % of the training set) and 40 triggered ones; both methods take held-out ASR to 2 % or
    less within the tool's default 2-point accuracy bound (the 1-point goal, met here by both: the benchmark
    table, docs/repair-benchmark.md; a model trained on another CPU differs)."""
    pytest.importorskip("torch")
    from lancet.models.recipes import Recipe, build_case

    built = build_case(Recipe(dataset="sklearn_digits", arch="mlp", attack="badnets", train_size=1200,
                              defender_clean=60, defender_error=40, test_size=490, epochs=40))
    heldout = dict(np.load(built.heldout))
    assert heldout["x_test"].shape[1:] == (1, 8, 8)
    out = tmp_path / "fixed.onnx"
    result = repair(built.model, built.case, out, method=method, progress=False)
    assert result.accepted and result.written
    acc_before, asr_before = heldout_figures(built.model, heldout)
    acc_after, asr_after = heldout_figures(out, heldout)
    assert asr_before > 0.9 and asr_after <= 0.02 and acc_before - acc_after <= 0.02, (acc_after, asr_after)


def test_flip_options_are_observed_with_their_own_parameters(backdoor_case):
    """`observe` sees every flip option with its flipped parameters: each one's clean accuracy is the drop
    the option records, and the picked option's parameters are the repair's."""
    model = load_model(backdoor_case.model)
    case, forward = load_case(backdoor_case.case, model), Forward(model)
    base = float(np.mean(predict_labels(forward, case.x_clean) == case.y_clean))
    seen = []

    def observe(option, params):
        option["observed_drop"] = 100.0 * (base - float(np.mean(predict_labels(forward, case.x_clean, params=params)
                                                                 == case.y_clean)))
        seen.append((option, params))

    result = repair(backdoor_case.model, case, method="flip", progress=False, observe=observe)
    options = result.details["flip"]["options"]
    assert len(seen) == len(options) > 1
    assert [o["observed_drop"] for o in options] == pytest.approx([o["drop_points"] for o in options], abs=1e-6)
    picked = [params for option, params in seen
              if (option["scope"], option["margin"]) == (result.details["flip"]["scope"], result.details["flip"]["margin"])]
    assert picked and all(np.array_equal(np.asarray(picked[0][k]), np.asarray(v))
                          for k, v in result.repaired_params.items())
