"""Neurons of a loaded model.

A *layer* is a Conv, ConvTranspose, Gemm or MatMul whose weight is a parameter, together with the bias
that completes it (the op's own bias input, an `Add` of a parameter right after a MatMul, and a
BatchNormalization right after a convolution). Its *tensor* is the output of that chain (pre-activation).
A *channel neuron* is (layer tensor, channel), the channel on axis 1 for convolutions and on the last axis
for dense layers; a *weight neuron* is (initializer, flat index).

Some layers have weight neurons only (`Layer.weight_only`). A recurrent node (LSTM, GRU, RNN) gives two,
its input weights W and its recurrent weights R (with the biases B beside W), and a Loop one per weight
matrix its body reads: their output is not a per-step feature map with channels that an edit or a sign
flip could act on alone (each step feeds the next). A quantized-operator layer (QLinearConv, QLinearMatMul,
QGemm: onnxruntime's QOperator format) outputs integers around a zero point, which scaling does not
ablate or flip; nor does an onnxruntime fused layer left fused (its activation is inside it).
Channel granularity, the EI feature taps and the channel-pruning peers leave these out
(`find_layers(weight_only=False)`).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np

from .ir import Model, NBitsParam, Node
from .ops.registry import registry_key
from .quantization import FOUR_BIT_TYPES

LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "ConvInteger", "MatMulInteger")
# convolutions whose kernel is [out channels, in channels, ...]
CONV_OPS = ("Conv", "ConvInteger", "QLinearConv", "FusedConv")
DENSE_OPS = ("Gemm", "MatMul", "MatMulInteger", "QLinearMatMul", "QGemm", "FusedGemm", "FusedMatMul")
# Quantized-operator layers (keys: `ops.registry.registry_key`): (weight slot, bias slot or None); weight
# neurons only.
QLINEAR_OPS = {"QLinearConv": (3, 8), "QLinearMatMul": (3, None), "com.microsoft::QGemm": (3, 6)}
# onnxruntime's fused layers the loader could not split into layer and activation (`loader._unfused`: an
# activation with no standard node; FusedMatMul): weight neurons only, as their output is past the
# activation, where scaling a channel is not what negating its weights does.
# onnxruntime's packed self-attention keeps the Q, K and V projections in one weight (QAttention: in int8).
FUSED_OPS = {"com.microsoft::FusedConv": (1, 2), "com.microsoft::FusedGemm": (1, 2),
             "com.microsoft::FusedMatMul": (1, None), "com.microsoft::Attention": (1, 2),
             "com.microsoft::DynamicQuantizeMatMul": (1, 4), "com.microsoft::QAttention": (1, 2)}
# weight-only quantized MatMul, 2, 4 or 8 bits (its B folded into a float [K, N] weight; ops/nbits.py)
NBITS_OPS = {"com.microsoft::MatMulNBits": (1, 5)}
WEIGHT_ONLY_OPS = {**QLINEAR_OPS, **FUSED_OPS, **NBITS_OPS}
RECURRENT_OPS = ("LSTM", "GRU", "RNN", "DynamicQuantizeLSTM")


@dataclass(frozen=True)
class Layer:
    """One neuron layer: where its channels live and which parameters produce them."""

    name: str            # the layer tensor (channel neurons live here)
    node: str            # the Conv/Gemm/MatMul node
    op_type: str
    channels: int
    channel_axis: int    # 1 for convolutions, -1 for dense layers
    weight: str          # weight initializer
    bias: str | None     # bias parameter (own input or a following Add)
    batchnorm: str | None  # the following BatchNormalization node, if any
    weight_shape: tuple[int, ...]
    parameters: int      # weight + bias (+ BatchNorm scale and shift) element count
    # weight neurons only: a recurrent node's W or R, a Loop's weight ('<node>:W', ':R', ':<weight>'), or a
    # quantized-operator layer
    weight_only: bool = False

    def as_dict(self) -> dict:
        """JSON-ready form."""
        return asdict(self)


def _weight_channels(node: Node, weight: np.ndarray) -> int:
    if node.op_type in CONV_OPS:
        return int(weight.shape[0])
    if node.op_type == "ConvTranspose":
        return int(weight.shape[1] * node.attrs.get("group", 1))
    if node.op_type in ("Gemm", "QGemm", "FusedGemm"):
        return int(weight.shape[0] if node.attrs.get("transB", 0) else weight.shape[-1])
    return int(weight.shape[-1])


def _past_integer_scaling(tensor: str, consumers: dict[str, list[Node]]) -> str:
    """The MatMulInteger result `tensor` after the Cast to float and the Mul by the scales that follow it
    in a dynamically quantized model (each the only reader), where a following Add of a bias sees it."""
    for op_type in ("Cast", "Mul"):
        readers = consumers.get(tensor, [])
        if len(readers) != 1 or readers[0].op_type != op_type:
            return tensor
        tensor = readers[0].outputs[0]
    return tensor


def _recurrent_layers(model: Model, node: Node) -> list[Layer]:
    """A recurrent node's W and R as weight-neuron layers (those of them that are parameters)."""
    layers = []
    hidden_axis = 1 if node.op_type == "DynamicQuantizeLSTM" else -1  # R [D, H, 4H] there, [D, 4H, H] in LSTM
    hidden = int(model.params[node.inputs[2]].shape[hidden_axis]) if node.inputs[2] in model.params else 0
    bias = node.inputs[3] if len(node.inputs) > 3 and node.inputs[3] in model.params else None
    for slot, role in ((1, "W"), (2, "R")):
        weight = node.inputs[slot]
        if weight not in model.params:
            continue
        shape = tuple(int(d) for d in model.params[weight].shape)
        layer_bias = bias if role == "W" else None
        count = model.params[weight].size + (model.params[layer_bias].size if layer_bias else 0)
        layers.append(Layer(f"{node.name}:{role}", node.name, node.op_type, hidden * shape[0], -1, weight,
                            layer_bias, None, shape, int(count), weight_only=True))
    return layers


def _subgraph_layers(model: Model, node: Node) -> list[Layer]:
    """The weight matrices a control-flow node's subgraphs read (tf2onnx passes a Keras GRU's kernel,
    recurrent kernel and bias into its Loop; torch.cond's branches read their layers' weights from the
    outer graph): each a weight-neuron layer."""
    layers = []
    for name in dict.fromkeys(node.inputs):
        value = model.params.get(name)
        if value is None or value.ndim < 2:
            continue
        shape = tuple(int(d) for d in value.shape)
        layers.append(Layer(f"{node.name}:{name}", node.name, node.op_type, shape[-1], -1, name, None, None,
                            shape, int(value.size), weight_only=True))
    return layers


def _weight_only_layer(model: Model, node: Node) -> list[Layer]:
    """A quantized-operator layer whose integer weight the loader folded into a parameter (with its folded
    int32 bias), or an onnxruntime fused layer, as a weight-neuron layer."""
    weight_slot, bias_slot = WEIGHT_ONLY_OPS[registry_key(node.op_type, node.domain)]
    weight = model.params.get(node.inputs[weight_slot]) if len(node.inputs) > weight_slot else None
    if weight is None or weight.ndim < 2:
        return []
    bias = (node.inputs[bias_slot] if bias_slot is not None and len(node.inputs) > bias_slot
            and node.inputs[bias_slot] in model.params else None)
    count = weight.size + (model.params[bias].size if bias else 0)
    return [Layer(node.outputs[0], node.name, node.op_type, _weight_channels(node, weight),
                  1 if node.op_type in CONV_OPS else -1, node.inputs[weight_slot], bias, None,
                  tuple(int(d) for d in weight.shape), int(count), weight_only=True)]


def find_layers(model: Model, weight_only: bool = False) -> list[Layer]:
    """All neuron layers of the model, in graph order; with `weight_only`, the layers with weight neurons
    only too (recurrent nodes' W and R, the weight matrices an If, Loop or Scan reads, quantized-operator
    and MatMulNBits layers: weight granularity)."""
    consumers = model.consumers_of()
    layers = []
    for node in model.nodes:
        if weight_only and node.op_type in RECURRENT_OPS and len(node.inputs) > 2:
            layers += _recurrent_layers(model, node)
            continue
        if weight_only and node.op_type in ("If", "Loop", "Scan"):
            layers += _subgraph_layers(model, node)
            continue
        if weight_only and registry_key(node.op_type, node.domain) in WEIGHT_ONLY_OPS:
            layers += _weight_only_layer(model, node)
            continue
        if node.op_type not in LAYER_OPS or len(node.inputs) < 2 or node.inputs[1] not in model.params:
            continue
        weight = model.params[node.inputs[1]]
        if node.op_type in ("MatMul", "MatMulInteger") and weight.ndim != 2:
            continue
        channels = _weight_channels(node, weight)
        tensor = node.outputs[0]
        bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] in model.params else None
        batchnorm = None
        if node.op_type == "MatMulInteger":  # its result is cast to float and scaled before the bias
            tensor = _past_integer_scaling(tensor, consumers)
        follower = consumers.get(tensor, [])
        if len(follower) == 1:
            nxt = follower[0]
            if node.op_type in ("MatMul", "MatMulInteger") and bias is None and nxt.op_type == "Add":
                other = [name for name in nxt.inputs if name != tensor]
                if other and other[0] in model.params and model.params[other[0]].size == channels:
                    bias, tensor = other[0], nxt.outputs[0]
            elif node.op_type in ("Conv", "ConvTranspose") and nxt.op_type == "BatchNormalization":
                batchnorm, tensor = nxt.name, nxt.outputs[0]
        count = weight.size + (model.params[bias].size if bias else 0) + (2 * channels if batchnorm else 0)
        axis = 1 if node.op_type in (*CONV_OPS, "ConvTranspose") else -1
        layers.append(Layer(tensor, node.name, node.op_type, channels, axis, node.inputs[1], bias, batchnorm,
                            tuple(int(d) for d in weight.shape), int(count)))
    return layers


def summary(model: Model) -> dict:
    """What `lancet inspect` reports: inputs, outputs, layers, neuron and parameter counts, op coverage."""
    from .ops import REGISTRY

    layers = find_layers(model, weight_only=True)
    op_counts: dict[str, int] = {}  # op types of other domains than the default as "domain::op type"
    for node in model.nodes:
        key = registry_key(node.op_type, node.domain)
        op_counts[key] = op_counts.get(key, 0) + 1
    layer_weights = {layer.weight for layer in layers}
    return {
        "path": str(model.path) if model.path else None,
        "producer": model.producer,
        "opset": model.opset,
        "inputs": [{"name": i.name, "shape": list(i.shape or []), "dtype": str(i.dtype)} for i in model.inputs],
        "outputs": [{"name": o.name, "shape": list(o.shape or []), "dtype": str(o.dtype)} for o in model.outputs],
        "scores_output": model.output.name,
        # parameters per type the file stores them in (the engine computes every float type in float32)
        "parameter_dtypes": dict(Counter(f"{model.quantized[name].dtype} quantized" if name in model.quantized
                                         else str(model.param_dtypes.get(name, "float32")) for name in model.params)),
        "nodes": len(model.nodes),
        "layers": [layer.as_dict() for layer in layers],
        "channel_neurons": sum(layer.channels for layer in layers if not layer.weight_only),
        "weight_neurons": int(sum(model.params[w].size for w in layer_weights)),
        "parameters": int(sum(v.size for v in model.params.values())),
        "outside_layers": _outside_layers(model, layers),
        "batch": _batch_summary(model),
        "quantization": _quantization_format(model),
        "op_coverage": {op: {"count": n, "supported": op in REGISTRY} for op, n in sorted(op_counts.items())},
    }


def _outside_layers(model: Model, layers: list[Layer]) -> dict:
    """The parameters no neuron layer holds (a ViT's position embedding, LayerNorm scales, a Loop's 1-D
    biases): no repair and no peer defence changes them. Their element count, and per op type reading them
    the element count it reads."""
    by_name = {node.name: node for node in model.nodes}
    inside = {name for layer in layers for name in (layer.weight, layer.bias) if name}
    inside |= {name for layer in layers if layer.batchnorm for name in by_name[layer.batchnorm].inputs[1:]}
    outside = [name for name in model.params if name not in inside]
    consumers = model.consumers_of()
    read_by: Counter = Counter()
    for name in outside:
        for op_type in sorted({node.op_type for node in consumers.get(name, [])}):
            read_by[op_type] += int(model.params[name].size)
    return {"parameters": int(sum(model.params[name].size for name in outside)), "read_by": dict(read_by)}


def _quantization_format(model: Model) -> str | None:
    """Which of onnxruntime's quantized formats the file is in: 'qoperator' (quantized operators), 'dynamic'
    (activations quantized per input at run time), 'int4-weights' (weight-only, 4-bit blocks behind
    DequantizeLinear or in MatMulNBits; 'int8-weights', 'int2-weights' for MatMulNBits of those widths), 'qdq'
    (weights behind DequantizeLinear, activations fake-quantized); None for a float model."""
    op_types = {node.op_type for node in model.nodes}
    if op_types & {key.split("::")[-1] for key in QLINEAR_OPS}:
        return "qoperator"
    if model.per_input_ranges or op_types & {"ConvInteger", "MatMulInteger"}:  # DynamicQuantizeMatMul too
        return "dynamic"
    if "MatMulNBits" in op_types:  # onnxruntime's MatMulNBitsQuantizer: 4 bits unless told 2 or 8
        widths = sorted({q.bits for q in model.quantized.values() if isinstance(q, NBitsParam)}
                        or {int(n.attrs.get("bits", 4)) for n in model.nodes if n.op_type == "MatMulNBits"})
        return "/".join(f"int{b}" for b in widths) + "-weights"
    if model.quantized and not op_types & {"QuantizeLinear"} and any(
            q.dtype in FOUR_BIT_TYPES for q in model.quantized.values()):
        return "int4-weights"  # the same quantizer's QDQ format
    return "qdq" if model.quantized or "DequantizeLinear" in op_types else None


def _batch_summary(model: Model) -> dict:
    """The input batch the file fixes (None: free), whether the graph computes with it (then the engine
    runs it vmapped over groups of that size; forward.over_fixed_batch), and why an input's result depends
    on its batch, if it does (then each input runs alone; `Model.batch_coupled`)."""
    from .forward import hard_codes_batch, static_batch

    fixed = static_batch(model)
    coupled = (f"control flow on the data ({', '.join(model.data_control)})" if model.data_control else
               "activations quantized over the batch's range" if model.per_input_ranges else None)
    return {"fixed": fixed, "hard_coded": bool(fixed) and hard_codes_batch(model), "coupled_by": coupled}
