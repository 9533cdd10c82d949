"""`lancet demo`: build (first run; cached after) a backdoored LeNet-5 on real MNIST digits and repair it."""
from __future__ import annotations

import time

import numpy as np

from .recipes import Recipe, build_case

DEMO_RECIPE = Recipe(dataset="mnist_digits", arch="lenet5", attack="badnets")


def run_demo(console) -> dict:
    """Build the demo model and case, evaluate it with both backends; returns the figures it printed."""
    from lancet.evaluate import accuracy, make_predictor
    from lancet.loader import load_model
    from lancet.report import key_value_table

    start = time.perf_counter()
    built = build_case(DEMO_RECIPE)
    model = load_model(built.model)
    heldout = np.load(built.heldout)
    figures: dict = {"model": str(built.model), "case": str(built.case)}
    for backend in ("ort", "jax"):
        predictor = make_predictor(model, backend)
        figures[f"{backend}: held-out clean accuracy"] = accuracy(predictor, heldout["x_test"], heldout["y_test"])
        target = np.full(len(heldout["x_error"]), int(heldout["target"]))
        figures[f"{backend}: attack success rate"] = accuracy(predictor, heldout["x_error"], target)
    figures["seconds"] = round(time.perf_counter() - start, 2)
    key_value_table("lancet demo: backdoored LeNet-5 on MNIST digits", figures, console)
    return figures
