"""Peer defences, run on the same ONNX models through the engine, for a fair comparison with AI-Lancet.

One module per defence, each behind the same call `defend(forward, case, *, seed, ...) -> DefenceResult`
(the changed parameters, ready for graph surgery):

* `finetuning`   plain fine-tuning of all weights on the defender's data;
* `fine_pruning` Fine-Pruning (Liu et al. 2018): prune the last convolution's channels dormant on clean data,
  then fine-tune;
* `nc_unlearning` Neural-Cleanse unlearning (Wang et al. 2019): restore the trigger, fine-tune on clean
  inputs stamped with it under their true labels;
* `anp`          Adversarial Neuron Pruning (Wu & Wang 2021): learn per-neuron masks under adversarial
  neuron perturbation, prune the neurons whose mask falls low.
"""
from __future__ import annotations

from typing import Callable

from . import anp, fine_pruning, finetuning, nc_unlearning
from .common import DefenceResult

DEFENCES: dict[str, Callable[..., DefenceResult]] = {
    "finetuning": finetuning.defend,
    "fine_pruning": fine_pruning.defend,
    "nc_unlearning": nc_unlearning.defend,
    "anp": anp.defend,
}

__all__ = ["DEFENCES", "DefenceResult"]
