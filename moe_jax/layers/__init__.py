"""Flax NNX building blocks of the Transformer: norms, attention, MLPs and the MoE layer."""
