"""Bad input, tried systematically through the command's entry point (`moe_jax.main.run`).

Each malformed config, data set or checkpoint must give exit status 2 and one `error:` message
that names the problem, with no traceback, nothing compiled, and nothing in the workdir created
or changed.
"""

import hashlib

import jax
import ml_collections
import numpy as np
import pytest

from configs.default import get_config
from moe_jax.main import run

COMPILES = {"count": 0}


def _count_compiles(event, duration, **kwargs):
  if event == "/jax/core/compile/backend_compile_duration":
    COMPILES["count"] += 1


jax.monitoring.register_event_duration_secs_listener(_count_compiles)


def _with(config, **changes):
  """A copy of `config` with dotted fields set to any value, type checks bypassed (as a config
  file written by hand could do); a value of DELETE removes the field."""
  tree = config.to_dict()
  for dotted, value in changes.items():
    *sections, name = dotted.split("__")
    node = tree
    for section in sections:
      node = node[section]
    if value is DELETE:
      del node[name]
    else:
      node[name] = value
  return ml_collections.ConfigDict(tree)


DELETE = object()


def _snapshot(directory):
  return {p.relative_to(directory): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(directory.rglob("*")) if p.is_file()} if directory.exists() else None


def _refused(config, workdir, capsys, *expected):
  """Runs `config` in `workdir`; checks the clean refusal and returns the message."""
  before, compiles = _snapshot(workdir), COMPILES["count"]
  assert run(config, str(workdir)) == 2
  stderr = capsys.readouterr().err
  assert stderr.startswith("error: ") and stderr.count("error:") == 1, stderr
  assert "Traceback" not in stderr
  for text in expected:
    assert text in stderr, (text, stderr)
  assert COMPILES["count"] == compiles, "compiled before refusing"
  assert _snapshot(workdir) == before, "the workdir changed"
  return stderr


# ---- configs -------------------------------------------------------------------------------

BAD_CONFIGS = {
    # unknown keys
    "unknown field": ({"model__num_experts": 8},
                      ["model.num_experts is not a known field (did you mean"]),
    "unknown section": ({"trainer": {"steps": 3}}, ["trainer is not a known field (did you mean train?)"]),
    "missing field": ({"optimizer__b1": DELETE}, ["optimizer.b1: missing"]),
    "field that moved": ({"model__top_k": 3, "router__top_k": DELETE},
                         ["model.top_k is now router.top_k", "router.top_k: missing"]),
    # wrong types
    "string for int": ({"router__top_k": "2"}, ["router.top_k='2' must be an integer"]),
    "float for int": ({"data__seq_len": 64.5}, ["data.seq_len=64.5 must be an integer"]),
    "int for bool": ({"router__norm_topk_prob": 1}, ["router.norm_topk_prob=1 must be True or False"]),
    "string for float": ({"optimizer__learning_rate": "3e-3"},
                         ["optimizer.learning_rate='3e-3' must be a number"]),
    "value for section": ({"mesh": 8}, ["mesh=8 must be a section"]),
    # impossible sizes
    "zero width": ({"model__d_model": 0}, ["model.d_model=0 must be >= 1"]),
    "one-token context": ({"data__seq_len": 1}, ["data.seq_len=1 must be >= 2"]),
    "top_k above experts": ({"router__top_k": 9}, ["router.top_k=9 is larger than model.num_routed_experts=8"]),
    "odd head_dim": ({"model__head_dim": 33}, ["model.head_dim=33 must be even"]),
    "batch over devices": ({"data__batch_size": 12}, ["data.batch_size=12 does not divide over the 8 devices"]),
    "experts over expert axis": ({"model__num_routed_experts": 6, "mesh__data": 2, "mesh__expert": 4},
                                 ["model.num_routed_experts=6 is not divisible by the 4 devices"]),
    # mesh shapes
    "mesh too small": ({"mesh__data": 3}, ["mesh: data=3 x fsdp=1 x tensor=1 x expert=1 x stage=1 = 3 "
                                             "devices, but 8 are available"]),
    "mesh not dividing": ({"mesh__expert": 3}, ["mesh: 8 devices cannot be split with fixed axes of 3"]),
    "two free axes": ({"mesh__expert": -1}, ["mesh: at most one axis may be -1"]),
    "zero axis": ({"mesh__expert": 0}, ["mesh: sizes must be positive or -1"]),
    # unknown names
    "router": ({"router__score_function": "hash"}, ["router.score_function='hash' is unknown; choose from"]),
    "dispatcher": ({"dispatch__strategy": "megablocks"}, ["dispatch.strategy='megablocks' is unknown"]),
    "expert parallel variant": ({"dispatch__expert_parallel": "all_reduce"},
                                ["dispatch.expert_parallel='all_reduce' is unknown"]),
    "replicas without all_gather": ({"dispatch__expert_replicas": 2},
                                    ["dispatch.expert_replicas=2 places copies of hot experts on "
                                     "expert-parallel ranks of the 'all_gather' variant, but "
                                     "dispatch.expert_parallel='none'"]),
    "bias rule": ({"balancing__bias_update_rule": "pid"}, ["balancing.bias_update_rule='pid' is unknown"]),
    "data source": ({"data__source": "web"}, ["data.source='web' is unknown"]),
    "sharding axis": ({"sharding__embed": "pipe"}, ["sharding.embed=pipe: unknown mesh axis"]),
    "stage axis in a rule": ({"sharding__embed": "stage"},
                             ["sharding.embed=stage: the stage axis holds pipeline stages"]),
    # pipelines
    "pipeline schedule": ({"pipeline__schedule": "interleaved"},
                          ["pipeline.schedule='interleaved' is unknown; choose from"]),
    "stages without a stack": ({"mesh__stage": 2, "mesh__data": 4},
                               ["mesh.stage=2 splits the stack of MoE blocks into pipeline stages: "
                                "set model.scan_layers=True"]),
    "blocks not into stages": ({"mesh__stage": 2, "mesh__data": 4, "model__scan_layers": True,
                                "model__num_layers": 4},
                               ["leaves 3 MoE blocks, which do not split evenly into the 2 "
                                "stages of pipeline.schedule='1f1b' on mesh.stage=2"]),
    "stage blocks not a list of counts": ({"pipeline__stage_blocks": "3,x"},
                                          ["pipeline.stage_blocks='3,x' must list each stage's "
                                           "MoE block count"]),
    "stage blocks not the model's": ({"mesh__stage": 2, "mesh__data": 4,
                                      "model__scan_layers": True, "model__num_layers": 5,
                                      "pipeline__stage_blocks": "3,2"},
                                     ["pipeline.stage_blocks='3,2' gives 2 stages 5 MoE blocks, "
                                      "but model.num_layers=5 with model.num_dense_layers=1 "
                                      "leaves 4 MoE blocks"]),
    "kernels in interpret mode in a pipeline": (
        {"mesh__stage": 2, "mesh__data": 4, "model__scan_layers": True, "model__num_layers": 5,
         "dispatch__strategy": "dropless", "dispatch__grouped_matmul": "interpret"},
        ["dispatch.grouped_matmul='interpret' (the GPU kernels in Pallas interpret mode) does not "
         "run inside a pipeline (mesh.stage=2)"]),
    "expert parallelism in a pipeline with tensor parallelism": (
        {"mesh__stage": 2, "mesh__data": 1, "mesh__tensor": 2, "mesh__expert": 2,
         "model__scan_layers": True, "model__num_layers": 5,
         "dispatch__expert_parallel": "all_to_all"},
        ["dispatch.expert_parallel='all_to_all' inside a pipeline (mesh.stage=2) runs each device "
         "on its own shard of the batch, which mesh.tensor=2 does not split: set mesh.tensor=1"]),
    "too few micro-batches": ({"mesh__stage": 2, "mesh__data": 4, "model__scan_layers": True,
                               "model__num_layers": 5, "pipeline__schedule": "dualpipev",
                               "train__microbatches": 2},
                              ["train.microbatches=2 (the pipeline's micro-batches) is below the 4 "
                               "that pipeline.schedule='dualpipev' needs on mesh.stage=2"]),
    "rule that does not fit": ({"sharding__vocab": "data"},
                               ["has 260 along 'vocab', not divisible by 8 devices"]),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_is_refused_by_name(tmp_path, capsys, case):
  changes, expected = BAD_CONFIGS[case]
  _refused(_with(get_config("tiny"), **changes), tmp_path / "run", capsys, *expected)
  assert not (tmp_path / "run").exists()


def test_every_problem_of_a_config_is_listed_in_one_message(tmp_path, capsys):
  config = _with(get_config("tiny"), router__top_k=99, router__score_function="nope", train__steps=0)
  message = _refused(config, tmp_path / "run", capsys, "router.top_k=99", "router.score_function='nope'",
                     "train.steps=0")
  assert message.count("\n  - ") == 4   # top_k, router, steps, and warmup_steps >= steps


# ---- data ----------------------------------------------------------------------------------


def _text_config(path):
  return _with(get_config("tiny"), data__source="text", data__path=str(path))


def _token_config(path, dtype="uint16"):
  return _with(get_config("tiny"), data__source="tokens", data__path=str(path),
               data__token_dtype=dtype)


def _text_tree(directory, files):
  directory.mkdir()
  for name, content in files.items():
    (directory / name).write_bytes(content)
  return directory


BAD_DATA = {
    "no files": (lambda d: _text_config(_text_tree(d, {})), ["matched no files"]),
    "empty files": (lambda d: _text_config(_text_tree(d, {"a.txt": b"", "b.txt": b""})),
                    ["are all empty"]),
    "binary file": (lambda d: _text_config(_text_tree(d, {
        "a.txt": b"text " * 400, "b.txt": b"more text " * 400, "logo.png": b"\x89PNG\r\n\x1a\n\0\0"})),
        ["logo.png looks binary (a NUL byte at offset 8)"]),
    "corpus shorter than a sequence": (lambda d: _text_config(_text_tree(d, {
        "a.txt": b"tiny", "b.txt": b"files"})), ["fewer than data.seq_len + 1 = 65"]),
    "ids above the vocabulary": (
        lambda d: (np.arange(5000, dtype=np.uint16).tofile(d), _token_config(d))[1],
        ["holds id 4999, but model.vocab_size=260"]),
    "odd byte count": (lambda d: (d.write_bytes(b"\1\2\3"), _token_config(d))[1],
                       ["has 3 bytes, not a positive multiple of 2 (uint16)"]),
    "empty token file": (lambda d: (d.write_bytes(b""), _token_config(d, "uint32"))[1],
                         ["has 0 bytes, not a positive multiple of 4 (uint32)"]),
    "missing token file": (lambda d: _token_config(d), ["no such token file"]),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_is_refused_by_name(tmp_path, capsys, case):
  make_config, expected = BAD_DATA[case]
  _refused(make_config(tmp_path / "data"), tmp_path / "run", capsys, *expected)
  assert not (tmp_path / "run").exists()


# ---- checkpoints ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
  """A tiny run that stopped at step 4 with a checkpoint."""
  workdir = tmp_path_factory.mktemp("trained")
  config = get_config("tiny")
  config.train.update(steps=6, eval_every=100, checkpoint_every=4, sample_tokens=0)
  config.optimizer.warmup_steps = 2
  # An Adam b2 no other test uses: the optimizer, which holds it (the schedule, weight decay
  # and clipping norm it is given), is then this run's own, so the run compiles a step this
  # process has not.
  config.optimizer.b2 = 0.9123
  from moe_jax.train import train_and_evaluate
  compiles = COMPILES["count"]
  train_and_evaluate(config, workdir, stop_after_step=4)
  assert COMPILES["count"] > compiles   # the counter behind "nothing compiled" does count
  return workdir


OTHER_MODELS = {
    "wider": ({"model__d_model": 96}, "model.d_model: 64 in the checkpoint, 96 now"),
    "more experts": ({"model__num_routed_experts": 16}, "model.num_routed_experts: 8 in the checkpoint, 16 now"),
    "deeper": ({"model__num_layers": 3}, "model.num_layers: 2 in the checkpoint, 3 now"),
    "other vocabulary": ({"model__vocab_size": 300}, "model.vocab_size: 260 in the checkpoint, 300 now"),
    "an MTP module": ({"model__mtp_depth": 1}, "model.mtp_depth: 0 in the checkpoint, 1 now"),
    "bf16 moments": ({"optimizer__moment_dtype": "bfloat16"},
                     "optimizer.moment_dtype: 'float32' in the checkpoint, 'bfloat16' now"),
}


@pytest.mark.parametrize("case", list(OTHER_MODELS))
def test_checkpoint_of_another_model_is_refused(trained_workdir, capsys, case):
  changes, expected = OTHER_MODELS[case]
  _refused(_with(get_config("tiny"), **changes), trained_workdir, capsys,
           "the checkpoint at step 4", expected, "use a new --workdir")


def test_unreadable_checkpoint_is_refused(trained_workdir, tmp_path, capsys):
  import shutil
  workdir = tmp_path / "copy"
  shutil.copytree(trained_workdir, workdir)
  for path in (workdir / "checkpoints" / "4" / "state").rglob("*"):
    if path.is_file() and path.name != "_METADATA":
      path.write_bytes(b"")   # a disk that lost the array data
  _refused(get_config("tiny"), workdir, capsys, "the checkpoint at step 4", "cannot be read")
