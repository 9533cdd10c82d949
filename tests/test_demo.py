"""`lancet demo`, the README's main command: the demo model repaired by both methods, figures on held-out data."""
from __future__ import annotations

import numpy as np
import pytest


def test_demo_repairs_the_backdoor_with_both_methods(tmp_path):
    pytest.importorskip("torch")
    from rich.console import Console

    from lancet.cache import cache_root
    from lancet.evaluate import OrtPredictor, class_accuracy
    from lancet.loader import load_model
    from lancet.models.demo import DEMO_RECIPE, run_demo
    from lancet.models.recipes import build_case

    console = Console(record=True, width=160)
    was_cached = (cache_root() / DEMO_RECIPE.name / "meta.json").is_file()
    shown = run_demo(console, out_dir=tmp_path)
    rows = shown["rows"]
    assert rows["original"]["asr"] > 0.9
    heldout = np.load(build_case(DEMO_RECIPE).heldout)
    for method in ("flip", "finetune"):
        row = rows[method]
        assert row["status"] == "repaired" and (tmp_path / f"repaired-{method}.onnx").exists()
        assert row["asr"] <= 0.02 and rows["original"]["c_acc"] - row["c_acc"] <= 0.015, (method, row)
        # The class column comes from the written file's own predictions.
        path = tmp_path / f"repaired-{method}.onnx"
        pred = OrtPredictor(load_model(path), path).predict(heldout["x_test"])
        assert row["class_acc"] == class_accuracy(pred, heldout["y_test"])
        drops = {c: rows["original"]["class_acc"][c] - row["class_acc"][c] for c in row["class_acc"]}
        assert row["worst_class"]["class"] == int(max(drops, key=lambda c: (drops[c], -int(c))))
    text = console.export_text()
    assert "class losing most" in text and "flip" in text and "finetune" in text
    assert ("(cached)" if was_cached else "(trained)") in text  # said from the cache, not from the build time
