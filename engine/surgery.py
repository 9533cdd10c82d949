"""Graph surgery: write repaired parameter values back into the original ONNX file, and nothing else.

onnx-graphsurgeon imports the original model; the changed parameters (initializers, or weights that the
exporter stored as Constant nodes) get their new values; the graph is exported and put back into a copy of
the original ModelProto (opset, IR version, producer and metadata kept). A graph whose subgraphs read
main-graph initializers (torch.cond's branches), or whose changed values are 4-bit integers, is edited in
place instead, since onnx-graphsurgeon's export would move those initializers into the subgraphs
(`_outer_reads_from_subgraphs`) or write 4-bit values unpacked (`_is_sub_byte`). Before anything is
written the result must pass `onnx.checker`, keep the node list, op types, graph inputs and outputs, and
every other initializer bit for bit, load and run in onnxruntime, and match the JAX forward of the
repaired params.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx

from .errors import RepairRejectedError
from .ir import Model
from .loader import read_model_proto
from .quantization import FOUR_BIT_TYPES

METADATA_PREFIX = "lancet."
# A model that rounds computed activations to integer steps (`Model.requantizes`: QDQ, dynamic, QOperator)
# can land an activation one step from onnxruntime's where XLA's float result is an ulp or two off (a Keras
# CNN's QDQ convolution summed in another order: 5 activations of 64 inputs a step apart, logits 3e-3; a
# dynamic LeNet-5's rescale-and-add of the bias one ulp off onnxruntime's two separate roundings, which XLA
# rewrite causes it not pinned down: 5 of 5,000 inputs, 1.2e-3 of the logits' scale). Up to this share of
# the check inputs may differ so.
STEP_APART_SHARE = 0.05


def _structure(graph: onnx.GraphProto) -> dict:
    return {
        "nodes": [(n.op_type, n.name, tuple(n.input), tuple(n.output)) for n in graph.node],
        "inputs": [(v.name, v.type.SerializeToString()) for v in graph.input],
        "outputs": [(v.name, v.type.SerializeToString()) for v in graph.output],
    }


def _tensors(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    values = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = onnx.numpy_helper.to_array(attr.t)
    return values


def replace_parameters(source: str | Path, changed: Mapping[str, np.ndarray],
                       metadata: Mapping[str, Any] | None = None) -> onnx.ModelProto:
    """A copy of the model at `source` with the `changed` parameter values, checked structurally."""
    original = read_model_proto(source)
    if _outer_reads_from_subgraphs(original.graph) or any(_is_sub_byte(value) for value in changed.values()):
        repaired = _replaced_in_place(original, changed)
    else:
        repaired = _replaced_by_graphsurgeon(original, changed)
    for key, value in (metadata or {}).items():
        entry = next((p for p in repaired.metadata_props if p.key == METADATA_PREFIX + key), None)
        entry = entry or repaired.metadata_props.add()
        entry.key, entry.value = METADATA_PREFIX + key, str(value)
    _check_same_graph(original, repaired, set(changed))
    return repaired


def _replaced_by_graphsurgeon(original: onnx.ModelProto, changed: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """onnx-graphsurgeon imports the graph, the changed initializers and Constant-node weights get their new
    values, the graph is exported into a copy of the original ModelProto."""
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(original)
    tensors = graph.tensors()
    for name, value in changed.items():  # keyed and typed as the file holds them (`Model.file_values`)
        tensor = tensors.get(name)
        if isinstance(tensor, gs.Constant):
            _check_shape(name, value, tuple(tensor.shape))
            tensor.values = np.asarray(value, dtype=tensor.dtype)
        elif tensor is not None and tensor.inputs and tensor.inputs[0].op == "Constant":
            node = tensor.inputs[0]
            old = node.attrs["value"]
            node.attrs["value"] = gs.Constant(old.name, np.asarray(value, dtype=old.values.dtype))
        else:
            raise RepairRejectedError(f"parameter {name!r} is neither an initializer nor a Constant node output")
    exported = gs.export_onnx(graph, do_type_check=True)
    repaired = onnx.ModelProto()
    repaired.CopyFrom(original)
    repaired.graph.CopyFrom(exported.graph)
    return repaired


def _outer_reads_from_subgraphs(graph: onnx.GraphProto) -> bool:
    """Whether a subgraph (If branch, Loop or Scan body) reads an initializer of the main graph.
    onnx-graphsurgeon exports such an initializer into every subgraph reading it and drops it from the main
    graph where no main-graph node reads it (measured on torch.cond's export: both branches' weights moved),
    which changes the file's structure; those files are edited in place instead."""
    names = {init.name for init in graph.initializer}

    def reads(subgraph: onnx.GraphProto) -> bool:
        return any(name in names for node in subgraph.node for name in node.input) or any(
            reads(attr.g) for node in subgraph.node for attr in node.attribute if attr.type == onnx.AttributeProto.GRAPH)

    return any(reads(attr.g) for node in graph.node for attr in node.attribute
               if attr.type == onnx.AttributeProto.GRAPH)


def _is_sub_byte(value: np.ndarray) -> bool:
    """A 4-bit array (ml_dtypes int4 / uint4): onnx-graphsurgeon's export writes one byte per element
    where ONNX packs two (measured: 12,288 bytes for a 64 x 192 uint4 weight that takes 6,144), so such
    values are written in place, packed by onnx.numpy_helper."""
    return np.dtype(np.asarray(value).dtype) in FOUR_BIT_TYPES


def _replaced_in_place(original: onnx.ModelProto, changed: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of the original ModelProto whose changed initializers and Constant-node weights of the main
    graph hold their new values, in their own type; nothing else is touched."""
    repaired = onnx.ModelProto()
    repaired.CopyFrom(original)
    initializers = {init.name: init for init in repaired.graph.initializer}
    constants = {node.output[0]: attr for node in repaired.graph.node if node.op_type == "Constant"
                 for attr in node.attribute if attr.name == "value"}
    for name, value in changed.items():
        target = initializers[name] if name in initializers else constants[name].t if name in constants else None
        if target is None:
            raise RepairRejectedError(f"parameter {name!r} is neither an initializer nor a Constant node output")
        old = onnx.numpy_helper.to_array(target)
        _check_shape(name, value, old.shape)
        target.CopyFrom(onnx.numpy_helper.from_array(np.asarray(value, dtype=old.dtype), target.name))
    return repaired


def _check_shape(name: str, value: np.ndarray, shape: tuple) -> None:
    if tuple(np.shape(value)) != tuple(shape):
        raise RepairRejectedError(f"parameter {name!r}: new shape {np.shape(value)} != {tuple(shape)}")


def _in_float(proto: onnx.ModelProto) -> bytes:
    """The serialized model, its MatMulNBits nodes at accuracy_level 0 (dequantized weights, float products:
    what the engine computes; level 4 rounds activations to int8 in onnxruntime's fused kernel, as the QDQ
    format's fused kernels do when optimised)."""
    if not any(node.op_type == "MatMulNBits" for node in proto.graph.node):
        return proto.SerializeToString()
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    for node in copy.graph.node:
        if node.op_type == "MatMulNBits":
            kept = [attr for attr in node.attribute if attr.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend(kept + [onnx.helper.make_attribute("accuracy_level", 0)])
    return copy.SerializeToString()


def _check_same_graph(original: onnx.ModelProto, repaired: onnx.ModelProto, changed: set[str]) -> None:
    before, after = _structure(original.graph), _structure(repaired.graph)
    for part in ("nodes", "inputs", "outputs"):
        if before[part] != after[part]:
            raise RepairRejectedError(f"graph surgery changed the graph's {part}; refusing to write")
    old, new = _tensors(original.graph), _tensors(repaired.graph)
    if set(old) != set(new):
        raise RepairRejectedError("graph surgery changed the set of initializers; refusing to write")
    for name in old:
        same = old[name].dtype == new[name].dtype and np.array_equal(old[name], new[name])
        if name not in changed and not same:
            raise RepairRejectedError(f"graph surgery changed initializer {name!r}, which is not repaired")


def verify_repaired(repaired: onnx.ModelProto, x_check: np.ndarray, expected: np.ndarray, model: Model,
                    atol: float = 1e-4) -> float:
    """onnx.checker, onnxruntime load and run, and output parity with the JAX forward; returns max |diff|.

    onnxruntime runs as everywhere else (`evaluate.OrtPredictor` for `model`, the IR of the original file):
    fed in the file's input type and batch, read from its class-scores output as [n, classes] float32. A
    quantized model must run as deployed (optimised: fused integer kernels, whose requantization rounds a
    few activations a step away from the float emulation) and match the engine as written (graph
    optimisations off: its Quantize/Dequantize nodes in float, as the engine computes them; MatMulNBits at
    accuracy_level 0, `_in_float`). Returns the
    largest difference of any input's outputs; for a model that requantizes activations up to
    STEP_APART_SHARE of the inputs may exceed `atol`."""
    from .evaluate import OrtPredictor

    try:
        onnx.checker.check_model(repaired)
    except Exception as exc:
        raise RepairRejectedError(f"the repaired model fails onnx.checker: {str(exc).splitlines()[0]}") from exc
    try:
        data = repaired.SerializeToString()
        deployed = OrtPredictor(model, data).logits(x_check)
        got = OrtPredictor(model, _in_float(repaired), optimize=False).logits(x_check) if model.is_quantized \
            else deployed
    except Exception as exc:
        raise RepairRejectedError(f"onnxruntime cannot run the repaired model: {exc}") from exc
    if not (np.all(np.isfinite(got)) and np.all(np.isfinite(deployed))):
        raise RepairRejectedError("the repaired model produces NaN or infinite outputs; nothing written")
    if not got.size:
        return 0.0
    per_input = np.max(np.abs(got - expected).reshape(len(got), -1), axis=1)
    scale = max(1.0, float(np.max(np.abs(expected))))
    apart = int(np.sum(per_input > atol * scale))
    allowed = int(STEP_APART_SHARE * len(per_input)) if model.requantizes else 0
    if apart > allowed:
        raise RepairRejectedError(f"onnxruntime and the JAX forward disagree on the repaired model "
                                  f"(max |diff| {float(per_input.max()):.2e} > {atol:g} on {apart} of "
                                  f"{len(per_input)} inputs{f', {allowed} allowed' if allowed else ''}); "
                                  "nothing written")
    return float(per_input.max())
