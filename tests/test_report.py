"""Tables and plots for people stay readable for a model with many classes."""
from __future__ import annotations

import numpy as np
import pytest


def many_class_report(n_classes: int = 1000) -> dict:
    rng = np.random.default_rng(0)
    before = {str(c): float(v) for c, v in enumerate(rng.uniform(0.6, 1.0, n_classes))}
    after = {c: max(0.0, v - float(rng.uniform(-0.05, 0.1))) for c, v in before.items()}
    worst = max(before, key=lambda c: before[c] - after[c])
    return {"method": "flip", "status": "repaired",
            "before": {"clean_accuracy": 0.8, "clean_class_accuracy": before},
            "after": {"clean_accuracy": 0.78, "clean_class_accuracy": after,
                      "largest_class_drop": {"class": int(worst), "before": before[worst], "after": after[worst],
                                             "drop_points": 100 * (before[worst] - after[worst]), "images": 5}},
            "flip": {"scope": "global", "margin": 1.0, "neurons": 3,
                     "options": [{"scope": "global", "margin": 1.0, "k": 3, "fix_rate": 1.0, "drop_points": 2.0,
                                  "class_drop_points": 10.0}]}}


def test_a_dict_cell_shows_its_lowest_entries_when_long():
    from rich.console import Console

    from lancet.report import MAX_DICT_ITEMS, key_value_table

    report = many_class_report()
    per_class = report["before"]["clean_class_accuracy"]
    console = Console(record=True, width=400)
    key_value_table("t", {"clean_class_accuracy": per_class}, console)
    text = console.export_text()
    lowest = min(per_class, key=per_class.get)
    assert f"lowest {MAX_DICT_ITEMS} of 1000" in text and f"{lowest}: {per_class[lowest]:.4f}" in text
    highest = max(per_class, key=per_class.get)
    assert f" {highest}: {per_class[highest]:.4f}" not in text


def test_repair_plot_of_a_thousand_class_model(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    from lancet.plots import plot_repair

    plot_repair(many_class_report(), tmp_path / "many.png")
    assert imread(tmp_path / "many.png").shape[1] > 800
