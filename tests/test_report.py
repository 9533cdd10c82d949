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


def test_candidates_table_shows_the_residual_trigger_only_when_restored():
    from rich.console import Console

    from lancet.report import finetune_candidates_table

    def attempt(scope, chosen, residual=None):
        entry = {"scope": scope, "depth": 3, "neurons": 10, "accepted": True, "clean_accuracy": 0.9,
                 "heldback_accuracy": 0.8, "error_fix_rate": 0.0, "chosen": chosen}
        if residual is not None:
            entry["residual_trigger"] = {"anomaly_index": residual}
        return entry

    for tried, shown in (([attempt("fc1.weight", False), attempt("fc2.weight", True)], False),
                         ([attempt("fc1.weight", False, 3.25), attempt("fc2.weight", True, -0.5)], True)):
        console = Console(record=True, width=200)
        finetune_candidates_table(tried, console)
        text = console.export_text()
        assert ("residual index" in text) == shown and ("-0.50" in text) == shown
        starred = [line for line in text.splitlines() if line.lstrip("│ ").startswith("*")]
        assert len(starred) == 1 and "fc2.weight" in starred[0] and "0.0000" in starred[0]  # a 0 fix rate shows
        assert "on pixels" not in text
    console = Console(record=True, width=200)
    finetune_candidates_table([{**attempt("fc0.weight", True), "depth": 1, "reads_pixels": True}], console)
    assert "1 (on pixels)" in console.export_text()  # why an MLP's first layer outranks deeper sets


def test_repair_table_names_the_peeled_trigger_parts():
    """A clean-data repair run with --peel: the outcome table lists each peeled part's size and index."""
    from rich.console import Console

    from lancet.report import repair_tables

    report = {**many_class_report(10), "ein_count": 3, "changed_parameter_count": 3, "pairs_used": 9,
              "pairs_dropped": 0, "written": False, "output": None, "reasons": [], "seconds": {"total": 1.0},
              "locate": {"restore": {"peeled": {"0": [{"norm": 14.7, "anomaly_index": 2.77, "attack_rate": 0.99}]}}}}
    console = Console(record=True, width=300)
    repair_tables(report, console)
    text = console.export_text()
    assert "peeled trigger parts" in text and "class 0: 14.7 px (index 2.77)" in text
    del report["locate"]
    console = Console(record=True, width=300)
    repair_tables(report, console)
    assert "peeled" not in console.export_text()
