"""Generate from a run's checkpoint with a KV cache: greedy, temperature/top-p, or speculative
decoding with the model's MTP modules (greedy, the same output as plain greedy decoding).

  python scripts/generate.py --workdir=runs/default --prompt="def main(" --max_new_tokens=200
  python scripts/generate.py --workdir=runs/default --prompt="import " --temperature=0.8 --top_p=0.9
  python scripts/generate.py --workdir=runs/default --prompt="class " --speculative

Byte-level runs take --prompt text; runs on token files take --prompt_ids=1,2,3. Prints the
continuation, tokens/s of the decoding loop (after compilation), and for --speculative the
acceptance rate of the drafts and the plain greedy run it reproduces.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import arguments   # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, type=Path)
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default newest)")
  parser.add_argument("--prompt", default="")
  parser.add_argument("--prompt_ids", type=arguments.whole_numbers(0), default=None,
                      help="comma-separated token ids")
  parser.add_argument("--max_new_tokens", type=arguments.whole_number(1), default=128)
  parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
  parser.add_argument("--top_p", type=float, default=1.0)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--speculative", action="store_true",
                      help="draft with the MTP modules and verify (greedy only)")
  args = parser.parse_args()
  if args.speculative and args.temperature != 0:
    parser.error("--speculative decodes greedily; leave --temperature at 0")
  if not 0 < args.top_p <= 1 or args.temperature < 0:
    parser.error("--top_p must be in (0, 1] and --temperature >= 0")

  # jax and the model are imported once the arguments are known good: a mistyped one is
  # refused at once.
  import numpy as np
  from absl import logging

  from moe_jax import analysis, data, generate
  from moe_jax.checkpoint import CheckpointMismatch
  logging.set_verbosity(logging.ERROR)   # orbax warns that a read-only checkpoint keeps all
  try:
    run = analysis.load_run(args.workdir, args.step)
    d = run.config.data
    tokenizer = data.run_tokenizer(d.source, d.get("tokenizer", "bytes"), args.workdir)
  except (analysis.RunNotFound, CheckpointMismatch, data.DataError) as error:
    print(f"generate.py: error: {error}", file=sys.stderr)
    sys.exit(2)
  if args.prompt_ids:
    ids = args.prompt_ids
  elif tokenizer:
    ids = [tokenizer.bos_id, *tokenizer.encode(args.prompt.encode()).tolist()]
  else:
    parser.error("this run reads token ids: give --prompt_ids")
  if max(ids) >= run.config.model.vocab_size:
    parser.error(f"a prompt id is outside the vocabulary of {run.config.model.vocab_size}")
  if args.speculative and not run.spec.mtp_depth:
    parser.error("--speculative drafts with the model's MTP modules, and this run has none "
                 "(model.mtp_depth=0)")
  context, length = run.config.data.seq_len, len(ids) + args.max_new_tokens
  if length > context:   # allowed (RoPE), but the reader should know
    print(f"generate.py: note: the run trained on windows of {context} tokens; the last "
          f"{length - context} of these {length} positions lie beyond any it saw",
          file=sys.stderr, flush=True)
  model = generate.decoding_model(run.graphdef, run.params, run.biases)
  prompt = np.asarray([ids], np.int32)
  show = tokenizer.text if tokenizer else (lambda t: ",".join(map(str, t)))
  print(f"run {args.workdir} at step {run.step}; prompt of {len(ids)} tokens", flush=True)
  if args.speculative:
    result = generate.speculative_generate(model, prompt, args.max_new_tokens)
    plain = generate.generate(model, prompt, args.max_new_tokens)
    print(show(result.tokens[0]))
    print(f"speculative: {(args.max_new_tokens - 1) / result.seconds:,.1f} tokens/s, "
          f"{result.forward_passes} main-model passes, draft acceptance "
          f"{100 * result.accepted_fraction:.1f}%")
    print(f"plain greedy: {(args.max_new_tokens - 1) / plain.seconds:,.1f} tokens/s; "
          f"outputs identical: {bool(np.array_equal(result.tokens, plain.tokens))}")
  else:
    result = generate.generate(model, prompt, args.max_new_tokens, args.temperature, args.top_p,
                               args.seed)
    print(show(result.tokens[0]))
    print(f"{(args.max_new_tokens - 1) / result.seconds:,.1f} tokens/s")


if __name__ == "__main__":
  main()
