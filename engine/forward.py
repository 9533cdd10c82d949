"""The JAX forward pass of a loaded model: pure, jit-compilable, differentiable, with taps and edits.

`apply(params, inputs, taps=(), edits=None)` runs the graph node by node through the op registry.
`taps` names intermediate tensors to return; `edits` rewrites intermediate tensors as they are produced
(`a -> a * scale + shift`, with per-channel vectors applied along the tensor's channel axis), which is
what ablation (scale 0), flipping (scale -1) and gradients with respect to activations (shift) need,
without rebuilding or re-tracing the graph for new edit values.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .allocator import tune_allocator
from .errors import BadInputError, LancetError, NodeFailedError
from .ir import Model
from .ops import OpContext, spec_of
from .ops.fused import conv_relu_max_pool, find_conv_relu_pools

# Op types whose output channels live on axis 1 (NCHW-style) rather than on the last axis.
CHANNEL_FIRST_OPS = {"Conv", "ConvInteger", "ConvTranspose", "BatchNormalization", "InstanceNormalization", "MaxPool",
                     "AveragePool", "GlobalAveragePool", "GlobalMaxPool"}


class Edit(NamedTuple):
    """`a -> a * scale + shift`; a 1-D array of the channel count acts along the channel axis."""

    scale: Any = None
    shift: Any = None


def channel_axis(model: Model, tensor: str) -> int:
    """The axis that holds a tensor's channels: 1 after convolution-like ops, else the last axis."""
    node = model.producer_of().get(tensor)
    return 1 if node is not None and node.op_type in CHANNEL_FIRST_OPS else -1


def _along(vector: Any, value: Any, axis: int) -> Any:
    vector = jnp.asarray(vector)
    if vector.ndim != 1 or value.ndim < 2:
        return vector
    shape = [1] * value.ndim
    shape[axis] = vector.shape[0]
    return vector.reshape(shape)


def apply_edit(value: Any, edit: Edit, axis: int) -> Any:
    """Apply one Edit to a tensor."""
    if edit.scale is not None:
        value = value * _along(edit.scale, value, axis)
    if edit.shift is not None:
        value = value + _along(edit.shift, value, axis)
    return value


def live_tensors(model: Model, start: int) -> list[str]:
    """Tensors computed before node `start` (or graph inputs) that node `start` onwards, or the outputs, read.

    Given these, the graph from node `start` on can run without its prefix (`build_apply(model, start)`).
    """
    produced = {info.name for info in model.inputs}
    for node in model.nodes[:start]:
        produced.update(node.outputs)
    needed = {name for node in model.nodes[start:] for name in node.inputs if name}
    needed.update(info.name for info in model.outputs)
    return [name for name in dict.fromkeys(list(produced)) if name in needed]


def build_apply(model: Model, start: int = 0,
                static: Mapping[str, np.ndarray] | None = None) -> Callable[..., dict[str, Any]]:
    """Return the pure function `apply(params, inputs, taps=(), edits=None) -> {name: array}`.

    The result holds every graph output and every tapped tensor. `inputs` is a mapping of input name to
    array, or one array for a single-input model. Wrap it in `jax.jit(..., static_argnames="taps")`.
    With `start` > 0 only nodes from `start` on run and `inputs` maps `live_tensors(model, start)` to
    their values (a cached prefix: what the per-layer ablation search reuses for every candidate);
    `static` gives those of them that are the same for every batch (shape arithmetic a later Reshape
    needs as a constant), held as constants rather than passed in `inputs`. Any number of inputs, also
    for a graph that hard-codes its file's fixed batch (`over_fixed_batch`).
    """
    fixed = static_batch(model)
    if model.batch_coupled:  # each input alone (its own quantization range or branch): groups of one
        return over_fixed_batch(_graph_apply(model, start, static, fuse=False), fixed or 1)
    if fixed is None or not hard_codes_batch(model):
        return _graph_apply(model, start, static)
    return over_fixed_batch(_graph_apply(model, start, static, fuse=False), fixed)


def _graph_apply(model: Model, start: int = 0, static: Mapping[str, np.ndarray] | None = None,
                 fuse: bool = True) -> Callable[..., dict[str, Any]]:
    """`build_apply` on the graph as written: on the batch sizes the graph itself allows. `fuse`: run
    Conv -> Relu -> MaxPool chains as one op where they qualify (ops/fused.py)."""
    nodes = list(model.nodes)[start:]
    static = dict(static or {})
    constants = {**model.constants, **static}
    specs = [spec_of(node.op_type, node.domain) for node in nodes]
    contexts = [OpContext(model.opset, node.name, len(node.outputs)) for node in nodes]
    output_names = [info.name for info in model.outputs]
    input_names = ([info.name for info in model.inputs] if start == 0
                   else [name for name in live_tensors(model, start) if name not in static])
    producers = model.producer_of()
    axes = {name: (1 if node.op_type in CHANNEL_FIRST_OPS else -1) for name, node in producers.items()}
    known = set(producers) | set(input_names) | set(model.params) | set(constants)
    chains = find_conv_relu_pools(model, nodes) if fuse else {}

    def apply(params: Mapping[str, Any], inputs: Any, taps: Sequence[str] = (),
              edits: Mapping[str, Edit] | None = None) -> dict[str, Any]:
        if not isinstance(inputs, Mapping):
            if len(input_names) != 1:
                raise BadInputError(f"the model has inputs {input_names}: pass a mapping name -> array")
            inputs = {input_names[0]: inputs}
        edits = edits or {}
        for name in list(taps) + list(edits):
            if name not in known:
                raise BadInputError(f"no tensor named {name!r} in the model")
        env: dict[str, Any] = dict(constants)
        env.update({name: jnp.asarray(value) for name, value in params.items()})
        env.update({name: jnp.asarray(value) for name, value in inputs.items()})
        for name in input_names if start == 0 else ():  # a cached prefix already carries its edits
            if name in edits:
                env[name] = apply_edit(env[name], edits[name], 1)
        fused: set[int] = set()  # the Relu and MaxPool positions a fused chain has already computed
        for index, (node, spec, ctx) in enumerate(zip(nodes, specs, contexts)):
            if index in fused:
                continue
            args = [env[name] if name else None for name in node.inputs]
            chain = chains.get(index)
            if chain is not None and not {node.outputs[0], nodes[chain.relu].outputs[0]} & (set(taps) | set(edits)):
                pool = nodes[chain.pool]
                value = conv_relu_max_pool(*args[:2], args[2] if len(args) > 2 else None, node.attrs, pool.attrs)
                if value is not None:
                    name = pool.outputs[0]
                    env[name] = apply_edit(value, edits[name], 1) if name in edits else value
                    fused.update((chain.relu, chain.pool))
                    continue
            try:
                result = spec.fn(args, node.attrs, ctx)
            except LancetError:
                raise
            except Exception as exc:  # noqa: BLE001 - shape and attribute errors surface at trace time
                shapes = ", ".join(str(tuple(np.shape(a))) if a is not None else "-" for a in args)
                raise NodeFailedError(f"node {node.name!r} ({node.op_type}) cannot run on inputs of shapes "
                                      f"{shapes}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                                      ) from exc
            results = result if isinstance(result, (tuple, list)) else (result,)
            for name, value in zip(node.outputs, results):
                if name in edits:
                    value = apply_edit(value, edits[name], axes.get(name, -1))
                env[name] = value
        wanted = list(dict.fromkeys(output_names + list(taps)))
        return {name: jnp.asarray(env[name]) for name in wanted}

    return apply


def static_batch(model: Model) -> int | None:
    """The batch size the file fixes on every graph input (an exporter's default without a dynamic
    axis), or None when any input leaves it free."""
    sizes = {info.shape[0] if info.shape else None for info in model.inputs}
    if len(sizes) != 1:
        return None
    size = sizes.pop()
    return size if isinstance(size, int) and size > 0 else None


def hard_codes_batch(model: Model) -> bool:
    """Whether a graph with a fixed input batch b computes with it: traced (shapes only) on b and on 2b
    inputs, some tensor does not simply double its leading b (a Reshape to [1, -1] gives [1, 256] and
    [1, 512]) or the trace fails. Such a graph runs through `over_fixed_batch`; the others, whose file
    merely declares the batch, run on any batch as they are. Decided once per model (both traces are
    cheap next to a compilation) and remembered on it."""
    cached = model.__dict__.get("_hard_codes_batch")
    if cached is not None:
        return cached
    batch = static_batch(model)
    shapes = [info.shape for info in model.inputs]
    if batch is None or any(not all(isinstance(d, int) for d in shape[1:]) for shape in shapes):
        verdict = batch is not None  # unknown sizes besides the batch: assume the worst
    else:
        apply = _graph_apply(model)
        names = tuple(dict.fromkeys(name for node in model.nodes for name in node.outputs if name))
        params = {name: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype) for name, v in model.params.items()}

        def traced(n: int) -> dict:  # inputs as the engine feeds them: float32 (integer pixels too)
            inputs = {info.name: jax.ShapeDtypeStruct((n, *info.shape[1:]), np.float32) for info in model.inputs}
            return jax.eval_shape(lambda p, x: apply(p, x, taps=names), params, inputs)

        try:
            one, two = traced(batch), traced(2 * batch)
            doubled = {name: (2 * batch, *one[name].shape[1:]) if one[name].shape[:1] == (batch,) else None
                       for name in one}
            verdict = any(two[name].shape not in (one[name].shape, doubled[name]) for name in one)
        except Exception:  # noqa: BLE001 - any failure on 2b inputs means the graph is tied to b
            verdict = True
    model.__dict__["_hard_codes_batch"] = verdict
    return verdict


def over_fixed_batch(apply: Callable[..., dict[str, Any]], batch: int) -> Callable[..., dict[str, Any]]:
    """`apply` for any number of inputs on a graph written for exactly `batch` of them.

    A graph exported with a fixed batch may hard-code it (PyTorch's `x.view(x.size(0), -1)` becomes a
    Reshape to [1, -1]), so it cannot simply run on more inputs. The inputs are split into groups of
    `batch` (the last zero-padded) and the graph is `jax.vmap`ped over the groups, which XLA runs as one
    batched computation. Returned tensors whose graph shape leads with `batch` are joined back into one
    batch axis; the others (shape arithmetic, parameters) are the same for every group and returned once.
    Edits with a per-input array (rank >= 2, leading axis the number of inputs) are split with the inputs;
    per-channel vectors are shared."""

    def per_input(array: Any, n: int) -> bool:
        return array is not None and np.ndim(array) >= 2 and np.shape(array)[0] == n

    def apply_any(params: Mapping[str, Any], inputs: Any, taps: Sequence[str] = (),
                  edits: Mapping[str, Edit] | None = None) -> dict[str, Any]:
        single = not isinstance(inputs, Mapping)
        named = {None: inputs} if single else dict(inputs)  # key None: the one unnamed input array
        n = int(np.shape(next(iter(named.values())))[0])
        if n == batch:
            return apply(params, inputs, taps=taps, edits=edits)
        groups = -(-n // batch)

        def split(array: Any) -> Any:
            array = jnp.asarray(array)
            if groups * batch != n:
                array = jnp.pad(array, [(0, groups * batch - n)] + [(0, 0)] * (array.ndim - 1))
            return array.reshape(groups, batch, *array.shape[1:])

        edits = dict(edits or {})
        split_edits = {name: Edit(*(split(a) if per_input(a, n) else None for a in edit))
                       for name, edit in edits.items() if any(per_input(a, n) for a in edit)}

        def one_group(group_inputs, group_edits):
            merged = {name: Edit(*(g if g is not None else a for a, g in zip(edit, group_edits[name])))
                      if name in group_edits else edit for name, edit in edits.items()}
            return apply(params, group_inputs[None] if single else group_inputs, taps=taps, edits=merged)

        out = jax.vmap(one_group)({k: split(v) for k, v in named.items()}, split_edits)
        return {name: value.reshape(groups * batch, *value.shape[2:])[:n]
                if value.ndim >= 2 and value.shape[1] == batch else value[0] for name, value in out.items()}

    return apply_any


CLOSED_KERNEL_BYTES = 128 << 20  # own-weights forward: convolution kernels up to this many bytes as constants


def _xla_conv_kernels(model: Model, params: Mapping[str, Any]) -> set[str]:
    """Parameters that are only ever the kernel of group-1 Convs off the shifted-sum path (whose fusion
    barrier reads its kernel; depthwise kernels likewise stay out)."""
    from .ops.nn import shifted_sum_conv

    readers = model.consumers_of()
    return {name for name, value in params.items()
            if value.ndim == 4 and readers.get(name) and all(
                node.op_type == "Conv" and node.inputs[1] == name and node.attrs.get("group", 1) == 1
                and not shifted_sum_conv(value, 1) for node in readers[name])}


def label_threshold(model: Model) -> float:
    """For a one-column classifier output (two classes): the value above which it means class 1, 0.5 for a
    Sigmoid's probability and 0 for a raw logit."""
    producer = model.producer_of().get(model.output.name)
    return 0.5 if producer is not None and producer.op_type == "Sigmoid" else 0.0


def class_scores(output: Any) -> Any:
    """A classifier output as [n, classes]: a head that keeps singleton axes beside the classes (a 1 x 1
    convolution and global pool without Flatten: [n, C, 1, 1], or [n, 1, 1, C] channels-last) flattened.
    An output with more than one axis beyond the batch (a feature map; no classifier's, `case.num_classes`)
    is returned as it is."""
    if output.ndim == 2 or sum(size > 1 for size in output.shape[1:]) > 1:
        return output
    return output.reshape(output.shape[0], -1)


def output_labels(output: Any, threshold: float) -> Any:
    """Class labels of classifier outputs [n, classes] (`class_scores`): the arg-max, or with one column (a
    two-class model with one sigmoid or logit output) class 1 where it exceeds `threshold`."""
    xp_ = np if isinstance(output, np.ndarray) else jnp
    output = class_scores(output)
    if output.ndim == 2 and output.shape[-1] == 1:
        return (output[:, 0] > threshold).astype(xp_.int32)
    return xp_.argmax(output, axis=-1)


class Forward:
    """A model's forward pass, jitted once per set of taps (and per input shape, by jax.jit itself)."""

    def __init__(self, model: Model):
        tune_allocator()  # XLA's per-call buffers on CPU (engine/allocator.py)
        self.model = model
        self.params = {name: jnp.asarray(value) for name, value in model.params.items()}
        self.apply = build_apply(model)
        self._jitted = jax.jit(self.apply, static_argnames=("taps",))
        self.output_name = model.output.name
        self.threshold = label_threshold(model)  # a one-column output's class-1 threshold (output_labels)
        self._own: tuple | None = None  # (params it was built for, own-weights forward, its constants, the rest)

    def __call__(self, inputs: Any, taps: Sequence[str] = (), edits: Mapping[str, Edit] | None = None,
                 params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Run the jitted forward on `inputs` (default params unless given)."""
        if params is None or params is self.params:  # the own weights: one compiled forward for both
            own, free = self._own_weights()
            return own(free, inputs, taps=tuple(taps), edits=edits)
        return self._jitted(params, inputs, taps=tuple(taps), edits=edits)

    def _own_weights(self) -> tuple[Any, dict[str, Any]]:
        """The forward with the model's own weights, its convolution kernels closed over as constants (on
        CPU): XLA then lays them out once at compile time instead of on every call (median of 7 alternating
        rounds, two A/Bs: ResNet-18 at 64 inputs 300 -> 260 and 333 -> 280 ms, 1.51x -> 1.31x and 1.53x ->
        1.28x onnxruntime's time; DenseNet-small 27.3 -> 25.3 ms; VGG-11 8.8 -> 8.7 ms; LeNet-5 and
        MobileNetV2-small unchanged). Shifted-sum
        kernels stay arguments: their fusion barrier reads them, and folded away it made LeNet-5's forward
        1.9 -> 3.1 ms; so does everything beyond CLOSED_KERNEL_BYTES (each compiled variant embeds its own
        copy). Returns the jitted function and the parameters it takes as arguments."""
        key = tuple((name, id(value)) for name, value in self.params.items())
        if self._own is None or self._own[0] != key:
            kernels = _xla_conv_kernels(self.model, self.params) if jax.default_backend() == "cpu" else set()
            closed = {name: self.params[name] for name in kernels}
            if sum(v.nbytes for v in closed.values()) > CLOSED_KERNEL_BYTES:
                closed = {}

            def own(free, inputs, taps=(), edits=None):
                return self.apply({**free, **closed}, inputs, taps=taps, edits=edits)

            free = {name: value for name, value in self.params.items() if name not in closed}
            self._own = key, jax.jit(own, static_argnames=("taps",)), closed, free
        return self._own[1], self._own[3]

    def logits(self, x: Any, params: Mapping[str, Any] | None = None,
               edits: Mapping[str, Edit] | None = None) -> Any:
        """The class scores (logits or probabilities, `Model.output`) for one input batch, [n, classes]."""
        return class_scores(self(x, edits=edits, params=params)[self.output_name])

    def predict(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Labels (`output_labels`) for a numpy batch, computed in fixed-size chunks (one compile per chunk
        shape)."""
        labels = []
        for start in range(0, len(x), batch_size):
            labels.append(np.asarray(output_labels(self.logits(x[start:start + batch_size]), self.threshold)))
        return np.concatenate(labels) if labels else np.zeros(0, np.int64)
