"""Optimisers that change the gradients of adapters (LoRA-Pro), found through their two factors."""

from .factors import FactorPair, two_factor_methods, two_factor_pairs
from .lorapro import LoRAPro, adjusted_gradients

__all__ = ["FactorPair", "LoRAPro", "adjusted_gradients", "two_factor_methods", "two_factor_pairs"]
