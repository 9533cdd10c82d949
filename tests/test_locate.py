"""Locating EINs on a real backdoored model: held-out triggered inputs lose the attacker's label."""
from __future__ import annotations

import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from lancet import Edit, Forward, load_model
from lancet.case import Case, load_case
from lancet.locate import build_pairs, ei_features, progressive_ablation, score_neurons
from lancet.locate.ablation import K_TOLERANCE
from lancet.locate.common import predict_labels
from lancet.locate.pairs import NothingToFixError
from lancet.locate.pipeline import locate
from lancet.neurons import find_layers


@pytest.fixture(scope="module")
def setup(backdoor_case):
    model = load_model(backdoor_case.model)
    case = load_case(backdoor_case.case, model)
    heldout = dict(np.load(backdoor_case.heldout))
    return model, case, heldout


def ablated_figures(result, heldout):
    """Held-out clean accuracy and ASR with the located EINs ablated (weights zeroed / channels masked)."""
    forward = result.forward
    params, edits = dict(forward.params), None
    if result.granularity == "weight":
        for ein in result.eins:
            value = np.array(params[ein["initializer"]])
            value.reshape(-1)[ein["index"]] = 0
            params[ein["initializer"]] = jnp.asarray(value)
    else:
        scales = {}
        for ein in result.eins:
            scale = scales.setdefault(ein["layer"], np.ones(result.scores.scores[ein["layer"]].size, np.float32))
            scale[ein["index"]] = 0
        edits = {name: Edit(scale=jnp.asarray(s)) for name, s in scales.items()}

    def predict(x):
        return np.concatenate([np.asarray(jnp.argmax(forward.logits(x[i:i + 256], params=params, edits=edits), -1))
                               for i in range(0, len(x), 256)])

    before_acc = float(np.mean(predict_labels(forward, heldout["x_test"]) == heldout["y_test"]))
    acc = float(np.mean(predict(heldout["x_test"]) == heldout["y_test"]))
    asr = float(np.mean(predict(heldout["x_error"]) == int(heldout["target"])))
    return before_acc, acc, asr


@pytest.mark.parametrize("granularity,target_fix", [("weight", 0.99), ("channel", 0.95)])
def test_located_eins_remove_backdoor_on_heldout(setup, granularity, target_fix):
    model, case, heldout = setup
    result = locate(model, case, granularity=granularity, target_fix=target_fix, progress=False)
    assert result.status == "located" and result.chosen.success
    share = len(result.eins) / result.total_neurons
    assert 0 < share < (0.01 if granularity == "weight" else 0.05)
    before_acc, acc, asr = ablated_figures(result, heldout)
    assert asr <= 0.05, f"held-out ASR after ablating {len(result.eins)} EINs: {asr:.3f}"
    assert 100 * (before_acc - acc) <= 2.0
    report = result.to_json()
    json.dumps(report)
    assert report["ein_count"] == len(result.eins) and report["pairs_used"] > 50
    curve = report["ablation_curve"]
    assert curve[0]["k"] == 0 and curve[0]["fix_rate"] == 0.0
    assert any(p["k"] == result.chosen.k and p["fix_rate"] >= target_fix for p in curve)
    assert set(report["seconds"]) >= {"pairs", "features", "scores", "ablation", "total"}


def test_steps_compose_as_separate_functions(setup):
    model, case, _ = setup
    from lancet import Forward

    forward = Forward(model)
    layers = find_layers(model)
    pairs = build_pairs(forward, case, fill="inpaint")
    assert pairs.source == "trigger_mask" and pairs.used > 50
    assert np.all(predict_labels(forward, pairs.x_companion) == pairs.y_right)
    features = ei_features(forward, pairs, layers)
    assert {name: f.shape for name, f in features.items()} == {l.name: (pairs.used, l.channels) for l in layers}
    scores = score_neurons(forward, pairs, case.x_clean, case.y_clean, layers, granularity="channel")
    chosen, every = progressive_ablation(forward, scores, pairs, case.x_clean, case.y_clean, scopes="global")
    assert [r.scope for r in every] == ["global"]
    if chosen.success:
        assert chosen.fix_rate >= 0.95 and chosen.clean_drop_points <= 2.0
    else:  # reaching the target costs too much accuracy: the best set within the bound is reported
        assert chosen.clean_drop_points <= 2.0
        assert any(p["fix_rate"] >= 0.95 and 100 * (chosen.clean_accuracy_before - p["clean_accuracy"]) > 2.0
                   for p in chosen.curve)


@pytest.mark.parametrize("bound", [2.0, 0.0])
def test_clean_set_runs_only_where_it_decides_and_picks_what_the_full_curve_picks(setup, bound):
    """The search runs the clean set at the minimal k reaching the target and, when that k breaks the bound
    (bound 0), in order of fix rate until a k keeps it; every scope picks the set that a search evaluating
    the clean set at every k picks, with the same accuracies where both evaluated it."""
    model, case, _ = setup
    forward = Forward(model)
    pairs = build_pairs(forward, case)
    scores = score_neurons(forward, pairs, case.x_clean, case.y_clean, find_layers(model))
    run = dict(max_acc_drop=bound, max_layer_scopes=3)
    _, lazy = progressive_ablation(forward, scores, pairs, case.x_clean, case.y_clean, **run)
    _, full = progressive_ablation(forward, scores, pairs, case.x_clean, case.y_clean, full_curve=True, **run)
    assert bound > 0 or any(not r.success and r.k_target for r in full)  # the fallback ran
    for a, b in zip(lazy, full):
        assert (a.scope, a.k, a.success, a.k_target) == (b.scope, b.k, b.success, b.k_target)
        assert [p["k"] for p in a.curve] == [p["k"] for p in b.curve]
        assert all(p["clean_accuracy"] is not None for p in b.curve)
        for p, q in zip(a.curve, b.curve):
            assert p["fix_rate"] == q["fix_rate"]
            assert p["clean_accuracy"] is None or p["clean_accuracy"] == pytest.approx(q["clean_accuracy"])
    skipped = sum(p["clean_accuracy"] is None for r in lazy for p in r.curve)
    assert skipped >= len(lazy), "the clean set ran at (almost) every k"
    # Where the target breaks the bound, the best set within it has the highest fix rate among the k tried
    # within it, and the bound was pinned down by bisection: a tried k within it and a larger one beyond it
    # lie within the k tolerance of each other.
    narrowed = 0
    for r in full:
        if r.success or not r.k_target or 100 * (r.clean_accuracy_before - r.clean_accuracy) > bound:
            continue
        drop = {p["k"]: 100 * (r.clean_accuracy_before - p["clean_accuracy"]) for p in r.curve}
        fix = {p["k"]: p["fix_rate"] for p in r.curve}
        assert fix[r.k] == max(fix[k] for k in drop if drop[k] <= bound)
        if any(k > r.k and fix[k] > fix[r.k] for k in fix):
            assert any(0 < b - a <= max(1, int(b * K_TOLERANCE)) and drop[a] <= bound < drop[b]
                       for a in drop for b in drop), r.scope
            narrowed += 1
    assert narrowed or bound > 0


def test_clean_set_is_abandoned_once_the_bound_is_out_of_reach(setup):
    """With a bound, a k whose misses already rule the bound out stops early: NaN accuracy and a ceiling at
    or above its real accuracy that still breaks the bound; a group holding a k within the bound runs to
    the end, exactly."""
    from lancet.locate.ablation import Ablator

    model, case, _ = setup
    forward = Forward(model)
    pairs = build_pairs(forward, case)
    scores = score_neurons(forward, pairs, case.x_clean, case.y_clean, find_layers(model))
    ablator = Ablator(forward, scores, pairs, case.x_clean, case.y_clean, batch=64)
    ranks, n = ablator.ranks("global")
    ks = [1, n // 2]  # one neuron costs nothing; half the weights wreck the model
    _, exact = ablator.evaluate(ranks, ks, parts=("clean",))
    base = float(exact[0])
    assert 100 * (base - exact[1]) > 30
    # A group of k stops only once every k of it is out of reach: here the first keeps the bound.
    grouped = ablator.evaluate_bounded(ranks, ks, parts=("clean",), bound=(base, 2.0))
    np.testing.assert_allclose(grouped.accuracy, exact)
    np.testing.assert_allclose(grouped.ceiling, exact)
    assert list(grouped.rows_run) == [len(case.x_clean)] * 2
    wrecked = ablator.evaluate_bounded(ranks, ks[1:], parts=("clean",), bound=(base, 2.0))
    assert np.isnan(wrecked.accuracy[0]) and exact[1] <= wrecked.ceiling[0] < base - 0.02
    assert wrecked.rows_run[0] < len(case.x_clean)
    # A k a few points out of bound, its misses run first: the bound is out of reach sooner, same verdict.
    doubling = [2**i for i in range(int(np.log2(n)))]
    _, accuracies = ablator.evaluate(ranks, doubling, parts=("clean",))
    k = next(k for k, a in zip(doubling, accuracies) if 100 * (base - a) > 4)
    mild = ablator.evaluate_bounded(ranks, [k], parts=("clean",))
    natural = ablator.evaluate_bounded(ranks, [k], parts=("clean",), bound=(base, 2.0))
    ordered = ablator.evaluate_bounded(ranks, [k], parts=("clean",), bound=(base, 2.0),
                                       order=np.argsort(-mild.misses, kind="stable"))
    assert np.isnan(natural.accuracy[0]) and np.isnan(ordered.accuracy[0])
    assert ordered.rows_run[0] < natural.rows_run[0], (k, mild.accuracy, natural.rows_run, ordered.rows_run)
    assert mild.misses.sum() == round((1 - mild.accuracy[0]) * len(case.x_clean))


def test_saliency_finds_trigger_region_without_mask(setup):
    model, case, _ = setup
    from lancet import Forward

    forward = Forward(model)
    blind = Case(case.x_clean, case.y_clean, case.x_error, case.y_error)
    pairs = build_pairs(forward, blind)
    assert pairs.source == "saliency" and pairs.used >= 0.8 * len(case.x_error)
    assert pairs.details["mean_region_share"] < 0.1
    # The regions found overlap the real trigger patch far more than chance.
    trigger = np.broadcast_to(case.trigger_mask, pairs.masks.shape) > 0
    overlap = (pairs.masks * trigger).sum() / pairs.masks.sum()
    assert overlap > 5 * trigger.mean()


def test_given_companions_are_used_and_wrong_ones_dropped(setup):
    model, case, _ = setup
    from lancet import Forward
    from lancet.locate.pairs import refill

    forward = Forward(model)
    companions = refill(case.x_error, case.trigger_mask, "median", case.x_clean)
    companions[:5] = case.x_error[:5]  # five companions still carry the trigger
    pairs = build_pairs(forward, Case(case.x_clean, case.y_clean, case.x_error, case.y_error, companions))
    assert pairs.source == "companion" and pairs.dropped_companion_wrong >= 5


def test_nothing_to_fix(setup):
    model, case, _ = setup
    from lancet import Forward

    forward = Forward(model)
    right = predict_labels(forward, case.x_clean) == case.y_clean
    already_right = Case(case.x_clean, case.y_clean, case.x_clean[right][:20], case.y_clean[right][:20])
    with pytest.raises(NothingToFixError, match="nothing to fix"):
        locate(model, already_right, progress=False)


def test_clean_only_case_restores_the_trigger(setup, backdoor_case):
    model, case, heldout = setup
    clean_only = Case(case.x_clean, case.y_clean)
    result = locate(model, clean_only, progress=False, restore_steps=200)
    assert result.restore.flagged == 0, result.restore.summary()
    assert result.restore.anomaly[0] > 2
    assert result.pairs.source == "restored" and result.chosen is not None
    # The convergence trace: each class's smallest working trigger only shrinks, and ends at the reported norm.
    trace = result.restore.details["trace"]
    assert [step for step, _ in trace] == list(range(25, 201, 25))
    for cls in range(10):
        norms = [n[cls] for _, n in trace if n[cls] is not None]
        assert norms == sorted(norms, reverse=True)
        assert not norms or norms[-1] == pytest.approx(result.restore.norms[cls], rel=1e-3)
    json.dumps(result.to_json())  # the trace is JSON (no infinities)
    # A restoration done earlier is taken as it is: nothing restored again, the same EINs.
    again = locate(model, clean_only, progress=False, restore=result.restore)
    assert "restore" not in again.seconds and again.restore is result.restore and again.eins == result.eins
    # Repair from the restored trigger alone removes the real trigger on held-out data.
    from lancet.repair import repair

    repaired = repair(backdoor_case.model, clean_only, method="finetune", progress=False, reuse=result)
    assert repaired.accepted and repaired.details["locate"]["pairs"]["source"] == "restored"
    forward = result.forward
    acc_before = np.mean(predict_labels(forward, heldout["x_test"]) == heldout["y_test"])
    acc_after = np.mean(predict_labels(forward, heldout["x_test"], params=repaired.repaired_params) == heldout["y_test"])
    asr_after = np.mean(predict_labels(forward, heldout["x_error"], params=repaired.repaired_params) == heldout["target"])
    print(f"restored-trigger finetune: held-out accuracy {acc_before:.4f} -> {acc_after:.4f}, ASR {asr_after:.4f}")
    assert asr_after <= 0.05 and acc_before - acc_after <= 0.02
    # The residual trigger: restored again on the repaired model, the target's trigger is no longer anomalous;
    # on the original model it is found again as small as before.
    residual = repaired.details["residual_trigger"]
    assert residual["classes"] == [0] and residual["norms"][0] > 2 * residual["norms_before"][0], residual
    assert residual["anomaly_index"] < 2 < residual["anomaly_indices_before"][0], residual
    from lancet.locate.restore import residual_trigger

    unrepaired = residual_trigger(forward, case.x_clean, result.restore, forward.params)
    assert unrepaired["anomaly_index"] > 2 and unrepaired["norms"][0] < 1.5 * unrepaired["norms_before"][0]


def test_cli_locate_writes_report_and_plot(backdoor_case, tmp_path):
    report, plot = tmp_path / "eins.json", tmp_path / "curve.png"
    run = subprocess.run([sys.executable, "-m", "lancet.cli", "locate", str(backdoor_case.model), "--data",
                          str(backdoor_case.case), "--report", str(report), "--plot", str(plot)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "lancet locate" in run.stdout and "EINs" in run.stdout
    data = json.loads(report.read_text())
    assert data["status"] == "located" and data["eins"][0]["initializer"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_locate_bad_case_exit_2(backdoor_case, tmp_path):
    arrays = dict(np.load(backdoor_case.case))
    arrays["y_error"] = arrays["y_error"] + 100
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrays)
    run = subprocess.run([sys.executable, "-m", "lancet.cli", "locate", str(backdoor_case.model), "--data",
                          str(bad)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "y_error" in run.stderr and "Traceback" not in run.stderr


def test_general_defect_spurious_feature(defect_case):
    model = load_model(defect_case.model)
    case = load_case(defect_case.case, model)
    heldout = dict(np.load(defect_case.heldout))
    result = locate(model, case, progress=False)
    assert result.chosen.success and len(result.eins) / result.total_neurons < 0.01
    before_acc, acc, error_rate = ablated_figures(result, heldout)  # heldout "target" = the spurious class
    assert error_rate <= 0.05 and 100 * (before_acc - acc) <= 2.0


def test_clean_model_no_backdoor_found(tmp_path):
    pytest.importorskip("torch")
    from lancet.models.recipes import Recipe, build_case

    built = build_case(Recipe(attack="none"))
    model = load_model(built.model)
    case = load_case(built.case, model)
    result = locate(model, Case(case.x_clean, case.y_clean), progress=False, restore_steps=200)
    assert result.status == "no_backdoor" and result.eins == []
    assert result.restore.flagged is None and max(result.restore.anomaly) < result.restore.threshold
    additive = result.restore.details["additive"]  # the fallback trigger model ran and found nothing either
    assert additive["flagged_class"] is None and max(additive["anomaly_index"]) < result.restore.threshold
    pairwise = result.restore.details["source_specific"]  # nor the source-specific one, over its 90 rows
    assert len(pairwise["rows"]) == 90 and pairwise["flagged_triggers"] == []
    assert max(pairwise["anomaly_index"]) < pairwise["anomaly_threshold"]
    assert result.to_json()["restore"]["backdoor_found"] is False
    # `repair` on the same restoration stops, writes nothing and names the trigger that came closest.
    from lancet.repair import repair

    stopped = repair(built.model, Case(case.x_clean, case.y_clean), tmp_path / "out.onnx", progress=False,
                     restore=result.restore)
    assert stopped.status == "no_backdoor" and not stopped.written and not (tmp_path / "out.onnx").exists()
    closest = int(np.argmax(result.restore.anomaly))
    assert f"{result.restore.label(closest)}, anomaly index {max(result.restore.anomaly):.2f} under" in stopped.reasons[0]


def test_additive_restoration_flags_blended_target(tmp_path):
    """A full-image blended trigger: the additive trigger model flags the target with a clearly smaller
    perturbation than any other class needs, and its restored trigger sends clean inputs there."""
    pytest.importorskip("torch")
    from lancet.locate.restore import restore_triggers, save_mask_png
    from lancet.models.recipes import Recipe, build_case

    built = build_case(Recipe(attack="blended"))
    model = load_model(built.model)
    forward = Forward(model)
    case = load_case(built.case, model)
    result = restore_triggers(forward, case.x_clean, 10, kind="additive", steps=200)
    assert result.kind == "additive" and result.flagged == 0, result.summary()
    assert result.norms[0] < 0.6 * np.median(result.norms)
    stamped = result.apply(case.x_clean, 0)
    assert stamped.min() >= case.x_clean.min() and stamped.max() <= case.x_clean.max()
    assert np.mean(predict_labels(forward, stamped) == 0) > 0.9
    png = tmp_path / "perturbation.png"
    save_mask_png(result, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_source_specific_restoration_flags_the_all_to_all_rows():
    """An all-to-all backdoor (y -> y + 1) has no single target class; restored per (source, target) pair,
    the attacker's rows stand out among the 90 and only they are flagged; their triggers are stamped on
    every class but their targets for the pairs."""
    pytest.importorskip("torch")
    from lancet.locate.restore import restore_pairwise, restored_pairs_inputs
    from lancet.models.recipes import Recipe, build_case

    built = build_case(Recipe(attack="badnets", mode="all_to_all"))
    model = load_model(built.model)
    case = load_case(built.case, model)
    result = restore_pairwise(Forward(model), case.x_clean, case.y_clean, 10, steps=200)
    flagged = result.flagged_classes
    assert flagged and result.threshold > 2.5  # stricter than Neural Cleanse's 2 over 10 classes
    assert all(result.targets[r] == (result.sources[r] + 1) % 10 for r in flagged), result.summary()["flagged_triggers"]
    assert all(result.attack_rates[r] >= 0.8 for r in flagged)
    # Pairs: the flagged triggers stamped on every class but their targets'; build_pairs keeps what they move.
    x_error, y_right, companions = restored_pairs_inputs(result, case.x_clean, case.y_clean)
    assert len(x_error) == sum(int(np.sum(case.y_clean != result.targets[r])) for r in flagged)


def test_anomaly_index_sees_a_small_mask_among_widely_spread_ones():
    """The mask norms restored from DenseNet-small BadNets after 200 steps: the target's 11.5 px stands out
    from honest classes spread over 54-369 px on a log scale (index > 2; the raw-norm index of Neural
    Cleanse gives it 1.07, so this fails with it). Scaling every norm leaves the index unchanged."""
    from lancet.locate.restore import anomaly_index

    norms = np.array([11.5, 266.4, 278.3, 126.9, 92.8, 177.8, 70.3, 368.7, 54.0, 168.7])
    index = anomaly_index(norms)
    assert index[0] > 2 and np.all(index[1:] < 2)
    np.testing.assert_allclose(anomaly_index(norms * 7.0), index, atol=1e-9)


def test_restored_pairs_cover_every_flagged_class():
    """With two anomalous classes, the pairs hold each class's trigger on the clean inputs not of that class."""
    from lancet.locate.restore import RestoreResult, restored_pairs_inputs

    rng = np.random.default_rng(0)
    x = rng.random((30, 1, 4, 4)).astype(np.float32)
    y = np.arange(30) % 3
    masks = np.zeros((3, 1, 4, 4), np.float32)
    masks[:, :, 0, 0] = 1
    patterns = np.stack([np.full((1, 4, 4), value, np.float32) for value in (5.0, 6.0, 7.0)])
    result = RestoreResult(masks, patterns, np.ones(3), np.ones(3), np.zeros(3), flagged=2, threshold=2.0,
                           also_flagged=[1])
    assert result.flagged_classes == [2, 1]
    x_error, y_right, x_companion = restored_pairs_inputs(result, x, y)
    assert len(x_error) == 20 + 20 and np.all(y_right[:20] != 2) and np.all(y_right[20:] != 1)
    assert np.all(x_error[:20, 0, 0, 0] == 7.0) and np.all(x_error[20:, 0, 0, 0] == 6.0)
    assert np.array_equal(x_companion[:20], x[y != 2])


def test_restored_pairs_stamp_the_peeled_union():
    """A flagged class with a trigger peeled after it: the pairs hold its first trigger alone and then the
    union of both (each stamped over the other's pixels), on the clean inputs not of that class."""
    from lancet.locate.restore import RestoreResult, restored_pairs_inputs

    rng = np.random.default_rng(0)
    x = rng.random((20, 1, 4, 4)).astype(np.float32)
    y = np.arange(20) % 2
    masks = np.zeros((2, 1, 4, 4), np.float32)
    masks[:, :, 0, 0] = 1
    patterns = np.full((2, 1, 4, 4), 5.0, np.float32)
    second = np.zeros((1, 4, 4), np.float32)
    second[:, 3, 3] = 1
    peeled = {1: [{"mask": second, "pattern": np.full((1, 4, 4), 9.0, np.float32), "norm": 1.0,
                   "anomaly_index": 3.0, "attack_rate": 1.0}]}
    result = RestoreResult(masks, patterns, np.ones(2), np.ones(2), np.zeros(2), flagged=1, threshold=2.0,
                           peeled=peeled)
    x_error, y_right, x_companion = restored_pairs_inputs(result, x, y)
    assert len(x_error) == 20 and np.all(y_right != 1) and np.array_equal(x_companion[10:], x[y != 1])
    assert np.all(x_error[:, 0, 0, 0] == 5.0)
    assert np.array_equal(x_error[:10, 0, 3, 3], x[y != 1][:, 0, 3, 3]) and np.all(x_error[10:, 0, 3, 3] == 9.0)
    assert result.summary()["peeled"] == {"1": [{"norm": 1.0, "anomaly_index": 3.0, "attack_rate": 1.0}]}


def test_peeled_triggers_avoid_the_pixels_found_before(setup):
    """Peeling on the test model's restoration: each further trigger's mask is zero on every pixel an
    earlier one took, and what is kept is anomalous against the unflagged classes and flips most inputs;
    the restoration's optimiser honours `allowed` exactly."""
    from lancet.locate.restore import PEEL_TAKEN, _optimise, peel_triggers, restore_triggers

    model, case, _ = setup
    forward = Forward(model)
    allowed = np.ones((1, 1, 28, 28), np.float32)
    allowed[..., 20:, 20:] = 0
    masks, _, norms, *_ = _optimise(forward, case.x_clean, [0], "mask", steps=20, batch=32, lr=None, lam=None,
                                    seed=0, progress=None, allowed=allowed)
    assert np.all(masks[0][..., 20:, 20:] == 0) and norms[0] == pytest.approx(masks[0].sum(), rel=1e-5)
    result = restore_triggers(forward, case.x_clean, 10, kind="mask", steps=200)
    assert result.flagged == 0
    result.peeled.clear()
    peel_triggers(forward, case.x_clean, result, steps=200, batch=64, lr=None, seed=0, min_attack_rate=0.8)
    taken = result.masks[0] > PEEL_TAKEN
    for part in result.peeled.get(0, []):
        assert np.all(part["mask"][taken] == 0)
        assert part["anomaly_index"] > result.threshold and part["attack_rate"] >= 0.8
        taken |= part["mask"] > PEEL_TAKEN


def test_per_layer_scopes_of_a_transformer_match_the_full_graph(digits, tmp_path, torch_threads):
    """A ViT's per-layer scopes run the graph from the layer on, on cached prefix tensors; shape arithmetic
    that crosses the cut (a Reshape's target shape) is held as a constant. With nothing ablated, every
    scope gives the full graph's fix rate and clean accuracy."""
    from lancet.converters.torch_export import export_torch
    from lancet.locate.ablation import Ablator
    from lancet.models.torch_zoo import build

    x = digits[0][:96]
    path = export_torch(build("vit", 1, 28), x[:2], tmp_path / "vit.onnx")
    model = load_model(path)
    forward = Forward(model)
    labels = predict_labels(forward, x)
    companion = int(np.flatnonzero(labels != labels[0])[0])  # error inputs: images labelled unlike it
    errors = np.flatnonzero(labels != labels[companion])[:16]
    case = Case(x[48:], labels[48:], x[errors], np.full(len(errors), labels[companion]),
                x_companion=np.repeat(x[companion:companion + 1], len(errors), axis=0))
    pairs = build_pairs(forward, case)
    scores = score_neurons(forward, pairs, case.x_clean, case.y_clean, find_layers(model))
    ablator = Ablator(forward, scores, pairs, case.x_clean, case.y_clean, batch=32)
    reference = ablator.evaluate(ablator.ranks("global")[0], [0], "global")
    scopes = [unit for unit in scores.scores if ablator._start(unit) > 0]
    assert len(scopes) >= 4
    for scope in scopes:
        fix, accuracy = ablator.evaluate(ablator.ranks(scope)[0], [0], scope)
        assert fix[0] == reference[0][0] and accuracy[0] == pytest.approx(reference[1][0]), scope


def test_mask_png_shows_every_flagged_class(tmp_path):
    """Two anomalous classes: the PNG holds a row per class (twice the height of a one-class PNG)."""
    import struct

    from lancet.locate.restore import RestoreResult, save_mask_png

    rng = np.random.default_rng(0)
    masks = rng.uniform(size=(3, 1, 8, 8)).astype(np.float32)
    anomaly = np.array([2.5, 0.1, 3.0])
    result = RestoreResult(masks, rng.uniform(size=(3, 1, 8, 8)).astype(np.float32), masks.sum((1, 2, 3)),
                           np.ones(3), anomaly, 2, 2.0, also_flagged=[0])

    def height(path):
        return struct.unpack(">II", path.read_bytes()[16:24])[1]

    both, one = tmp_path / "both.png", tmp_path / "one.png"
    save_mask_png(result, both)
    save_mask_png(result, one, targets=[2])
    assert height(both) > 1.8 * height(one)


def test_global_scope_starts_at_the_first_layer_holding_a_candidate(setup, monkeypatch):
    """Global-scope candidates confined to late layers run the graph from the first of them, on cached prefix
    activations: the same fix rates and accuracies as full forwards (the cache switched off)."""
    from lancet import Forward
    from lancet.locate import ablation

    model, case, _ = setup
    forward = Forward(model)
    pairs = build_pairs(forward, case)
    scores = score_neurons(forward, pairs, case.x_clean, case.y_clean, find_layers(model))
    cached = ablation.Ablator(forward, scores, pairs, case.x_clean, case.y_clean, batch=128)
    late = [unit for unit in scores.scores if cached._start(unit) > 0]
    assert late
    results = []
    for unit in late:
        ranks = cached.ranks(unit)[0]  # only this layer's neurons are candidates
        assert cached._start("global", ranks, 16) == cached._start(unit)
        results.append(cached.evaluate(ranks, [1, 4, 16, 64], "global"))
    assert cached._prefix, "no prefix was cached"
    assert any(fix.max() > 0 for fix, _ in results)
    monkeypatch.setattr(ablation, "PREFIX_CACHE_BYTES", 0)
    full = ablation.Ablator(forward, scores, pairs, case.x_clean, case.y_clean, batch=128)
    for unit, (fix, accuracy) in zip(late, results):
        full_fix, full_accuracy = full.evaluate(full.ranks(unit)[0], [1, 4, 16, 64], "global")
        np.testing.assert_allclose(fix, full_fix)
        np.testing.assert_allclose(accuracy, full_accuracy)
    assert not full._prefix


def test_cli_locate_peels_when_asked(backdoor_case, tmp_path):
    """`lancet locate --peel 2` with clean data only: the report lists each peeled part (its size, anomaly
    index and attack rate), at most two per flagged class, and the table names them; without --peel none."""
    from click.testing import CliRunner

    from lancet.cli import main

    data = np.load(backdoor_case.case)
    clean = tmp_path / "clean.npz"
    np.savez(clean, x_clean=data["x_clean"], y_clean=data["y_clean"])
    runs = {}
    for peel in (0, 2):
        report = tmp_path / f"peel{peel}.json"
        run = CliRunner().invoke(main, ["locate", str(backdoor_case.model), "--data", str(clean), "--peel", str(peel),
                                        "--report", str(report)])
        assert run.exit_code == 0, run.output
        runs[peel] = (json.loads(report.read_text())["restore"], run.output)
    assert "peeled" not in runs[0][0] and "peeled parts" not in runs[0][1]
    peeled = runs[2][0].get("peeled", {})
    assert all(1 <= len(parts) <= 2 and all(p["anomaly_index"] > 2 and p["attack_rate"] >= 0.8 for p in parts)
               for parts in peeled.values())
    assert ("peeled parts" in runs[2][1]) == bool(peeled)
