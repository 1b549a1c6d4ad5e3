"""Import a Hugging Face MoE checkpoint into moe_jax, and write it back out.

  python scripts/convert_hf.py --hf_dir=DeepSeek-V2-Lite --dtype=bfloat16
  python scripts/convert_hf.py --hf_dir=tiny_v3 --export=tiny_v3_out --check

Families: deepseek_v3, deepseek_v2 (V2, V2-Lite), mixtral, qwen2_moe, qwen3_moe, olmoe (see
moe_jax/hf.py). Prints the imported model's shape and parameter memory; --export writes
config.json and model.safetensors in the checkpoint's own format (import -> export -> import
is exact); --check runs the same random tokens through `transformers` (needs torch and
transformers; loads a second float32 copy) and prints the largest logit difference and
whether every MoE layer chose the same experts.
"""

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import arguments   # noqa: E402
from moe_jax import analysis, hf   # noqa: E402
from moe_jax.generate import decoding_model   # noqa: E402
from moe_jax.model import parameter_counts   # noqa: E402


def check_against_transformers(directory: Path, imported: hf.Imported, length: int) -> None:
  import torch
  import transformers
  theirs = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
  tokens = np.asarray(jax.random.randint(jax.random.key(0), (1, length), 0,
                                         imported.spec.vocab_size))
  choices = []
  hooks = [m.register_forward_hook(lambda mod, args, out: choices.append(out[-1].numpy()))
           for m in theirs.modules() if type(m).__name__.endswith("Router")]
  with torch.no_grad():
    expected = theirs(torch.as_tensor(tokens)).logits.numpy()
  for h in hooks:
    h.remove()
  ours, _ = decoding_model(imported.graphdef, imported.params, imported.biases)(tokens)
  decisions = analysis.routing_trace(analysis.run_from_hf(imported), tokens)
  same = all(np.array_equal(np.sort(d.expert_ids.reshape(-1, d.expert_ids.shape[-1]), -1),
                            np.sort(c.reshape(-1, c.shape[-1]), -1))
             for d, c in zip(decisions, choices))
  print(f"against transformers on {length} random tokens: max |logit difference| "
        f"{np.max(np.abs(np.asarray(ours) - expected)):.2e}; same experts in all "
        f"{len(decisions)} MoE layers: {same}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--hf_dir", required=True, type=Path)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--export", type=arguments.writable_directory, default=None,
                      help="write the model back here")
  parser.add_argument("--check", action="store_true", help="compare with transformers")
  parser.add_argument("--check_tokens", type=arguments.whole_number(), default=16)
  args = parser.parse_args()
  try:
    imported = hf.load(args.hf_dir, jnp.dtype(args.dtype))
  except hf.ImportError_ as error:   # not a checkpoint this importer reads: the user's to fix
    parser.exit(2, f"convert_hf.py: error: {error}\n")
  s = imported.spec
  counts = parameter_counts(s)
  gigabytes = sum(p.nbytes for p in jax.tree.leaves(imported.params)) / 1e9
  print(f"{imported.hf_config['model_type']}: {counts['total'] / 1e9:.2f}B parameters "
        f"({counts['active'] / 1e9:.2f}B per token), {gigabytes:.1f} GB in {args.dtype}; "
        f"{s.num_layers} layers ({s.num_dense_layers} dense), {s.attention} attention, "
        f"{s.num_routed_experts} routed experts top-{s.top_k} ({s.router}), "
        f"{s.num_shared_experts} shared, {s.mtp_depth} MTP modules")
  if args.export:
    hf.save(args.export, imported)
    print(f"wrote {args.export}/config.json and model.safetensors")
  if args.check:
    check_against_transformers(args.hf_dir, imported, args.check_tokens)


if __name__ == "__main__":
  main()
