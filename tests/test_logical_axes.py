"""Every parameter carries the logical names of its dimensions from where it is created, so
every parameter is in reach of the `sharding.*` rules (none is replicated for want of a name)."""

import jax
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from moe_jax import parallel, steps
from moe_jax.layers.moe import BalancingBias
from moe_jax.layers.params import logical_axes
from moe_jax.model import ModelSpec, abstract_model
from tests import model_variants

VARIANTS = {
    **model_variants.VARIANTS,
    "gqa, q/k norms over all heads": model_variants.SMALL.replace(qk_norm="whole"),
    "mla with a query latent, MTP 2": model_variants.SMALL.replace(attention="mla",
                                                                   q_lora_rank=16, mtp_depth=2),
    "all dense": model_variants.SMALL.replace(num_dense_layers=3),
}


def _variables(spec: ModelSpec) -> dict[str, nnx.Variable]:
  model = abstract_model(spec)
  return {"/".join(map(str, path)): variable for state in nnx.state(model, nnx.Param, BalancingBias)
          for path, variable in nnx.to_flat_state(state)}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_parameter_of_every_variant_has_logical_names(variant):
  variables = _variables(VARIANTS[variant])
  assert len(variables) > 10
  for path, variable in variables.items():
    names = logical_axes(variable)
    assert names is not None, f"{path} has no logical axis names"
    assert len(names) == variable.ndim, (path, names, variable.shape)
    assert all(n is None or n in parallel.LOGICAL_AXES for n in names), (path, names)


def test_the_parameters_a_name_table_missed_have_their_names():
  """Biases, q/k norm scales, the shared-expert gate and the MTP projection, by hand."""
  gqa = _variables(VARIANTS["gqa, biases, per-head norms, gated shared expert, MTP"])
  expected = {
      "blocks/0/attention/b_q": ("heads", "head_dim"),
      "blocks/0/attention/b_k": ("kv_heads", "head_dim"),
      "blocks/0/attention/query_norm_scale": ("head_dim",),
      "blocks/1/mlp/shared_gate": ("embed", None),
      "blocks/1/mlp/balancing_bias": ("router",),
      "mtp/0/w_proj": (None, "embed"),
      "mtp/0/block/mlp/w_gate": ("experts", "embed", "mlp"),
  }
  for path, names in expected.items():
    assert logical_axes(gqa[path]) == names, path
  whole = _variables(VARIANTS["gqa, q/k norms over all heads"])
  assert logical_axes(whole["blocks/0/attention/key_norm_scale"]) == ("kv_heads",)


def test_a_rule_reaches_a_bias_and_its_optimizer_moments():
  """sharding.heads='expert' splits the query bias and both of its Adam moments."""
  spec = VARIANTS["gqa, biases, per-head norms, gated shared expert, MTP"]
  _, state = steps.abstract_state(spec, optax.adam(1e-3), 0)
  mesh = parallel.make_mesh(4, 2)
  rules = {**parallel.DEFAULT_RULES, "heads": ("expert",)}
  shardings = parallel.state_shardings(state, mesh, rules)
  bias = shardings.params["blocks"][0]["attention"]["b_q"]
  assert bias.get_value().spec == P("expert", None)
  moments = [s for path, s in jax.tree_util.tree_leaves_with_path(shardings.opt_state)
             if "b_q" in jax.tree_util.keystr(path)]
  assert len(moments) == 2 * 4   # mu and nu of 3 blocks' and 1 MTP block's query bias
  assert all(m.spec == P("expert", None) for m in moments)
