"""If with a condition known at trace time: the branch it picks runs inline.

Exporters write such Ifs around shape checks (TorchScript's LocalResponseNorm tests the input's rank); the
condition then folds to a constant from shapes alone and jit sees one straight-line graph. A condition
that depends on the input data is refused, naming the node. The loader lists the outer tensors the
branches read after the condition (`loader._node`), so they arrive here as inputs.
"""
from __future__ import annotations

from .registry import REGISTRY, OpContext, register, static_array


@register("If", static_inputs=(0,))
def if_(inputs, attrs, ctx):
    condition = static_array(inputs[0], "the If condition", ctx)
    branch = attrs["then_branch" if bool(condition.reshape(-1)[0]) else "else_branch"]
    env = dict(zip(attrs["outer"], inputs[1:]))
    env.update(branch["initializers"])
    for node in branch["nodes"]:
        args = [env[name] if name else None for name in node.inputs]
        result = REGISTRY[node.op_type].fn(args, node.attrs, OpContext(ctx.opset, node.name, len(node.outputs)))
        env.update(zip(node.outputs, result if isinstance(result, (tuple, list)) else (result,)))
    values = [env[name] for name in branch["outputs"]]
    return values[0] if len(values) == 1 else tuple(values)
