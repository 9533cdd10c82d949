"""`locate()`: the four steps in a row (pairs -> EI features -> scores -> ablation), timed, with progress.

Each step is also a public function of its own module, so a user can swap one; this module only wires
them together and shapes the report.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..case import Case, load_case, num_classes
from ..errors import BadInputError
from ..forward import Forward
from ..ir import Model
from ..loader import load_model
from ..neurons import find_layers
from .ablation import MAX_LAYER_SCOPES, AblationResult, progressive_ablation
from .common import predict_labels
from .features import ei_features
from .pairs import Pairs, build_pairs
from .restore import RestoreResult, peel_triggers, restore_triggers
from .valuation import NeuronScores, score_neurons


class NoBackdoorFound(Exception):
    """Raised inside `locate` when a clean-only case shows no anomalous class; carries the restore result."""

    def __init__(self, restore: RestoreResult):
        self.restore = restore
        super().__init__("no backdoor found: no class has an anomalously small restored trigger "
                         f"(largest anomaly index {float(np.max(restore.anomaly)):.2f}, threshold "
                         f"{restore.threshold})")


@dataclass
class LocateResult:
    """Everything `lancet locate` reports: the EINs, the curve, the pairs, per-stage seconds."""

    model: Model
    forward: Forward
    granularity: str
    pairs: Pairs | None
    scores: NeuronScores | None
    chosen: AblationResult | None
    scopes: list[AblationResult]
    seconds: dict[str, float]
    base_accuracy: float
    restore: RestoreResult | None = None
    features: dict[str, np.ndarray] = field(default_factory=dict)
    status: str = "located"

    @property
    def eins(self) -> list[dict]:
        return self.chosen.eins if self.chosen else []

    @property
    def total_neurons(self) -> int:
        return self.scores.total_neurons if self.scores else 0

    def layer_counts(self) -> dict[str, int]:
        """How many EINs each layer (or initializer) holds."""
        key = "initializer" if self.granularity == "weight" else "layer"
        counts: dict[str, int] = {}
        for ein in self.eins:
            counts[ein[key]] = counts.get(ein[key], 0) + 1
        return counts

    def to_json(self) -> dict:
        """The JSON report (see shared/CASE_FORMAT.md for the shared field names)."""
        report = {
            "status": self.status,
            "model": str(self.model.path) if self.model.path else None,
            "scores_output": self.model.output.name,
            "granularity": self.granularity,
            "clean_accuracy": self.base_accuracy,
            "pairs": self.pairs.summary() if self.pairs else None,
            "pairs_used": self.pairs.used if self.pairs else 0,
            "pairs_dropped": self.pairs.dropped if self.pairs else 0,
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
        }
        if self.restore is not None:
            report["restore"] = self.restore.summary()
        if self.chosen is not None:
            report.update({
                "success": self.chosen.success,
                "ein_count": len(self.eins),
                "total_neurons": self.total_neurons,
                "ein_share": len(self.eins) / max(1, self.total_neurons),
                "chosen": self.chosen.summary(),
                "eins_per_layer": self.layer_counts(),
                "eins": self.eins,
                "ablation_curve": self.chosen.curve,
                "scopes": [r.summary() for r in self.scopes],
                "scoring": self.scores.details if self.scores else {},
            })
        return report


def _progress_bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=None if enabled else True, leave=False)


def locate(model: Model | str | Path, case: Case | str | Path, *, granularity: str = "weight",
           target_fix: float = 0.99, max_acc_drop: float = 2.0, fill: str = "median", scopes: str = "all",
           discount: bool = True, factor: float = 0.0, restore_steps: int = 500, seed: int = 0,
           progress: bool = True, forward: Forward | None = None,
           reuse: LocateResult | None = None, full_curve: bool = False,
           restore: RestoreResult | None = None, output: str | None = None, restore_peel: int = 0) -> LocateResult:
    """Locate the error-inducing neurons of `model` for `case`.

    Without x_error the trigger is first restored from x_clean (`restore.py`); with no anomalous class the
    result has status 'no_backdoor' and no EINs. `factor` 0 searches ablation sets, -1 flip sets.
    `reuse`: an earlier result on the same model and case whose restore, pairs, features and scores are
    taken as they are (only the ablation search runs again, e.g. with another `factor`).
    `target_fix` defaults to 0.99 on the pairs: the minimal set at 0.95 sits right at the edge and fixed
    about 94 % of held-out triggered inputs on the MNIST-digits LeNet, the stricter target 99 %.
    `full_curve`: the ablation curve carries the clean accuracy at every k tried (else only where it decides
    the search; the clean set is most of the evaluated inputs).
    `restore`: a trigger restoration done earlier on this model and x_clean (restoring costs minutes to an
    hour on a CPU ResNet); used instead of restoring again when the case has no x_error.
    `output`: for a model given as a path, the graph output holding the class scores (`load_model`).
    `restore_peel`: after restoring, peel up to this many further triggers per flagged class
    (`restore.peel_triggers`; off by default: measured, it helped some models and cost a ViT 18.9 points).
    """
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    if not isinstance(model, Model):
        model = load_model(model, output=output)
    if not isinstance(case, Case):
        case = load_case(case, model)
    forward = forward or Forward(model)
    seconds["load"] = time.perf_counter() - start

    tick = time.perf_counter()
    base_accuracy = float(np.mean(predict_labels(forward, case.x_clean) == case.y_clean))
    if reuse is not None and reuse.restore is not None:
        restore = reuse.restore
    if case.x_error is not None:  # error inputs given: no trigger to restore
        restore = None
    if reuse is not None and reuse.scores is not None and reuse.scores.granularity == granularity:
        pairs, features, scores = reuse.pairs, reuse.features, reuse.scores
        seconds.update(reused=0.0)
    else:
        pairs = features = scores = None
    if case.x_error is None and restore is None:
        if (num_classes(model) or 10) < 3:
            raise BadInputError(f"{case.path or 'the case'} has no x_error; restoring a trigger from x_clean alone "
                                "needs at least three classes (each class's trigger size is rated against the "
                                "others'), and this model has two: give x_error (triggered or misclassified "
                                "inputs) with y_error (their right labels)")
        bar = _progress_bar(restore_steps, "restoring triggers", progress)
        def tick_restore(_):
            if bar.n >= bar.total:  # the fallback trigger model (restore.py, kind 'auto') runs as many steps
                bar.total += restore_steps
            bar.update()

        restore = restore_triggers(forward, case.x_clean, num_classes(model) or 10, steps=restore_steps, seed=seed,
                                   progress=tick_restore, y_clean=case.y_clean)
        bar.close()
        if restore_peel and restore.flagged is not None:
            peel_triggers(forward, case.x_clean, restore, steps=restore_steps, seed=seed, rounds=restore_peel)
        seconds["restore"] = time.perf_counter() - tick
        if restore.flagged is None:
            seconds["total"] = time.perf_counter() - start
            return LocateResult(model, forward, granularity, None, None, None, [], seconds, base_accuracy,
                                restore, status="no_backdoor")
        tick = time.perf_counter()
    if restore is not None and restore.flagged is None:
        seconds["total"] = time.perf_counter() - start
        return LocateResult(model, forward, granularity, None, None, None, [], seconds, base_accuracy,
                            restore, status="no_backdoor")
    if scores is None:
        pairs = build_pairs(forward, case, fill=fill, restored=restore)
        seconds["pairs"] = time.perf_counter() - tick

        layers = find_layers(model, weight_only=granularity == "weight")
        if not layers and granularity == "channel" and find_layers(model, weight_only=True):
            raise BadInputError("the model's layers have weight neurons only (recurrent, Loop, quantized-"
                                "operator or fused layers, neurons.Layer.weight_only): use --granularity weight")
        tick = time.perf_counter()
        features = ei_features(forward, pairs, [layer for layer in layers if not layer.weight_only])
        seconds["features"] = time.perf_counter() - tick

        tick = time.perf_counter()
        scores = score_neurons(forward, pairs, case.x_clean, case.y_clean, layers, granularity=granularity,
                               discount=discount)
        seconds["scores"] = time.perf_counter() - tick

    tick = time.perf_counter()
    layers_scored = sum(bool(np.isfinite(v).any()) for v in scores.scores.values())
    n_scopes = (scopes in ("global", "all")) + (min(MAX_LAYER_SCOPES, layers_scored) if scopes != "global" else 0)
    bar = _progress_bar(n_scopes or 1, "ablation search", progress)
    chosen, results = progressive_ablation(forward, scores, pairs, case.x_clean, case.y_clean,
                                           target_fix=target_fix, max_acc_drop=max_acc_drop, scopes=scopes,
                                           base_accuracy=base_accuracy, factor=factor, full_curve=full_curve,
                                           progress=lambda _: bar.update())
    bar.close()
    seconds["ablation"] = time.perf_counter() - tick
    seconds["total"] = time.perf_counter() - start
    status = "located" if chosen.success else "not_located"
    return LocateResult(model, forward, granularity, pairs, scores, chosen, results, seconds, base_accuracy,
                        restore, features, status)


def plot_curve(result: LocateResult, path: str | Path) -> None:
    """PNG of the ablation curve (k -> error-fix rate and clean accuracy), for `--plot`."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io import write_bytes_atomic

    fig, axis = plt.subplots(figsize=(6, 4))
    if result.chosen is not None:
        curve = result.chosen.curve
        ks = [max(p["k"], 0.5) for p in curve]
        axis.plot(ks, [p["fix_rate"] for p in curve], "o-", label="error-fix rate (pairs)")
        known = [(k, p["clean_accuracy"]) for k, p in zip(ks, curve) if p["clean_accuracy"] is not None]
        axis.plot(*zip(*known), "s-", label="clean accuracy")
        if result.chosen.k:
            axis.axvline(result.chosen.k, color="gray", ls="--", label=f"EINs: k = {result.chosen.k}")
        axis.set_xscale("log")
        axis.set_title(f"progressive ablation ({result.granularity}, scope {result.chosen.scope})")
    axis.set_xlabel("neurons ablated (k)")
    axis.set_ylim(-0.02, 1.02)
    axis.legend(loc="center right")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight", dpi=110)
    plt.close(fig)
    write_bytes_atomic(Path(path), buffer.getvalue())
