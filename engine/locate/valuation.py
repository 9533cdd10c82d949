"""Step 3, neuron valuation: a contribution score per neuron toward the erroneous output.

With the margin m(x) = z_wrong(x) - z_right(x) (positive while the model errs) and a pair (e, c):

* weight neurons (initializer element w):
      raw(w)    = w * mean_pairs[ dm/dw (e) - dm/dw (c) ]
  the first-order change of the margin gap between error input and companion when w is removed
  (the published reference code ranks single weights this way, layer by layer);
* channel neurons (channel k of a layer tensor a):
      raw(k)    = mean_pairs sum_positions (a_e - a_c)[k] * dm/da (e)[k]
  the first-order contribution of the channel's EI feature to the margin.

Both are then discounted by the neuron's importance to clean behaviour,
      benign(n) = sqrt( mean_clean ( n * dL/dn )^2 )       (per-sample first-order loss change, RMS)
      score(n)  = raw(n) / (benign(n) + eps),  eps = `eps_rel` x mean benign of the neuron's layer,
so that neurons which carry the error but little clean behaviour come first. Without the discount the top
weights often have huge leverage on clean accuracy (see shared/FACTS.md); `discount=False` gives the raw
score. Only neurons with raw > 0 are candidates.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import BadInputError
from ..forward import Edit, Forward
from ..neurons import Layer
from .common import chunks, class_logits, logit_tensor, make_logits_fn, margin, pad_to
from .pairs import Pairs

GRANULARITIES = ("weight", "channel")


@dataclass
class NeuronScores:
    """Scores per unit: an initializer (weight neurons) or a layer tensor (channel neurons)."""

    granularity: str
    layers: list[Layer]
    scores: dict[str, np.ndarray]
    raw: dict[str, np.ndarray]
    benign: dict[str, np.ndarray]
    details: dict = field(default_factory=dict)

    def unit_layer(self) -> dict[str, Layer]:
        """Unit key -> its layer."""
        key = (lambda layer: layer.weight) if self.granularity == "weight" else (lambda layer: layer.name)
        return {key(layer): layer for layer in self.layers}

    @property
    def total_neurons(self) -> int:
        return int(sum(v.size for v in self.scores.values()))


def _accumulate(fn, arrays: list[np.ndarray], batch: int):
    """Sum of fn(*chunk, valid) over fixed-size padded chunks (one compile), as a pytree of arrays."""
    n = len(arrays[0])
    size = min(batch, n)
    total = None
    for start, stop in chunks(n, batch):
        valid = pad_to(np.ones(stop - start, np.float32), size)
        part = fn(*[pad_to(a[start:stop], size) for a in arrays], valid)
        total = part if total is None else jax.tree_util.tree_map(jnp.add, total, part)
    return total


def _weight_scores(forward: Forward, pairs: Pairs, x_clean, y_clean, layers, batch):
    logits_fn = make_logits_fn(forward)
    names = [layer.weight for layer in layers]
    fixed = {k: v for k, v in forward.params.items() if k not in names}
    weights = {k: forward.params[k] for k in names}

    @jax.jit
    def gap_grad(w, xe, xc, wrong, right, valid):
        def gap(w_):
            params = {**fixed, **w_}
            return jnp.sum(valid * (margin(logits_fn(params, xe), wrong, right)
                                    - margin(logits_fn(params, xc), wrong, right)))
        return jax.grad(gap)(w)

    @jax.jit
    def benign_sq(w, x, y, valid):
        def loss_one(w_, xi, yi):
            logits = logits_fn({**fixed, **w_}, xi[None])[0]
            return -jax.nn.log_softmax(logits)[yi]
        grads = jax.vmap(jax.grad(loss_one), in_axes=(None, 0, 0))(w, x, y)
        return {k: jnp.einsum("n,n...->...", valid, (g * w[k][None]) ** 2) for k, g in grads.items()}

    g = _accumulate(lambda xe, xc, wr, ri, valid: gap_grad(weights, xe, xc, wr, ri, valid),
                    [pairs.x_error, pairs.x_companion, pairs.y_wrong, pairs.y_right], batch)
    raw = {k: np.asarray(weights[k] * g[k]) / pairs.used for k in names}
    sq = _accumulate(lambda x, y, valid: benign_sq(weights, x, y, valid), [x_clean, y_clean], max(8, batch // 8))
    benign = {k: np.sqrt(np.asarray(sq[k]) / len(x_clean)) for k in names}
    return raw, benign


def _channel_scores(forward: Forward, pairs: Pairs, x_clean, y_clean, layers, batch):
    logit_name = logit_tensor(forward)
    names = tuple(layer.name for layer in layers)
    axes = {layer.name: layer.channel_axis for layer in layers}

    def per_channel(value, axis):
        axis = axis % value.ndim
        other = tuple(a for a in range(1, value.ndim) if a != axis)
        return value.sum(axis=other) if other else value

    def run_shifted(params, x, shifts):
        """Logits and layer activations with `shifts` added to the layers (d/dshift = d/dactivation)."""
        out = forward.apply(params, x, taps=names + (logit_name,),
                            edits={n: Edit(shift=s) for n, s in shifts.items()})
        return class_logits(out[logit_name]), {n: out[n] for n in names}

    def zeros(params, x):
        return {n: jnp.zeros_like(v) for n, v in run_shifted(params, x, {})[1].items()}

    @jax.jit
    def raw_part(params, xe, xc, wrong, right, valid):
        _, acts_c = run_shifted(params, xc, {})

        def total_margin(shifts):
            logits, acts = run_shifted(params, xe, shifts)
            return jnp.sum(valid * margin(logits, wrong, right)), acts

        grads, acts_e = jax.grad(total_margin, has_aux=True)(zeros(params, xe))
        return {n: jnp.einsum("n,nc->c", valid, per_channel((acts_e[n] - acts_c[n]) * grads[n], axes[n]))
                for n in names}

    @jax.jit
    def benign_part(params, x, y, valid):
        def total_loss(shifts):
            logits, acts = run_shifted(params, x, shifts)
            return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=-1)), acts

        grads, acts = jax.grad(total_loss, has_aux=True)(zeros(params, x))
        return {n: jnp.einsum("n,nc->c", valid, per_channel(acts[n] * grads[n], axes[n]) ** 2) for n in names}

    raw_sum = _accumulate(lambda xe, xc, wr, ri, valid: raw_part(forward.params, xe, xc, wr, ri, valid),
                          [pairs.x_error, pairs.x_companion, pairs.y_wrong, pairs.y_right], batch)
    sq = _accumulate(lambda x, y, valid: benign_part(forward.params, x, y, valid), [x_clean, y_clean], batch)
    raw = {n: np.asarray(raw_sum[n]) / pairs.used for n in names}
    benign = {n: np.sqrt(np.asarray(sq[n]) / len(x_clean)) for n in names}
    return raw, benign


def score_neurons(forward: Forward, pairs: Pairs, x_clean: np.ndarray, y_clean: np.ndarray, layers: list[Layer],
                  *, granularity: str = "weight", discount: bool = True, eps_rel: float = 0.1,
                  batch: int = 128) -> NeuronScores:
    """Score every neuron of `layers` (see the module docstring for the formula)."""
    if granularity not in GRANULARITIES:
        raise BadInputError(f"unknown granularity {granularity!r}; use one of {GRANULARITIES}")
    if not layers:
        raise BadInputError("the model has no Conv/Gemm/MatMul layer with parameter weights to score")
    fn = _weight_scores if granularity == "weight" else _channel_scores
    raw, benign = fn(forward, pairs, x_clean, y_clean, layers, batch)
    scores = {}
    for key, value in raw.items():
        if discount:
            eps = eps_rel * float(benign[key].mean()) + 1e-12
            scores[key] = value / (benign[key] + eps)
        else:
            scores[key] = value.copy()
        scores[key] = np.where(value > 0, scores[key], -np.inf).astype(np.float64)
    return NeuronScores(granularity, list(layers), scores, raw, benign,
                        details={"discount": discount, "eps_rel": eps_rel})
