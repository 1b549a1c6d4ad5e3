"""Expert-choice dispatch: each expert already holds its C token ids, so no sort is needed.

buffer[e, c] = x[token_ids[e, c]] -> experts -> y[t] = sum over the (e, c) that took t of
gates[e, c] * out[e, c]. A token no expert took gets 0 (the residual carries it).
"""

import jax.numpy as jnp


def expert_choice_dispatch(x, token_ids, gates, experts):
  out_ExCxD = experts(x[token_ids])
  weighted = (out_ExCxD.astype(jnp.float32) * gates[..., None]).reshape(-1, x.shape[-1])
  y = jnp.zeros(x.shape, jnp.float32).at[token_ids.reshape(-1)].add(weighted)
  return y.astype(x.dtype)
