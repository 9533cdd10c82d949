"""Fixing located EINs: neuron-flip and neuron-fine-tuning, both as pure functions of the params."""
from .finetune import FinetuneResult, finetune
from .flip import flip
from .masks import ein_masks

__all__ = ["FinetuneResult", "ein_masks", "finetune", "flip"]
