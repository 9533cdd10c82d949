"""A tiny IR of an ONNX graph: nodes in topological order, parameters, static constants, inputs, outputs."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .quantization import dequantize_values, expand_blocks, pack_bits, quantize_values, unpack_bits


@dataclass(frozen=True)
class TensorInfo:
    """Name, shape (None or a string for a symbolic dimension) and numpy dtype of a graph tensor."""

    name: str
    shape: tuple[int | str | None, ...] | None
    dtype: np.dtype


@dataclass
class Node:
    """One ONNX node with its attributes already turned into Python values (tensors as numpy arrays)."""

    name: str
    op_type: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any]
    domain: str = ""


@dataclass(frozen=True)
class QuantizedParam:
    """A parameter the file stores quantized: `source`, an integer initializer read by a DequantizeLinear
    (QDQ; the engine holds the float value under the DequantizeLinear's output) or directly by an integer op
    (dynamic quantization, QOperator; held under the initializer's own name), value = (q - zero_point) *
    scale, the scale and zero point per tensor, along `axis`, per block of `block_size` along it (opset 21's
    blocked int4 weights), or of the weight's rank."""

    source: str
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int
    dtype: np.dtype
    block_size: int = 0

    def quantize(self, value: np.ndarray) -> np.ndarray:
        """Float values as the file's integers: rounded half to even, saturated to the integer type."""
        return quantize_values(value, self.scale, self.zero_point, self.axis, self.dtype, self.block_size)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        """The file's integers as the float values the graph computes with."""
        return dequantize_values(q, self.scale, self.zero_point, self.axis, self.block_size)


@dataclass(frozen=True)
class NBitsParam(QuantizedParam):
    """A com.microsoft MatMulNBits weight: the file stores B as bytes [N, blocks, block_size x bits / 8],
    8 / bits values each (2, 4 or 8 bits), for the weight's transpose [N, K] padded to whole blocks, with a
    scale and zero point per row and block (`scale`, `zero_point`: [N, blocks], unpacked). The engine holds
    the float weight as a MatMul's [K, N]; `padded` keeps the file's values past K, written back as they
    were."""

    k: int = 0
    padded: np.ndarray | None = None  # the file's unpacked values [N, blocks x block_size]
    bits: int = 4

    def _full(self, value: np.ndarray) -> np.ndarray:
        """A per-row-and-block scale or zero point [N, blocks] over the weight's transpose [N, K]."""
        return expand_blocks(np.asarray(value, np.float32), 1, self.block_size, (len(value), self.k))

    def quantize(self, value: np.ndarray) -> np.ndarray:
        """A [K, N] float weight as the file's packed bytes (rounded half to even, saturated to
        0..2^bits - 1)."""
        q = np.array(self.padded, np.uint8, copy=True)
        # zero points may be float here: round after adding them
        steps = np.round(np.asarray(value, np.float32).T / self._full(self.scale) + self._full(self.zero_point))
        q[:, : self.k] = np.clip(steps, 0, (1 << self.bits) - 1).astype(np.uint8)
        return pack_bits(q, self.bits).reshape(q.shape[0], -1, self.block_size * self.bits // 8)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        """The file's packed bytes as the [K, N] float weight the layer computes with."""
        values = unpack_bits(np.asarray(q).reshape(np.shape(q)[0], -1), self.bits)[:, : self.k]
        return dequantize_values(values, self.scale, self.zero_point, 1, self.block_size).T


@dataclass
class Model:
    """A loaded ONNX model.

    `params` are the float tensors the forward pass is differentiable in (initializers and Constant-node
    weights); `constants` are the tensors that stay static under jit (integer initializers, shape
    arithmetic). `param_sources` says where each parameter lives in the file ("initializer" or
    "constant_node"), which graph surgery needs to write it back.
    """

    path: Path | None
    opset: int
    nodes: list[Node]
    params: dict[str, np.ndarray]
    constants: dict[str, np.ndarray]
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    value_info: dict[str, TensorInfo] = field(default_factory=dict)
    param_sources: dict[str, str] = field(default_factory=dict)
    producer: str = ""
    scores_output: str = ""  # name of the class scores' output (default: the first)
    # Parameters the file stores in another float type (float16, float64): `params` holds them as float32,
    # the precision the engine computes in; written back in their own type (`stored`).
    param_dtypes: dict[str, np.dtype] = field(default_factory=dict)
    # Parameters the file stores as integers (`QuantizedParam`): `params` holds them dequantized.
    quantized: dict[str, QuantizedParam] = field(default_factory=dict)
    # If and Loop nodes whose condition depends on the input data (torch.cond, torch.while_loop): one
    # condition for the whole batch.
    data_control: tuple[str, ...] = ()

    @property
    def input(self) -> TensorInfo:
        """The single float input of a classifier."""
        return self.inputs[0]

    def stored(self, values: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """`values` of parameters as the file will hold them (rounded to a float16 parameter's type, or to a
        quantized parameter's integer steps), as float32: what a repaired file computes with."""
        stored = {}
        for name, value in values.items():
            if name in self.quantized:
                stored[name] = self.quantized[name].dequantize(self.quantized[name].quantize(value))
            elif name in self.param_dtypes:
                stored[name] = np.asarray(np.asarray(value).astype(self.param_dtypes[name]), np.float32)
            else:
                stored[name] = np.asarray(value)
        return stored

    def file_values(self, values: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """`values` of parameters keyed and typed as the file holds them: a quantized parameter becomes its
        integer initializer's new integers (graph surgery casts float types itself)."""
        return {self.quantized[name].source if name in self.quantized else name:
                self.quantized[name].quantize(value) if name in self.quantized else np.asarray(value)
                for name, value in values.items()}

    @property
    def is_quantized(self) -> bool:
        """Whether the file stores parameters as integers (QDQ, QOperator, dynamic quantization):
        its onnxruntime kernels compute in integers, so its outputs match the engine's float emulation to a
        quantization step, not to 1e-4."""
        return bool(self.quantized)

    @property
    def per_input_ranges(self) -> bool:
        """Whether the graph quantizes activations over their own range at run time (DynamicQuantizeLinear,
        a dynamically quantized model): the range spans the whole tensor, so an input's result depends on
        the inputs sharing its batch (`batch_coupled`)."""
        return any(node.op_type in ("DynamicQuantizeLinear", "DynamicQuantizeLSTM", "DynamicQuantizeMatMul")
                   for node in self.nodes)

    @property
    def batch_coupled(self) -> bool:
        """Whether an input's result depends on the other inputs of its batch: activations quantized over
        the whole tensor (`per_input_ranges`) or an If or Loop whose one condition is computed from the
        batch's data (`data_control`). The engine and its onnxruntime reference then run each input alone, as a
        service answering one request at a time does (`forward.build_apply`, `evaluate.OrtPredictor`)."""
        return self.per_input_ranges or bool(self.data_control)

    @property
    def requantizes(self) -> bool:
        """Whether the graph rounds computed activations to integer steps (QuantizeLinear on a computed
        tensor, dynamic quantization, quantized operators): a float result a few ulps from onnxruntime's
        (another summation order) can then land one step apart there."""
        return self.per_input_ranges or any(node.op_type in ("QuantizeLinear", "QGemm")
                                            or node.op_type.startswith("QLinear") for node in self.nodes)

    @property
    def half_precision(self) -> bool:
        """Whether the file computes in float16 anywhere (float16 parameters, input or output)."""
        infos = [*self.inputs, *self.outputs]
        return any(np.dtype(d) == np.float16 for d in [*self.param_dtypes.values(), *(i.dtype for i in infos)])

    @property
    def output(self) -> TensorInfo:
        """The output holding the class scores (logits or probabilities; `loader.classifier_output`)."""
        return next((info for info in self.outputs if info.name == self.scores_output), self.outputs[0])

    def producer_of(self) -> dict[str, Node]:
        """Map each tensor name to the node that produces it."""
        return {out: node for node in self.nodes for out in node.outputs}

    def consumers_of(self) -> dict[str, list[Node]]:
        """Map each tensor name to the nodes that read it."""
        table: dict[str, list[Node]] = {}
        for node in self.nodes:
            for name in node.inputs:
                if name:
                    table.setdefault(name, []).append(node)
        return table
