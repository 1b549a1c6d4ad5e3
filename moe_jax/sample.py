"""Text sampling from a trained model (for a look at what it learned, not for serving)."""

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.tokenizer import Tokenizer
from moe_jax.generate import decoding_model


def sample_text(graphdef, params, biases, tokenizer: Tokenizer, prompt: str, num_tokens: int,
                context: int, temperature: float = 0.8, seed: int = 0) -> str:
  """Continues `prompt` by `num_tokens` tokens, re-reading a fixed window each step.

  Routing during sampling must not let later (not yet written) positions push earlier tokens
  out of an expert, so every MoE layer gets room for all tokens (capacity = sequence length);
  a single sequence does not split over devices, so expert parallelism is off.
  """
  model = decoding_model(graphdef, params, biases)
  prompt_ids = np.concatenate([[tokenizer.bos_id], tokenizer.encode(prompt.encode())])
  prompt_ids = prompt_ids.astype(np.int32)
  length = min(context, len(prompt_ids) + num_tokens)
  prompt_ids = prompt_ids[:length - 1]
  start = len(prompt_ids)
  buffer = jnp.zeros((1, length), jnp.int32).at[0, :start].set(prompt_ids)

  @jax.jit
  def generate(buffer, key):
    def body(position, carry):
      buffer, key = carry
      key, sub = jax.random.split(key)
      logits, _ = model(buffer)
      next_id = jax.random.categorical(sub, logits[0, position - 1] / temperature)
      return buffer.at[0, position].set(next_id), key
    return jax.lax.fori_loop(start, length, body, (buffer, key))[0]

  out = generate(buffer, jax.random.key(seed))
  return tokenizer.text(np.asarray(out[0]))
