"""Hugging Face MoE checkpoints in and out: config.json + *.safetensors <-> a moe_jax model.

Families (`model_type`): `deepseek_v3`, `deepseek_v2` (V2 and V2-Lite), `mixtral`,
`qwen2_moe`, `qwen3_moe` and `olmoe`.
Import reads the safetensors files into jax arrays (no torch needed; bf16 kept), builds a `ModelSpec` from
config.json, and maps every tensor to its parameter: dense first layers, shared experts, MLA,
the router's correction bias as the balancing bias, and the MTP modules' weights when the
checkpoint has them (DeepSeek-V3's `model.layers.{num_hidden_layers + k}.*`). Export writes
the same names and shapes back, so a round trip is exact.

Where implementations differ we follow DeepSeek's own inference code: experts outside a
token's chosen groups are at -inf, not 0, so that a negative biased score cannot lose to a
masked expert (Hugging Face fills 0); see `tests/test_hf.py`.
"""

import json
from pathlib import Path
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.dispatch import DispatchSettings
from moe_jax.layers.moe import RoutingState
from moe_jax.model import ModelSpec, abstract_model
from moe_jax.routing import RouterSettings

FAMILIES = ("deepseek_v3", "deepseek_v2", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
GQA_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


class ImportError_(ValueError):
  """The checkpoint cannot be imported; the message says why."""


class Imported(NamedTuple):
  spec: ModelSpec
  graphdef: nnx.GraphDef
  params: nnx.State
  biases: nnx.State
  hf_config: dict     # the checkpoint's config.json, kept for export


# ---- configs ------------------------------------------------------------------------------

def _rope_fields(hf: dict) -> dict:
  """Our RoPE fields from `rope_parameters` (transformers 5) or `rope_theta`/`rope_scaling`."""
  params = dict(hf.get("rope_parameters") or {})
  scaling = dict(hf.get("rope_scaling") or {})
  params = {**scaling, **params}
  theta = params.get("rope_theta", hf.get("rope_theta", 10_000.0))
  kind = params.get("rope_type", params.get("type", "default"))
  fields = dict(rope_theta=float(theta), rope_scaling="none", rope_factor=1.0,
                rope_original_max_len=int(hf.get("max_position_embeddings", 4096)),
                yarn_beta_fast=32.0, yarn_beta_slow=1.0, yarn_mscale=1.0, yarn_mscale_all_dim=1.0)
  if kind == "yarn":
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    if not (mscale and mscale_all_dim):   # Hugging Face: cos/sin x yarn_mscale(factor, 1) only
      mscale, mscale_all_dim = 1.0, 0.0
    fields.update(rope_scaling="yarn", rope_factor=float(params["factor"]),
                  rope_original_max_len=int(params.get("original_max_position_embeddings",
                                                       fields["rope_original_max_len"])),
                  yarn_beta_fast=float(params.get("beta_fast") or 32.0),
                  yarn_beta_slow=float(params.get("beta_slow") or 1.0),
                  yarn_mscale=float(mscale), yarn_mscale_all_dim=float(mscale_all_dim))
  elif kind != "default":
    raise ImportError_(f"RoPE type {kind!r} is not supported (default or yarn)")
  return fields


def _dense_prefix(family: str, hf: dict) -> int:
  """Qwen's dense layers (`mlp_only_layers`, `decoder_sparse_step`) as a leading count."""
  if family not in ("qwen2_moe", "qwen3_moe"):
    return 0
  dense = sorted(hf.get("mlp_only_layers") or [])
  if (hf.get("decoder_sparse_step") or 1) != 1 or dense != list(range(len(dense))):
    raise ImportError_("only leading dense layers are supported (decoder_sparse_step 1, "
                       f"mlp_only_layers 0..k-1); this config has {dense} and step "
                       f"{hf.get('decoder_sparse_step')}")
  return len(dense)


def _gqa_fields(family: str, hf: dict) -> tuple[dict, RouterSettings]:
  """The attention and MoE fields, and the router, of Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE."""
  heads = hf["num_attention_heads"]
  if hf.get("attention_bias") or hf.get("clip_qkv"):
    raise ImportError_("attention_bias (on the output projection) and clip_qkv are not supported")
  experts = hf.get("num_local_experts") or hf["num_experts"]   # the name varies by version
  expert_dim = hf.get("moe_intermediate_size") or hf["intermediate_size"]
  shared = hf.get("shared_expert_intermediate_size") or 0
  if shared % expert_dim:
    raise ImportError_(f"shared_expert_intermediate_size {shared} is not a multiple of "
                       f"moe_intermediate_size {expert_dim}")
  router = RouterSettings(
      score_function="softmax", top_k=hf["num_experts_per_tok"],
      norm_topk_prob=True if family == "mixtral" else bool(hf.get("norm_topk_prob", False)))
  return dict(
      num_dense_layers=_dense_prefix(family, hf), attention="gqa",
      num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
      q_lora_rank=0, kv_lora_rank=0, qk_nope_head_dim=0, qk_rope_head_dim=0, v_head_dim=0,
      qkv_bias=family == "qwen2_moe" and hf.get("qkv_bias", True) is not False,
      qk_norm={"qwen3_moe": "per_head", "olmoe": "whole"}.get(family, "none"),
      dense_mlp_dim=hf["intermediate_size"], num_routed_experts=experts,
      num_shared_experts=shared // expert_dim, shared_expert_gate=bool(shared),
      expert_dim=expert_dim), router


def spec_from_hf_config(hf: dict, mtp_depth: int = 0) -> ModelSpec:
  """The ModelSpec of a Hugging Face config (dict of config.json): what the family sets, and
  dropless dispatch (a pretrained model's outputs do not depend on a capacity); the rest
  (float32 compute, no expert parallelism, balancing) are the settings' defaults."""
  family = hf.get("model_type")
  if family not in FAMILIES:
    raise ImportError_(f"model_type {family!r} is not supported; supported: {list(FAMILIES)}")
  common = dict(
      vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
      num_heads=hf["num_attention_heads"], norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      dispatch=DispatchSettings(strategy="dropless", capacity_factor=1.0), mtp_depth=mtp_depth,
      **_rope_fields(hf))
  if family in GQA_FAMILIES:
    fields, router = _gqa_fields(family, hf)
    return ModelSpec(**common, **fields, router=router)
  is_v3 = family == "deepseek_v3"
  grouped = is_v3 or hf.get("topk_method") == "group_limited_greedy"
  return ModelSpec(
      **common, num_dense_layers=hf.get("first_k_dense_replace", 0), attention="mla",
      num_kv_heads=hf["num_attention_heads"], head_dim=hf["qk_nope_head_dim"] + hf["qk_rope_head_dim"],
      q_lora_rank=hf.get("q_lora_rank") or 0, kv_lora_rank=hf["kv_lora_rank"],
      qk_nope_head_dim=hf["qk_nope_head_dim"], qk_rope_head_dim=hf["qk_rope_head_dim"],
      v_head_dim=hf["v_head_dim"], dense_mlp_dim=hf["intermediate_size"],
      num_routed_experts=hf["n_routed_experts"], num_shared_experts=hf.get("n_shared_experts") or 0,
      expert_dim=hf["moe_intermediate_size"],
      router=RouterSettings(
          score_function="sigmoid" if is_v3 else "softmax", top_k=hf["num_experts_per_tok"],
          route_scale=float(hf.get("routed_scaling_factor", 1.0)),
          norm_topk_prob=bool(hf.get("norm_topk_prob", is_v3)),
          num_groups=(hf.get("n_group") or 1) if grouped else 1,
          topk_groups=(hf.get("topk_group") or 1) if grouped else 1,
          group_score="top2_sum" if is_v3 else "max"))


# ---- weights ------------------------------------------------------------------------------

# A rule: (Hugging Face name, our path, to ours, to theirs). Names use {i} for the layer.
Rule = tuple[str, tuple, Callable, Callable]


def _linear(shape_fn=None):
  """torch Linear [out, in] <-> ours [in, ...out] (out reshaped by shape_fn(spec) if given)."""
  def to_ours(w, spec):
    w = w.T
    return w.reshape(w.shape[0], *shape_fn(spec)) if shape_fn else w
  def to_theirs(w, spec):
    return w.reshape(w.shape[0], -1).T if shape_fn else w.T
  return to_ours, to_theirs


def _into_heads(shape_fn):
  """torch Linear [D, N*H] (output projection) <-> ours [N, H, D]."""
  to_ours = lambda w, spec: w.T.reshape(*shape_fn(spec), w.shape[0])
  to_theirs = lambda w, spec: w.reshape(-1, w.shape[-1]).T
  return to_ours, to_theirs


SAME = (lambda w, spec: w, lambda w, spec: w)


def _bias(shape_fn):
  """A projection's bias [N*H] <-> ours [N, H]."""
  return (lambda b, spec: b.reshape(shape_fn(spec)), lambda b, spec: b.reshape(-1))


def _attention_rules(family: str, spec: ModelSpec, prefix: str, ours: tuple) -> list[Rule]:
  a = f"{prefix}.self_attn"
  if spec.attention == "gqa":
    heads = lambda n: (lambda s: (n(s), s.head_dim))
    q, kv = heads(lambda s: s.num_heads), heads(lambda s: s.num_kv_heads)
    rules = [(f"{a}.q_proj.weight", ours + ("w_q",), *_linear(q)),
             (f"{a}.k_proj.weight", ours + ("w_k",), *_linear(kv)),
             (f"{a}.v_proj.weight", ours + ("w_v",), *_linear(kv)),
             (f"{a}.o_proj.weight", ours + ("w_o",), *_into_heads(q))]
    if spec.qkv_bias:
      rules += [(f"{a}.{t}_proj.bias", ours + (f"b_{t}",), *_bias(shape))
                for t, shape in (("q", q), ("k", kv), ("v", kv))]
    if spec.qk_norm != "none":
      rules += [(f"{a}.q_norm.weight", ours + ("query_norm_scale",), *SAME),
                (f"{a}.k_norm.weight", ours + ("key_norm_scale",), *SAME)]
    return rules
  qk = lambda s: (s.num_heads, s.qk_nope_head_dim + s.qk_rope_head_dim)
  rules = [(f"{a}.kv_a_proj_with_mqa.weight", ours + ("w_kv_down",), *_linear()),
           (f"{a}.kv_a_layernorm.weight", ours + ("kv_norm_scale",), *SAME),
           (f"{a}.kv_b_proj.weight", ours + ("w_kv_up",),
            *_linear(lambda s: (s.num_heads, s.qk_nope_head_dim + s.v_head_dim))),
           (f"{a}.o_proj.weight", ours + ("w_o",),
            *_into_heads(lambda s: (s.num_heads, s.v_head_dim)))]
  if spec.q_lora_rank:
    rules += [(f"{a}.q_a_proj.weight", ours + ("w_q_down",), *_linear()),
              (f"{a}.q_a_layernorm.weight", ours + ("q_norm_scale",), *SAME),
              (f"{a}.q_b_proj.weight", ours + ("w_q_up",), *_linear(qk))]
  else:
    rules.append((f"{a}.q_proj.weight", ours + ("w_q",), *_linear(qk)))
  return rules


def _stack_experts(name_fn, num_experts):
  """Per-expert torch Linears -> ours [E, in, out]; the reverse splits them again."""
  def to_ours(tensors, spec):
    return jnp.stack([tensors.pop(name_fn(e)).T for e in range(num_experts)])
  def to_theirs(w, spec):
    return {name_fn(e): w[e].T for e in range(num_experts)}
  return to_ours, to_theirs


def _block_rules(family: str, spec: ModelSpec, hf_index: int, ours: tuple, moe: bool):
  """(single-tensor rules, expert-stack rules) of one decoder layer."""
  p = f"model.layers.{hf_index}"
  rules = [(f"{p}.input_layernorm.weight", ours + ("attention_norm", "scale"), *SAME),
           (f"{p}.post_attention_layernorm.weight", ours + ("mlp_norm", "scale"), *SAME)]
  rules += _attention_rules(family, spec, p, ours + ("attention",))
  mlp = ours + ("mlp",)
  if family == "mixtral":   # router "gate", experts w1 (gate), w3 (up), w2 (down)
    m = f"{p}.block_sparse_moe"
    names = {"gate": "w1", "up": "w3", "down": "w2"}
    return rules + [(f"{m}.gate.weight", mlp + ("router_kernel",), *_linear())], [
        (mlp + (f"w_{t}",), _stack_experts(lambda e, t=t: f"{m}.experts.{e}.{names[t]}.weight",
                                           spec.num_routed_experts))
        for t in ("gate", "up", "down")]
  m = f"{p}.mlp"
  projections = ("gate", "up", "down")
  if not moe:
    return rules + [(f"{m}.{t}_proj.weight", mlp + (f"w_{t}",), *_linear())
                    for t in projections], []
  rules.append((f"{m}.gate.weight", mlp + ("router_kernel",), *_linear()))
  if family == "deepseek_v3":
    rules.append((f"{m}.gate.e_score_correction_bias", mlp + ("balancing_bias",), *SAME))
  if spec.num_shared_experts:   # DeepSeek: "shared_experts"; Qwen2-MoE: "shared_expert" + gate
    shared = "shared_expert" if family == "qwen2_moe" else "shared_experts"
    rules += [(f"{m}.{shared}.{t}_proj.weight", mlp + ("shared", f"w_{t}"), *_linear())
              for t in projections]
    if spec.shared_expert_gate:
      rules.append((f"{m}.shared_expert_gate.weight", mlp + ("shared_gate",), *_linear()))
  stacks = [(mlp + (f"w_{t}",), _stack_experts(lambda e, t=t: f"{m}.experts.{e}.{t}_proj.weight",
                                               spec.num_routed_experts))
            for t in projections]
  return rules, stacks


def weight_rules(family: str, spec: ModelSpec):
  """Every (rule, stack) of a model: main layers, then MTP modules (DeepSeek's layer
  indices num_layers + k), embedding, final norm and output head."""
  rules = [("model.embed_tokens.weight", ("embed",), *SAME),
           ("model.norm.weight", ("final_norm", "scale"), *SAME),
           ("lm_head.weight", ("unembed",), *_linear())]
  stacks = []
  has_moe = spec.num_dense_layers < spec.num_layers
  for i in range(spec.num_layers):
    r, s = _block_rules(family, spec, i, ("blocks", i), i >= spec.num_dense_layers)
    rules, stacks = rules + r, stacks + s
  for k in range(spec.mtp_depth):
    p = f"model.layers.{spec.num_layers + k}"
    rules += [(f"{p}.enorm.weight", ("mtp", k, "embed_norm", "scale"), *SAME),
              (f"{p}.hnorm.weight", ("mtp", k, "hidden_norm", "scale"), *SAME),
              (f"{p}.eh_proj.weight", ("mtp", k, "w_proj"), *_linear()),
              (f"{p}.shared_head.norm.weight", ("mtp", k, "final_norm", "scale"), *SAME)]
    r, s = _block_rules(family, spec, spec.num_layers + k, ("mtp", k, "block"), has_moe)
    rules, stacks = rules + r, stacks + s
  return rules, stacks


def _mtp_layers_in(tensors: dict, hf: dict) -> int:
  """How many DeepSeek MTP layers (`num_nextn_predict_layers`) the checkpoint holds."""
  layers = hf["num_hidden_layers"]
  wanted = hf.get("num_nextn_predict_layers") or 0
  return sum(1 for k in range(wanted) if f"model.layers.{layers + k}.eh_proj.weight" in tensors)


def _put(flat: dict, path: tuple, value, name: str, dtype):
  if path not in flat:
    raise ImportError_(f"{name}: no parameter {path} in the model built from config.json")
  expected = flat[path].shape
  if tuple(value.shape) != tuple(expected):
    raise ImportError_(f"{name}: shape {tuple(value.shape)} does not fit {path} {tuple(expected)}")
  flat[path] = flat[path].replace(jnp.asarray(value, dtype))


def from_tensors(tensors: dict, hf: dict, dtype=jnp.float32, scan_layers: bool = False) -> Imported:
  """The moe_jax model of a Hugging Face config and its tensors (name -> array), with
  parameters stored in `dtype` (bfloat16 halves the memory of a large checkpoint), its blocks
  as a list or, with `scan_layers`, as stacks (`model.scan_layers`)."""
  spec = spec_from_hf_config(hf, _mtp_layers_in(tensors, hf))
  family = hf["model_type"]
  model = abstract_model(spec)
  graphdef, state = nnx.split(model)
  flat = dict(nnx.to_flat_state(state))
  if hf.get("tie_word_embeddings") and "lm_head.weight" not in tensors:
    tensors = {**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"]}
  rules, stacks = weight_rules(family, spec)
  missing = [r[0] for r in rules if r[0] not in tensors]
  if missing:
    raise ImportError_(f"{len(missing)} tensors missing from the checkpoint, e.g. {missing[:3]}")
  tensors = dict(tensors)   # each tensor is dropped once converted: peak memory ~ one copy
  for name, path, to_ours, _ in rules:
    _put(flat, path, to_ours(jnp.asarray(tensors.pop(name)), spec), name, dtype)
  for path, (to_ours, _) in stacks:
    _put(flat, path, to_ours(tensors, spec), f"the experts' {path[-1]}", dtype)
  assigned = {path for _, path, _, _ in rules} | {path for path, _ in stacks}
  for path in set(flat) - assigned:   # e.g. Mixtral and DeepSeek-V2 have no correction bias
    if path[-1] != "balancing_bias":
      raise ImportError_(f"parameter {path} got no tensor from the checkpoint")
    flat[path] = flat[path].replace(jnp.zeros(flat[path].shape, dtype))
  model = nnx.merge(graphdef, nnx.from_flat_state(flat)).with_layout(scan_layers)
  graphdef, params, biases = nnx.split(model, nnx.Param, RoutingState)
  return Imported(model.spec, graphdef, params, biases, hf)


def to_tensors(imported: Imported) -> dict[str, jax.Array]:
  """The Hugging Face tensors (name -> array in the parameters' dtype) of a model; MTP
  modules included, with DeepSeek's copies of the shared embedding and head in each."""
  spec, family = imported.spec.replace(scan_layers=False), imported.hf_config["model_type"]
  model = nnx.merge(imported.graphdef, imported.params, imported.biases).with_layout(False)
  flat = {path: v[...] for path, v in nnx.to_flat_state(nnx.state(model))}
  rules, stacks = weight_rules(family, spec)
  tensors = {name: to_theirs(flat[path], spec) for name, path, _, to_theirs in rules}
  for path, (_, to_theirs) in stacks:
    tensors.update(to_theirs(flat[path], spec))
  for k in range(spec.mtp_depth):
    p = f"model.layers.{spec.num_layers + k}"
    tensors[f"{p}.embed_tokens.weight"] = tensors["model.embed_tokens.weight"]
    tensors[f"{p}.shared_head.head.weight"] = tensors["lm_head.weight"]
  return tensors


# ---- files --------------------------------------------------------------------------------

def load(directory, dtype=jnp.float32, scan_layers: bool = False) -> Imported:
  """A Hugging Face checkpoint directory (config.json and one or more .safetensors), its
  parameters in `dtype`, its blocks stacked for scans with `scan_layers`."""
  from safetensors.flax import load_file
  directory = Path(directory)
  config_path = directory / "config.json"
  if not config_path.exists():
    raise ImportError_(f"{config_path} not found: expected a Hugging Face checkpoint directory")
  files = sorted(directory.glob("*.safetensors"))
  if not files:
    raise ImportError_(f"no .safetensors files in {directory}")
  tensors = {}
  for path in files:
    tensors.update(load_file(path))
  return from_tensors(tensors, json.loads(config_path.read_text()), dtype, scan_layers)


def save(directory, imported: Imported) -> None:
  """Writes config.json and model.safetensors in the checkpoint's own format."""
  from safetensors.flax import save_file
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  hf = dict(imported.hf_config)
  if imported.spec.mtp_depth:
    hf["num_nextn_predict_layers"] = imported.spec.mtp_depth
  (directory / "config.json").write_text(json.dumps(hf, indent=2))
  save_file(to_tensors(imported), directory / "model.safetensors", metadata={"format": "pt"})
