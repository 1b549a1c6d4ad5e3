"""The memory plan (`python -m moe_jax.plan`) against XLA's memory analysis of the same
compiled training step on 8 simulated devices."""

import subprocess
import sys

import jax
import numpy as np
import pytest

from moe_jax import parallel, plan
from moe_jax.config_validation import validate_config
from moe_jax.train import jit_train_step, laid_out_state, mesh_of, step_arguments_on

CASES = {
    "fsdp 8, no remat": ({"fsdp": 8}, {}),
    "data 2 x fsdp 2 x expert 2, all_to_all, remat block, scanned": (
        {"data": 2, "fsdp": 2, "expert": 2},
        {"expert_parallel": "all_to_all", "remat": "block", "scan_layers": True}),
    "fsdp 4 x expert 2, all_to_all, remat costly, scanned": (
        {"fsdp": 4, "expert": 2},
        {"expert_parallel": "all_to_all", "remat": "costly", "scan_layers": True}),
}


def _config(tiny_config, mesh: dict, options: dict):
  c = tiny_config
  c.model.num_kv_heads = 2
  c.data.batch_size, c.data.seq_len = 16, 128
  c.mesh.update({a: mesh.get(a, 1) for a in parallel.MESH_AXES})
  c.dispatch.expert_parallel = options.get("expert_parallel", "none")
  c.model.remat = options.get("remat", "none")
  c.model.scan_layers = options.get("scan_layers", False)
  validate_config(c, 8)
  return c


def _xla_memory(config):
  mesh = mesh_of(config)
  with jax.set_mesh(mesh):
    spec, _, tx, graphdef, state, shardings, rules = laid_out_state(config, mesh)
    tokens = jax.ShapeDtypeStruct((config.data.batch_size, config.data.seq_len + 1), np.int32,
                                  sharding=parallel.batch_sharding(mesh, rules["batch"]))
    return jit_train_step(spec, graphdef, tx, shardings).lower(
        state, tokens, *step_arguments_on(config, mesh)).compile().memory_analysis()


@pytest.mark.parametrize("case", list(CASES))
def test_the_plan_matches_xlas_memory_analysis_of_the_step(tiny_config, case):
  """The training state per device exactly (XLA's arguments less the token batch, the
  optimizer's values and the balancing values); the total (state, gradients, activations, one
  block's backward) within 0.6x-1.3x of XLA's (arguments + outputs - donated + temporaries).
  Measured on the CPU backend: 0.69, 0.79 and 1.05."""
  config = _config(tiny_config, *CASES[case])
  sizes = {a: int(config.mesh[a]) for a in parallel.MESH_AXES}
  p = plan.plan(config, sizes, backend="cpu")
  xla = _xla_memory(config)
  token_split = sizes["data"] * sizes["fsdp"] * sizes["expert"]
  batch_bytes = config.data.batch_size // token_split * (config.data.seq_len + 1) * 4
  step_counter = 4   # the training state's int32 step
  optimizer = 6 * 4  # steps.OptimizerValues: six float32 values, an argument of the step
  balancing = 5 * 4  # routing.BalancingValues: four float32 values and an int32, arguments too
  assert (p.parameters + p.optimizer + step_counter + optimizer + balancing
          == xla.argument_size_in_bytes - batch_bytes)
  xla_total = (xla.argument_size_in_bytes + xla.output_size_in_bytes - xla.alias_size_in_bytes
               + xla.temp_size_in_bytes)
  assert 0.6 * xla_total <= p.total <= 1.3 * xla_total, (p, xla_total)


def test_the_command_says_whether_it_fits_and_finds_the_fewest_devices():
  run = lambda *flags: subprocess.run(
      [sys.executable, "-m", "moe_jax.plan", "--config=configs/default.py:tiny", *flags],
      capture_output=True, text=True, timeout=300)
  fits = run("--mesh=fsdp=4,expert=2", "--device_memory=1")
  assert fits.returncode == 0, fits.stderr
  assert "mesh: fsdp 4 x expert 2 (8 devices)" in fits.stdout and "\nfits in" in fits.stdout
  found = run("--find", "--device_memory=0.0112", "--usable_fraction=1",
              "--config.data.seq_len=256")
  assert found.returncode == 0, found.stderr
  devices = int(found.stdout.split("fewest devices of")[1].split(":")[1].split()[0])
  assert devices > 1 and "does NOT fit" not in found.stdout   # one device is too small
  wrong = run("--mesh=fsdp=3")
  assert wrong.returncode == 2 and wrong.stderr.startswith("error: ") and \
      "Traceback" not in wrong.stderr
  flags_out_of_range = run("--find", "--device_memory=-1", "--usable_fraction=2",
                           "--batch_per_device=0")
  assert (flags_out_of_range.returncode, flags_out_of_range.stderr) == (
      2, "error: --device_memory=-1 must be a size in GiB above 0; --usable_fraction=2 must be in "
         "(0, 1]; --batch_per_device=0 must be >= 1\n")


def test_a_pipelined_config_is_refused_by_name_not_planned_wrongly(tiny_config):
  """The plan models no pipeline stages: with mesh.stage > 1 it says so and points to
  --dry_run, rather than giving an unpipelined step's activations."""
  from moe_jax.settings import ConfigError
  sizes = {"data": 4, "fsdp": 1, "tensor": 1, "expert": 1, "stage": 2}
  with pytest.raises(ConfigError, match="mesh.stage=2: the plan does not model pipeline stages"):
    plan.plan(tiny_config, sizes, backend="cpu")
