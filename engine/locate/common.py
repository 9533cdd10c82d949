"""Shared pieces of the locating steps: logits of any classifier, margins, chunked batched evaluation."""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ..forward import Forward, class_scores, output_labels

# Output ops whose input is the real logit tensor (their output saturates and would flatten gradients).
NORMALISING_OUTPUT_OPS = ("Softmax", "LogSoftmax", "Sigmoid")


def logit_tensor(forward: Forward) -> str:
    """The tensor to treat as logits: the first output, or the input of a final Softmax-like node."""
    node = forward.model.producer_of().get(forward.output_name)
    if node is not None and node.op_type in NORMALISING_OUTPUT_OPS:
        return node.inputs[0]
    return forward.output_name


def class_logits(logits: Any) -> Any:
    """Logits with one column per class: a two-class model's single logit z becomes [0, z] (softmax of it is
    the sigmoid's [1 - p, p]; arg-max is class 1 where z > 0), other outputs as [n, classes]."""
    logits = class_scores(logits)
    if logits.shape[-1] != 1:
        return logits
    return jnp.concatenate([jnp.zeros_like(logits), logits], axis=-1)


def make_logits_fn(forward: Forward) -> Callable[..., Any]:
    """`logits(params, x, edits=None)` as a pure function of the params (differentiable, jittable); one
    column per class (`class_logits`)."""
    name = logit_tensor(forward)
    taps = () if name == forward.output_name else (name,)

    def logits(params: Mapping[str, Any], x: Any, edits: Mapping[str, Any] | None = None) -> Any:
        return class_logits(forward.apply(params, x, taps=taps, edits=edits)[name])

    return logits


def margin(logits: Any, wrong: Any, right: Any) -> Any:
    """Per-sample z_wrong - z_right: positive while the model still gives the wrong label."""
    picked_wrong = jnp.take_along_axis(logits, wrong[:, None], axis=-1)[:, 0]
    picked_right = jnp.take_along_axis(logits, right[:, None], axis=-1)[:, 0]
    return picked_wrong - picked_right


def chunks(n: int, size: int):
    """(start, stop) ranges covering n items."""
    for start in range(0, n, size):
        yield start, min(n, start + size)


def pad_to(x: np.ndarray, size: int) -> np.ndarray:
    """Pad a chunk along axis 0 to a fixed size (one compile per chunk shape)."""
    if len(x) == size:
        return x
    pad = np.zeros((size - len(x), *x.shape[1:]), dtype=x.dtype)
    return np.concatenate([x, pad])


def predict_labels(forward: Forward, x: np.ndarray, batch: int = 256,
                   params: Mapping[str, Any] | None = None, edits: Mapping[str, Any] | None = None) -> np.ndarray:
    """Class labels (`output_labels`) in fixed-size padded chunks (with `params` or forward `edits` if given)."""
    out = []
    for start, stop in chunks(len(x), batch):
        logits = forward.logits(pad_to(x[start:stop], min(batch, len(x))), params=params, edits=edits)
        threshold = forward.threshold if logits.shape[-1] == 1 else 0.0  # one column: two classes
        out.append(np.asarray(output_labels(logits, threshold))[: stop - start])
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def spatial_axes(shape: tuple[int, ...]) -> tuple[int | None, tuple[int, ...]]:
    """(channel axis, spatial axes) of a per-sample input shape; channel None for flat or 2-D inputs."""
    if len(shape) == 3:
        if shape[0] in (1, 3, 4) and shape[-1] not in (1, 3, 4):
            return 0, (1, 2)
        if shape[-1] in (1, 3, 4):
            return 2, (0, 1)
        return 0, (1, 2)
    return None, tuple(range(len(shape)))


def block_until_ready(tree: Any) -> Any:
    """Wait for asynchronous JAX results (for honest stage timings)."""
    return jax.block_until_ready(tree)
