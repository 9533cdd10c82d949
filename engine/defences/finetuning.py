"""Plain fine-tuning: train all neuron parameters on the defender's data (the baseline users reach for)."""
from __future__ import annotations

import time

from ..case import Case
from ..forward import Forward
from ..neurons import find_layers
from .common import DefenceResult, trainable_parameters, train_all, training_data


def defend(forward: Forward, case: Case, *, seed: int = 0, **_: object) -> DefenceResult:
    """Fine-tune every weight, bias and BatchNorm scale/shift on x_clean (plus the error inputs with their
    right labels when the case has them); early stopping on a held-back fifth."""
    start = time.perf_counter()
    names = trainable_parameters(forward.model, find_layers(forward.model, weight_only=True))
    x, y, weights = training_data(case)
    tuned = train_all(forward, names, x, y, weights, seed=seed)
    return DefenceResult("finetuning", "repaired", tuned.changed, time.perf_counter() - start,
                         {"trained_parameters": len(names), "best_epoch": tuned.best_epoch,
                          "epochs_run": len(tuned.history) - 1})
