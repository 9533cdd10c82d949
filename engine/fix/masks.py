"""Which parameter elements an EIN set covers, as boolean masks per parameter.

* weight neuron (initializer, flat index): that one element;
* channel neuron (layer tensor, channel k): the parameters that produce channel k: the kernel slice of
  output channel k (Conv: W[k]; ConvTranspose, group 1: W[:, k]; Gemm: row k with transB=1, else column k;
  MatMul: column k), the bias element k, and with a following BatchNormalization its scale[k] and B[k].
"""
from __future__ import annotations

import numpy as np

from ..errors import BadInputError
from ..ir import Model
from ..neurons import CONV_OPS, Layer


def _node(model: Model, name: str):
    return next(node for node in model.nodes if node.name == name)


def channel_parameters(model: Model, layer: Layer, channel: int) -> list[tuple[str, tuple, str]]:
    """(param, index, role) for every parameter slice that produces `channel` of `layer`.

    role is 'kernel', 'bias', 'bn_scale' or 'bn_shift'; with a BatchNormalization the flip acts on the
    BN scale and shift (which negates the normalised channel exactly), so the kernel is listed for
    fine-tuning but flagged with the role 'kernel'.
    """
    node = _node(model, layer.node)
    if layer.op_type in CONV_OPS:
        kernel = (channel,)
    elif layer.op_type == "ConvTranspose":
        if node.attrs.get("group", 1) != 1:
            raise BadInputError(f"channel neurons of grouped ConvTranspose node {node.name!r} are not supported")
        kernel = (slice(None), channel)
    elif layer.op_type == "Gemm" and node.attrs.get("transB", 0):
        kernel = (channel,)
    else:
        kernel = (slice(None), channel)
    found = [(layer.weight, kernel, "kernel")]
    if layer.bias:
        found.append((layer.bias, (channel,), "bias"))
    if layer.batchnorm:
        bn = _node(model, layer.batchnorm)
        found += [(bn.inputs[1], (channel,), "bn_scale"), (bn.inputs[2], (channel,), "bn_shift")]
    return found


def ein_masks(model: Model, layers: list[Layer], eins: list[dict], granularity: str) -> dict[str, np.ndarray]:
    """{param name: bool mask of its EIN elements} for the parameters the EINs touch."""
    masks: dict[str, np.ndarray] = {}

    def mask_of(name: str) -> np.ndarray:
        if name not in model.params:
            raise BadInputError(f"EIN parameter {name!r} is not a parameter of the model")
        return masks.setdefault(name, np.zeros(model.params[name].shape, bool))

    if granularity == "weight":
        for ein in eins:
            mask_of(ein["initializer"]).reshape(-1)[ein["index"]] = True
        return masks
    by_name = {layer.name: layer for layer in layers}
    for ein in eins:
        if ein["layer"] not in by_name:
            raise BadInputError(f"EIN layer {ein['layer']!r} is not a neuron layer of the model")
        for name, index, _ in channel_parameters(model, by_name[ein["layer"]], ein["index"]):
            mask_of(name)[index] = True
    return masks
