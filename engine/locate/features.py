"""Step 2, EI features: per layer, how each channel's activation differs between error input and companion."""
from __future__ import annotations

import numpy as np

from ..forward import Forward
from ..neurons import Layer
from .common import chunks, pad_to
from .pairs import Pairs


def _channel_reduce(values: np.ndarray, axis: int) -> np.ndarray:
    """Sum over every axis but batch and channel -> [N, C]."""
    axis = axis % values.ndim
    other = tuple(a for a in range(1, values.ndim) if a != axis)
    return values.sum(axis=other) if other else values


def ei_features(forward: Forward, pairs: Pairs, layers: list[Layer], batch: int = 128) -> dict[str, np.ndarray]:
    """{layer tensor: [pairs, channels]} activation differences a(error) - a(companion), summed spatially.

    Large entries mark the channels that the error-inducing features drive; valuation weighs them by their
    effect on the output.
    """
    names = tuple(layer.name for layer in layers)
    axes = {layer.name: layer.channel_axis for layer in layers}
    out: dict[str, list[np.ndarray]] = {name: [] for name in names}
    size = min(batch, pairs.used)
    for start, stop in chunks(pairs.used, batch):
        err = forward(pad_to(pairs.x_error[start:stop], size), taps=names)
        comp = forward(pad_to(pairs.x_companion[start:stop], size), taps=names)
        for name in names:
            diff = np.asarray(err[name]) - np.asarray(comp[name])
            out[name].append(_channel_reduce(diff, axes[name])[: stop - start])
    return {name: np.concatenate(parts) for name, parts in out.items()}
