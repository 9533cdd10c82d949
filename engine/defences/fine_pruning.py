"""Fine-Pruning (Liu, Dolan-Gavitt, Garg, RAID 2018): backdoor neurons tend to be dormant on clean inputs.

1. Rank the channels of the last convolution by their mean activation (after ReLU) on x_clean (a model
   without convolutions, e.g. an MLP: the neurons of its last hidden dense layer, the one before the output).
2. Prune them, least active first, as far as clean accuracy on x_clean stays within `max_prune_drop`
   points (the paper prunes until validation accuracy drops by 4 %); pruning zeroes the channel's
   parameters (kernel slice and bias, or BatchNorm scale and shift).
3. Fine-tune all parameters, the pruned channels held at zero.
"""
from __future__ import annotations

import time

import jax.numpy as jnp
import numpy as np

from ..case import Case
from ..errors import BadInputError
from ..forward import Forward
from ..neurons import CONV_OPS, find_layers
from .common import (DefenceResult, largest_prune_within, pruned_parameters, trainable_parameters, train_all,
                     training_data)

MAX_PRUNE_DROP = 4.0


def _mean_activation(forward: Forward, tensor: str, axis: int, x: np.ndarray, batch: int = 256) -> np.ndarray:
    """Per channel: the mean over inputs and positions of the ReLU'd layer tensor."""
    total = 0.0
    for start in range(0, len(x), batch):
        value = jnp.maximum(forward(x[start:start + batch], taps=(tensor,))[tensor], 0)
        moved = jnp.moveaxis(value, axis, -1)
        per_input = moved.reshape(moved.shape[0], -1, moved.shape[-1]).mean(axis=1)
        total = total + np.asarray(per_input.sum(axis=0), np.float64)
    return total / len(x)


def defend(forward: Forward, case: Case, *, seed: int = 0, max_prune_drop: float = MAX_PRUNE_DROP,
           **_: object) -> DefenceResult:
    """Prune the last convolution's (or hidden dense layer's) dormant channels, then fine-tune (see the
    module docstring)."""
    start = time.perf_counter()
    model = forward.model
    layers = find_layers(model)
    convs = [i for i, layer in enumerate(layers) if layer.op_type in CONV_OPS]
    position = convs[-1] if convs else len(layers) - 2
    if position < 0:
        raise BadInputError("Fine-Pruning needs a convolution or a hidden dense layer; the model has neither")
    layer = layers[position]
    activation = _mean_activation(forward, layer.name, layer.channel_axis, case.x_clean)
    order = [(position, int(c)) for c in np.argsort(activation, kind="stable")]
    count, curve = largest_prune_within(forward, layers, order, case.x_clean, case.y_clean, max_prune_drop)
    pruned = order[:count]
    changed, masks = pruned_parameters(model, model.params, layers, pruned)
    names = trainable_parameters(model, layers)
    x, y, weights = training_data(case)
    tuned = train_all(forward, names, x, y, weights, frozen_zero=masks, start=changed, seed=seed)
    return DefenceResult("fine_pruning", "repaired", tuned.changed, time.perf_counter() - start,
                         {"layer": layer.name, "channels": layer.channels, "pruned": count,
                          "prune_curve": curve, "best_epoch": tuned.best_epoch})
