"""ONNX import: read a file (external data too), validate it, and build the IR the JAX forward runs on."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.helper import get_attribute_value, tensor_dtype_to_np_dtype

from .errors import BadInputError, UnsupportedOpError
from .ir import Model, NBitsParam, Node, QuantizedParam, TensorInfo
from .ops import REGISTRY, spec_of
from .ops.registry import registry_key
from .ops.nbits import NBITS, nbits_param, nbits_scales_and_zeros
from .quantization import is_integer_type

# Opsets 22-25 (torch 2.13's exporter writes up to 25) only widen the tensor types the supported ops take
# (bfloat16, float4, float8e8m0, 2-bit integers): their float semantics are those of 21.
MIN_OPSET, MAX_OPSET = 9, 25
# Integer inputs taken as pixels (a deployed model that Casts uint8 images itself); the engine feeds them
# as float32 holding the same integers, onnxruntime as the file's type. Wider integers are ids, not pixels.
IMAGE_INT_TYPES = tuple(np.dtype(t) for t in (np.uint8, np.int8, np.uint16, np.int16))
DEFAULT_DOMAINS = ("", "ai.onnx")
# Ops whose output is known from shapes alone, whatever their input holds.
SHAPE_ONLY_OPS = {"Shape", "Size"}
SUBGRAPH_OPS = {"If": ("then_branch", "else_branch"), "Loop": ("body",), "Scan": ("body",)}  # op -> graph attributes


def read_model_proto(path: str | Path, load_external: bool = True) -> onnx.ModelProto:
    """Parse an ONNX file (and its external-data files); every failure names the file."""
    path = Path(path)
    if not path.exists():
        raise BadInputError(f"model file {path} does not exist")
    if not path.is_file():
        raise BadInputError(f"model path {path} is not a file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise BadInputError(f"{path} is not a readable ONNX model (truncated or not ONNX): {exc}") from exc
    if not proto.HasField("graph") or proto.ir_version == 0 or not proto.graph.node:
        raise BadInputError(f"{path} is not an ONNX model (no graph or nodes; truncated or another format?)")
    if load_external:
        _load_external_data(proto, path)
    return proto


def external_data_files(path: str | Path) -> list[Path]:
    """The external-data files the ONNX file at `path` keeps its tensors in (none: everything inline), e.g.
    the `.onnx.data` file torch.onnx.export's default (dynamo) exporter writes beside the model."""
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    path = Path(path)
    proto = read_model_proto(path, load_external=False)
    found = {path.parent / ExternalDataInfo(tensor).location for tensor in _get_all_tensors(proto)
             if uses_external_data(tensor)}
    return sorted(found)


def _load_external_data(proto: onnx.ModelProto, path: Path) -> None:
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    base = path.parent
    for tensor in _get_all_tensors(proto):
        if uses_external_data(tensor):
            location = ExternalDataInfo(tensor).location
            if not (base / location).is_file():
                raise BadInputError(f"{path}: external-data file {base / location} (tensor {tensor.name!r}) "
                                    "is missing")
    try:
        onnx.load_external_data_for_model(proto, str(base))
    except Exception as exc:
        raise BadInputError(f"{path}: cannot read its external data: {exc}") from exc


def default_opset(proto: onnx.ModelProto) -> int:
    """The default-domain opset the model was written for."""
    for entry in proto.opset_import:
        if entry.domain in DEFAULT_DOMAINS:
            return int(entry.version)
    raise BadInputError("the model imports no default-domain (ai.onnx) opset")


def _tensor_info(value_info: onnx.ValueInfoProto) -> TensorInfo:
    ttype = value_info.type.tensor_type
    shape = None
    if ttype.HasField("shape"):
        shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in ttype.shape.dim)
    dtype = np.dtype(tensor_dtype_to_np_dtype(ttype.elem_type)) if ttype.elem_type else np.dtype(np.float32)
    return TensorInfo(value_info.name, shape, dtype)


def _attributes(node: onnx.NodeProto) -> dict:
    attrs = {}
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH and node.op_type in SUBGRAPH_OPS:
            attrs[attr.name] = _branch(attr.g)
            continue
        if attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
            attrs[attr.name] = None  # other control flow (Scan): reported as unsupported
            continue
        value = get_attribute_value(attr)
        if isinstance(value, onnx.TensorProto):
            value = numpy_helper.to_array(value)
        elif isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, list) and value and isinstance(value[0], bytes):
            value = [v.decode() for v in value]
        attrs[attr.name] = value
    return attrs


def _node(proto: onnx.NodeProto, index: int) -> Node:
    """The IR node of `proto`. An If or Loop node also lists, after its own inputs (an If: its condition),
    the outer tensors its subgraphs read (ONNX leaves them implicit), so that ordering, the data-dependence
    analysis and cached prefixes see them; its handler binds them by name (ops/control.py)."""
    node = Node(proto.name or f"{proto.op_type}_{index}", proto.op_type, list(proto.input), list(proto.output),
                _attributes(proto), proto.domain)
    if node.op_type in SUBGRAPH_OPS:
        outer = list(dict.fromkeys(name for key in SUBGRAPH_OPS[node.op_type]
                                   for name in (node.attrs.get(key) or {}).get("outer", [])))
        node.inputs = (node.inputs[:1] if node.op_type == "If" else node.inputs) + outer
        node.attrs["outer"] = outer
    return node


def _branch(graph: onnx.GraphProto) -> dict:
    """A subgraph (If branch, Loop body): its formal inputs, nodes in order, initializers, output names and
    the outer tensors it reads."""
    nodes = [_node(proto, index) for index, proto in enumerate(graph.node)]
    initializers = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    inputs = [i.name for i in graph.input]
    produced = set(initializers) | set(inputs) | {name for node in nodes for name in node.outputs}
    outer = [name for node in nodes for name in node.inputs if name and name not in produced]
    outer += [o.name for o in graph.output if o.name not in produced]  # an output passed straight through
    return {"inputs": inputs, "nodes": nodes, "initializers": initializers,
            "outputs": [o.name for o in graph.output], "outer": list(dict.fromkeys(outer))}


def _topological(nodes: list[Node], available: set[str]) -> list[Node]:
    ready = set(available)
    pending, ordered = list(nodes), []
    while pending:
        remaining = []
        for node in pending:
            if all(not name or name in ready for name in node.inputs):
                ordered.append(node)
                ready.update(node.outputs)
            else:
                remaining.append(node)
        if len(remaining) == len(pending):
            missing = sorted({n for node in remaining for n in node.inputs if n and n not in ready})
            raise BadInputError(f"graph is not a DAG or reads undefined tensors: {', '.join(missing[:10])}")
        pending = remaining
    return ordered


def check_supported(nodes: list[Node]) -> None:
    """Raise one error naming every op type (and its nodes) the engine cannot run, before any compute."""
    unsupported: dict[str, list[str]] = {}
    pending = list(nodes)
    while pending:
        node = pending.pop(0)
        if spec_of(node.op_type, node.domain) is None:
            key = registry_key(node.op_type, node.domain)
            unsupported.setdefault(key, []).append(node.name)
        if node.op_type in SUBGRAPH_OPS:  # the subgraphs' ops too
            pending += [inner for key in SUBGRAPH_OPS[node.op_type] for inner in node.attrs[key]["nodes"]]
    if unsupported:
        raise UnsupportedOpError(unsupported)


def _dynamic_tensors(nodes: list[Node], inputs: list[TensorInfo]) -> set[str]:
    """Tensors whose value depends on the graph inputs' data (not only their shapes)."""
    dynamic = {info.name for info in inputs}
    for node in nodes:
        if node.op_type in SHAPE_ONLY_OPS:
            continue
        if any(name in dynamic for name in node.inputs):
            dynamic.update(node.outputs)
    return dynamic


def _controlled_by_data(node: Node, dynamic: set[str]) -> bool:
    """Whether an If's condition, or a Loop's initial or continue-condition, depends on the input data. A
    Loop body's carried values count as data once any copy's value does (followed to a fixed point)."""
    if node.op_type == "If":
        return node.inputs[0] in dynamic
    if node.op_type != "Loop":
        return False
    if len(node.inputs) > 1 and node.inputs[1] in dynamic:
        return True
    body = node.attrs["body"]
    own = len(node.inputs) - len(node.attrs["outer"])
    carried = node.inputs[2:own]
    data = [name in dynamic for name in carried]
    outer = {name for name in node.attrs["outer"] if name in dynamic}
    while True:
        seeds = outer | {formal for formal, is_data in zip(body["inputs"][2:], data) if is_data}
        inner = _dynamic_tensors(body["nodes"], [TensorInfo(name, None, np.dtype(np.float32)) for name in seeds])
        grown = [is_data or out in inner for is_data, out in zip(data, body["outputs"][1:])]
        if grown == data:
            return body["outputs"][0] in inner
        data = grown


def _split_params(nodes, tensors: dict[str, np.ndarray], dynamic: set[str]):
    """Float tensors read by data-dependent computation (outside static slots) are parameters."""
    params, constants = {}, {}
    param_names = set()
    for node in nodes:
        if not any(out in dynamic for out in node.outputs):
            continue
        static_slots = spec_of(node.op_type, node.domain).static_inputs
        for slot, name in enumerate(node.inputs):
            if name in tensors and slot not in static_slots and np.issubdtype(tensors[name].dtype, np.floating):
                param_names.add(name)
    for name, value in tensors.items():
        (params if name in param_names else constants)[name] = value
    return params, constants


def _fold_weight_dequantize(nodes: list[Node], tensors: dict[str, np.ndarray], sources: dict[str, str],
                            opset: int) -> tuple[list[Node], dict[str, QuantizedParam]]:
    """A QDQ-quantized model stores each weight and bias as integers read by a DequantizeLinear. Such a
    DequantizeLinear (integer initializer read by it alone, constant scale and zero point, per tensor, axis or block) is
    folded: its output becomes a float tensor, (q - zero_point) * scale, so the layer reading it has a
    float weight like any other; the `QuantizedParam` says how to write a changed value back."""
    readers: dict[str, int] = {}
    for node in nodes:
        for name in node.inputs:
            readers[name] = readers.get(name, 0) + 1
    kept, quantized = [], {}
    for node in nodes:
        source = node.inputs[0] if node.op_type == "DequantizeLinear" and node.inputs else None
        slots = [name for name in node.inputs[1:3] if name]
        foldable = (source in tensors and readers.get(source) == 1 and all(name in tensors for name in slots)
                    and is_integer_type(tensors[source].dtype) and np.dtype(tensors[source].dtype).itemsize <= 4)
        if not foldable:
            kept.append(node)
            continue
        q = tensors[source]
        scale = np.asarray(tensors[node.inputs[1]], np.float32)
        zero = (np.asarray(tensors[node.inputs[2]]) if len(node.inputs) > 2 and node.inputs[2]
                else np.zeros((), q.dtype))
        axis = int(node.attrs.get("axis", 1)) if opset >= 13 else 1
        param = QuantizedParam(source, scale, zero, axis, np.dtype(q.dtype), int(node.attrs.get("block_size", 0)))
        tensors[node.outputs[0]] = param.dequantize(q)
        sources[node.outputs[0]] = "dequantized"
        quantized[node.outputs[0]] = param
    return kept, quantized


# Ops computing with an integer weight in slot 1 (zero point in slot 3), and the weight axis a per-channel
# scale runs along: onnxruntime's dynamic quantization writes these.
INTEGER_WEIGHT_OPS = {"MatMulInteger": -1, "ConvInteger": 0}
# onnxruntime's dynamically quantized fusions with an int8 weight in slot 1: its scale and zero point slots.
SCALED_WEIGHT_OPS = {"DynamicQuantizeMatMul": (2, 3), "QAttention": (4, 7)}
# Quantized operators (onnxruntime's QOperator format): weight slot (its scale and zero point follow it),
# bias slot (int32, scale input scale x weight scale) or None.
QLINEAR_WEIGHT_OPS = {"QLinearConv": (3, 8), "QLinearMatMul": (3, None), "QGemm": (3, 6)}


def _integer_weight_scale(node: Node, producers: dict[str, Node], consumers: dict[str, list[Node]],
                          tensors: dict[str, np.ndarray]) -> np.ndarray | None:
    """The weight's scale in onnxruntime's dynamic quantization pattern: the integer result is cast to
    float and multiplied by Mul(input scale, weight scale), the weight scale a float initializer. None
    when the graph reads otherwise."""
    readers = consumers.get(node.outputs[0], [])
    if len(readers) != 1 or readers[0].op_type != "Cast":
        return None
    cast_output = readers[0].outputs[0]
    muls = consumers.get(cast_output, [])
    if len(muls) != 1 or muls[0].op_type != "Mul":
        return None
    factor = next((name for name in muls[0].inputs if name != cast_output), None)
    maker = producers.get(factor)
    if maker is None or maker.op_type != "Mul":
        return None
    found = [tensors[name] for name in maker.inputs if name in tensors and np.issubdtype(tensors[name].dtype, np.floating)]
    return np.asarray(found[0], np.float32) if len(found) == 1 else None


def _slot(node: Node, slot: int | None) -> str | None:
    return node.inputs[slot] if slot is not None and len(node.inputs) > slot and node.inputs[slot] else None


def _folded(tensors: dict[str, np.ndarray], name: str, scale: np.ndarray, zero: np.ndarray | None, axis: int,
            readers: dict[str, int]) -> QuantizedParam | None:
    """The integer initializer `name` as a float parameter (q - zero) x scale, per tensor, along `axis`, or
    (a scale and zero point of the weight's rank) broadcast: its QuantizedParam, the float value stored
    under the same name; None when it does not qualify (not an integer initializer read once, a scale or
    zero point of the wrong size, a scale not positive)."""
    q = tensors.get(name)
    if q is None or readers.get(name) != 1 or not np.issubdtype(q.dtype, np.integer) or q.ndim < 1:
        return None
    axis %= q.ndim
    zero = np.zeros((), q.dtype) if zero is None else np.asarray(zero)
    scale = np.asarray(scale, np.float32)
    if not np.all(scale > 0):
        return None

    def shaped(value: np.ndarray) -> np.ndarray | None:
        if value.size == 1:
            return value.reshape(())
        if value.ndim == q.ndim and q.ndim > 1:  # already broadcastable (a recurrent weight's per-column scale)
            return value if np.broadcast_shapes(value.shape, q.shape) == q.shape else None
        return value.reshape(-1) if value.size == q.shape[axis] else None

    scale_shaped, zero_shaped = shaped(scale), shaped(zero)
    if scale_shaped is None or zero_shaped is None:
        return None
    param = QuantizedParam(name, scale_shaped, zero_shaped, axis, np.dtype(q.dtype))
    tensors[name] = param.dequantize(q)
    return param


def _folded_nbits(node: Node, tensors: dict[str, np.ndarray], readers: dict[str, int]) -> NBitsParam | None:
    """A MatMulNBits node's packed 2-, 4- or 8-bit B (read by it alone, constant scales and zero points, no
    g_idx) as a float [K, N] parameter under B's name; its NBitsParam, or None when it does not qualify."""
    b, scales, zeros = _slot(node, 1), _slot(node, 2), _slot(node, 3)
    bits = int(node.attrs.get("bits", 4))
    if (b not in tensors or readers.get(b) != 1 or tensors[b].dtype != np.uint8 or scales not in tensors
            or (zeros is not None and zeros not in tensors) or _slot(node, 4) is not None or bits not in NBITS):
        return None
    k, n, block_size = int(node.attrs["K"]), int(node.attrs["N"]), int(node.attrs["block_size"])
    blocks = -(-k // block_size)
    if tensors[b].size * 8 != n * blocks * block_size * bits:
        return None
    scale, zero = nbits_scales_and_zeros(tensors[scales], tensors.get(zeros) if zeros else None, n, blocks, bits)
    param = nbits_param(b, tensors[b], scale, zero, k, block_size, bits)
    tensors[b] = param.dequantize(tensors[b])
    return param


def _fold_integer_weights(nodes: list[Node], tensors: dict[str, np.ndarray]) -> dict[str, QuantizedParam]:
    """Integer weights read directly by the ops that compute with them, made float parameters under their own
    names, (q - zero point) x scale, so the layer has real-valued weights to score, flip and train:

    * dynamic quantization (onnxruntime's quantize_dynamic): a ConvInteger or MatMulInteger weight, its
      scale found by `_integer_weight_scale` (the node gets it as `weight_unit` to compute in integer
      steps again, ops/quantize.py); onnxruntime's fusions DynamicQuantizeMatMul and QAttention (the packed
      self-attention's weight) with the scale and zero point beside it;
    * the QOperator format: a QLinearConv, QLinearMatMul or QGemm weight with the scale and zero point
      beside it, and its int32 bias (scale: input scale x weight scale); the ops divide by those scales
      (ops/qlinear.py);
    * weight-only quantization: a com.microsoft MatMulNBits weight (2, 4 or 8 bits), unpacked from its blocks
      (`_folded_nbits`; the op multiplies by it as it is, ops/nbits.py).
    The weight is read by that node alone, its zero point and scales constant."""
    readers: dict[str, int] = {}
    for node in nodes:
        for name in node.inputs:
            readers[name] = readers.get(name, 0) + 1
    producers = {out: node for node in nodes for out in node.outputs}
    consumers: dict[str, list[Node]] = {}
    for node in nodes:
        for name in node.inputs:
            consumers.setdefault(name, []).append(node)
    quantized: dict[str, QuantizedParam] = {}
    for node in nodes:
        if node.op_type in INTEGER_WEIGHT_OPS and len(node.inputs) > 1:
            zero_name = _slot(node, 3)
            scale = _integer_weight_scale(node, producers, consumers, tensors)
            if scale is None or (zero_name is not None and zero_name not in tensors):
                continue
            param = _folded(tensors, node.inputs[1], scale, tensors.get(zero_name) if zero_name else None,
                            INTEGER_WEIGHT_OPS[node.op_type], readers)
            if param is not None:
                node.attrs = {**node.attrs, "weight_unit": param.scale}
                quantized[param.source] = param
        elif node.op_type in SCALED_WEIGHT_OPS:  # B or the packed QKV weight, its scale and zero point
            scale, zero = (_slot(node, slot) for slot in SCALED_WEIGHT_OPS[node.op_type])
            if scale in tensors and (zero is None or zero in tensors) and len(node.inputs) > 1:
                param = _folded(tensors, node.inputs[1], tensors[scale], tensors.get(zero) if zero else None, -1,
                                readers)
                if param is not None:
                    quantized[param.source] = param
        elif node.op_type == "DynamicQuantizeLSTM":  # W and R with scales and zero points in slots 8-11
            for weight_slot, scale_slot in ((1, 8), (2, 10)):
                weight, scale, zero = (_slot(node, weight_slot), _slot(node, scale_slot), _slot(node, scale_slot + 1))
                if weight is None or scale not in tensors or (zero is not None and zero not in tensors):
                    continue
                directions = tensors[weight].shape[0] if weight in tensors and tensors[weight].ndim == 3 else 0
                value = np.asarray(tensors[scale], np.float32)
                zero_value = np.asarray(tensors[zero]) if zero else None
                if not directions or value.size not in (1, directions, tensors[weight].size // tensors[weight].shape[1]):
                    continue
                shaped = value if value.size == 1 else value.reshape(directions, 1, -1)
                zero_shaped = (zero_value if zero_value is None or zero_value.size == 1
                               else zero_value.reshape(directions, 1, -1))
                param = _folded(tensors, weight, shaped, zero_shaped, 0, readers)
                if param is not None:
                    quantized[weight] = param
        elif node.op_type == "MatMulNBits":
            param = _folded_nbits(node, tensors, readers)
            if param is not None:
                quantized[param.source] = param
        elif node.op_type in QLINEAR_WEIGHT_OPS:
            weight_slot, bias_slot = QLINEAR_WEIGHT_OPS[node.op_type]
            names = [_slot(node, slot) for slot in (1, weight_slot, weight_slot + 1, weight_slot + 2)]
            x_scale, weight, w_scale, w_zero = names
            if weight is None or any(name is not None and name not in tensors for name in (x_scale, w_scale, w_zero)) \
                    or x_scale is None or w_scale is None:
                continue
            axis = 0 if node.op_type == "QLinearConv" or (node.op_type == "QGemm" and node.attrs.get("transB", 0)) else -1
            scale = np.asarray(tensors[w_scale], np.float32)
            param = _folded(tensors, weight, scale, tensors.get(w_zero) if w_zero else None, axis, readers)
            if param is None:
                continue
            quantized[weight] = param
            bias = _slot(node, bias_slot)
            if bias is not None:
                bias_scale = (np.asarray(tensors[x_scale], np.float32).reshape(()) * scale).astype(np.float32)
                folded_bias = _folded(tensors, bias, bias_scale, None, 0, readers)
                if folded_bias is not None:
                    quantized[bias] = folded_bias
    return quantized


def _activation_node(activation: str, params: list[float], node_name: str, x: str, y: str,
                     tensors: dict[str, np.ndarray], sources: dict[str, str], opset: int) -> Node | None:
    """The standard node for a fused layer's activation (x -> y, `ops.contrib.activation_op`), or None for
    one it cannot be. Clip's bounds become constants named after y (attributes before opset 11)."""
    from .ops.contrib import activation_op

    op = activation_op(activation, params)
    if op is None:
        return None
    op_type, attrs, bounds = op
    if op_type == "Clip" and opset < 11:
        return Node(f"{node_name}::activation", op_type, [x], [y], dict(zip(("min", "max"), bounds)))
    names = []
    for bound, value in zip(("min", "max"), bounds):
        tensors[f"{y}::{bound}"] = np.asarray(value, np.float32)
        sources[f"{y}::{bound}"] = "unfused"
        names.append(f"{y}::{bound}")
    return Node(f"{node_name}::activation", op_type, [x, *names], [y], attrs)


def _unfused(nodes: list[Node], tensors: dict[str, np.ndarray], sources: dict[str, str], opset: int) -> list[Node]:
    """onnxruntime's fused layers (com.microsoft FusedConv, FusedGemm: what its optimiser writes for a
    convolution or Gemm and the activation after it, FusedConv also with an Add's other input Z) split back
    into the standard nodes they stand for, in the IR only: the layer's channels then sit before the
    activation, where a channel edit is what negating or zeroing its weights does (channel neurons, their
    flips and the channel-pruning peers work as on the unoptimised file). The layer node keeps the fused
    node's name; the written file keeps the fused node (graph surgery rewrites initializers only). An
    activation with no standard node stays fused, and its handler refuses it naming the node."""
    result = []
    for node in nodes:
        if node.domain != "com.microsoft" or node.op_type not in ("FusedConv", "FusedGemm"):
            result.append(node)
            continue
        activation = node.attrs.get("activation", "")
        activation = activation.decode() if isinstance(activation, bytes) else str(activation)
        if node.op_type == "FusedConv":
            params = list(node.attrs.get("activation_params") or [])
        else:
            params = [node.attrs[k] for k in ("activation_alpha", "activation_beta") if k in node.attrs]
        output = node.outputs[0]
        z = node.inputs[3] if node.op_type == "FusedConv" and len(node.inputs) > 3 and node.inputs[3] else None
        pre = f"{output}::preact" if activation or z else output
        summed = f"{output}::sum" if z and activation else (output if z else pre)
        act = (_activation_node(activation, params, node.name, summed, output, tensors, sources, opset)
               if activation else None)
        if activation and act is None:
            result.append(node)
            continue
        base = {k: v for k, v in node.attrs.items() if not k.startswith("activation")}
        result.append(Node(node.name, "Conv" if node.op_type == "FusedConv" else "Gemm", node.inputs[:3], [pre], base))
        if z:
            result.append(Node(f"{node.name}::add", "Add", [pre, z], [summed], {}))
        if act is not None:
            result.append(act)
    return result


def load_model(path: str | Path, output: str | None = None) -> Model:
    """Load and validate an ONNX classifier: opset 9-25, supported ops only, at least one float input.

    `output`: the graph output holding the class scores (logits or probabilities); default: the first
    float output (`classifier_output`)."""
    path = Path(path)
    proto = read_model_proto(path)
    return model_from_proto(proto, path, output=output)


def classifier_output(outputs: list[TensorInfo], wanted: str | None, where: str) -> str:
    """The name of the output holding the class scores.

    Exports often carry more than the scores: a predicted label (ArgMax, int64) before the probabilities,
    or features beside the logits. The scores are `wanted` if named, else the first float output; the
    written file keeps its outputs and their order either way (surgery rewrites initializers only)."""
    listing = ", ".join(f"{info.name} ({info.dtype})" for info in outputs)
    if wanted is not None:
        chosen = [info for info in outputs if info.name == wanted]
        if not chosen:
            raise BadInputError(f"{where} has no output {wanted!r}; its outputs: {listing}")
        if not np.issubdtype(chosen[0].dtype, np.floating):
            raise BadInputError(f"output {wanted!r} of {where} is {chosen[0].dtype}, not class scores; "
                                f"name a float output (its outputs: {listing})")
    else:
        chosen = [info for info in outputs if np.issubdtype(info.dtype, np.floating)][:1]
        if not chosen:
            raise BadInputError(f"{where} has no float output to read class scores from (its outputs: {listing})")
    return chosen[0].name


def model_from_proto(proto: onnx.ModelProto, path: Path | None = None, output: str | None = None) -> Model:
    """Build the IR from an in-memory ModelProto (external data already loaded); `output` as in
    `load_model`."""
    where = str(path) if path else "the model"
    opset = default_opset(proto)
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise BadInputError(f"{where} uses opset {opset}; supported default-domain opsets are "
                            f"{MIN_OPSET} to {MAX_OPSET}")
    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception as exc:
        warnings.warn(f"shape inference failed on {where}: {exc}", stacklevel=2)
        inferred = proto
    try:
        onnx.checker.check_model(inferred)
    except Exception as exc:
        raise BadInputError(f"{where} fails onnx.checker: {str(exc).splitlines()[0]}") from exc
    graph = proto.graph

    tensors = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    sources = {name: "initializer" for name in tensors}
    nodes: list[Node] = []
    for index, node_proto in enumerate(graph.node):
        nodes.append(_node(node_proto, index))
    check_supported(nodes)

    kept: list[Node] = []
    for node in nodes:
        if node.op_type == "Constant" and not node.inputs:
            from .ops.registry import OpContext

            value = REGISTRY["Constant"].fn([], node.attrs, OpContext(opset, node.name, 1))
            tensors[node.outputs[0]] = np.asarray(value)
            sources[node.outputs[0]] = "constant_node"
        else:
            kept.append(node)

    kept, quantized = _fold_weight_dequantize(kept, tensors, sources, opset)
    quantized.update(_fold_integer_weights(kept, tensors))
    kept = _unfused(kept, tensors, sources, opset)

    inputs = [_tensor_info(v) for v in graph.input if v.name not in tensors]
    outputs = [_tensor_info(v) for v in inferred.graph.output]
    scores_output = classifier_output(outputs, output, where)
    if not inputs or not any(np.issubdtype(info.dtype, np.floating) or info.dtype in IMAGE_INT_TYPES
                             for info in inputs):
        raise BadInputError(f"{where} has no float or 8/16-bit integer image input: a classifier takes a "
                            f"float tensor or pixels (inputs: {[(i.name, str(i.dtype)) for i in inputs]})")
    ordered = _topological(kept, set(tensors) | {i.name for i in inputs})
    dynamic = _dynamic_tensors(ordered, inputs)
    params, constants = _split_params(ordered, tensors, dynamic)
    data_control = tuple(node.name for node in ordered if _controlled_by_data(node, dynamic))
    param_dtypes = {name: value.dtype for name, value in params.items() if value.dtype != np.float32}
    params = {name: value.astype(np.float32) for name, value in params.items()}  # computed in float32
    value_info = {v.name: _tensor_info(v) for v in list(inferred.graph.value_info) + list(graph.output)}
    return Model(path=path, opset=opset, nodes=ordered, params=params, constants=constants, inputs=inputs,
                 outputs=outputs, value_info=value_info,
                 param_sources={name: sources[name] for name in params},
                 producer=f"{proto.producer_name} {proto.producer_version}".strip(), scores_output=scores_output,
                 param_dtypes=param_dtypes, quantized={name: q for name, q in quantized.items() if name in params},
                 data_control=data_control)
