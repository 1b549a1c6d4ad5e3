"""Trains a few steps of every shipped config, size and sweep member through the real command,
and prints one table row per run (status, first and last loss, seconds).

  python scripts/check_configs.py                    # everything, one run at a time
  python scripts/check_configs.py --parallel=4 --only=_gpu_,tiny_   # runs whose name holds either

Each run ends with a checkpoint, an evaluation and (configs/default.py) a text sample, so the
whole path of a run is exercised. On one GPU `--parallel=N` gives each run 1/N of its memory.
Cases: configs/default.py at both sizes, in float32 and bfloat16, with both attentions and
the MTP module, at sequence lengths that are odd, not a power of two, and the sizes' own; every
member of every study in experiments/ at every size.
"""

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def config_cases() -> dict[str, list[str]]:
  """name -> the command's config arguments."""
  cases = {}
  for size in ("tiny", "default"):
    for dtype in ("float32", "bfloat16"):
      for attention in ("gqa", "mla"):
        for seq in ((64, 63) if size == "tiny" else (256, 1023, 1024, 1000)):
          cases[f"{size}_{dtype}_{attention}_seq{seq}"] = [
              f"--config=configs/default.py:{size}", f"--config.model.compute_dtype={dtype}",
              f"--config.model.attention={attention}", f"--config.data.seq_len={seq}",
              "--config.model.mtp_depth=1"]
  return cases


def sweep_cases() -> dict[str, list[str]]:
  from moe_jax import sweep
  cases = {}
  for path in sorted((ROOT / "experiments").glob("*.py")):
    if path.stem == "sizes":
      continue
    for size in ("tiny", "gpu"):
      study, _ = sweep.load_sweep(f"{path}:{size}")
      for member in study.members:
        argv = sweep.command(study, member, Path("unused"))
        cases[f"{study.name}_{size}_{member}"] = [a for a in argv[3:] if not a.startswith("--workdir")]
  return cases


def run_case(name: str, arguments: list[str], steps: int, workdir: Path, env: dict) -> dict:
  short = [f"--config.train.steps={steps}", f"--config.train.log_every=1",
           f"--config.train.eval_every={steps}", f"--config.train.checkpoint_every={steps}",
           "--config.train.eval_batches=1", "--config.optimizer.warmup_steps=1",
           "--config.train.sample_tokens=16"]
  argv = [sys.executable, "-m", "moe_jax.main", *arguments, *short, f"--workdir={workdir / name}"]
  started = time.perf_counter()
  result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env=env)
  seconds = time.perf_counter() - started
  row = {"case": name, "status": "ok" if result.returncode == 0 else f"exit {result.returncode}",
         "seconds": seconds}
  metrics = workdir / name / "metrics.jsonl"
  losses = [r["loss"] for r in map(json.loads, metrics.read_text().splitlines())
            if "loss" in r] if metrics.exists() else []
  if losses:
    row.update(first_loss=losses[0], last_loss=losses[-1])
  if result.returncode:
    lines = [l for l in result.stderr.strip().splitlines() if l.strip()]
    row["error"] = lines[-1][:200] if lines else ""
  return row


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--only", default="", help="comma-separated texts: run only the cases "
                      "whose name holds one of them")
  parser.add_argument("--parallel", type=int, default=1, help="runs at once")
  args = parser.parse_args()
  cases = {**config_cases(), **sweep_cases()}
  wanted = args.only.split(",")
  cases = {name: argv for name, argv in cases.items() if any(w in name for w in wanted)}
  env = dict(os.environ)
  if args.parallel > 1:
    env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{0.9 / args.parallel:.3f}"
  device = subprocess.run([sys.executable, "-c", "import jax; print(jax.__version__, "
                           "jax.devices()[0].device_kind)"], capture_output=True, text=True)
  print(f"jax {device.stdout.strip()}, {len(cases)} runs of {args.steps} steps", flush=True)
  print("| case | status | first loss | last loss | seconds |\n|---|---|---|---|---|", flush=True)
  failures = 0
  with tempfile.TemporaryDirectory() as workdir, \
      concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
    futures = [pool.submit(run_case, name, argv, args.steps, Path(workdir), env)
               for name, argv in cases.items()]
    for future in futures:
      row = future.result()
      failures += row["status"] != "ok"
      loss = lambda key: f"{row[key]:.3f}" if key in row else "-"
      print(f"| {row['case']} | {row['status']} | {loss('first_loss')} | {loss('last_loss')} | "
            f"{row['seconds']:.0f} |" + (f" {row['error']}" if "error" in row else ""), flush=True)
  print(f"{len(cases) - failures} of {len(cases)} runs finished")
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
