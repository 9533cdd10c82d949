"""`repair()`: locate the EINs, fix them (flip or fine-tune), export by graph surgery, evaluate before/after.

Acceptance: the clean-accuracy drop on x_clean is at most `max_acc_drop` points (and, when given, no class of
x_clean loses more than `max_class_drop` points) and at least `target_fix` of the error inputs the model got
wrong no longer get their wrong label. A repair that misses is not written unless `force`; a repaired file
that fails the checker, onnxruntime or parity is never written.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import AbstractSet, Any, Callable, Iterator, Mapping, NamedTuple

import jax.numpy as jnp
import numpy as np

from . import __version__
from .case import Case, load_case
from .errors import BadInputError, RepairRejectedError
from .evaluate import class_accuracy, error_rate_upper_bound, largest_class_drop, static_batch
from .fix import ein_masks, finetune, flip
from .forward import Forward
from .io import check_output_path, external_data_path, write_model_atomic
from .loader import external_data_files, load_model
from .locate.common import predict_labels
from .locate.pipeline import LocateResult, locate
from .locate.restore import RestoreResult, residual_trigger
from .neurons import DENSE_OPS, Layer, find_layers

METHODS = ("flip", "finetune")
# onnxruntime against the JAX forward on the written file, relative to the largest score (at least 1): a
# float16 file computes in float16 in onnxruntime, in float32 in the engine (the test LeNet-5 halved, on
# 64 clean inputs: 4.0e-3 with scores up to 18.3; float16 keeps about 3 significant digits).
PARITY_ATOL, PARITY_ATOL_HALF = 1e-4, 1e-2
# Ablation-search fix-rate target on the pairs per method: a flip search can afford a stricter target
# (flipping pushes the trigger's evidence the other way); fine-tuning then trains the ablated set.
SEARCH_TARGET = {"flip": 0.99, "finetune": 0.95}
SEARCH_FACTOR = {"flip": -1.0, "finetune": 0.0}
ERROR_LOSS_SHARE = 1 / 3
FINETUNE_CANDIDATES = 4  # sets fine-tuning tries (`_finetune_scopes`)
# Every candidate set is fine-tuned and the one kept is picked by `_pick_finetuned`: among the accepted sets
# whose accuracy on the fine-tuning's held-back split is at most HELDBACK_TOLERANCE below the best set's, and
# which fix the given error inputs within FIX_TOLERANCE of the best of them (with real error inputs), or
# whose residual trigger (restore.residual_trigger: the flagged classes' triggers restored again on the
# fine-tuned model) is no longer anomalous (clean data only, when any is), the deepest one.
HELDBACK_TOLERANCE = 0.03
FIX_TOLERANCE = 0.02
# Fine-tuning trains each set from two starts, the EIN elements zeroed (their ablated value) and kept at
# their values, and keeps the one with the lower loss on its held-back split. Neither start wins everywhere
# (held-out ASR with triggered inputs, zeroed / kept: Fashion LeNet Blended 2.5 / 1.8 %, BadNets 1.3 / 0.1,
# Trojan 1.4 / 4.6, MNIST-digits MLP 0.0 / 1.7); the held-back loss picked the better or an equally good one
# on each of six rows.
FINETUNE_STARTS = ("ablated", "keep")
FINETUNE_MARGIN = 2.0  # fine-tune the top 2k of the chosen scope (ResNet blended: held-out ASR 3.9 % -> 2.1 %)
# With real error inputs, when no accepted set fixes at least FINETUNE_GROW_BELOW of the error inputs it was
# trained on, the same scopes are trained again at twice the margin, up to FINETUNE_MAX_MARGIN, and the pick
# weighs only the largest size's sets: a set too small to fix its own training inputs rarely holds on held-out
# ones (measured in docs/fine-tuning-pick.md, "Larger sets when the given inputs stay unfixed"). With 67 to
# 200 given error inputs, 0.985 means: grow while two or more stay unfixed (0.98 let a set with
# two of ~100 unfixed stop the growth: a fresh DenseNet 2.99 % -> 0.66 %; 0.99 also grew on one unfixed input
# of 89 and cost a digits MLP 0.7 points).
FINETUNE_GROW_BELOW = 0.985
FINETUNE_MAX_MARGIN = 8.0
# Flip the top m x k of a successful scope, for the largest margin m that keeps the accuracy bound on x_clean:
# the minimal set fixes the pairs right at the edge and held-out triggered inputs slip back (Fashion LeNet
# BadNets, triggered inputs: held-out ASR 3.4 % at 1x, 1.7 % at 1.5x).
FLIP_MARGINS = (1.5, 1.25, 1.0)


@dataclass
class RepairResult:
    """What `lancet repair` reports (fields of shared/CASE_FORMAT.md's report.json)."""

    method: str
    status: str
    before: dict
    after: dict
    eins: list[dict]
    changed_parameters: dict[str, int]
    seconds: dict[str, float]
    pairs_used: int
    pairs_dropped: int
    accepted: bool
    written: bool
    output: str | None
    reasons: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)
    locate_result: LocateResult | None = None
    repaired_params: dict | None = None

    def to_json(self) -> dict:
        """JSON-ready report."""
        return {"method": self.method, "status": self.status, "accepted": self.accepted, "written": self.written,
                "output": self.output, "reasons": self.reasons, "before": self.before, "after": self.after,
                "ein_count": len(self.eins), "eins": self.eins, "changed_parameters": self.changed_parameters,
                "changed_parameter_count": int(sum(self.changed_parameters.values())),
                "pairs_used": self.pairs_used, "pairs_dropped": self.pairs_dropped,
                "seconds": {k: round(v, 3) for k, v in self.seconds.items()}, **self.details}


def _evaluate(forward: Forward, params, case: Case, x_error, y_error) -> dict:
    clean_pred = predict_labels(forward, case.x_clean, params=params)
    report = {"clean_accuracy": float(np.mean(clean_pred == case.y_clean)),
              "clean_class_accuracy": class_accuracy(clean_pred, case.y_clean)}
    if x_error is not None and len(x_error):
        pred = predict_labels(forward, x_error, params=params)
        report["error_accuracy"] = float(np.mean(pred == y_error))
        report["_pred"] = pred
    return report


def _no_backdoor_reason(restore: RestoreResult) -> str:
    """Why a clean-only repair stops: no restored trigger stood out; names the one that came closest, so a
    defender can judge a near miss (a fresh ViT's target: the smallest mask, index 1.69 under 2)."""
    closest = int(np.argmax(restore.anomaly))
    what = f"class {restore.label(closest)}" if restore.sources is None else f"trigger {restore.label(closest)}"
    return (f"no backdoor found: no restored trigger is anomalously small (closest: {what}, anomaly index "
            f"{float(restore.anomaly[closest]):.2f} under the threshold {restore.threshold:g}): nothing to repair")


def _finetune_scopes(located: LocateResult, depth: Mapping[str, int] | None = None,
                     pixel_tied: AbstractSet[str] = frozenset(),
                     limit: int = FINETUNE_CANDIDATES) -> list[tuple[str, int]]:
    """(scope, k) sets fine-tuning tries, training the top FINETUNE_MARGIN x k of each; every one is
    fine-tuned and `_pick_finetuned` keeps one of those accepted (when none is, the last one tried is
    reported).

    First the search's chosen set when it found one within the accuracy bound. Otherwise, the best set
    within the bound (the all-to-all LeNet, triggered inputs: held-out C-Acc / ASR
    86.6 / 0.6 %, where the set below alone was rejected at 79.8 %), then the smallest set that reaches the
    fix target in any scope whatever its clean-accuracy cost, since training on correct data wins accuracy
    back (MobileNetV2 trojan: the best set within 2 points fixes 1 % of the pairs and cannot repair;
    ablating 176 weights fixes 96 % at 5.8 points, and trained, repairs).

    Then (given `depth`: each scope's first node index, the output layer's the largest of all layers')
    a dense first layer over the pixels (`pixel_tied`, as `_pick_finetuned` ranks it first), then the
    scopes that reach the fix target, deepest first but for the output layer (training it can starve the
    target class), up to `limit` sets in all (FINETUNE_CANDIDATES by default): which set's training carries
    over to held-out triggered inputs differs from model to model, and the smallest set often does not.
    Measurements: docs/fine-tuning-pick.md.
    """
    chosen = located.chosen
    if chosen is not None and chosen.success and chosen.k:
        scopes = [(chosen.scope, chosen.k)]
    else:
        scopes = [(chosen.scope, chosen.k)] if chosen is not None and chosen.k else []
        reaching = [r for r in located.scopes if r.k_target]
        if reaching:
            best = min(reaching, key=lambda r: r.k_target)
            if (best.scope, best.k_target) not in scopes:
                scopes.append((best.scope, best.k_target))
    if depth is None:
        return scopes[:limit]
    output_depth = max(depth.values(), default=0)  # the output layer (see the docstring)
    reaching = sorted((r for r in located.scopes if r.k_target and depth.get(r.scope, 0) < output_depth),
                      key=lambda r: (r.scope not in pixel_tied, -depth.get(r.scope, 0)))
    deep = [(r.scope, r.k_target) for r in reaching if (r.scope, r.k_target) not in scopes]
    return (scopes + deep)[:limit]


def _finetune_sets(forward: Forward, located: LocateResult, case: Case, layers: list[Layer],
                   limit: int = FINETUNE_CANDIDATES,
                   margin: float = FINETUNE_MARGIN) -> list[tuple[list[dict], str | None, int, bool]]:
    """The neuron sets fine-tuning tries, with their scopes, depths and whether they read the pixels: the top
    `margin` x k of each of `_finetune_scopes` (the minimal ablation set sits right at the edge; a
    margin lets training push the error further away). Depth (see `_pick_finetuned`): the index of the first
    node the set's layer changes, for a set across layers (`global`) that of the layer holding its median
    element; that layer also decides whether the set reads the pixels (`_pixel_tied_layer`)."""
    from .locate.ablation import Ablator

    ablator = Ablator(forward, located.scores, located.pairs, case.x_clean[:1], case.y_clean[:1])
    depth = {r.scope: ablator.depth(r.scope) for r in located.scopes}
    depth.update({layer.name: ablator.depth(layer.name) for layer in located.scores.layers
                  if layer.name not in depth})
    pixel_tied = _pixel_tied_layer(layers, case)
    # A restored trigger ranks no set by its pixels (`_pick_finetuned`), so none is tried early for that.
    scopes = _finetune_scopes(located, depth, pixel_tied if located.restore is None else frozenset(), limit)
    if not scopes or margin <= 1:
        return [(located.eins, located.chosen.scope if located.chosen else None, -1, False)]
    sets = []
    for scope, k in scopes:
        ranks, candidates = ablator.ranks(scope)
        eins = ablator.eins(ranks, min(candidates, int(np.ceil(k * margin))))
        homes = sorted((e.get("initializer", e.get("layer")) for e in eins), key=lambda home: depth.get(home, 0))
        median = homes[(len(homes) - 1) // 2] if homes else None
        sets.append((eins, scope, depth.get(median, 0) if median else 0, median in pixel_tied))
    return sets


def _finetune_rounds(sets_at: Callable[[float], list[tuple[list[dict], str | None, int, bool]]],
                     tried: list[dict], grow: bool, grow_below: float | None = None,
                     ) -> Iterator[tuple[float, list[dict], str | None, int, bool]]:
    """(margin, *set) for every set fine-tuning trains: `sets_at(FINETUNE_MARGIN)`, then, when `grow` (real
    error inputs) and no accepted set of those trained so far (`tried`, filled in by the caller as it goes)
    fixes `grow_below` (default FINETUNE_GROW_BELOW) of the given error inputs, `sets_at` twice the margin, up
    to FINETUNE_MAX_MARGIN. A set already trained (same scope and size: a scope has no more elements) is
    skipped. `benchmarks/growth_replay.py` drives it over recorded sets to replay other thresholds."""
    grow_below = FINETUNE_GROW_BELOW if grow_below is None else grow_below
    margin, seen = FINETUNE_MARGIN, set()
    while True:
        for trained, scope, depth, reads_pixels in sets_at(margin):
            if (scope, len(trained)) not in seen:
                seen.add((scope, len(trained)))
                yield margin, trained, scope, depth, reads_pixels
        fixed = [t["error_fix_rate"] for t in tried if t["accepted"] and t.get("error_fix_rate") is not None]
        if not grow or margin * 2 > FINETUNE_MAX_MARGIN or (fixed and max(fixed) >= grow_below):
            return
        margin *= 2


def _pixel_tied_layer(layers: list[Layer], case: Case) -> set[str]:
    """The names (weight, layer tensor) of the model's first layer when it is dense over the whole input,
    every weight tied to one input pixel (an MLP's first layer); empty otherwise (a convolution or a patch
    embedding shares its weights across positions). See `_pick_finetuned` for why it matters."""
    if not layers or layers[0].op_type not in DENSE_OPS:
        return set()
    first, pixels = layers[0], int(np.prod(case.x_clean.shape[1:]))
    return {first.weight, first.name} if int(np.prod(first.weight_shape)) == pixels * first.channels else set()


class _Trained(NamedTuple):
    """One fine-tuned candidate set: its parameters, figures on the defender's data and residual trigger."""

    changed: dict
    repaired: dict
    after: dict
    reasons: list[str]
    scope: str | None
    neurons: int
    finetune: dict
    heldback_accuracy: float
    residual: dict | None = None
    depth: int = 0  # see `_finetune_sets`
    reads_pixels: bool = False  # its median element lies in a dense first layer (`_pixel_tied_layer`)
    attempt: dict | None = None  # its entry of the report's `finetune_tried`
    margin: float = FINETUNE_MARGIN  # its size, in multiples of its scope's ablation set (`_finetune_rounds`)


def _pick_finetuned(kept: list[_Trained], threshold: float | None) -> _Trained:
    """The fine-tuned set to keep, of the accepted ones of the largest size trained (when the sets were
    grown, `_finetune_rounds`, every smaller one fell short of the fix rate that stops the growth): among
    those whose held-back accuracy is at most
    HELDBACK_TOLERANCE below the best one's, and, with real error inputs (`threshold` None), which fix the
    given error inputs within FIX_TOLERANCE of the best of them, or, when the pairs come from a restored
    trigger (clean data only, each set with its residual trigger), whose residual trigger's anomaly index is
    at most `threshold` (the restoration's own flagging threshold) when any's is: the deepest set
    (`_finetune_sets`: a set across layers sits where its median element does), then a single-layer set,
    then the higher held-back accuracy. With real error inputs, a set in a dense first layer over the whole
    input (an MLP's, `_pixel_tied_layer`) ranks above every deeper one.

    Why depth: the restored trigger resembles the real one in pixels only partly, while deep in the network
    both drive the same target-class features; training a shallow set teaches it to ignore the restored
    pixels, training a deep one removes what the real trigger reaches too. Why a pixel-tied first layer
    first with real error inputs: each of its weights reads one pixel, so training it cuts the trigger's
    pixels off; not with a restored trigger, the smallest mask that flips the model, which holds only some
    of the real trigger's pixels (the rest keep working: Fashion-MNIST MLPs' first-layer sets left 5.6-99 %
    held-out ASR where the deeper hidden layer's left 0.2-2.3 %). The held-back split is a weak guide to
    which set removes the backdoor, hence the wide tolerance; it rules out a deep set that costs much
    accuracy. Measurements and replays: docs/fine-tuning-pick.md.
    """
    largest = max(k.margin for k in kept)
    kept = [k for k in kept if k.margin == largest]
    best_heldback = max(k.heldback_accuracy for k in kept)
    safe = [k for k in kept if k.heldback_accuracy >= best_heldback - HELDBACK_TOLERANCE]
    if threshold is None:
        best_fix = max(k.after.get("error_fix_rate", 1.0) for k in safe)
        gone = [k for k in safe if k.after.get("error_fix_rate", 1.0) >= best_fix - FIX_TOLERANCE]
    else:
        gone = [k for k in safe if k.residual["anomaly_index"] <= threshold] or safe
    real_trigger = threshold is None
    return max(gone, key=lambda k: (k.reads_pixels and real_trigger, k.depth, k.scope != "global",
                                    k.heldback_accuracy))


@dataclass
class FlipOption:
    """One candidate flip set: the top `k` (= margin x the scope's minimal k) of a scope, and its figures on
    the defender's data with those neurons flipped."""

    scope: str
    margin: float
    k: int
    fix_rate: float
    drop_points: float
    class_drop_points: float = 0.0  # the largest drop of any one class of x_clean


def _pick_flip(options: list[FlipOption], max_acc_drop: float, target_fix: float,
               max_class_drop: float | None = None) -> FlipOption | None:
    """The flip set to apply: among the options that reach `target_fix` on the pairs within `max_acc_drop`
    points (and `max_class_drop` for every class, when given), the largest margin, then the smallest
    clean-accuracy drop, then the smallest set. None when no option qualifies."""
    ok = [o for o in options if o.fix_rate >= target_fix and o.drop_points <= max_acc_drop
          and (max_class_drop is None or o.class_drop_points <= max_class_drop)]
    if not ok:
        return None
    return min(ok, key=lambda o: (-o.margin, o.drop_points, o.k))


def _flip_set(forward: Forward, located: LocateResult, case: Case, max_acc_drop: float,
              max_class_drop: float | None, class_accuracy_before: Mapping[str, float],
              observe: Callable[[dict, Mapping[str, Any]], None] | None = None,
              layers: list[Layer] | None = None) -> tuple[list[dict], dict]:
    """The neurons to flip and how they were chosen: FLIP_MARGINS x k of every successful scope, each
    flipped and evaluated on the pairs and x_clean in one batched call per scope, picked by `_pick_flip`
    (each option's largest class drop measured against `class_accuracy_before`). Without a successful
    scope, the located EINs as they are. `observe`: called with each option's entry and its flipped
    parameters (as `repair`'s; `layers`: the model's, for the flips)."""
    good = [r for r in located.scopes if r.success and r.k]
    fallback = (located.eins, {"scope": located.chosen.scope if located.chosen else None, "margin": 1.0,
                               "neurons": len(located.eins), "options": []})
    if not good:
        return fallback
    from .locate.ablation import Ablator

    ablator = Ablator(forward, located.scores, located.pairs, case.x_clean, case.y_clean,
                      factor=SEARCH_FACTOR["flip"])
    base_per_class = np.array([class_accuracy_before.get(str(c), np.nan)
                               for c in range(int(case.y_clean.max()) + 1)])
    options, ranks_of = [], {}
    for result in good:
        ranks, candidates = ablator.ranks(result.scope)
        ranks_of[result.scope] = ranks
        ks = {m: min(candidates, int(np.ceil(result.k * m))) for m in FLIP_MARGINS}
        unique = sorted(set(ks.values()))
        run = ablator.evaluate_bounded(ranks, unique, result.scope)
        class_drops = np.nanmax(100.0 * (base_per_class - run.class_accuracy), axis=1)
        for margin, k in ks.items():
            i = unique.index(k)
            options.append(FlipOption(result.scope, margin, k, float(run.fix[i]),
                                      100.0 * (located.base_accuracy - float(run.accuracy[i])),
                                      float(class_drops[i])))
    picked = _pick_flip(options, max_acc_drop, SEARCH_TARGET["flip"], max_class_drop)
    entries = [vars(o) for o in options]
    if observe is not None:
        layers = layers if layers is not None else find_layers(forward.model)
        for option, entry in zip(options, entries):
            changed = forward.model.stored(flip(forward.model, forward.model.params, layers,
                                                ablator.eins(ranks_of[option.scope], option.k), located.granularity))
            observe(entry, {**forward.params, **{k: jnp.asarray(v) for k, v in changed.items()}})
    if picked is None:
        return fallback[0], {**fallback[1], "options": entries}
    eins = ablator.eins(ranks_of[picked.scope], picked.k)
    return eins, {"scope": picked.scope, "margin": picked.margin, "neurons": len(eins), "options": entries}


def _judge(forward: Forward, repaired, case: Case, x_error, y_error, before: dict, before_pred,
           max_acc_drop: float, target_fix: float, max_class_drop: float | None = None,
           heldback_rows: np.ndarray | None = None) -> tuple[dict, list[str]]:
    """Figures of the repaired params on the defender's data, and the reasons it misses the bounds.
    `heldback_rows`: rows of x_error fine-tuning never trained on (their figures: `after["heldback_error"]`)."""
    after = _evaluate(forward, repaired, case, x_error, y_error)
    after_pred = after.pop("_pred", None)
    if before_pred is not None:
        after["error_fix_rate"] = _fix_rate(before_pred, after_pred, y_error)
        if heldback_rows is not None:
            after["heldback_error"] = _heldback_error(before_pred, after_pred, y_error, heldback_rows)
    drop = 100.0 * (before["clean_accuracy"] - after["clean_accuracy"])
    worst = after["largest_class_drop"] = largest_class_drop(before["clean_class_accuracy"],
                                                             after["clean_class_accuracy"], case.y_clean)
    reasons = []
    if drop > max_acc_drop:
        reasons.append(f"clean accuracy drops {drop:.2f} points (bound {max_acc_drop})")
    if max_class_drop is not None and worst["drop_points"] > max_class_drop:
        reasons.append(f"class {worst['class']} accuracy drops {worst['drop_points']:.2f} points on its "
                       f"{worst['images']} clean images (bound {max_class_drop})")
    if after.get("error_fix_rate", 1.0) < target_fix:
        reasons.append(f"error-fix rate {after['error_fix_rate']:.3f} below target {target_fix}")
    return after, reasons


def _heldback_error(before_pred: np.ndarray, after_pred: np.ndarray, y_error: np.ndarray,
                    rows: np.ndarray) -> dict | None:
    """Of the error inputs at `rows` (those fine-tuning held back for early stopping, never trained on), the
    ones the model got wrong before: how many the repair fixes, and the 95 % upper bound on the share left
    unfixed. The fix rate `_judge` checks is on inputs the set was trained on; these few say how far it
    carries, and how little they can vouch for (a Blended LeNet's 18-weight set fixed all 24 held back and 96 %
    of those it trained on, and left 7.3 % of held-out triggered inputs at the target)."""
    rows = rows[before_pred[rows] != y_error[rows]]
    if not rows.size:
        return None
    fixed = int(np.sum(after_pred[rows] != before_pred[rows]))
    return {"inputs": int(rows.size), "fixed": fixed, "fix_rate": fixed / rows.size,
            "unfixed_upper_95": error_rate_upper_bound(int(rows.size) - fixed, int(rows.size)),
            "rows": [int(r) for r in rows]}


def _fix_rate(before_pred: np.ndarray, after_pred: np.ndarray, y_error: np.ndarray) -> float:
    """Share of the error inputs wrong before that no longer get their former wrong label."""
    wrong = before_pred != y_error
    if not wrong.any():
        return 1.0
    return float(np.mean(after_pred[wrong] != before_pred[wrong]))


def repair(model_path: str | Path, data: str | Path | Case, out: str | Path | None = None, *,
           method: str = "finetune", granularity: str = "weight", max_acc_drop: float = 2.0,
           max_class_drop: float | None = None, target_fix: float = 0.95, seed: int = 0, force: bool = False,
           progress: bool = True, finetune_epochs: int = 30, finetune_candidates: int = FINETUNE_CANDIDATES,
           reuse: LocateResult | None = None,
           observe: Callable[[dict, Mapping[str, Any]], None] | None = None,
           restore: RestoreResult | None = None, output: str | None = None, restore_peel: int = 0) -> RepairResult:
    """Locate, fix, export and evaluate; write `out` only when accepted (or `force`) and verified.

    `method`: "finetune" (the default: on the repair benchmark's held-out data it meets the goal, ASR <= 2 %
    and accuracy drop <= 1 point, in 36 of 46 cells where "flip" meets it in 12) or "flip" (no training,
    faster; it takes the target class's accuracy down most).

    `max_class_drop`: largest accuracy drop (points) accepted on any single class of x_clean (default: no
    bound); the class that drops most is reported either way (`after["largest_class_drop"]`). Fine-tuning
    then tries its next candidate set when one breaks it.
    `reuse`: the `locate_result` of an earlier repair of the same model and case; its pairs and scores
    are reused (only the ablation search for this method runs). `restore`: a trigger restoration done
    earlier on this model and x_clean, used instead of restoring again (clean data only).
    `finetune_candidates`: the most candidate sets fine-tuning trains per size (`_finetune_scopes`,
    `_finetune_rounds`; 1 trains the search's set alone, the fastest, at the cost measured in
    docs/fine-tuning-pick.md).
    `output`: the graph output holding the class scores (default: the first float one; `load_model`).
    `restore_peel`: clean data only, peel up to this many further triggers per flagged class after the
    restoration (`locate`; off by default, see `restore.peel_triggers` for what it did on the benchmark).
    `observe`: called with each fine-tuned candidate's entry of `details["finetune_tried"]` and its
    parameters, after the residual check, or with each flip option's entry of `details["flip"]["options"]`
    and its flipped parameters; what it adds to the entry goes into the report (the repair benchmark scores
    every candidate on held-out data, where the report keeps only the chosen one).
    """
    if method not in METHODS:
        raise BadInputError(f"unknown method {method!r}; use one of {METHODS}")
    if finetune_candidates < 1:
        raise BadInputError(f"finetune_candidates must be at least 1, got {finetune_candidates}")
    start = time.perf_counter()
    seconds: dict[str, float] = {}
    model_path = Path(model_path)
    external = external_data_files(model_path) if out is not None else []
    if out is not None:
        check_output_path(Path(out), inputs=(model_path, *external))
        if external:
            check_output_path(external_data_path(Path(out)), inputs=(model_path, *external))
    model = reuse.model if reuse is not None else load_model(model_path, output=output)
    case = data if isinstance(data, Case) else load_case(data, model)
    forward = reuse.forward if reuse is not None else Forward(model)
    seconds["load"] = time.perf_counter() - start

    tick = time.perf_counter()
    located = locate(model, case, granularity=granularity, target_fix=SEARCH_TARGET[method],
                     max_acc_drop=max_acc_drop, factor=SEARCH_FACTOR[method], seed=seed, progress=progress,
                     forward=forward, reuse=reuse, restore=restore, restore_peel=restore_peel)
    seconds["locate"] = time.perf_counter() - tick
    if located.status == "no_backdoor":
        seconds["total"] = time.perf_counter() - start
        return RepairResult(method, "no_backdoor", {}, {}, [], {}, seconds, 0, 0, True, False, None,
                            [_no_backdoor_reason(located.restore)], {"restore": located.restore.summary()}, located)
    pairs = located.pairs
    if case.x_error is not None:
        x_error, y_error = case.x_error, case.y_error
    else:  # clean data only: the restored-trigger inputs stand in for the error set
        x_error, y_error = pairs.x_error, pairs.y_right
    before = _evaluate(forward, None, case, x_error, y_error)

    tick = time.perf_counter()
    layers = find_layers(model)
    details: dict = {"granularity": granularity, "seed": seed, "locate": located.to_json()}
    details["locate"].pop("eins", None)
    before_pred = before.pop("_pred", None)
    if before_pred is not None:
        before["error_fix_rate"] = 0.0

    def checked(changed: dict) -> tuple[dict, dict]:
        """(the changed values as the file will store them, the full repaired parameters): a float16
        parameter is judged as rounded to float16, a quantized one as rounded to its integer steps, what the
        written file computes with (`Model.stored`)."""
        changed = model.stored(changed)
        for name, value in changed.items():
            if not np.all(np.isfinite(value)):
                raise RepairRejectedError(f"the repair produced NaN or infinite values in parameter {name!r}; "
                                          "nothing written")
        return changed, {**forward.params, **{k: jnp.asarray(v) for k, v in changed.items()}}

    if method == "flip":
        flipped, details["flip"] = _flip_set(forward, located, case, max_acc_drop, max_class_drop,
                                             before["clean_class_accuracy"], observe, layers)
        changed, repaired = checked(flip(model, model.params, layers, flipped, granularity))
        after, reasons = _judge(forward, repaired, case, x_error, y_error, before, before_pred, max_acc_drop,
                                target_fix, max_class_drop)
    else:
        x_train = np.concatenate([case.x_clean, x_error])
        y_train = np.concatenate([case.y_clean, y_error])
        # The few error inputs weigh as much as a third of the clean set in the loss.
        error_weight = max(1.0, ERROR_LOSS_SHARE * len(case.x_clean) / max(1, len(x_error)))
        weights = np.concatenate([np.ones(len(case.x_clean)), np.full(len(x_error), error_weight)])
        from tqdm.auto import tqdm

        tried, best, kept = [], None, []
        rounds = _finetune_rounds(lambda margin: _finetune_sets(forward, located, case, layers, finetune_candidates,
                                                                margin), tried, grow=located.restore is None)
        for margin, trained, scope, depth, reads_pixels in rounds:
            bar = tqdm(total=finetune_epochs * len(FINETUNE_STARTS), desc=f"fine-tuning {len(trained)} EINs ({scope})",
                       disable=None if progress else True, leave=False)
            masks = ein_masks(model, layers, trained, granularity)
            starts = {init: finetune(forward, masks, x_train, y_train, weights=weights, epochs=finetune_epochs,
                                     seed=seed, init=init, keep_start=init == "ablated",
                                     progress=lambda _: bar.update())
                      for init in FINETUNE_STARTS}
            bar.close()
            start_init = min(starts, key=lambda init: starts[init].heldback_loss)
            tuned = starts[start_init]
            changed, repaired = checked(tuned.changed)
            heldback = tuned.heldback[tuned.heldback >= len(case.x_clean)] - len(case.x_clean)  # x_clean, x_error
            after, reasons = _judge(forward, repaired, case, x_error, y_error, before, before_pred, max_acc_drop,
                                    target_fix, max_class_drop, heldback_rows=heldback)
            attempt = {"scope": scope, "depth": depth, "reads_pixels": reads_pixels, "neurons": len(trained),
                       "margin": margin, "start": start_init,
                       "accepted": not reasons,
                       "reasons": reasons,
                       "clean_accuracy": after["clean_accuracy"],
                       "error_fix_rate": after.get("error_fix_rate"),
                       "largest_class_drop": after["largest_class_drop"]["drop_points"],
                       "heldback_accuracy": tuned.history[tuned.best_epoch]["heldback_accuracy"],
                       # the untouched model on the same split (the "keep" start's epoch 0): what a drop is
                       # measured from, recorded so that a tolerance against it can be replayed
                       "heldback_accuracy_original": (starts["keep"].history[0]["heldback_accuracy"]
                                                      if "keep" in starts else None),
                       "heldback_loss": tuned.heldback_loss,
                       "heldback_error": after.get("heldback_error")}
            tried.append(attempt)
            outcome = _Trained(changed, repaired, after, reasons, scope, len(trained),
                               {"error_weight": error_weight, "start": start_init, "best_epoch": tuned.best_epoch,
                                "epochs_run": len(tuned.history) - 1, "history": tuned.history,
                                "starts": {init: {"heldback_loss": r.heldback_loss, "best_epoch": r.best_epoch}
                                           for init, r in starts.items()}},
                               attempt["heldback_accuracy"], depth=depth, reads_pixels=reads_pixels,
                               attempt=attempt, margin=margin)
            if not reasons and located.restore is not None:
                # Clean data only: is the backdoor still there? Restore the flagged classes' triggers again.
                outcome = outcome._replace(residual=residual_trigger(forward, case.x_clean, located.restore,
                                                                     repaired, seed=seed + 1,
                                                                     y_clean=case.y_clean))
                attempt["residual_trigger"] = outcome.residual
            if observe is not None:
                observe(attempt, repaired)
            if reasons:  # with none accepted, the last one tried is reported
                best = outcome if best is None or best.reasons else best
                continue
            kept.append(outcome)
        if kept:
            best = _pick_finetuned(kept, located.restore.threshold if located.restore is not None else None)
        changed, repaired, after, reasons = best.changed, best.repaired, best.after, best.reasons
        details["finetune"] = best.finetune
        details["finetune_scope"], details["finetune_neurons"] = best.scope, best.neurons
        for attempt in tried:
            attempt["chosen"] = attempt is best.attempt
        details["finetune_tried"] = tried
        if best.residual is not None:  # the kept set's: how large the flagged classes' triggers have to be now
            details["residual_trigger"] = best.residual
    seconds["fix"] = time.perf_counter() - tick
    accepted = not reasons

    tick = time.perf_counter()
    # keyed by the file's initializers (a quantized weight's integer initializer, not its DequantizeLinear)
    changed_counts = {model.quantized[name].source if name in model.quantized else name:
                      int(np.sum(np.asarray(value) != np.asarray(model.params[name])))
                      for name, value in changed.items()}
    written = False
    if out is not None:
        from .surgery import replace_parameters, verify_repaired

        metadata = {"method": method, "granularity": granularity, "ein_count": len(located.eins),
                    "changed_parameters": ",".join(f"{k}:{v}" for k, v in changed_counts.items()),
                    "tool_version": __version__, "seed": seed}
        proto = replace_parameters(model_path, model.file_values(changed), metadata)
        x_check = case.x_clean[:max(64, static_batch(model) or 0)]  # a fixed batch's group is padded
        expected = np.asarray(forward.logits(x_check, params=repaired))
        details["parity_max_abs_diff"] = verify_repaired(
            proto, x_check, expected, model, atol=PARITY_ATOL_HALF if model.half_precision else PARITY_ATOL)
        if accepted or force:
            # the input's layout kept: tensors in an external-data file when the input has one (torch's
            # default exporter writes one beside every model)
            details["files_written"] = [str(p) for p in write_model_atomic(Path(out), proto, external=bool(external))]
            written = True
    seconds["export"] = time.perf_counter() - tick
    seconds["total"] = time.perf_counter() - start
    status = "repaired" if accepted else "rejected"
    return RepairResult(method, status, before, after, located.eins, changed_counts, seconds, pairs.used,
                        pairs.dropped, accepted, written, str(out) if out is not None else None, reasons, details,
                        located, repaired)


__all__ = ["FLIP_MARGINS", "METHODS", "RepairResult", "repair"]
