"""A DeepSeek-style decoder-only Transformer LM: dense blocks first, MoE blocks after.

tokens[B, S] -> embed -> blocks: x += attention(norm(x)); x += mlp_or_moe(norm(x))
-> final norm -> logits[B, S, V]. Every MoE block also reports its routing statistics.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from moe_jax.dispatch import DispatchSettings
from moe_jax.layers.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS
from moe_jax.layers.attention import QK_NORMS, Attention
from moe_jax.layers.attention import chosen_implementation as chosen_attention
from moe_jax.layers.logits import output_cross_entropy, output_logits
from moe_jax.layers.mla import LatentAttention
from moe_jax.layers.mlp import SwiGLU, scaled_normal
from moe_jax.layers.moe import MoE, MoEStats
from moe_jax.layers.norms import RMSNorm
from moe_jax.layers.params import KeySource, ParamKeys, param
from moe_jax.layers.rope import SCALINGS, Rope
from moe_jax.layers.stack import LayerStack, converted_state
from moe_jax.routing import BalancingSettings, RouterSettings
from moe_jax.settings import Settings

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Primitives whose results are cheaper to recompute than to store and read back: elementwise
# arithmetic, casts, layout changes and gathers (each reads its inputs and writes its output
# once, which storing the output for the backward pass would cost as well).
CHEAP_PRIMITIVES = frozenset((
    "abs", "add", "add_any", "and", "broadcast_in_dim", "concatenate", "convert_element_type",
    "cos", "div", "eq", "erf", "exp", "expand_dims", "gather", "ge", "gt", "integer_pow",
    "iota", "is_finite", "le", "log", "logistic", "lt", "max", "min", "mul", "name", "ne",
    "neg", "not", "or", "pad", "pow", "rem", "reshape", "rsqrt", "select_n", "sign", "sin",
    "slice", "split", "sqrt", "square", "squeeze", "stop_gradient", "sub", "tanh",
    "transpose"))


def _cheap(prim, params) -> bool:
  """A primitive in CHEAP_PRIMITIVES, or a jitted function or one with its own gradient (the
  dispatch's row gathers) made of nothing else."""
  inner = params.get("call_jaxpr") if prim.name == "custom_vjp_call" else (
      params.get("jaxpr") if prim.name in ("jit", "pjit") else None)
  if inner is not None:
    return all(_cheap(e.primitive, e.params) for e in inner.jaxpr.eqns)
  return prim.name in CHEAP_PRIMITIVES


def costly_saveable(prim, *_, **params) -> bool:
  """Keep the results that cost more to recompute than to store: matmuls, attention, sorts,
  scatters, reductions. Unrolled, XLA fuses cheap results into their consumers and never
  stores them; a scanned block's residuals are all stored, stacked per layer, and this keeps
  them to what the unrolled step stores (docs/performance.md)."""
  return not _cheap(prim, params)


# model.remat: what a block keeps for its backward pass; the rest is recomputed there.
REMAT_POLICIES = {
    "none": None,                                                   # everything (no remat)
    "block": jax.checkpoint_policies.nothing_saveable,              # only the block's input
    "matmuls": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # matmul outputs
    # the routed experts' inputs and outputs (what crossed the dispatch): the backward pass
    # recomputes attention, routing and the experts' insides, not the token exchange
    "expert_io": jax.checkpoint_policies.save_only_these_names("expert_inputs",
                                                               "expert_outputs"),
    "costly": costly_saveable,   # all but elementwise results and gathers
}
ATTENTIONS = ("gqa", "mla")
PARAMETER_FIELDS = ("vocab_size", "d_model", "num_layers", "num_dense_layers", "attention",
                    "num_heads", "num_kv_heads", "head_dim", "q_lora_rank", "kv_lora_rank",
                    "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "qkv_bias", "qk_norm",
                    "dense_mlp_dim", "num_routed_experts", "num_shared_experts",
                    "shared_expert_gate", "expert_dim", "mtp_depth", "scan_layers")
# Parameter fields whose checkpoints convert on restore (moe_jax/train.py: restore_in_layout).
LAYOUT_FIELDS = ("scan_layers",)
# Fields the model does not read: the training step takes them as arguments
# (moe_jax/train.py: step_arguments_on). A model keeps its spec with these, and the whole
# `balancing` section (the step's too), at their defaults, so that runs differing only there
# share the model's graph, and so its traced step.
STEP_ARGUMENT_FIELDS = ("mtp_loss_weight", "mtp_loss_weight_final", "mtp_weight_switch_fraction")


@dataclasses.dataclass(frozen=True)
class ModelSpec(Settings):
  """The model's shape (`model` section of a config) and, nested, the settings its MoE layers
  read: router, balancing and dispatch (sections of their own).

  The defaults are a small DeepSeek-style model with every optional feature off (no q/k/v
  bias or norm, no YaRN, no gated shared expert, no MTP), so a field added later takes, in an
  older checkpoint's config, the value that reproduces the older model. The Hugging Face
  importer states only what a model family sets."""

  SECTION = "model"

  vocab_size: int = 4096
  d_model: int = 96
  num_layers: int = 4
  num_dense_layers: int = 1
  attention: str = "gqa"            # a key of ATTENTIONS
  num_heads: int = 3
  num_kv_heads: int = 1
  head_dim: int = 32
  q_lora_rank: int = 0
  kv_lora_rank: int = 64
  qk_nope_head_dim: int = 32
  qk_rope_head_dim: int = 16
  v_head_dim: int = 32
  qkv_bias: bool = False
  qk_norm: str = "none"
  rope_theta: float = 10_000.0
  rope_scaling: str = "none"
  rope_factor: float = 1.0
  rope_original_max_len: int = 4096
  yarn_beta_fast: float = 32.0
  yarn_beta_slow: float = 1.0
  yarn_mscale: float = 1.0
  yarn_mscale_all_dim: float = 1.0
  dense_mlp_dim: int = 288
  norm_eps: float = 1e-6
  compute_dtype: str = "float32"
  loss_logits_dtype: str = "float32"   # the training loss's logits; validation stays float32
  attention_implementation: str = "auto"   # a name of attention.IMPLEMENTATIONS
  remat: str = "none"               # a name of REMAT_POLICIES
  scan_layers: bool = False         # dense and MoE blocks as two scans over stacked parameters
  num_routed_experts: int = 16
  num_shared_experts: int = 1
  shared_expert_gate: bool = False
  expert_dim: int = 64
  mtp_depth: int = 0
  mtp_loss_weight: float = 0.3
  mtp_loss_weight_final: float = 0.1
  mtp_weight_switch_fraction: float = 0.68
  router: RouterSettings = RouterSettings()
  balancing: BalancingSettings = BalancingSettings()
  dispatch: DispatchSettings = DispatchSettings()

  @classmethod
  def from_config(cls, config) -> "ModelSpec":
    """Built from a config's `model`, `router`, `balancing` and `dispatch` sections."""
    return cls.from_section(config.model, router=RouterSettings.from_section(config.router),
                            balancing=BalancingSettings.from_section(config.balancing),
                            dispatch=DispatchSettings.from_section(config.dispatch))

  def sections(self) -> dict[str, dict]:
    """The config sections this spec is built from (`from_config` reads them back)."""
    return {"model": self.values(), "router": self.router.values(),
            "balancing": self.balancing.values(), "dispatch": self.dispatch.values()}

  def parameter_settings(self) -> dict:
    """The fields that can change which parameters exist or their shapes (tested against the
    model: every other field leaves them unchanged). A checkpoint is checked against these
    (with dispatch.expert_replicas: `state_settings`) only, so a run resumes after changing
    how it computes: dispatch, expert parallelism, compute dtype, routing rules, loss weights."""
    return {name: getattr(self, name) for name in PARAMETER_FIELDS}

  def state_settings(self) -> dict:
    """The settings that shape the training state, by "section.field": the parameters'
    (`parameter_settings`) and dispatch.expert_replicas (the replica plans in the routing
    state). A checkpoint is checked against these."""
    return {**{f"model.{name}": value for name, value in self.parameter_settings().items()},
            "dispatch.expert_replicas": self.dispatch.expert_replicas}

  def problems(self) -> list[str]:
    problems = []
    need = lambda ok, message: ok or problems.append(message)
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                 "dense_mlp_dim", "num_routed_experts", "expert_dim"):
      need(getattr(self, name) >= 1, f"model.{name}={getattr(self, name)} must be >= 1")
    need(0 <= self.num_dense_layers <= self.num_layers,
         f"model.num_dense_layers={self.num_dense_layers} must be between 0 and "
         f"model.num_layers={self.num_layers}")
    need(self.num_shared_experts >= 0,
         f"model.num_shared_experts={self.num_shared_experts} must be >= 0")
    need(self.num_kv_heads >= 1 and self.num_heads % max(self.num_kv_heads, 1) == 0,
         f"model.num_heads={self.num_heads} is not a multiple of model.num_kv_heads="
         f"{self.num_kv_heads}")
    need(self.head_dim % 2 == 0, f"model.head_dim={self.head_dim} must be even (rotary embeddings)")
    need(self.attention_implementation in ATTENTION_IMPLEMENTATIONS,
         f"model.attention_implementation={self.attention_implementation!r} is unknown; "
         f"choose from {list(ATTENTION_IMPLEMENTATIONS)}")
    need(self.remat in REMAT_POLICIES,
         f"model.remat={self.remat!r} is unknown; choose from {list(REMAT_POLICIES)}")
    need(self.compute_dtype in DTYPES,
         f"model.compute_dtype={self.compute_dtype!r} is unknown; choose from {sorted(DTYPES)}")
    need(self.loss_logits_dtype in DTYPES,
         f"model.loss_logits_dtype={self.loss_logits_dtype!r} is unknown; choose from "
         f"{sorted(DTYPES)}")
    need(self.mtp_depth >= 0,
         f"model.mtp_depth={self.mtp_depth} must be >= 0 (0: no multi-token prediction)")
    for name in ("mtp_loss_weight", "mtp_loss_weight_final"):
      need(getattr(self, name) >= 0, f"model.{name}={getattr(self, name)} must be >= 0")
    need(0 <= self.mtp_weight_switch_fraction <= 1,
         f"model.mtp_weight_switch_fraction={self.mtp_weight_switch_fraction} must be in [0, 1]")
    return problems + self._attention_problems() + self._expert_problems()

  def _attention_problems(self) -> list[str]:
    """MLA's widths and YaRN's settings."""
    problems = []
    need = lambda ok, message: ok or problems.append(message)
    need(self.attention in ATTENTIONS,
         f"model.attention={self.attention!r} is unknown; choose from {list(ATTENTIONS)}")
    if self.attention == "mla":
      for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
        need(getattr(self, name) >= 1,
             f"model.{name}={getattr(self, name)} must be >= 1 with model.attention='mla'")
      need(self.q_lora_rank >= 0,
           f"model.q_lora_rank={self.q_lora_rank} must be >= 0 (0: no query latent)")
      need(self.qk_rope_head_dim % 2 == 0,
           f"model.qk_rope_head_dim={self.qk_rope_head_dim} must be even (rotary embeddings)")
    need(self.qk_norm in QK_NORMS,
         f"model.qk_norm={self.qk_norm!r} is unknown; choose from {list(QK_NORMS)}")
    need(self.rope_theta > 1, f"model.rope_theta={self.rope_theta} must be > 1")
    need(self.rope_scaling in SCALINGS,
         f"model.rope_scaling={self.rope_scaling!r} is unknown; choose from {list(SCALINGS)}")
    if self.rope_scaling == "yarn":
      need(self.rope_factor >= 1, f"model.rope_factor={self.rope_factor} must be >= 1 for YaRN")
      need(self.rope_original_max_len >= 1,
           f"model.rope_original_max_len={self.rope_original_max_len} must be >= 1")
      need(self.yarn_beta_fast > self.yarn_beta_slow > 0,
           f"model.yarn_beta_fast={self.yarn_beta_fast} must exceed model.yarn_beta_slow="
           f"{self.yarn_beta_slow} > 0")
    return problems

  def _expert_problems(self) -> list[str]:
    """The router's choices against the number of experts, and the rules an expert-choice
    router (balanced by construction, not causal) cannot use."""
    r, experts = self.router, self.num_routed_experts
    if r.top_k > experts:
      return [f"router.top_k={r.top_k} is larger than model.num_routed_experts={experts}"]
    if r.num_groups < 1 or experts % r.num_groups:   # (below 1: the router's own problem)
      return [f"router.num_groups={r.num_groups} must divide model.num_routed_experts={experts}"
              ] if r.num_groups >= 1 else []
    per_group, problems = experts // r.num_groups, []
    if r.num_groups > 1 and r.top_k > r.topk_groups * per_group:
      problems.append(f"router.top_k={r.top_k} is more than the {r.topk_groups * per_group} "
                      f"experts in router.topk_groups={r.topk_groups} groups of {per_group}")
    if r.num_groups > 1 and r.group_score == "top2_sum" and per_group < 2:
      problems.append(f"router.group_score='top2_sum' needs >= 2 experts per group; "
                      f"router.num_groups={r.num_groups} leaves {per_group}")
    if r.expert_choice:
      problems += [f"balancing.{name}={getattr(self.balancing, name)} has no effect with "
                   f"router.score_function='expert_choice' (balanced by construction): set it to 0"
                   for name in ("bias_update_rate", "switch_loss_alpha", "sequence_loss_alpha")
                   if getattr(self.balancing, name) != 0]
      if self.dispatch.expert_parallel != "none":
        problems.append("dispatch.expert_parallel is for token-choice routers, not "
                        "router.score_function='expert_choice'")
    return problems

  @property
  def rope(self) -> Rope:
    return Rope(self.rope_theta, self.rope_scaling, self.rope_factor, self.rope_original_max_len,
                self.yarn_beta_fast, self.yarn_beta_slow, self.yarn_mscale, self.yarn_mscale_all_dim)

  def attention_path(self, backend: str | None = None) -> str:
    """The attention implementation this model takes on `backend` ("gpu": NVIDIA's; None: this
    process's): the one `attention.chosen_implementation` picks for its compute dtype and
    query/key head width."""
    head_dim = self.head_dim if self.attention == "gqa" else (self.qk_nope_head_dim
                                                              + self.qk_rope_head_dim)
    return chosen_attention(DTYPES[self.compute_dtype], head_dim, self.attention_implementation,
                            backend)


def make_attention(spec: ModelSpec, dtype, rngs: KeySource) -> Attention | LatentAttention:
  """Grouped-query attention or DeepSeek's multi-head latent attention, as the spec says."""
  if spec.attention == "mla":
    return LatentAttention(spec.d_model, spec.num_heads, spec.q_lora_rank, spec.kv_lora_rank,
                           spec.qk_nope_head_dim, spec.qk_rope_head_dim, spec.v_head_dim,
                           spec.rope, spec.norm_eps, dtype, rngs, spec.attention_implementation)
  return Attention(spec.d_model, spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.rope,
                   dtype, rngs, spec.qkv_bias, spec.qk_norm, spec.norm_eps,
                   spec.attention_implementation)


class Block(nnx.Module):

  def __init__(self, spec: ModelSpec, use_moe: bool, rngs: KeySource):
    dtype = DTYPES[spec.compute_dtype]
    self.attention_norm = RMSNorm(spec.d_model, spec.norm_eps)
    self.attention = make_attention(spec, dtype, rngs)
    self.mlp_norm = RMSNorm(spec.d_model, spec.norm_eps)
    if use_moe:
      self.mlp = MoE(spec.d_model, spec.num_routed_experts, spec.expert_dim,
                     spec.num_shared_experts, rngs, router=spec.router,
                     dispatch=spec.dispatch, dtype=dtype,
                     shared_expert_gate=spec.shared_expert_gate)
    else:
      self.mlp = SwiGLU(spec.d_model, spec.dense_mlp_dim, dtype, rngs)

  def attend(self, x, positions):
    """The first half of the block: x plus attention over its normalised input."""
    with jax.named_scope("attention"):
      return x + self.attention(self.attention_norm(x), positions).astype(x.dtype)

  def feed_forward(self, x):
    """The second half: x plus the dense MLP or MoE of its normalised input, and MoE stats."""
    if isinstance(self.mlp, MoE):
      with jax.named_scope("moe"):
        y, stats = self.mlp(self.mlp_norm(x))
        return x + y.astype(x.dtype), stats
    with jax.named_scope("mlp"):
      return x + self.mlp(self.mlp_norm(x)).astype(x.dtype), None

  def __call__(self, x, positions):
    return self.feed_forward(self.attend(x, positions))

  def decode(self, x, positions, cache, start):
    """The block for new tokens against its attention cache: (x, new cache)."""
    y, cache = self.attention.decode(self.attention_norm(x), positions, cache, start)
    return self.feed_forward(x + y.astype(x.dtype))[0], cache


class MTPModule(nnx.Module):
  """One depth of DeepSeek-V3's multi-token prediction.

  At position i it joins RMSNorm(embedding of token i + k) with RMSNorm(the previous depth's
  hidden state at i) through a 2D -> D projection, runs one Transformer block, and (through
  its own final norm and the model's shared output projection) predicts token i + k + 1.
  The concatenation puts the embedding first, as in the released weights (`eh_proj`); the
  paper writes the hidden state first.
  """

  def __init__(self, spec: ModelSpec, use_moe: bool, rngs: KeySource):
    self.embed_norm = RMSNorm(spec.d_model, spec.norm_eps)
    self.hidden_norm = RMSNorm(spec.d_model, spec.norm_eps)
    # [2D, D]: the first dimension is two model widths side by side, left unsharded
    self.w_proj = param(scaled_normal(2 * spec.d_model)(rngs.params(),
                                                        (2 * spec.d_model, spec.d_model)),
                        None, "embed")
    self.block = Block(spec, use_moe, rngs)
    self.final_norm = RMSNorm(spec.d_model, spec.norm_eps)
    self.dtype = DTYPES[spec.compute_dtype]

  def join(self, hidden_BxSxD, embedded_BxSxD):
    joined = jnp.concatenate([self.embed_norm(embedded_BxSxD), self.hidden_norm(hidden_BxSxD)], -1)
    return joined.astype(self.dtype) @ self.w_proj[...].astype(self.dtype)

  def __call__(self, hidden_BxSxD, embedded_BxSxD, positions_S):
    return self.block(self.join(hidden_BxSxD, embedded_BxSxD), positions_S)


def mtp_losses(token_losses, mtp_features, tokens):
  """Per depth k: mean cross-entropy and top-1 accuracy of predicting token i + k + 1 of the
  windows `tokens` [B, S + 1] from depth k's features [B, S - k, D], through
  `token_losses(features, targets) -> (nats, hits)` (`Transformer.token_losses`)."""
  losses, accuracies = [], []
  for depth, features in enumerate(mtp_features, start=1):
    nats, hits = token_losses(features, tokens[:, depth + 1:])
    losses.append(nats.mean())
    accuracies.append(hits.mean())
  return losses, accuracies


def _concatenated(stats_chunks: list) -> MoEStats | None:
  """MoE statistics with a leading layer axis, chunks joined in order."""
  return (jax.tree.map(lambda *leaves: jnp.concatenate(leaves), *stats_chunks)
          if stats_chunks else None)


class Transformer(nnx.Module):
  """The blocks are a list (`blocks`) or, with `spec.scan_layers`, two stacks run by scans
  (`dense_blocks`, `moe_blocks`; moe_jax/layers/stack.py) holding the same parameters:
  `with_layout` converts a model between the two."""

  def __init__(self, spec: ModelSpec, rngs: KeySource):
    self.embed = param(nnx.initializers.normal(1.0)(rngs.params(),
                                                    (spec.vocab_size, spec.d_model)),
                       "vocab", "embed")
    blocks = [Block(spec, i >= spec.num_dense_layers, rngs) for i in range(spec.num_layers)]
    if spec.scan_layers:
      dense, moe = blocks[:spec.num_dense_layers], blocks[spec.num_dense_layers:]
      self.dense_blocks = LayerStack(dense) if dense else None
      self.moe_blocks = LayerStack(moe) if moe else None
    else:
      self.blocks = nnx.List(blocks)
    self.final_norm = RMSNorm(spec.d_model, spec.norm_eps)
    self.unembed = param(scaled_normal(spec.d_model)(rngs.params(),
                                                     (spec.d_model, spec.vocab_size)),
                         "embed", "vocab")
    # The MTP blocks are built like the last main block (MoE when the model has MoE blocks).
    self.mtp = nnx.List([MTPModule(spec, spec.num_dense_layers < spec.num_layers, rngs)
                         for _ in range(spec.mtp_depth)])
    self.dtype = DTYPES[spec.compute_dtype]
    defaults = ModelSpec.field_defaults()
    self.spec = spec.replace(balancing=defaults["balancing"],
                             **{name: defaults[name] for name in STEP_ARGUMENT_FIELDS})

  def embed_tokens(self, tokens: Int[Array, "B S"]) -> Float[Array, "B S D"]:
    return self.embed[...][tokens].astype(self.dtype)

  def _stacks(self) -> list[LayerStack]:
    return [s for s in (self.dense_blocks, self.moe_blocks) if s is not None]

  def moe_layers(self) -> list[MoE]:
    """Every MoE layer in the order of the statistics: the main blocks' (with scanned layers,
    one MoE whose variables hold every MoE block's), then the MTP modules' blocks'."""
    blocks = [s.layers for s in self._stacks()] if self.spec.scan_layers else list(self.blocks)
    blocks += [m.block for m in self.mtp]
    return [b.mlp for b in blocks if isinstance(b.mlp, MoE)]

  def hidden_states(self, tokens: Int[Array, "B S"]) -> tuple[Float[Array, "B S D"], list]:
    """The last block's output (before the final norm) and the MoE blocks' statistics, in
    chunks with a leading layer axis."""
    positions = jnp.arange(tokens.shape[1])
    with jax.named_scope("embed"):
      x = self.embed_tokens(tokens)
    stats_chunks = []
    if self.spec.scan_layers:
      for stack in self._stacks():
        x, stats = stack(x, positions, policy=REMAT_POLICIES[self.spec.remat])
        if stats is not None:
          stats_chunks.append(stats)
      return x, stats_chunks
    for block in self.blocks:
      x, stats = self.run_block(block, x, positions)
      if stats is not None:
        stats_chunks.append(jax.tree.map(lambda a: a[None], stats))
    return x, stats_chunks

  def run_block(self, block: Block, x, positions):
    """`block(x, positions)`, under the remat policy: what its backward pass keeps."""
    if self.spec.remat == "none":
      return block(x, positions)
    # A pure function of the block's state (which its forward leaves unchanged), so that
    # jax.checkpoint can recompute it in the backward pass.
    graphdef, state = nnx.split(block)
    run = lambda state, x, positions: nnx.merge(graphdef, state)(x, positions)
    return jax.checkpoint(run, policy=REMAT_POLICIES[self.spec.remat])(state, x, positions)

  def with_layout(self, scan_layers: bool) -> "Transformer":
    """This model (same arrays) with its blocks as a list or as stacks: the other layout's
    model is built abstractly and takes this one's values, path by path."""
    if scan_layers == self.spec.scan_layers:
      return self
    spec = self.spec.replace(scan_layers=scan_layers)
    target = abstract_model(spec)
    nnx.update(target, converted_state(nnx.state(self), scan_layers, spec.num_layers,
                                       spec.num_dense_layers))
    return target

  def logits(self, normed_BxSxD) -> Float[Array, "B S V"]:
    """The shared output projection, float32 logits."""
    with jax.named_scope("output"):
      return output_logits(normed_BxSxD, self.unembed[...].astype(self.dtype))

  def token_losses(self, features_BxSxD, targets_BxS, unembed_DxV=None):
    """(cross-entropy, 1.0 where the target is the top prediction) of each position [B, S]
    from a final norm's output, through the output projection (this model's, or `unembed_DxV`
    where a pipeline hands the head's parameters in) fused with the loss
    (`output_cross_entropy`: the loss's gradient reaches the backward products in bf16)."""
    unembed_DxV = self.unembed[...] if unembed_DxV is None else unembed_DxV
    with jax.named_scope("output"):
      return output_cross_entropy(features_BxSxD, unembed_DxV.astype(self.dtype), targets_BxS,
                                  DTYPES[self.spec.loss_logits_dtype])

  def features(self, tokens: Int[Array, "B S"]) -> tuple[Float[Array, "B S D"], MoEStats]:
    """The output projection's input (the final norm of the last block's output) and the MoE
    blocks' statistics stacked along a leading layer axis."""
    x, stats_chunks = self.hidden_states(tokens)
    return self.final_norm(x), _concatenated(stats_chunks)

  def __call__(self, tokens: Int[Array, "B S"]) -> tuple[Float[Array, "B S V"], MoEStats]:
    """Logits in float32 and the MoE blocks' statistics stacked along a leading layer axis."""
    features, stats = self.features(tokens)
    return self.logits(features), stats

  def init_cache(self, batch: int, max_len: int) -> tuple[list, list]:
    """Empty decoding caches: one per main block, one per MTP module. Decoding runs on the
    blocks as a list (`with_layout(scan_layers=False)`)."""
    return ([b.attention.init_cache(batch, max_len) for b in self.blocks],
            [m.block.attention.init_cache(batch, max_len) for m in self.mtp])

  def decode(self, tokens_BxT, caches: list, start):
    """The main model on T new tokens at positions start .. start + T - 1, reading and
    extending the blocks' caches: (float32 logits, last hidden states, new caches)."""
    positions = start + jnp.arange(tokens_BxT.shape[1])
    x, new_caches = self.embed_tokens(tokens_BxT), []
    for block, cache in zip(self.blocks, caches):
      x, cache = block.decode(x, positions, cache, start)
      new_caches.append(cache)
    return self.logits(self.final_norm(x)), x, new_caches

  def mtp_decode(self, depth: int, hidden_BxTxD, next_tokens_BxT, cache, start):
    """MTP module `depth` (1-based) on T positions from `start`, joining the previous depth's
    hidden states with the embeddings of the tokens `depth` places ahead: (logits, hidden,
    new cache)."""
    module = self.mtp[depth - 1]
    positions = start + jnp.arange(hidden_BxTxD.shape[1])
    x = module.join(hidden_BxTxD, self.embed_tokens(next_tokens_BxT))
    hidden, cache = module.block.decode(x, positions, cache, start)
    return self.logits(module.final_norm(hidden)), hidden, cache

  def with_mtp(self, tokens: Int[Array, "B S"]):
    """(the main model's `features`, statistics of every MoE layer incl. the MTP blocks', the
    MTP modules' features per depth: their final norm's output, the output projection's input).

    Depth k's features [B, S - k, D] at position i predict token i + k + 1 of the window that
    `tokens` starts (the main model's predict i + 1).
    """
    hidden, stats_chunks = self.hidden_states(tokens)
    features = self.final_norm(hidden)
    mtp_features = []
    with jax.named_scope("mtp"):
      for depth, module in enumerate(self.mtp, start=1):
        length = tokens.shape[1] - depth
        joined = module.join(hidden[:, :length], self.embed_tokens(tokens[:, depth:]))
        hidden, stats = self.run_block(module.block, joined, jnp.arange(length))
        if stats is not None:
          stats_chunks.append(jax.tree.map(lambda a: a[None], stats))
        mtp_features.append(module.final_norm(hidden))
    return features, _concatenated(stats_chunks), tuple(mtp_features)


def abstract_model(spec: ModelSpec, seed: int = 0) -> Transformer:
  """The model of `spec` with ShapeDtypeStructs for values, computing nothing: its keys come
  from `ParamKeys`, whose count is a Python int, so building it stays linear in the number of
  parameters (`layers/params.py`)."""
  return nnx.eval_shape(lambda: Transformer(spec, ParamKeys(seed)))


ROUTED_EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")


def parameter_counts(spec: ModelSpec) -> dict[str, int]:
  """Parameter counts from shapes alone: total; active (what one token uses: routed experts
  count top_k / E of theirs); active_experts (the routed and shared expert weights one token
  uses); embedding (the input and output matrices); active_matmul (the active weights a token
  is multiplied by: matrices, not the embedding lookup, norm scales or biases)."""
  spec = spec.replace(scan_layers=False)   # one array per layer
  params = nnx.state(abstract_model(spec), nnx.Param)
  counts = dict.fromkeys(("total", "active", "active_experts", "embedding", "active_matmul"), 0)
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    size = int(np.prod(leaf.shape))
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    names = [n for n in names if n != "value"]   # the Variable's own field
    routed = names[-1] in ROUTED_EXPERT_WEIGHTS and leaf.ndim == 3
    used = size * spec.router.top_k // spec.num_routed_experts if routed else size
    counts["total"] += size
    counts["active"] += used
    if routed or "shared" in names:
      counts["active_experts"] += used
    if names[-1] in ("embed", "unembed"):
      counts["embedding"] += size
    if leaf.ndim >= 2 and names[-1] != "embed" and not names[-1].startswith("b_"):
      counts["active_matmul"] += used
  return counts
