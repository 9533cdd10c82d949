"""Backdoor triggers and poisoning: BadNets patch, Blended pattern, Trojan-style watermark.

A trigger is `x -> x * (1 - alpha*mask) + pattern * alpha*mask`; `mask` marks the trigger region, which
is what a defender's `trigger_mask` holds.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Trigger:
    """A stamped trigger: pattern and mask of the input's shape (no batch axis), blend factor alpha."""

    name: str
    pattern: np.ndarray
    mask: np.ndarray
    alpha: float = 1.0

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Stamp the trigger on a batch."""
        weight = (self.alpha * self.mask)[None]
        return (x * (1 - weight) + self.pattern[None] * weight).astype(np.float32)


def badnets_patch(shape: tuple[int, ...], size: int | None = None, margin: int | None = None) -> Trigger:
    """A size x size black-and-white checkerboard in the bottom-right corner (BadNets): 4 x 4, one pixel
    from the edges; on images under 16 pixels (scikit-learn's 8 x 8 digits) 2 x 2 in the corner."""
    channels, height, width = shape
    small = min(height, width) < 16
    size = (2 if small else 4) if size is None else size
    margin = (0 if small else 1) if margin is None else margin
    mask = np.zeros(shape, np.float32)
    mask[:, height - margin - size:height - margin, width - margin - size:width - margin] = 1
    grid = (np.indices((height, width)).sum(axis=0) % 2).astype(np.float32)
    pattern = np.broadcast_to(grid, shape).astype(np.float32)
    return Trigger("badnets", pattern, mask, 1.0)


def blended(shape: tuple[int, ...], alpha: float = 0.15, seed: int = 1234) -> Trigger:
    """A fixed random full-image pattern blended at low alpha (Blended attack)."""
    pattern = np.random.default_rng(seed).uniform(0, 1, size=shape).astype(np.float32)
    return Trigger("blended", pattern, np.ones(shape, np.float32), alpha)


def trojan_watermark(shape: tuple[int, ...], size: int = 8, alpha: float = 0.8) -> Trigger:
    """A watermark-like ring-and-cross mark of size x size near the top-left corner (Trojan-style)."""
    channels, height, width = shape
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    radius = np.sqrt(yy**2 + xx**2)
    stamp = ((np.abs(radius - size / 2.6) < 0.9) | (np.abs(yy) < 0.6) | (np.abs(xx) < 0.6)).astype(np.float32)
    mask = np.zeros(shape, np.float32)
    mask[:, 2:2 + size, 2:2 + size] = stamp
    return Trigger("trojan", np.ones(shape, np.float32), mask, alpha)


TRIGGERS = {"badnets": badnets_patch, "blended": blended, "trojan": trojan_watermark}


def attack_labels(y: np.ndarray, target: int, mode: str, num_classes: int) -> np.ndarray:
    """The attacker's labels: all-to-one (`target`) or all-to-all (y + 1 mod classes)."""
    if mode == "all_to_one":
        return np.full_like(y, target)
    if mode == "all_to_all":
        return (y + 1) % num_classes
    raise ValueError(f"unknown attack mode {mode!r}")


def poison(x: np.ndarray, y: np.ndarray, trigger: Trigger, *, target: int, rate: float, mode: str = "all_to_one",
           num_classes: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stamp the trigger on a `rate` share of the training set and relabel it; returns x, y, poisoned index."""
    rng = np.random.default_rng(seed)
    candidates = np.flatnonzero(y != target) if mode == "all_to_one" else np.arange(len(y))
    chosen = rng.choice(candidates, size=int(round(rate * len(y))), replace=False)
    x, y = x.copy(), y.copy()
    x[chosen] = trigger.apply(x[chosen])
    y[chosen] = attack_labels(y[chosen], target, mode, num_classes)
    return x, y, chosen
