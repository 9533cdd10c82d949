"""Accuracy of a model on a case's sets, through onnxruntime or the JAX engine."""
from __future__ import annotations

from math import comb
from pathlib import Path
from typing import Mapping

import numpy as np

from .case import Case
from .errors import BadInputError
from .forward import Forward, class_scores, label_threshold, output_labels, static_batch
from .ir import Model
from .locate.common import pad_to
from .runtime import as_input_type, ort_session


def class_accuracy(pred: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Accuracy on each class present in `y`, keyed by the class index as a string (JSON keys). An overall
    figure within bounds can hide one class paying for the repair: flipping a backdoor's EINs takes the
    target class's recall down far more than the mean (Fashion LeNet, triggered inputs: class 0 81 -> 47 %
    while the overall accuracy drops 1.2 points)."""
    return {str(int(c)): float(np.mean(pred[y == c] == c)) for c in np.unique(y)}


def largest_class_drop(before: Mapping[str, float], after: Mapping[str, float], y: np.ndarray | None = None) -> dict:
    """The class whose accuracy drops most from `before` to `after` (points; ties: the lowest class), with
    its image count in `y` when given."""
    label = max(before, key=lambda c: (before[c] - after[c], -int(c)))
    return {"class": int(label), "before": before[label], "after": after[label],
            "drop_points": 100.0 * (before[label] - after[label]),
            "images": None if y is None else int(np.sum(y == int(label)))}


def error_rate_upper_bound(errors: int, n: int, confidence: float = 0.95) -> float:
    """One-sided Clopper-Pearson upper bound on an error rate seen as `errors` of `n`: the largest rate
    under which seeing at most `errors` still has probability >= 1 - confidence. What a defender's few
    triggered inputs can vouch for: none of 24 wrong still allows 11.7 % at 95 %."""
    if n <= 0 or errors >= n:
        return 1.0
    alpha = 1.0 - confidence

    def at_most_errors(rate: float) -> float:
        return sum(comb(n, i) * rate ** i * (1 - rate) ** (n - i) for i in range(errors + 1))

    low, high = errors / n, 1.0
    for _ in range(60):  # bisection: at_most_errors falls as the rate grows
        middle = (low + high) / 2
        low, high = (middle, high) if at_most_errors(middle) > alpha else (low, middle)
    return high


def _chunks(x: np.ndarray, size: int):
    for start in range(0, len(x), size):
        yield x[start:start + size]


def _fixed_chunks(x: np.ndarray, size: int):
    """Chunks of exactly `size` (the last zero-padded) with their real lengths: a file with a fixed batch
    runs only on that many inputs."""
    for chunk in _chunks(x, size):
        yield pad_to(chunk, size), len(chunk)


class OrtPredictor:
    """Arg-max predictions through onnxruntime (the reference the JAX engine must match)."""

    def __init__(self, model: Model, path: str | Path | bytes, optimize: bool = True):
        self.session = ort_session(path, optimize=optimize)
        self.input_name = model.input.name
        self.output_names = [model.output.name]  # the class scores, whatever the file's output order
        self.input_dtype = model.input.dtype  # float16 or integer pixels in the file; the case holds float32
        self.fixed = static_batch(model) or (1 if model.batch_coupled else None)
        self.batch = self.fixed or 256
        self.threshold = label_threshold(model)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Raw class scores (`Model.output`) for a numpy batch of any length."""
        if self.fixed:
            outs = [self._run(chunk)[:n] for chunk, n in _fixed_chunks(x, self.fixed)]
        else:
            outs = [self._run(chunk) for chunk in _chunks(x, self.batch)]
        return class_scores(np.concatenate(outs).astype(np.float32))

    def _run(self, chunk: np.ndarray) -> np.ndarray:
        return self.session.run(self.output_names, {self.input_name: as_input_type(chunk, self.input_dtype)})[0]

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Class labels (`forward.output_labels`)."""
        return np.asarray(output_labels(self.logits(x), self.threshold))


class JaxPredictor:
    """Arg-max predictions through the JAX engine."""

    def __init__(self, model: Model, forward: Forward | None = None):
        self.forward = forward or Forward(model)
        self.threshold = self.forward.threshold
        self.batch = 256  # any batch, a file's fixed one included (forward.over_fixed_batch)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Raw class scores (`Model.output`) for a numpy batch of any length."""
        return np.concatenate([np.asarray(self.forward.logits(chunk)) for chunk in _chunks(x, self.batch)])

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Class labels (`forward.output_labels`)."""
        return np.asarray(output_labels(self.logits(x), self.threshold))


def make_predictor(model: Model, backend: str, path: str | Path | bytes | None = None):
    """A predictor for `backend` ('ort' or 'jax')."""
    if backend == "ort":
        source = path if path is not None else model.path
        if source is None:
            raise BadInputError("the ort backend needs the model's file or bytes")
        return OrtPredictor(model, source)
    if backend == "jax":
        return JaxPredictor(model)
    raise BadInputError(f"unknown backend {backend!r}; use 'ort' or 'jax'")


def accuracy(predictor, x: np.ndarray, y: np.ndarray) -> float:
    """Share of `x` predicted as `y`."""
    return float(np.mean(predictor.predict(x) == y)) if len(x) else float("nan")


def evaluate_case(predictor, case: Case) -> dict:
    """clean_accuracy on x_clean (overall and per class) and error_accuracy on x_error (share predicted as
    y_error), with counts."""
    clean_pred = predictor.predict(case.x_clean)
    report = {"clean_accuracy": float(np.mean(clean_pred == case.y_clean)), "clean_count": len(case.x_clean),
              "clean_class_accuracy": class_accuracy(clean_pred, case.y_clean)}
    if case.x_error is not None:
        report["error_accuracy"] = accuracy(predictor, case.x_error, case.y_error)
        report["error_count"] = len(case.x_error)
    if case.x_companion is not None:
        report["companion_accuracy"] = accuracy(predictor, case.x_companion, case.y_error)
    return report
