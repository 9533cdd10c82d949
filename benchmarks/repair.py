"""Repair benchmark: AI-Lancet (neuron-flip, neuron-fine-tuning) against the peer defences on the same models.

Every row is a recipe of `lancet.models` (dataset x architecture x attack, or a general defect), trained
once and cached; every method repairs the same ONNX model through the engine with the same defender data,
in two settings:

* `clean`  — the defender has clean images only (5 % of the training set); AI-Lancet and Neural-Cleanse
  restore the trigger from them (one restoration per row, shared by both and by Neural-Cleanse in the
  other setting, its seconds counted for each);
* `error`  — the defender also has ~100 triggered (or defective) inputs with their true labels.

Figures are on held-out data no method saw: C-Acc (clean test accuracy), ASR (triggered test inputs given
the attacker's label; for a defect row, marked inputs given the spurious class), R-Acc (triggered inputs
given their true label), DER (defence effectiveness rating, BackdoorBench: (max(0, dASR) - max(0, dC-Acc)
+ 1) / 2), seconds, changed parameter elements. Writes JSON, a markdown table and a plot.

    python benchmarks/repair.py [--quick] [--rows NAME ...] [--settings clean error] [--methods ...]
                                [--out benchmarks/results/repair.json] [--markdown docs/repair-benchmark.md]

`--quick`: the Fashion-MNIST LeNet-5 BadNets row, both settings, every method (under 10 min on 2 cores).
`--recipe-seed N`: the same recipes trained with another seed (rows NAME-sN; default outputs
results/repair-seedN.json, docs/repair-benchmark-seedN.md): do the figures carry over to fresh models?
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment, write_json  # noqa: E402

FASHION = dict(dataset="fashion_mnist", train_size=20000, defender_clean=1000, defender_error=110, test_size=5000)
# Larger networks: half the training set, so that a row trains in minutes on 2 cores.
FASHION_SMALL = dict(FASHION, train_size=10000, epochs=4, lr=1e-3, defender_clean=500, test_size=3000)
# Each row: (recipe fields, what it is). defender_clean is 5 % of train_size everywhere.
ROWS = {
    "fashion-lenet5-badnets": (dict(FASHION, arch="lenet5", attack="badnets"), "BadNets 4x4 patch, all-to-one"),
    "fashion-lenet5-blended": (dict(FASHION, arch="lenet5", attack="blended"), "Blended noise, alpha 0.15, all-to-one"),
    "fashion-lenet5-trojan": (dict(FASHION, arch="lenet5", attack="trojan"), "Trojan-style watermark, all-to-one"),
    "fashion-lenet5-badnets-all2all": (dict(FASHION, arch="lenet5", attack="badnets", mode="all_to_all"),
                                       "BadNets patch, all-to-all (y -> y+1)"),
    "fashion-resnet18-blended": (dict(FASHION_SMALL, arch="resnet18", attack="blended"),
                                 "ResNet-18 (w16), Blended, all-to-one"),
    "digits-lenet5-spurious": (dict(dataset="mnist_digits", arch="lenet5", attack="spurious", defender_clean=175),
                               "defect: mislabelled corner blot (MNIST digits)"),
    "fashion-vgg11-badnets": (dict(FASHION_SMALL, arch="vgg11", attack="badnets"), "VGG-11 (w16), BadNets, all-to-one"),
    "fashion-mobilenetv2-trojan": (dict(FASHION_SMALL, arch="mobilenetv2", attack="trojan"),
                                   "MobileNetV2-small, Trojan-style watermark, all-to-one"),
    "fashion-densenet-badnets": (dict(FASHION_SMALL, arch="densenet", attack="badnets"),
                                 "DenseNet-small, BadNets, all-to-one"),
    "fashion-vit-badnets": (dict(FASHION_SMALL, arch="vit", attack="badnets"),
                            "ViT-small (patch 4), BadNets, all-to-one"),
    "fashion-keras_cnn_bn-badnets": (dict(FASHION, arch="keras_cnn_bn", attack="badnets"),
                                     "Keras CNN with BatchNormalization (NHWC, tf2onnx), BadNets, all-to-one"),
    "digits-mlp-badnets": (dict(dataset="mnist_digits", arch="mlp", attack="badnets", defender_clean=175),
                           "MLP (MNIST digits), BadNets, all-to-one"),
    "fashion-mlp-badnets": (dict(FASHION, arch="mlp", attack="badnets"), "MLP (784-128-64), BadNets, all-to-one"),
    "sklearn-mlp-badnets": (dict(dataset="sklearn_digits", arch="mlp", attack="badnets", train_size=1200,
                                 defender_clean=60, defender_error=40, test_size=490, epochs=40),
                            "MLP (64-128-64) on scikit-learn's 8x8 digits, BadNets 2x2 corner patch, all-to-one"),
    "fashion-mlp-blended": (dict(FASHION, arch="mlp", attack="blended"), "MLP (784-128-64), Blended, all-to-one"),
    "fashion-keras_gru-badnets": (dict(FASHION, arch="keras_gru", attack="badnets"),
                                  "Keras GRU reading the rows (64 units, a Loop after tf2onnx) + 2 dense layers, "
                                  "BadNets, all-to-one"),
    "fashion-lenet5-badnets-qdq": (dict(FASHION, arch="lenet5", attack="badnets", quantize="qdq"),
                                   "LeNet-5 quantized for int8 deployment (onnxruntime QDQ, per channel), BadNets, "
                                   "all-to-one; every method judged on its weights rounded to int8"),
    "fashion-lenet5-badnets-qoperator": (dict(FASHION, arch="lenet5", attack="badnets", quantize="qoperator"),
                                         "LeNet-5 quantized for int8 deployment (onnxruntime QOperator format: "
                                         "QLinearConv, QGemm; per channel), BadNets, all-to-one; weight neurons "
                                         "only (channel-pruning peers do not apply)"),
    "fashion-lenet5-badnets-dynamic": (dict(FASHION, arch="lenet5", attack="badnets", quantize="dynamic"),
                                       "LeNet-5 dynamically quantized (onnxruntime quantize_dynamic: int8 weights, "
                                       "ConvInteger / MatMulInteger, activations quantized per input at run time), "
                                       "BadNets, all-to-one"),
    "fashion-lstm-badnets-dynamic": (dict(FASHION, arch="lstm", attack="badnets", quantize="dynamic"),
                                     "LSTM (64 units) + 2 dense layers dynamically quantized (onnxruntime "
                                     "quantize_dynamic: com.microsoft DynamicQuantizeLSTM, MatMulInteger), BadNets, "
                                     "all-to-one"),
    "fashion-lstm-badnets": (dict(FASHION, arch="lstm", attack="badnets"),
                             "LSTM reading the rows (64 units) + 2 dense layers, BadNets, all-to-one; the LSTM's input "
                             "and recurrent weights are weight-neuron candidates and plain fine-tuning / NC train them too"),
    "fashion-mlp_deep-badnets": (dict(FASHION, arch="mlp_deep", attack="badnets"),
                                 "MLP (784-256-128-64), BadNets, all-to-one"),
    "fashion-vit-badnets-int4": (dict(FASHION_SMALL, arch="vit", attack="badnets", quantize="int4"),
                                 "ViT-small (patch 4) with 4-bit weights (onnxruntime's MatMulNBitsQuantizer, QDQ: "
                                 "the attention and MLP MatMuls in uint4 blocks of 32), BadNets, all-to-one; every "
                                 "method judged on its weights rounded to their 4-bit steps"),
}
QUICK_ROWS = ("fashion-lenet5-badnets",)
SETTINGS = ("clean", "error")
METHODS = ("lancet-flip", "lancet-finetune", "finetuning", "fine_pruning", "nc_unlearning", "anp")
CLEAN_DATA_ONLY = ("anp",)  # defences that never read error inputs: run once per row, reported in both settings


class Row:
    """One built recipe: model, forward, full case, held-out arrays and the attacker's labels."""

    def __init__(self, name: str, recipe_seed: int = 0):
        from lancet import Forward, load_model
        from lancet.case import load_case
        from lancet.models.recipes import Recipe, build_case

        fields, self.description = ROWS[name]
        self.name = name
        if recipe_seed:  # a fresh model of the same recipe: do the table's figures carry over?
            fields = dict(fields, seed=recipe_seed)
            self.name, self.description = f"{name}-s{recipe_seed}", f"{self.description} (recipe seed {recipe_seed})"
        self.restore, self.restore_seconds = None, 0.0  # one trigger restoration per row, shared
        self.peel = 0  # further triggers peeled per flagged class after the restoration (--peel)
        self.outcomes: dict = {}  # outcomes of CLEAN_DATA_ONLY defences, shared by the settings
        self.recipe = Recipe(**fields)
        start = time.perf_counter()
        self.built = build_case(self.recipe)
        self.build_seconds = time.perf_counter() - start
        self.model = load_model(self.built.model)
        self.forward = Forward(self.model)
        self.case = load_case(self.built.case, self.model)
        heldout = np.load(self.built.heldout)
        self.x_test, self.y_test = heldout["x_test"], heldout["y_test"]
        self.x_error, self.y_error = heldout["x_error"], heldout["y_error"]
        target = int(heldout["target"])
        # x_error holds the triggered versions of these test images (all of them for all-to-all).
        self.originals = (self.y_test != target) if self.recipe.mode == "all_to_one" else np.ones(len(self.y_test), bool)
        self.y_attack = ((self.y_error + 1) % 10 if self.recipe.mode == "all_to_all"
                         else np.full_like(self.y_error, target))
        self.before = self.figures()

    def restore_cache(self, seed: int) -> Path:
        """Where this row's trigger restoration is kept: next to the cached model, keyed by the restore code,
        the model file, the defender's clean images and the seed (any change restores again)."""
        import hashlib

        from lancet.locate import restore as restore_module

        digest = hashlib.sha256()
        for part in (Path(restore_module.__file__).read_bytes(), Path(self.built.model).read_bytes(),
                     np.ascontiguousarray(self.case.x_clean).tobytes(), str(seed).encode()):
            digest.update(part)
        return Path(self.built.model).parent / (f"restore-{digest.hexdigest()[:16]}"
                                                + (f"-peel{self.peel}" if self.peel else "") + ".npz")

    def load_restore(self, seed: int) -> None:
        """Take the trigger restoration of an earlier run from the cache (with the seconds it took then)."""
        from lancet.locate.restore import RestoreResult

        if self.restore is not None:
            return
        path = self.restore_cache(seed)
        if not path.exists():
            return
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            peeled = {int(row): [{**figures, "mask": data[f"peeled_{row}_{i}_mask"],
                                  "pattern": data[f"peeled_{row}_{i}_pattern"]} for i, figures in enumerate(found)]
                      for row, found in meta.get("peeled", {}).items()}
            self.restore = RestoreResult(data["masks"], data["patterns"], data["norms"], data["attack_rates"],
                                         data["anomaly"], meta["flagged"], meta["threshold"], meta["details"],
                                         meta["kind"], tuple(meta["bounds"]), meta["also_flagged"],
                                         meta.get("sources"), meta.get("targets"), peeled)
        self.restore_seconds = float(meta["seconds"])

    def save_restore(self, seed: int) -> None:
        """Keep this row's trigger restoration for later runs (restoring costs minutes to an hour)."""
        import io

        from lancet.io import write_bytes_atomic

        r = self.restore
        meta = {"flagged": r.flagged, "threshold": r.threshold, "details": r.details, "kind": r.kind,
                "bounds": [float(b) for b in r.bounds], "also_flagged": [int(c) for c in r.also_flagged],
                "sources": r.sources, "targets": r.targets,
                "peeled": {str(row): [{k: v for k, v in p.items() if k not in ("mask", "pattern")} for p in found]
                           for row, found in r.peeled.items()},
                "seconds": self.restore_seconds}
        arrays = {f"peeled_{row}_{i}_{part}": p[part] for row, found in r.peeled.items()
                  for i, p in enumerate(found) for part in ("mask", "pattern")}
        buffer = io.BytesIO()
        np.savez(buffer, masks=r.masks, patterns=r.patterns, norms=r.norms, attack_rates=r.attack_rates,
                 anomaly=r.anomaly, meta=np.asarray(json.dumps(meta)), **arrays)
        write_bytes_atomic(self.restore_cache(seed), buffer.getvalue())

    def case_for(self, setting: str):
        """The defender's case in a setting: clean only, or with the error inputs (and companions or mask)."""
        from lancet.case import Case

        if setting == "error":
            return self.case
        return Case(self.case.x_clean, self.case.y_clean)

    def figures(self, params=None) -> dict:
        """Held-out C-Acc, ASR, R-Acc of the model with `params` (default: the original), the ASR floor:
        the share of the triggered images' clean originals that already get the attacker's label, and the
        accuracy of each class (JSON only: a mean within bounds can hide one class paying for a repair)."""
        from lancet.evaluate import class_accuracy
        from lancet.locate.common import predict_labels

        clean = predict_labels(self.forward, self.x_test, params=params)
        error = predict_labels(self.forward, self.x_error, params=params)
        return {"c_acc": float(np.mean(clean == self.y_test)), "asr": float(np.mean(error == self.y_attack)),
                "r_acc": float(np.mean(error == self.y_error)),
                "asr_floor": float(np.mean(clean[self.originals] == self.y_attack)),
                "class_acc": class_accuracy(clean, self.y_test)}


def der(before: dict, after: dict) -> float:
    """BackdoorBench's defence effectiveness rating in [0, 1] (0.5: nothing changed)."""
    return (max(0.0, before["asr"] - after["asr"]) - max(0.0, before["c_acc"] - after["c_acc"]) + 1) / 2


def _changed_count(model, changed: dict) -> int:
    return int(sum(np.sum(np.asarray(v) != np.asarray(model.params[k])) for k, v in changed.items()))


def _lancet_details(result) -> dict:
    """Which neurons an AI-Lancet repair changed: the fine-tuned scope and set size, or the flip choice."""
    details = {k: result.details[k] for k in ("finetune_scope", "finetune_neurons") if k in result.details}
    if "flip" in result.details:
        details["flip"] = {k: result.details["flip"].get(k) for k in ("scope", "margin", "neurons", "options")}
    if "finetune_tried" in result.details:  # every candidate set, with its held-out figures (see run_setting)
        details["finetune_tried"] = [
            {**{k: attempt.get(k) for k in ("scope", "depth", "reads_pixels", "neurons", "margin", "start", "accepted",
                                            "clean_accuracy", "error_fix_rate", "heldback_accuracy",
                                            "heldback_loss", "chosen", "heldout")},
             "residual_index": (attempt.get("residual_trigger") or {}).get("anomaly_index")}
            for attempt in result.details["finetune_tried"]]
    return details


def run_setting(row: Row, setting: str, methods: tuple[str, ...], seed: int, progress,
                max_acc_drop: float = 2.0) -> list[dict]:
    """Every method on one row and setting; returns one record per method. `max_acc_drop`: the AI-Lancet
    repairs' accuracy bound (`lancet repair --max-acc-drop`), on the defender's clean images."""
    import jax.numpy as jnp

    from lancet.defences import DEFENCES
    from lancet.defences.common import DefenceResult
    from lancet.errors import LancetError
    from lancet.repair import repair

    case = row.case_for(setting)
    before = row.before
    records, located = [], None
    shared = ("restore", "pairs", "features", "scores")  # stages a reusing repair takes from the first
    for method in methods:
        start = time.perf_counter()
        record = {"row": row.name, "setting": setting, "method": method}
        if method.startswith("lancet-"):
            if located is None and setting == "clean":
                row.load_restore(seed)  # restored in an earlier run: only the pairs onwards run
                if row.restore is None and row.peel:  # restored and peeled here, then cached as usual
                    from lancet.case import num_classes
                    from lancet.locate.restore import peel_triggers, restore_triggers

                    tick = time.perf_counter()
                    row.restore = restore_triggers(row.forward, row.case.x_clean, num_classes(row.model) or 10,
                                                   seed=seed, y_clean=row.case.y_clean)
                    peel_triggers(row.forward, row.case.x_clean, row.restore, seed=seed, rounds=row.peel)
                    row.restore_seconds = time.perf_counter() - tick
                    row.save_restore(seed)

            def score_candidate(attempt: dict, candidate_params) -> None:
                attempt["heldout"] = row.figures(candidate_params)

            result = repair(row.built.model, case, None, method=method.split("-", 1)[1], seed=seed, progress=False,
                            max_acc_drop=max_acc_drop, reuse=located, observe=score_candidate,
                            restore=row.restore if setting == "clean" else None)
            reused = located is not None
            located = located or result.locate_result
            if located.restore is not None and row.restore is None:
                row.restore, row.restore_seconds = located.restore, located.seconds.get("restore", 0.0)
                row.save_restore(seed)
            params = result.repaired_params
            record.update(status=result.status, accepted=result.accepted, eins=len(result.eins), max_acc_drop=max_acc_drop,
                          changed=int(sum(result.changed_parameters.values())), reasons=result.reasons,
                          details=_lancet_details(result))
            seconds = time.perf_counter() - start + (sum(located.seconds.get(k, 0.0) for k in shared) if reused else 0.0)
            if setting == "clean" and "restore" not in located.seconds:
                seconds += row.restore_seconds  # the cached restoration's seconds, as measured when it ran
        else:
            if method == "nc_unlearning":
                row.load_restore(seed)
            if method == "nc_unlearning" and row.restore is None:
                from lancet.case import num_classes
                from lancet.locate.restore import restore_triggers

                row.restore = restore_triggers(row.forward, row.case.x_clean, num_classes(row.model) or 10, seed=seed,
                                               y_clean=row.case.y_clean)
                row.restore_seconds = time.perf_counter() - start
                row.save_restore(seed)
                start = time.perf_counter()
            if method in CLEAN_DATA_ONLY and method in row.outcomes:
                outcome = row.outcomes[method]
                start -= outcome.seconds
            else:
                try:
                    outcome = DEFENCES[method](row.forward, case, seed=seed, restore=row.restore)
                except LancetError as exc:  # a defence that does not apply to this model: say so, go on
                    outcome = DefenceResult(method, f"n/a: {exc}", {}, time.perf_counter() - start, {})
                if method in CLEAN_DATA_ONLY:
                    row.outcomes[method] = outcome
            stored = row.model.stored(outcome.changed)  # as a written file would hold them (float16, int8)
            params = {**row.forward.params, **{k: jnp.asarray(v) for k, v in stored.items()}}
            record.update(status=outcome.status, changed=_changed_count(row.model, stored),
                          details={k: v for k, v in outcome.details.items() if k != "prune_curve"})
            seconds = time.perf_counter() - start
            if method == "nc_unlearning":
                seconds += row.restore_seconds
        after = row.figures(params) if params is not None else dict(before)
        record.update(before=before, after=after, der=der(before, after), seconds=round(seconds, 2))
        records.append(record)
        progress(record)
    return records


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def _worst_class(before: dict, after: dict) -> str:
    """'class: -points' for the held-out class losing most ('none' if none loses; blank if not recorded)."""
    from lancet.evaluate import largest_class_drop

    if "class_acc" not in before or "class_acc" not in after:
        return ""
    worst = largest_class_drop(before["class_acc"], after["class_acc"])
    return f"{worst['class']}: -{worst['drop_points']:.1f}" if worst["drop_points"] > 0 else "none"


def markdown(data: dict) -> str:
    """The results as a markdown table in the field's vocabulary (held-out figures, percent)."""
    lines = [f"# Repair benchmark{' (quick)' if data['quick'] else ''}", "",
             f"Regenerate: `{data['command']}` ({data['environment']['cpus']} CPU cores, "
             f"JAX {data['environment']['jax']} on {data['environment']['jax_backend']}; "
             f"{data['seconds']:.0f} s in all).", "",
             "Held-out test data no method saw. C-Acc: clean accuracy; ASR: triggered inputs given the attacker's "
             "label (defect row: marked inputs given the spurious class); R-Acc: triggered inputs given their true "
             "label; floor: the ASR floor after the repair (the clean originals of the triggered images given the "
             "attacker's label, i.e. without the trigger: an ASR near it means the trigger adds little or "
             "nothing); DER: (max(0, dASR) - max(0, dC-Acc) + 1) / 2. Settings: `clean` = the defender has clean "
             "images only (5 % of the training set), AI-Lancet and Neural-Cleanse restore the trigger; `error` = "
             "plus ~100 triggered inputs with their true labels. Goal per AI-Lancet row (issue 4): ASR <= 2 %, "
             "C-Acc drop <= 1 point; **miss** marks a row that misses it, `met, ASR <= 1 %` one that meets the "
             "stricter ASR bound too. Worst class: the held-out class whose accuracy drops most, and by how many "
             "points (a mean within bounds can hide one class paying for a repair; recorded since 2026-11-30, "
             "blank in older cells).", ""]
    revisions = sorted({r.get("code") or "unrecorded" for row in data["rows"].values() for r in row["records"]})
    machines = sorted({r.get("cpu") or "unrecorded" for row in data["rows"].values() for r in row["records"]})
    lines += [f"Code that produced the cells (`code` in each JSON record; `unrecorded`: run before 2026-12-01): "
              f"{', '.join(revisions)}. CPUs the models were trained and repaired on (`cpu`; a recipe trains "
              f"different models on AVX2 and AVX-512): {', '.join(machines)}.", ""]
    present = {name.removesuffix(f"-s{row['recipe'].get('seed', 0)}") for name, row in data["rows"].items()}
    missing = [name for name in ROWS if name not in present]
    if missing and not data["quick"]:
        lines += [f"Rows of the matrix not in this run: {', '.join(missing)}.", ""]
    for name, row in data["rows"].items():
        lines += [f"## {name}: {row['description']}", "",
                  f"Recipe `{json.dumps(row['recipe'], sort_keys=True)}`; before: C-Acc {_pct(row['before']['c_acc'])}, "
                  f"ASR {_pct(row['before']['asr'])}, R-Acc {_pct(row['before']['r_acc'])}; ASR floor (clean originals "
                  f"of the triggered images given the attacker's label) {_pct(row['before']['asr_floor'])}.", "",
                  "| setting | method | status | C-Acc | ASR | floor | R-Acc | worst class | DER | changed params | "
                  "seconds | goal |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for record in row["records"]:
            after, before = record["after"], record["before"]
            drop = round(100 * (before["c_acc"] - after["c_acc"]), 6)  # whole test images: no float residue
            goal = ""
            if record["method"].startswith("lancet-"):
                asr = round(100 * after["asr"], 6)
                goal = "**miss**" if asr > 2 or drop > 1 else ("met, ASR <= 1 %" if asr <= 1 else "met")
            # A defence that changed no parameter left the model as it was, whatever it calls its outcome.
            status = "unchanged" if record["changed"] == 0 and record["status"] == "repaired" else record["status"]
            lines.append(f"| {record['setting']} | {record['method']} | {status} | {_pct(after['c_acc'])} | "
                         f"{_pct(after['asr'])} | {_pct(after['asr_floor'])} | {_pct(after['r_acc'])} | "
                         f"{_worst_class(before, after)} | {record['der']:.3f} | {record['changed']:,} | "
                         f"{record['seconds']:.0f} | {goal} |")
        lines.append("")
    return "\n".join(lines)


def plot(data: dict, path: Path) -> None:
    """ASR and C-Acc after repair per method, one panel per row and setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(name, setting) for name, row in data["rows"].items()
              for setting in dict.fromkeys(r["setting"] for r in row["records"])]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.6 * len(panels)), squeeze=False)
    for ax, (name, setting) in zip(axes[:, 0], panels):
        records = [r for r in data["rows"][name]["records"] if r["setting"] == setting]
        x = np.arange(len(records))
        ax.bar(x - 0.2, [100 * r["after"]["asr"] for r in records], 0.4, label="ASR %")
        ax.bar(x + 0.2, [100 * r["after"]["c_acc"] for r in records], 0.4, label="C-Acc %")
        ax.axhline(100 * records[0]["before"]["c_acc"], color="grey", lw=0.8, ls="--")
        ax.set_xticks(x, [r["method"] for r in records], fontsize=8)
        ax.set_title(f"{name} / {setting}", fontsize=9)
        ax.set_ylim(0, 100)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _ordered(records: list[dict]) -> list[dict]:
    """Records in table order: by setting, then by method, as a run writes them."""
    return sorted(records, key=lambda r: (SETTINGS.index(r["setting"]), METHODS.index(r["method"])))


def render(args) -> dict:
    """Merge earlier result files (later records of a row win) into one JSON, markdown table and plot."""
    parts = [json.loads(Path(path).read_text()) for path in args.from_json]
    data = {**parts[0], "rows": {}, "seconds": sum(part["seconds"] for part in parts),
            "command": " && ".join(part["command"] for part in parts)}
    for part in parts:  # a later file's records replace the same (setting, method) of the same row
        for name, row in part["rows"].items():
            if name not in data["rows"]:
                data["rows"][name] = row
                continue
            later = {(r["setting"], r["method"]) for r in row["records"]}
            kept = [r for r in data["rows"][name]["records"] if (r["setting"], r["method"]) not in later]
            data["rows"][name] = {**row, "records": _ordered(kept + row["records"])}
    root = Path(__file__).resolve().parent
    out = Path(args.out or root / "results" / "repair.json")
    md_path = Path(args.markdown or root.parent / "docs" / "repair-benchmark.md")
    write_json(out, data)
    md_path.write_text(markdown(data) + "\n")
    plot(data, Path(args.plot or out.with_suffix(".png")))
    print(markdown(data))
    return data


def main(argv: list[str] | None = None) -> dict:
    """Parse arguments, run the matrix, write JSON, markdown and plot."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one row (Fashion-MNIST LeNet-5 BadNets)")
    parser.add_argument("--rows", nargs="+", choices=sorted(ROWS))
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--seed", type=int, default=0, help="the methods' seed")
    parser.add_argument("--recipe-seed", type=int, default=0,
                        help="train the rows' models with this seed instead (rows named NAME-sN): fresh models of "
                             "the same recipes, to check that the table's figures are not one model's luck")
    parser.add_argument("--max-acc-drop", type=float, default=2.0,
                        help="AI-Lancet's accuracy bound in points on the defender's clean images (the tool's default 2)")
    parser.add_argument("--peel", type=int, default=0,
                        help="with clean data only, peel up to N further triggers per flagged class after the "
                             "restoration (lancet.locate.restore.peel_triggers; opt-in, off in the tool)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/repair[-quick or -seedN].json)")
    parser.add_argument("--markdown", default=None, help="markdown path (default docs/repair-benchmark[-quick or -seedN].md)")
    parser.add_argument("--plot", default=None, help="PNG path (default next to the JSON)")
    parser.add_argument("--from-json", nargs="+", metavar="JSON",
                        help="no runs: merge the rows of earlier result files and write the markdown and plot")
    args = parser.parse_args(argv)
    if args.from_json:
        return render(args)
    from tqdm.auto import tqdm

    rows = args.rows or (QUICK_ROWS if args.quick else tuple(ROWS))
    suffix = "-quick" if args.quick else f"-seed{args.recipe_seed}" if args.recipe_seed else ""
    root = Path(__file__).resolve().parent
    out = Path(args.out or root / "results" / f"repair{suffix}.json")
    md_path = Path(args.markdown or root.parent / "docs" / f"repair-benchmark{suffix}.md")
    png_path = Path(args.plot or out.with_suffix(".png"))
    command = "python benchmarks/repair.py" + (" --quick" if args.quick else "") + (
        f" --rows {' '.join(args.rows)}" if args.rows else "") + (
        f" --settings {' '.join(args.settings)}" if tuple(args.settings) != SETTINGS else "") + (
        f" --methods {' '.join(args.methods)}" if tuple(args.methods) != METHODS else "") + (
        f" --recipe-seed {args.recipe_seed}" if args.recipe_seed else "") + (
        f" --max-acc-drop {args.max_acc_drop:g}" if args.max_acc_drop != 2.0 else "") + (
        f" --peel {args.peel}" if args.peel else "")
    data = {"quick": args.quick, "command": command, "environment": environment(), "rows": {}, "seconds": 0.0}
    start = time.perf_counter()
    bar = tqdm(total=len(rows) * len(args.settings) * len(args.methods), desc="repair benchmark")
    for name in rows:
        row = Row(name, args.recipe_seed)
        entry = {"description": row.description, "recipe": asdict(row.recipe), "before": row.before,
                 "build_seconds": round(row.build_seconds, 1), "records": []}
        data["rows"][row.name] = entry
        for setting in args.settings:
            def progress(record):
                bar.update()
                bar.write(f"{row.name:32s} {setting:5s} {record['method']:16s} C-Acc {_pct(record['after']['c_acc']):>5s} "
                          f"ASR {_pct(record['after']['asr']):>5s} R-Acc {_pct(record['after']['r_acc']):>5s} "
                          f"{record['seconds']:7.1f} s")
            row.peel = args.peel
            records = run_setting(row, setting, tuple(args.methods), args.seed, progress, args.max_acc_drop)
            # Merged tables mix runs: each cell names the code that produced it and the CPU its model was
            # trained on (a recipe trains different models on AVX2 and AVX-512 machines).
            entry["records"] += [{**record, "code": data["environment"]["code"], "cpu": data["environment"]["cpu"]}
                                 for record in records]
            data["seconds"] = time.perf_counter() - start
            write_json(out, data)  # partial results survive an interrupted run
    bar.close()
    data["seconds"] = time.perf_counter() - start
    write_json(out, data)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(markdown(data) + "\n")
    plot(data, png_path)
    print(markdown(data))
    print(f"\nwrote {out}, {md_path}, {png_path}")
    return data


if __name__ == "__main__":
    main()
