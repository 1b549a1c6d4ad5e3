"""moe_jax: DeepSeek-V3-style Mixture-of-Experts language models in JAX/Flax NNX."""

__version__ = "0.1.0"
