"""What the peer defences share: their result, the parameters they may train, training all of them, and
channel pruning evaluated through forward edits (no rebuilt graph per candidate)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from ..case import Case
from ..fix.finetune import FinetuneResult, finetune
from ..fix.masks import ein_masks
from ..forward import Edit, Forward
from ..ir import Model
from ..locate.common import predict_labels
from ..neurons import Layer

# The same loss weighting as AI-Lancet's fine-tuning: the few error inputs weigh as much as a third of the
# clean set, so every method sees the defender's data the same way.
ERROR_LOSS_SHARE = 1 / 3
TRAIN_LR = 1e-3
TRAIN_EPOCHS = 20
TRAIN_PATIENCE = 5


@dataclass
class DefenceResult:
    """A defence's outcome: changed parameters (name -> new array), status and its own figures."""

    name: str
    status: str                      # 'repaired'; 'no_backdoor' (found nothing to act on); 'unchanged'
    changed: dict[str, np.ndarray]
    seconds: float
    details: dict = field(default_factory=dict)


def trainable_parameters(model: Model, layers: Sequence[Layer]) -> list[str]:
    """Names of the neuron parameters: layer weights and biases, BatchNormalization scales and shifts
    (not running statistics, and no shape or epsilon constants)."""
    names = []
    nodes = {node.name: node for node in model.nodes}
    for layer in layers:
        names += [layer.weight] + ([layer.bias] if layer.bias else [])
        if layer.batchnorm:
            names += list(nodes[layer.batchnorm].inputs[1:3])
    return [name for name in dict.fromkeys(names) if name in model.params
            and np.issubdtype(np.asarray(model.params[name]).dtype, np.floating)]


def training_data(case: Case, extra_x: np.ndarray | None = None,
                  extra_y: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, y, per-sample weight): x_clean, optional extra clean-labelled inputs (weight 1) and the case's
    error inputs with their right labels (weighted to a third of the clean set)."""
    xs, ys, ws = [case.x_clean], [case.y_clean], [np.ones(len(case.x_clean), np.float32)]
    if extra_x is not None and len(extra_x):
        xs.append(extra_x)
        ys.append(extra_y)
        ws.append(np.ones(len(extra_x), np.float32))
    if case.x_error is not None and len(case.x_error):
        weight = max(1.0, ERROR_LOSS_SHARE * len(case.x_clean) / len(case.x_error))
        xs.append(case.x_error)
        ys.append(case.y_error)
        ws.append(np.full(len(case.x_error), weight, np.float32))
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(ws)


def train_all(forward: Forward, names: Sequence[str], x: np.ndarray, y: np.ndarray, weights: np.ndarray, *,
              frozen_zero: Mapping[str, np.ndarray] | None = None, start: Mapping[str, np.ndarray] | None = None,
              lr: float = TRAIN_LR, epochs: int = TRAIN_EPOCHS, seed: int = 0) -> FinetuneResult:
    """Fine-tune every parameter in `names` (Adam, held-back early stopping among the trained epochs: a
    user who fine-tunes keeps a trained model); elements set in `frozen_zero` (bool masks) stay frozen,
    e.g. pruned channels."""
    masks = {}
    for name in names:
        keep = np.ones(np.shape(forward.params[name]), np.float32)
        if frozen_zero is not None and name in frozen_zero:
            keep = keep * (1 - frozen_zero[name])
        masks[name] = keep
    return finetune(forward, masks, x, y, weights=weights, epochs=epochs, lr=lr, init="keep", seed=seed,
                    patience=TRAIN_PATIENCE, start=start, keep_start=False)


def channel_edits(layers: Sequence[Layer], pruned: Sequence[tuple[int, int]]) -> dict[str, Edit]:
    """Forward edits that zero the given (layer position, channel) neurons."""
    scales: dict[str, np.ndarray] = {}
    for position, channel in pruned:
        layer = layers[position]
        scales.setdefault(layer.name, np.ones(layer.channels, np.float32))[channel] = 0.0
    return {name: Edit(scale=scale) for name, scale in scales.items()}


def largest_prune_within(forward: Forward, layers: Sequence[Layer], order: Sequence[tuple[int, int]],
                         x: np.ndarray, y: np.ndarray, max_drop: float, points: int = 24) -> tuple[int, list[dict]]:
    """The largest prefix of `order` (neurons, first pruned first) whose pruning keeps accuracy on (x, y)
    within `max_drop` points of the unpruned model; also the curve of (count, accuracy) tried."""
    base = float(np.mean(predict_labels(forward, x) == y))
    counts = sorted(set(np.unique(np.linspace(0, len(order), min(points, len(order)) + 1).astype(int)).tolist()))
    curve, best = [], 0
    for count in counts:
        edits = channel_edits(layers, order[:count])
        accuracy = base if count == 0 else float(np.mean(predict_labels(forward, x, edits=edits) == y))
        curve.append({"pruned": int(count), "accuracy": accuracy})
        if 100 * (base - accuracy) <= max_drop:
            best = count
        else:
            break
    return best, curve


def pruned_parameters(model: Model, params: Mapping[str, np.ndarray], layers: Sequence[Layer],
                      pruned: Sequence[tuple[int, int]]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(changed params, bool masks) with the pruned channels' parameters zeroed: kernel slice and bias, and
    with a BatchNormalization its scale and shift, so the layer tensor's channel is exactly 0 (the edit)."""
    eins = [{"layer": layers[position].name, "index": int(channel)} for position, channel in pruned]
    masks = ein_masks(model, list(layers), eins, "channel")
    changed = {name: np.where(mask, 0, np.asarray(params[name])).astype(np.asarray(params[name]).dtype)
               for name, mask in masks.items()}
    return changed, masks
