"""Neural-Cleanse unlearning (Wang et al., IEEE S&P 2019): restore the triggers of the anomalous classes from
clean data, then fine-tune on clean inputs of which a fifth carry a restored trigger (each flagged class's
in turn) under their true labels, so the model learns to ignore them. A model with no anomalous class is
left as it is."""
from __future__ import annotations

import time

import numpy as np

from ..case import Case, num_classes
from ..forward import Forward
from ..locate.restore import RestoreResult, restore_triggers
from ..neurons import find_layers
from .common import DefenceResult, trainable_parameters, train_all, training_data

STAMPED_SHARE = 0.2


def defend(forward: Forward, case: Case, *, seed: int = 0, restore: RestoreResult | None = None,
           **_: object) -> DefenceResult:
    """Restore (or reuse `restore`), then unlearn the restored trigger (see the module docstring)."""
    start = time.perf_counter()
    restore = restore or restore_triggers(forward, case.x_clean, num_classes(forward.model) or 10, seed=seed,
                                          y_clean=case.y_clean)
    details = {"flagged_class": restore.flagged, "flagged_classes": restore.flagged_classes,
               "anomaly_index": float(np.max(restore.anomaly)) if len(restore.anomaly) else None}
    if restore.flagged is None:
        return DefenceResult("nc_unlearning", "no_backdoor", {}, time.perf_counter() - start, details)
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(case.x_clean), size=max(1, int(round(STAMPED_SHARE * len(case.x_clean)))), replace=False)
    # Each flagged class's trigger in turn on random clean inputs, their true labels kept, as Neural Cleanse
    # unlearns; a source-specific row's trigger the same way (it moves other classes too, see
    # restored_pairs_inputs; inputs of its target class are stamped here as well, labelled as they are).
    rows = np.resize(np.asarray(restore.flagged_classes), len(picks))
    stamped = np.concatenate([restore.apply(case.x_clean[picks[rows == r]], int(r)) for r in restore.flagged_classes])
    picks = np.concatenate([picks[rows == r] for r in restore.flagged_classes])
    names = trainable_parameters(forward.model, find_layers(forward.model, weight_only=True))
    x, y, weights = training_data(case, stamped, case.y_clean[picks])
    tuned = train_all(forward, names, x, y, weights, seed=seed)
    details.update(stamped=len(picks), best_epoch=tuned.best_epoch)
    return DefenceResult("nc_unlearning", "repaired", tuned.changed, time.perf_counter() - start, details)
