"""How the default run (`make train`) was chosen: model width, learning rate, batch shape,
dispatch, multi-token prediction, optimizer settings and tokenizer, at equal time on the 2-core CPU.

Each member's `train.steps` fills the same training time (330 s in rounds 1-2, 420 s in
rounds 3-4, which evaluate only at the end) at the tokens/s that shape reached on the 2-core
CPU (measured with 60-step runs or timed steps, no other load, jax 0.10.2), so a smaller
model or batch sees more tokens or steps. Four rounds:

  python -m moe_jax.sweep experiments/default_run.py:cpu          # round 1: width, rate, MTP
  python -m moe_jax.sweep experiments/default_run.py:cpu_round2   # round 2: batch, dispatch
  python -m moe_jax.sweep experiments/default_run.py:cpu_round3   # round 3: optimizer, routing
  python -m moe_jax.sweep experiments/default_run.py:cpu_round4   # round 4: round 3 combined
  python -m moe_jax.sweep experiments/default_run.py:cpu_round5   # round 5: bytes or BPE
  python -m moe_jax.sweep experiments/default_run.py:cpu_round6   # round 6: around BPE 4096

Round 1 scores the first 8 validation batches (the evaluation's default then); later rounds
the whole validation split (`train.eval_batches=0`), the number compared with compressors
(scripts/compression_baselines.py). Members' results do not depend on the machine's speed
(the steps are fixed), so a round can run anywhere; rounds 1, 3 and 4 ran on one GPU, whose
Python (3.12) has another standard library, so compare members within a round.
"""

from moe_jax.sweep import Sweep

# seconds of training steps per member, within `make train`'s 10 minutes with installation
SECONDS_OF_ROUND = {"cpu": 330, "cpu_round2": 330, "cpu_round3": 420, "cpu_round4": 420,
                    "cpu_round5": 420, "cpu_round6": 420}

D96 = {"model.d_model": 96, "model.num_heads": 3, "model.num_kv_heads": 1,
       "model.dense_mlp_dim": 288, "model.expert_dim": 64}
D128 = {"model.d_model": 128, "model.num_heads": 4, "model.num_kv_heads": 2,
        "model.dense_mlp_dim": 384, "model.expert_dim": 96}
S128 = {"data.seq_len": 128}
B16 = {"data.batch_size": 16}
WINNER2 = {**D96, **S128, **B16}   # round 2's winner, the shape of rounds 3 and 4
BYTES = {"data.tokenizer": "bytes", "model.vocab_size": 260}


def bpe(vocab_size: int) -> dict:
  return {"data.tokenizer": "bpe", "model.vocab_size": vocab_size}

# round -> member -> (overrides, learning rates, tokens/s of training steps on the 2-core CPU)
ROUNDS = {
    "cpu": {   # sequences of 256 x 16 unless noted
        "d128": ({**D128, "data.seq_len": 256, "data.batch_size": 16}, (3e-3, 6e-3), 9_100),
        "d128+mtp": ({**D128, "data.seq_len": 256, "data.batch_size": 16,
                      "model.mtp_depth": 1}, (3e-3,), 7_350),   # the previous default
        "d96": ({**D96, "data.seq_len": 256, "data.batch_size": 16}, (3e-3, 6e-3, 1.2e-2),
                13_100),
        "d96_s128": ({**D96, **S128, "data.batch_size": 32}, (6e-3, 1.2e-2), 16_500),
        "d64": ({"model.d_model": 64, "model.num_heads": 2, "model.num_kv_heads": 1,
                 "model.dense_mlp_dim": 192, "model.expert_dim": 48, "data.seq_len": 256,
                 "data.batch_size": 16}, (6e-3, 1.2e-2), 19_400),
    },
    "cpu_round2": {   # sequences of 128; the winner of round 1 is d96_s128 at 1.2e-2
        "d96_b32": ({**D96, **S128, "data.batch_size": 32}, (1.2e-2,), 16_500),
        "d96_b16": ({**D96, **S128, "data.batch_size": 16}, (6e-3, 1.2e-2), 15_800),
        "d96_b8": ({**D96, **S128, "data.batch_size": 8}, (6e-3,), 14_700),
        "d96_b32_dense": ({**D96, **S128, "data.batch_size": 32, "dispatch.strategy": "dense"},
                          (1.2e-2,), 12_800),   # GShard's one-hot einsum dispatch instead of
                                                # the sort and gather (same capacity)
        "d128_b16": ({**D128, **S128, "data.batch_size": 16}, (6e-3,), 10_400),
    },
    "cpu_round3": {   # round 2's winner d96_b16 at 6e-3, 420 s of steps, one evaluation at the
                      # end; tokens/s relative to it measured on the 2-core CPU in one session
        "d96_b16": (WINNER2, (6e-3, 8e-3), 15_800),
        "d96_b16_final0": ({**WINNER2, "optimizer.final_lr_fraction": 0.0}, (6e-3,), 15_800),
        "d96_b16_wd0": ({**WINNER2, "optimizer.weight_decay": 0.0}, (6e-3,), 15_800),
        "d96_b16_b2_0.99": ({**WINNER2, "optimizer.b2": 0.99}, (6e-3,), 15_800),
        "d96_b16_cf2": ({**WINNER2, "dispatch.capacity_factor": 2.0}, (6e-3,), 13_750),   # 0.87x
        "d96_b16_e8": ({**WINNER2, "model.num_routed_experts": 8}, (6e-3,), 16_100),   # 1.02x
        "d96_s256_b8": ({**D96, "data.seq_len": 256, "data.batch_size": 8}, (6e-3,),
                        12_800),   # 0.81x
        "d96_b16_warmup200": ({**WINNER2, "optimizer.warmup_steps": 200}, (6e-3,), 15_800),
    },
    "cpu_round4": {   # round 3's helpful changes together: warmup, b2, decay to zero, rate
        "d96_b16_w200_b2": ({**WINNER2, "optimizer.warmup_steps": 200,
                             "optimizer.b2": 0.99}, (6e-3,), 15_800),
        "d96_b16_w200_b2_final0": ({**WINNER2, "optimizer.warmup_steps": 200,
                                    "optimizer.b2": 0.99, "optimizer.final_lr_fraction": 0.0},
                                   (6e-3, 8e-3, 1e-2), 15_800),
        "d96_b16_w400_b2_final0": ({**WINNER2, "optimizer.warmup_steps": 400,
                                    "optimizer.b2": 0.99, "optimizer.final_lr_fraction": 0.0},
                                   (8e-3,), 15_800),
    },
    "cpu_round5": {   # round 4's winner (warmup 400, b2 0.99, decay to 0), bytes against a
                      # byte-level BPE of 1-4K ids; tokens/s of each relative to bytes measured
                      # on the 2-core CPU in one session (bytes 17,000 that day), scaled to 15,800
        "bytes": ({**WINNER2, **BYTES}, (8e-3,), 15_800),
        "bpe1024": ({**WINNER2, **bpe(1024)}, (8e-3,), 15_000),             # 0.95x
        "bpe2048": ({**WINNER2, **bpe(2048)}, (6e-3, 8e-3, 1.2e-2), 14_100),  # 0.89x
        "bpe4096": ({**WINNER2, **bpe(4096)}, (8e-3,), 11_350),             # 0.72x
        "bpe2048_d128": ({**D128, **S128, **B16, **bpe(2048)}, (8e-3,), 9_400),   # 0.59x
        "bpe2048_s256_b8": ({**D96, "data.seq_len": 256, "data.batch_size": 8, **bpe(2048)},
                            (8e-3,), 11_700),   # 0.74x
    },
    "cpu_round6": {   # round 5's winner bpe4096 at 8e-3: rate, warmup, wider, more ids, MTP;
                      # tokens/s relative to bpe4096 measured on the 2-core CPU in one session
        "bpe4096": ({**WINNER2, **bpe(4096)}, (6e-3, 1.2e-2), 11_350),
        "bpe4096_warmup200": ({**WINNER2, **bpe(4096), "optimizer.warmup_steps": 200}, (8e-3,),
                              11_350),
        "bpe8192": ({**WINNER2, **bpe(8192)}, (8e-3,), 8_840),                 # 0.78x
        "bpe4096_d128": ({**D128, **S128, **B16, **bpe(4096)}, (8e-3,), 7_890),  # 0.70x
        "bpe4096_mtp1": ({**WINNER2, **bpe(4096), "model.mtp_depth": 1}, (8e-3,), 7_750),  # 0.68x
    },
}


def members(round_name: str) -> dict[str, dict]:
  result = {}
  for shape, (overrides, rates, tokens_per_second) in ROUNDS[round_name].items():
    tokens_per_step = overrides["data.seq_len"] * overrides["data.batch_size"]
    steps = round(SECONDS_OF_ROUND[round_name] * tokens_per_second / tokens_per_step / 10) * 10
    for rate in rates:
      every = steps if round_name != "cpu" else steps // 3 + 1
      result[f"{shape}_lr{rate:g}"] = {
          **overrides, "optimizer.learning_rate": rate, "train.steps": steps,
          "train.eval_every": every, "train.checkpoint_every": steps // 3 + 1}
  return result


# What each round held fixed, so that a round re-runs as it ran whatever configs/default.py
# says today: rounds 1-4 trained bytes with the optimizer defaults of their time; round 5
# starts from round 4's winner.
EARLY = {"data.tokenizer": "bytes", "model.vocab_size": 260, "optimizer.warmup_steps": 50,
         "optimizer.b2": 0.95, "optimizer.final_lr_fraction": 0.1}
WINNER4 = {"optimizer.warmup_steps": 400, "optimizer.b2": 0.99, "optimizer.final_lr_fraction": 0.0}
FIXED_OF_ROUND = {"cpu": EARLY, "cpu_round2": EARLY, "cpu_round3": EARLY, "cpu_round4": EARLY,
                  "cpu_round5": WINNER4, "cpu_round6": WINNER4}


def get_sweep(size: str) -> Sweep:
  if size not in ROUNDS:
    raise ValueError(f"the sizes are {sorted(ROUNDS)} (step counts fitted to the 2-core CPU)")
  base = {"model.mtp_depth": 0, "train.sample_tokens": 0,
          "train.eval_batches": 8 if size == "cpu" else 0, **FIXED_OF_ROUND[size]}
  return Sweep("default_run", "configs/default.py", base, members(size),
               f"Which shape, learning rate, batch, dispatch, MTP, optimizer setting and "
               f"tokenizer give "
               f"the lowest validation bits per byte in {SECONDS_OF_ROUND[size]} s of training "
               f"on the 2-core CPU (the budget of `make train`)?")
