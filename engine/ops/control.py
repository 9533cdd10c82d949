"""Control flow: If, and Loop and Scan unrolled where their number of iterations is known at trace time.

Exporters write Ifs around shape checks (TorchScript's LocalResponseNorm tests the input's rank); the
condition then folds to a constant from shapes alone and jit sees one straight-line graph. An If on the
data (torch.cond) runs both branches and selects their outputs (`if_`).

tf2onnx writes a Keras recurrent layer it has no rewrite for (GRU, SimpleRNN) as a Loop over the time
steps, with a trip count and a continue-condition computed from shapes and counters. Such a Loop is
unrolled: the body runs once per iteration with the iteration number as a constant, so its condition
folds and the loop ends exactly where onnxruntime's does; carried values flow from one copy to the next
and scan outputs are stacked. A condition on the data (torch.while_loop) is followed with a running flag
(`loop`); a trip count on the data is refused, naming the node. Scan is unrolled the same way over its
scan axis (its length a shape). The loader lists the outer tensors the subgraphs read (`loader._node`),
so they arrive here as inputs after the node's own.
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from .registry import OpContext, is_static, register, spec_of, static_array

MAX_UNROLLED_ITERATIONS = 10_000  # a Loop on a condition alone that never folds to false is refused past this
MAX_DATA_ITERATIONS = 1_000  # copies unrolled once the condition reads the data (each one compiled)


def _run_graph(graph: dict, env: dict[str, Any], ctx: OpContext) -> list[Any]:
    """Run a subgraph's nodes on `env` (outer tensors and bound formal inputs); its outputs in order."""
    env = {**env, **graph["initializers"]}
    for node in graph["nodes"]:
        args = [env[name] if name else None for name in node.inputs]
        result = spec_of(node.op_type, node.domain).fn(args, node.attrs, OpContext(ctx.opset, node.name, len(node.outputs)))
        env.update(zip(node.outputs, result if isinstance(result, (tuple, list)) else (result,)))
    return [env[name] for name in graph["outputs"]]


@register("If", static_inputs=(0,))
def if_(inputs, attrs, ctx):
    """If. A condition known at trace time runs its branch alone. One that depends on the data (PyTorch's
    torch.cond, as its dynamo exporter writes it) runs both branches and selects each output with
    `jnp.where`, which equals the taken branch and differentiates through it; this needs both branches'
    outputs of one shape and dtype, else the node is refused, naming it."""
    outer = dict(zip(attrs["outer"], inputs[1:]))
    condition = inputs[0]
    if is_static(condition):
        branch = attrs["then_branch" if bool(np.asarray(condition).reshape(-1)[0]) else "else_branch"]
        values = _run_graph(branch, outer, ctx)
        return values[0] if len(values) == 1 else tuple(values)
    from ..errors import BadInputError

    if int(np.size(condition)) != 1:
        raise BadInputError(f"node {ctx.node_name!r} (If): its condition has shape {tuple(np.shape(condition))}; "
                            "ONNX needs a single element")
    taken = jnp.reshape(condition, ()).astype(bool)
    then_values = _run_graph(attrs["then_branch"], outer, ctx)
    else_values = _run_graph(attrs["else_branch"], outer, ctx)
    selected = []
    for index, (a, b) in enumerate(zip(then_values, else_values)):
        if np.shape(a) != np.shape(b) or jnp.result_type(a) != jnp.result_type(b):
            raise BadInputError(
                f"node {ctx.node_name!r} (If): its condition depends on the input data and its output {index} "
                f"differs between the branches (then {tuple(np.shape(a))} {jnp.result_type(a)}, else "
                f"{tuple(np.shape(b))} {jnp.result_type(b)}); the engine runs such an If only when both "
                "branches give outputs of one shape and dtype")
        selected.append(jnp.where(taken, a, b))
    return selected[0] if len(selected) == 1 else tuple(selected)


@register("Loop", static_inputs=(0,))
def loop(inputs, attrs, ctx):
    """Loop, unrolled. While the continue-condition is known at trace time the body runs as is. Once it
    depends on the data (torch.while_loop's test on a carried tensor) each further copy's carried values
    are selected with `jnp.where`: the new ones while the loop still runs, the old ones once it has stopped,
    so the result equals onnxruntime's stopping point. Copies go on until the trip count, or until the
    condition folds to false from counters alone (`elementwise._logical`); a loop on the data with neither
    bound, or with scan outputs (their length would depend on the data), is refused, naming the node."""
    from ..errors import BadInputError

    body = attrs["body"]
    own = len(inputs) - len(attrs["outer"])
    outer = dict(zip(attrs["outer"], inputs[own:]))
    trips = None if inputs[0] is None else int(static_array(inputs[0], "the Loop trip count", ctx).reshape(-1)[0])
    condition = True if own < 2 or inputs[1] is None else inputs[1]
    running = _known(condition)  # True / False at trace time, or a traced boolean scalar
    carried = final = list(inputs[2:own])
    scan_count = len(body["outputs"]) - 1 - len(carried)
    scanned: list[list[Any]] = []
    iteration = 0
    while running is not False and (trips is None or iteration < trips):
        if trips is None and iteration >= MAX_UNROLLED_ITERATIONS:
            raise BadInputError(f"node {ctx.node_name!r} (Loop): no trip count and its condition still holds "
                                f"after {MAX_UNROLLED_ITERATIONS} iterations")
        if running is not True and iteration >= MAX_DATA_ITERATIONS:
            raise BadInputError(f"node {ctx.node_name!r} (Loop): its continue-condition depends on the input data "
                                f"and no trip count or counter ends it within {MAX_DATA_ITERATIONS} iterations; the "
                                "engine unrolls loops, each iteration a copy of the body")
        if running is not True and scan_count:
            raise BadInputError(f"node {ctx.node_name!r} (Loop): its continue-condition depends on the input "
                                "data and it has scan outputs, whose length would depend on the data too")
        formal = [np.array(iteration, np.int64), np.array(True) if running is True else running] + carried
        values = _run_graph(body, {**outer, **dict(zip(body["inputs"], formal))}, ctx)
        new = values[1:1 + len(carried)]
        if running is True:
            carried = final = new
        else:  # once stopped, a copy keeps the values it had; counters (static) feed on unmasked, so the
            # condition can still fold from them, while the result takes the value at the stop
            final = [jnp.where(running, n, f) for n, f in zip(new, final)]
            carried = [n if is_static(n) and is_static(c) else f for n, c, f in zip(new, carried, final)]
        scanned.append(values[1 + len(carried):])
        step = _known(values[0])
        running = step if running is True or step is False else (
            running if step is True else jnp.logical_and(running, jnp.reshape(values[0], ()).astype(bool)))
        iteration += 1
    if not scanned and scan_count:
        raise BadInputError(f"node {ctx.node_name!r} (Loop): runs no iteration, so its scan outputs have no "
                            "known shape")
    stacked = [(np.stack if all(is_static(v) for v in column) else jnp.stack)(list(column))
               for column in zip(*scanned)] if scanned else []
    results = list(final) + stacked
    return results[0] if len(results) == 1 else tuple(results)


def _known(condition: Any) -> Any:
    """A Loop condition as Python True / False when known at trace time, else as a traced boolean scalar."""
    if is_static(condition):
        return bool(np.asarray(condition).reshape(-1)[0])
    return jnp.reshape(condition, ()).astype(bool)


@register("Scan")
def scan(inputs, attrs, ctx):
    """Scan (opset 9+), unrolled like Loop: the body runs once per slice of the scan inputs along their
    scan axes (backwards for direction 1), the states carried from one copy to the next; the scan outputs'
    slices are stacked along their axes (in reverse for direction 1). The scan length comes from a shape,
    so the number of copies is known at trace time."""
    from ..errors import BadInputError

    body = attrs["body"]
    count = int(attrs["num_scan_inputs"])
    own = len(inputs) - len(attrs["outer"])
    outer = dict(zip(attrs["outer"], inputs[own:]))
    states, scanned_in = list(inputs[: own - count]), list(inputs[own - count:own])
    in_axes = list(attrs.get("scan_input_axes") or [0] * count)
    in_directions = list(attrs.get("scan_input_directions") or [0] * count)
    lengths = {int(np.shape(value)[axis]) for value, axis in zip(scanned_in, in_axes)}
    if len(lengths) != 1:
        raise BadInputError(f"node {ctx.node_name!r} (Scan): scan inputs of different lengths {sorted(lengths)}")
    length = lengths.pop()
    outputs_per_step: list[list[Any]] = []
    for step in range(length):
        slices = []
        for value, axis, direction in zip(scanned_in, in_axes, in_directions):
            index = length - 1 - step if direction else step
            m = np if is_static(value) else jnp
            slices.append(m.take(value, index, axis=axis % np.ndim(value)))
        values = _run_graph(body, {**outer, **dict(zip(body["inputs"], states + slices))}, ctx)
        states = values[: len(states)]
        outputs_per_step.append(values[len(states):])
    k = len(body["outputs"]) - len(states)
    out_axes = list(attrs.get("scan_output_axes") or [0] * k)
    out_directions = list(attrs.get("scan_output_directions") or [0] * k)
    stacked = []
    for column, axis, direction in zip(zip(*outputs_per_step), out_axes, out_directions):
        column = list(column)[::-1] if direction else list(column)
        m = np if all(is_static(v) for v in column) else jnp
        stacked.append(m.stack(column, axis=axis % (np.ndim(column[0]) + 1)))
    results = states + stacked
    return results[0] if len(results) == 1 else tuple(results)
