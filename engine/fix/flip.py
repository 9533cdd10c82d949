"""Neuron-flip: negate the EINs.

Rule. Weight neuron: w -> -w. Channel neuron k of a layer: negate what produces the layer tensor's channel
k, so that channel's pre-activation becomes its exact negative: without BatchNormalization the kernel
slice and the bias element; with one, the BN scale[k] and shift[k] only (BN(x)_k = s_k * xhat_k + b_k, so
-s_k, -b_k gives -BN(x)_k). This equals the forward edit scale -1 on that channel, which is what the
ablation search with factor -1 evaluated.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from ..ir import Model
from ..neurons import Layer
from .masks import channel_parameters


def flip(model: Model, params: Mapping[str, np.ndarray], layers: list[Layer], eins: list[dict],
         granularity: str) -> dict[str, np.ndarray]:
    """Return the changed parameters (name -> new array) after flipping the EINs' sign."""
    changed: dict[str, np.ndarray] = {}

    def editable(name: str) -> np.ndarray:
        if name not in changed:
            changed[name] = np.array(params[name], copy=True)
        return changed[name]

    if granularity == "weight":
        for ein in eins:
            editable(ein["initializer"]).reshape(-1)[ein["index"]] *= -1
        return changed
    by_name = {layer.name: layer for layer in layers}
    for ein in eins:
        layer = by_name[ein["layer"]]
        slices = channel_parameters(model, layer, ein["index"])
        roles = ("bn_scale", "bn_shift") if layer.batchnorm else ("kernel", "bias")
        for name, index, role in slices:
            if role in roles:
                editable(name)[index] *= -1
    return changed
