"""Locating error-inducing neurons: pairs -> EI features -> neuron valuation -> progressive ablation."""
from .ablation import AblationResult, progressive_ablation
from .features import ei_features
from .pairs import Pairs, build_pairs
from .valuation import NeuronScores, score_neurons

__all__ = ["AblationResult", "NeuronScores", "Pairs", "build_pairs", "ei_features", "progressive_ablation",
           "score_neurons"]
