"""Step 1, image pairs: each error input gets a companion without its error-inducing features.

Sources, in order of preference: the case's `x_companion`; its `trigger_mask` (the masked region is refilled
with clean content); a region found by gradient saliency (the smallest salient region whose refill turns the
wrong label into the right one); or, with no error inputs at all, a trigger restored from clean data
(`restore.py`). A pair is kept only if the model gets the error input wrong and its companion right.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from ..case import Case
from ..errors import BadInputError
from ..forward import Forward
from .common import chunks, make_logits_fn, margin, pad_to, predict_labels, spatial_axes

FILLS = ("median", "inpaint")
# Shares of the input refilled, smallest first, when the error region is searched by saliency.
REGION_FRACTIONS = (0.005, 0.01, 0.02, 0.03, 0.04, 0.06, 0.08, 0.12, 0.16, 0.24, 0.32)


class NothingToFixError(BadInputError):
    """Every error input already gets its right label: there is no error to locate."""

    exit_code = 0


@dataclass
class Pairs:
    """Error inputs with their companions and labels; counts of what was dropped and why."""

    x_error: np.ndarray
    x_companion: np.ndarray
    y_right: np.ndarray
    y_wrong: np.ndarray
    source: str
    given: int
    dropped_already_right: int = 0
    dropped_companion_wrong: int = 0
    masks: np.ndarray | None = None
    details: dict = field(default_factory=dict)

    @property
    def used(self) -> int:
        return len(self.x_error)

    @property
    def dropped(self) -> int:
        return self.dropped_already_right + self.dropped_companion_wrong

    def summary(self) -> dict:
        """JSON-ready counts."""
        return {"source": self.source, "given": self.given, "used": self.used, "dropped": self.dropped,
                "dropped_already_right": self.dropped_already_right,
                "dropped_companion_wrong": self.dropped_companion_wrong, **self.details}


def clean_fill(x_clean: np.ndarray) -> np.ndarray:
    """Per-pixel median of the clean set: the content a removed trigger region is refilled with."""
    return np.median(x_clean, axis=0).astype(np.float32)


def inpaint(x: np.ndarray, mask: np.ndarray, iterations: int = 64) -> np.ndarray:
    """Fill masked pixels from their unmasked surroundings by repeated 3x3 averaging (harmonic inpainting)."""
    _, spatial = spatial_axes(x.shape[1:])
    if len(spatial) != 2:
        raise BadInputError("inpainting needs image inputs (2 spatial axes)")
    axes = [a + 1 for a in spatial]
    m = jnp.asarray(np.broadcast_to(mask, x.shape), dtype=jnp.float32)
    known = jnp.asarray(x) * (1.0 - m)

    def box3(v):
        for axis in axes:
            size = v.shape[axis]
            padded = jnp.pad(v, [(1, 1) if a == axis else (0, 0) for a in range(v.ndim)], mode="edge")
            v = sum(jax.lax.slice_in_dim(padded, k, k + size, axis=axis) for k in range(3)) / 3.0
        return v

    filled = jax.lax.fori_loop(0, iterations, lambda _, v: known + box3(v) * m, known)
    return np.asarray(filled, dtype=np.float32)


def refill(x: np.ndarray, mask: np.ndarray, fill: str, x_clean: np.ndarray) -> np.ndarray:
    """Replace the masked region of each input with clean content (`median` of x_clean, or `inpaint`)."""
    if fill == "median":
        return (x * (1 - mask) + clean_fill(x_clean) * mask).astype(np.float32)
    if fill == "inpaint":
        return inpaint(x, mask)
    raise BadInputError(f"unknown fill {fill!r}; use one of {FILLS}")


def _saliency(forward: Forward, x: np.ndarray, wrong: np.ndarray, right: np.ndarray, baseline: np.ndarray,
              batch: int = 128) -> np.ndarray:
    """|gradient x (input - baseline)| of the margin z_wrong - z_right, per input element."""
    logits_fn = make_logits_fn(forward)

    @jax.jit
    def grad_fn(params, xb, wb, rb):
        return jax.grad(lambda xx: margin(logits_fn(params, xx), wb, rb).sum())(xb)

    out = []
    for start, stop in chunks(len(x), batch):
        size = min(batch, len(x))
        g = grad_fn(forward.params, pad_to(x[start:stop], size), pad_to(wrong[start:stop], size),
                    pad_to(right[start:stop], size))
        out.append(np.asarray(g)[: stop - start])
    return np.abs(np.concatenate(out) * (x - baseline[None]))


def _smooth_map(saliency: np.ndarray, spatial: tuple[int, ...], channel: int | None) -> np.ndarray:
    """Saliency summed over channels and box-filtered 3x3, so regions come out contiguous."""
    sal = saliency.sum(axis=channel + 1) if channel is not None else saliency
    if len(spatial) == 2:
        total = sal
        for axis in (1, 2):
            padded = np.pad(total, [(0, 0)] + [(1, 1) if a == axis else (0, 0) for a in (1, 2)], mode="edge")
            total = (np.take(padded, range(0, total.shape[axis]), axis=axis)
                     + np.take(padded, range(1, total.shape[axis] + 1), axis=axis)
                     + np.take(padded, range(2, total.shape[axis] + 2), axis=axis)) / 3
        sal = total
    return sal


def find_regions(forward: Forward, x_error: np.ndarray, y_right: np.ndarray, y_wrong: np.ndarray,
                 x_clean: np.ndarray, fill: str = "median") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Smallest salient region per error input whose refill gives the right label.

    Returns (companions, masks, found): masks have the input's shape; `found` marks the inputs for which
    one of REGION_FRACTIONS worked. All candidate refills are evaluated in batched calls.
    """
    shape = x_error.shape[1:]
    channel, spatial = spatial_axes(shape)
    baseline = clean_fill(x_clean)
    sal = _smooth_map(_saliency(forward, x_error, y_wrong, y_right, baseline), spatial, channel)
    flat = sal.reshape(len(sal), -1)
    order = np.argsort(-flat, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(flat.shape[1])[None].repeat(len(flat), 0), axis=1)
    ranks = ranks.reshape(sal.shape)
    candidates, masks = [], []
    for fraction in REGION_FRACTIONS:
        region = (ranks < max(1, int(round(fraction * flat.shape[1])))).astype(np.float32)
        mask = np.expand_dims(region, channel + 1) if channel is not None else region
        mask = np.broadcast_to(mask, x_error.shape).astype(np.float32)
        masks.append(mask)
        candidates.append(refill(x_error, mask, fill, x_clean))
    preds = predict_labels(forward, np.concatenate(candidates)).reshape(len(REGION_FRACTIONS), len(x_error))
    ok = preds == y_right[None]
    found = ok.any(axis=0)
    first = np.where(found, ok.argmax(axis=0), len(REGION_FRACTIONS) - 1)
    index = np.arange(len(x_error))
    companions = np.stack(candidates)[first, index]
    chosen_masks = np.stack(masks)[first, index]
    return companions, chosen_masks, found


def build_pairs(forward: Forward, case: Case, *, fill: str = "median", restored=None) -> Pairs:
    """Pairs for `case` (see the module docstring).

    `restored` is a RestoreResult with a flagged class, required when the case has no x_error: the error
    inputs are then clean inputs stamped with the restored trigger, and their companions the clean inputs.
    """
    companions = None
    mask = None
    if case.x_error is None:
        if restored is None or restored.flagged is None:
            raise BadInputError("the case has no x_error: restore a trigger first (lancet.locate.restore)")
        from .restore import restored_pairs_inputs

        x_error, y_right, companions = restored_pairs_inputs(restored, case.x_clean, case.y_clean)
        source = "restored"
    else:
        x_error, y_right, mask = case.x_error, case.y_error, case.trigger_mask
        companions = case.x_companion
        source = "companion" if companions is not None else ("trigger_mask" if mask is not None else "saliency")
    given = len(x_error)
    y_wrong = predict_labels(forward, x_error)
    wrong = y_wrong != y_right
    if not wrong.any():
        raise NothingToFixError(f"nothing to fix: the model already gives all {given} error inputs their right "
                                "label")
    index = np.flatnonzero(wrong)
    x_e, y_r, y_w = x_error[index], y_right[index], y_wrong[index]
    masks = None
    if source in ("companion", "restored"):
        companion = companions[index]
        keep = predict_labels(forward, companion) == y_r
    elif source == "trigger_mask":
        masks = np.broadcast_to(mask, x_e.shape).astype(np.float32)
        companion = refill(x_e, masks, fill, case.x_clean)
        keep = predict_labels(forward, companion) == y_r
    else:
        companion, masks, keep = find_regions(forward, x_e, y_r, y_w, case.x_clean, fill)
    pairs = Pairs(x_e[keep], companion[keep], y_r[keep], y_w[keep], source, given,
                  dropped_already_right=int((~wrong).sum()), dropped_companion_wrong=int((~keep).sum()),
                  masks=None if masks is None else masks[keep])
    if source in ("trigger_mask", "saliency"):
        pairs.details["fill"] = fill
    if source == "saliency" and pairs.used:
        pairs.details["mean_region_share"] = float(pairs.masks.mean())
    if pairs.used == 0:
        raise BadInputError(f"no usable pairs: none of the {int(wrong.sum())} companions gets its right label "
                            f"(source {source}, fill {fill}); give x_companion or a trigger_mask")
    return pairs
