"""The op registry: one small handler per ONNX op type, registered with a decorator.

A handler is `fn(inputs, attrs, ctx) -> value | tuple of values`: `inputs` are the node's input values in
order (None for an omitted optional input), `attrs` the node's attributes as Python values, `ctx` the
opset and node. Values are numpy arrays when they are static (shapes, integer constants) and jax arrays
otherwise, so shape arithmetic is folded at trace time and jit never sees a data-dependent shape.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np


@dataclass(frozen=True)
class OpContext:
    """What a handler may need besides inputs and attributes."""

    opset: int
    node_name: str
    num_outputs: int


Handler = Callable[[list[Any], dict[str, Any], OpContext], Any]


@dataclass(frozen=True)
class OpSpec:
    """A registered handler and the input slots that must be static (known at trace time)."""

    op_type: str
    fn: Handler
    static_inputs: tuple[int, ...] = ()
    domain: str = ""  # "" for the default ONNX domain; "com.microsoft" for onnxruntime's contrib ops


# Handlers by op type for the default ONNX domain, by "domain::op type" for the others (onnxruntime's
# com.microsoft Gelu is not the default domain's).
REGISTRY: dict[str, OpSpec] = {}
DEFAULT_DOMAINS = ("", "ai.onnx")


def registry_key(op_type: str, domain: str = "") -> str:
    """The REGISTRY key of an op type in a domain."""
    return op_type if domain in DEFAULT_DOMAINS else f"{domain}::{op_type}"


def spec_of(op_type: str, domain: str = "") -> OpSpec | None:
    """The handler registered for an op type of a domain, or None."""
    return REGISTRY.get(registry_key(op_type, domain))


def register(*op_types: str, static_inputs: tuple[int, ...] = (), domain: str = "") -> Callable[[Handler], Handler]:
    """Register `fn` as the handler of each op type in `op_types` (of the default ONNX domain unless
    `domain` names another)."""

    def decorate(fn: Handler) -> Handler:
        for op_type in op_types:
            REGISTRY[registry_key(op_type, domain)] = OpSpec(op_type, fn, static_inputs, domain)
        return fn

    return decorate


def supported_op_types() -> list[str]:
    """All op types the engine can run, sorted."""
    return sorted(REGISTRY)


def is_static(value: Any) -> bool:
    """True for values known at trace time (numpy arrays and Python scalars)."""
    return isinstance(value, (np.ndarray, np.generic, int, float, bool))


def xp(*values: Any) -> Any:
    """numpy when every given value is static, else jax.numpy: keeps shape arithmetic out of the trace."""
    return np if all(v is None or is_static(v) for v in values) else jnp


def static_array(value: Any, what: str, ctx: OpContext) -> np.ndarray:
    """The numpy value of an input that must be static; a clear error when it depends on the data."""
    if not is_static(value):
        from ..errors import BadInputError

        raise BadInputError(f"node {ctx.node_name!r}: {what} depends on the input data; the engine needs it "
                            "to be computable from the graph's constants and shapes")
    return np.asarray(value)


def int_list(value: Any, what: str, ctx: OpContext) -> list[int]:
    """A static 1-D integer input (axes, pads, shape) as a list of Python ints."""
    return [int(v) for v in static_array(value, what, ctx).reshape(-1)]
