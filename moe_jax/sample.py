"""Text sampling from a trained model (for a look at what it learned, not for serving)."""

import numpy as np

from moe_jax.generate import decoding_model, generate
from moe_jax.tokenizer import Tokenizer


def sample_text(graphdef, params, biases, tokenizer: Tokenizer, prompt: str, num_tokens: int,
                context: int, temperature: float = 0.8, seed: int = 0) -> str:
  """`prompt` and its continuation by up to `num_tokens` tokens, all within `context` tokens
  (the training sequence length, the longest span the model has seen), decoded with KV caches
  and every MoE layer dropless (`moe_jax.generate`)."""
  model = decoding_model(graphdef, params, biases)
  prompt_ids = np.concatenate([[tokenizer.bos_id], tokenizer.encode(prompt.encode())])
  prompt_ids = prompt_ids[:context - 1].astype(np.int32)
  new_tokens = min(num_tokens, context - len(prompt_ids))
  result = generate(model, prompt_ids[None], new_tokens, temperature, seed=seed)
  return tokenizer.text(np.concatenate([prompt_ids, result.tokens[0]]))
