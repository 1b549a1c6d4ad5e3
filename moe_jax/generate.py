"""Decoding with KV caches: sampling (greedy, temperature, top-p) and speculative decoding
that drafts with the multi-token-prediction modules and verifies with the main model.

Every MoE layer gets room for all the tokens of a step (capacity = tokens), so routing never
drops a token and a token's output does not depend on how many arrive together: decoding
one token at a time, a prompt at once, or a draft of D + 1 tokens computes the same thing.
"""

import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_jax.model import Transformer


def decoding_model(graphdef, params, biases) -> Transformer:
  """The model with every MoE layer dropless (capacity = tokens) and experts on one device,
  its blocks as a list (one KV cache each)."""
  model = nnx.merge(graphdef, params, biases).with_layout(scan_layers=False)
  for layer in model.moe_layers():
    layer.dispatch = layer.dispatch.on_one_device(
        capacity_factor=layer.num_experts / layer.router.top_k)
  return model


def choose(logits_BxV, key, temperature: float, top_p: float):
  """Greedy when temperature is 0; else a sample at that temperature from the smallest set
  of most likely tokens whose probability reaches top_p."""
  if temperature == 0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits = logits_BxV.astype(jnp.float32) / temperature
  if top_p < 1:
    descending = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(descending, axis=-1)
    kept = jnp.cumsum(probs, axis=-1) - probs < top_p          # the most likely is always kept
    threshold = jnp.min(jnp.where(kept, descending, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits >= threshold, logits, -jnp.inf)
  return jax.random.categorical(key, logits).astype(jnp.int32)


class Generation(NamedTuple):
  tokens: np.ndarray          # [B, new tokens]
  seconds: float              # decoding time after compilation and prefill
  accepted_fraction: float    # speculative only: accepted drafts over proposed drafts
  forward_passes: int         # main-model steps after the prompt


def generate(model: Transformer, prompt_BxL, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0) -> Generation:
  """Continues each prompt row by `max_new_tokens`, one main-model step per token."""
  prompt = jnp.asarray(prompt_BxL, jnp.int32)
  batch, length = prompt.shape
  graphdef, state = nnx.split(model)

  @jax.jit
  def step(state, tokens, caches, start, key):
    logits, _, caches = nnx.merge(graphdef, state).decode(tokens, caches, start)
    return choose(logits[:, -1], key, temperature, top_p), caches

  caches = model.init_cache(batch, length + max_new_tokens)[0]
  keys = jax.random.split(jax.random.key(seed), max_new_tokens)
  token, caches = step(state, prompt, caches, 0, keys[0])
  out = [token]
  step(state, token[:, None], caches, length, keys[0])[0].block_until_ready()   # compile
  start_time = time.perf_counter()
  for i in range(1, max_new_tokens):
    token, caches = step(state, token[:, None], caches, length + i - 1, keys[i])
    out.append(token)
  tokens = np.asarray(jnp.stack(out, axis=1))
  return Generation(tokens, time.perf_counter() - start_time, float("nan"), max_new_tokens - 1)


def speculative_generate(model: Transformer, prompt_1xL, max_new_tokens: int) -> Generation:
  """Greedy decoding of one prompt, D tokens drafted per step by the D MTP modules and
  verified in one main-model pass over D + 1 tokens; the output is plain greedy decoding's.

  Each round: the main model reads [last token, d_1 .. d_D] and predicts g_0 .. g_D; the
  drafts agreeing with g from the left are accepted, plus g at the first disagreement (or
  g_D), so every round emits 1 .. D + 1 tokens. The MTP modules then read the round's
  positions (hidden states joined with the tokens now known) and draft the next D tokens.
  Depth-1 caches hold only true tokens; deeper ones may keep entries made from drafts,
  which can lower the acceptance rate but never changes the output.
  """
  depth = len(model.mtp)
  if depth == 0:
    raise ValueError("speculative decoding drafts with the MTP modules; this model has none "
                     "(model.mtp_depth = 0)")
  prompt = jnp.asarray(prompt_1xL, jnp.int32)
  length = prompt.shape[1]
  graphdef, state = nnx.split(model)
  window = jnp.arange(depth + 1)

  @jax.jit
  def prefill(state, prompt, caches):
    model = nnx.merge(graphdef, state)
    main, mtp = caches
    logits, hidden, main = model.decode(prompt, main, 0)
    known = jnp.concatenate([prompt, jnp.argmax(logits[:, -1:], -1).astype(jnp.int32)], axis=1)
    new_mtp = []
    for k in range(1, depth + 1):   # depth k at position p reads token p + k
      logits_k, hidden, cache = model.mtp_decode(k, hidden, known[:, k:k + length], mtp[k - 1], 0)
      known = jnp.concatenate([known, jnp.argmax(logits_k[:, -1:], -1).astype(jnp.int32)], axis=1)
      new_mtp.append(cache)
    return known[0, length], known[0, length + 1:], (main, new_mtp)

  @jax.jit
  def verify_and_draft(state, last, drafts, caches, start):
    model = nnx.merge(graphdef, state)
    main, mtp = caches
    logits, hidden, main = model.decode(jnp.concatenate([last[None], drafts])[None], main, start)
    greedy = jnp.argmax(logits[0], -1).astype(jnp.int32)                  # [D + 1]
    accepted = jnp.sum(jnp.cumprod(drafts == greedy[:depth]))             # a in 0 .. D
    new_drafts, new_mtp = jnp.zeros((depth,), jnp.int32), []
    for k in range(1, depth + 1):
      # Window position j reads token (start + j) + k: g_{j+k-1} while that is known, else a
      # new draft; positions past `accepted` are rewritten by the next round.
      index = window + k - 1
      from_drafts = new_drafts[jnp.clip(index - accepted - 1, 0, depth - 1)]
      next_tokens = jnp.where(index <= accepted, greedy[jnp.minimum(index, depth)], from_drafts)
      logits_k, hidden, cache = model.mtp_decode(k, hidden, next_tokens[None], mtp[k - 1], start)
      new_drafts = new_drafts.at[k - 1].set(jnp.argmax(logits_k[0, accepted]).astype(jnp.int32))
      new_mtp.append(cache)
    return greedy, accepted, new_drafts, (main, new_mtp)

  caches = model.init_cache(1, length + max_new_tokens + depth + 1)
  last, drafts, caches = prefill(state, prompt, caches)
  out, position, accepted_total, rounds = [int(last)], length, 0, 0
  jax.block_until_ready(verify_and_draft(state, last, drafts, caches, position))   # compile
  start_time = time.perf_counter()
  while len(out) < max_new_tokens:
    greedy, accepted, drafts, caches = verify_and_draft(state, last, drafts, caches, position)
    accepted = int(accepted)
    out.extend(np.asarray(greedy[:accepted + 1]).tolist())
    last, position = greedy[accepted], position + accepted + 1
    accepted_total, rounds = accepted_total + accepted, rounds + 1
  seconds = time.perf_counter() - start_time
  return Generation(np.asarray(out[:max_new_tokens])[None], seconds,
                    accepted_total / max(rounds * depth, 1), rounds)
