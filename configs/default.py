r"""Default config: DeepSeek-V3's recipe in miniature, trained on the embedded corpus.

The first layer is a dense SwiGLU block; the layers after it are MoE blocks with one
always-on shared expert plus fine-grained routed experts, chosen top-k by a sigmoid router
with aux-loss-free balancing (a per-expert bias that only changes which experts are chosen).
The corpus is the Python standard library of the interpreter that runs, tokenized by a
byte-level BPE of 4,096 ids learned from its training split (the tiny size reads raw bytes).

Run (what `make train` does):
  python -m moe_jax.main --config=configs/default.py --workdir=runs/default

Variants are picked with an argument string, big_vision style:
  --config=configs/default.py:tiny          # seconds-scale model used by the tests
  --config=configs/default.py:tiny,steps=50 # steps=, batch=, seq= set train.steps etc.
  --config=configs/default.py:gpu           # one GPU, ten minutes (set_gpu_size)
  --config=configs/default.py:default,ep=all_to_all  # experts sharded over all devices
Any field can be overridden from the command line: --config.router.top_k=4

Expected result: README.md ("Default run") gives the validation bits per byte that this config
reaches on the 2-core CPU machine, with the command that produced it.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config; `arg` is "", "tiny", or either followed by ",steps=N,batch=B,seq=S"."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  # ---- data -------------------------------------------------------------------------------
  c.data = ml_collections.ConfigDict()
  c.data.source = "stdlib"       # "stdlib" (embedded corpus) | "python" (stdlib + installed packages)
                                 # | "text" (files) | "documents" (shards) | "tokens" (binary ids)
  c.data.path = ""               # "text"/"documents": a directory or a glob; "tokens": a file
  c.data.text_field = "text"     # "documents": JSONL/Parquet/ArrayRecord records' text field
  c.data.tokenizer = "bpe"       # text: "bpe" (a byte-level BPE of model.vocab_size ids learned
                                 # from the training split, kept in the workdir) | "bytes"
  c.data.tokenizer_file = ""     # "bpe": use this byte-level BPE tokenizer.json instead of
                                 # learning one (copied into the workdir)
  c.data.token_dtype = "uint16"  # "tokens" only: uint16 | uint32
  c.data.validation_percent = 5  # share of files (text) or of the token stream (tokens) held out
  c.data.seq_len = 128           # tokens per training sequence (the context)
  c.data.batch_size = 16         # global batch, in sequences; split over every data-parallel device
  c.data.shuffle_seed = 0
  c.data.cache_dir = ""           # text sources: keep tokenized corpora (and a learned BPE) here,
                                 # by a hash of the text and tokenizer, for the next run ("": off)

  # ---- model ------------------------------------------------------------------------------
  c.model = ml_collections.ConfigDict()
  c.model.vocab_size = 4096         # BPE ids (experiments/default_run.py round 5: 1K-8K); the
                                    # byte tokenizer needs 258 (256 bytes + pad + bos)
  c.model.d_model = 96              # residual width D
  c.model.num_layers = 4            # transformer blocks
  c.model.num_dense_layers = 1      # the first blocks use a dense SwiGLU MLP, the rest MoE
  c.model.attention = "gqa"         # "gqa" (grouped-query) | "mla" (DeepSeek's latent attention)
  c.model.num_heads = 3             # query heads
  c.model.num_kv_heads = 1          # gqa: key/value heads; divides num_heads
  c.model.head_dim = 32             # gqa: width of each head
  c.model.q_lora_rank = 0           # mla: query latent rank (0: queries straight from x)
  c.model.kv_lora_rank = 64         # mla: key/value latent rank, what a decoding cache holds
  c.model.qk_nope_head_dim = 32     # mla: query/key channels without RoPE, per head
  c.model.qk_rope_head_dim = 16     # mla: query/key channels with RoPE (one key part shared)
  c.model.v_head_dim = 32           # mla: value width per head
  c.model.qkv_bias = False          # gqa: biases on the q, k, v projections (Qwen2-MoE)
  c.model.qk_norm = "none"          # gqa: RMSNorm of q and k: "per_head" (Qwen3) | "whole" (OLMoE)
  c.model.rope_theta = 10_000.0
  c.model.rope_scaling = "none"     # "none" | "yarn" (context extension; see layers/rope.py)
  c.model.rope_factor = 1.0         # yarn: extension factor
  c.model.rope_original_max_len = 4096  # yarn: the original context
  c.model.yarn_beta_fast = 32.0     # yarn: ramp between these rotation counts
  c.model.yarn_beta_slow = 1.0
  c.model.yarn_mscale = 1.0         # yarn: attention scale terms (DeepSeek's mscale...
  c.model.yarn_mscale_all_dim = 1.0  # ...and mscale_all_dim)
  c.model.dense_mlp_dim = 288       # hidden width of the dense SwiGLU MLP
  c.model.norm_eps = 1e-6
  c.model.compute_dtype = "float32"  # "bfloat16" computes in bf16; parameters stay float32
  c.model.loss_logits_dtype = "float32"  # "bfloat16": the training loss's logits rounded to bf16
                                    # (float32 accumulation and softmax; validation stays float32)
  c.model.remat = "none"            # what each block keeps for backward, the rest recomputed:
                                    # "none" | "block" (its input) | "matmuls" | "expert_io"
                                    # (the routed experts' inputs and outputs) | "costly" (all
                                    # but elementwise results and gathers: for scanned layers)
  c.model.scan_layers = False       # dense and MoE blocks as two scans over stacked parameters:
                                    # one block compiled per kind (deep models compile in
                                    # seconds); a checkpoint of either layout resumes
  c.model.attention_implementation = "auto"  # "cudnn" (fused, NVIDIA GPUs, 16-bit) | "xla" |
                                             # "xla_recompute" (keeps q, k, v; the backward
                                             # recomputes the scores) | "auto" (cudnn where
                                             # it applies, else xla)
  # MoE blocks
  c.model.num_routed_experts = 16   # fine-grained routed experts E
  c.model.num_shared_experts = 1    # always-on shared experts, each of width expert_dim
  c.model.shared_expert_gate = False  # shared output x sigmoid(x . w) (Qwen2-MoE)
  c.model.expert_dim = 64           # hidden width F of one expert's SwiGLU
  # multi-token prediction (DeepSeek-V3): depth-k modules predict token i + k + 1
  c.model.mtp_depth = 0             # MTP modules D (0: off); V3 used 1 (at this size and budget
                                    # it costs more time than it gives: experiments/default_run.py)
  c.model.mtp_loss_weight = 0.3     # lambda: the MTP loss is lambda / D x the sum over depths...
  c.model.mtp_loss_weight_final = 0.1   # ...and this after mtp_weight_switch_fraction of the
  c.model.mtp_weight_switch_fraction = 0.68  # steps (V3: 0.3 for 10T tokens, then 0.1 for 4.8T)

  # ---- router: which experts each token uses (moe_jax/routing/settings.py) ------------------
  c.router = ml_collections.ConfigDict()
  c.router.score_function = "sigmoid"  # "sigmoid" (DeepSeek-V3) | "softmax" (Switch, DeepSeek-V2)
                                       # | "expert_choice" (not causal); see docs/routing.md
  c.router.top_k = 2                # routed experts per token K
  c.router.norm_topk_prob = True    # renormalise the chosen gates to sum 1
  c.router.route_scale = 1.0        # gates are multiplied by this
  c.router.num_groups = 1           # group-limited routing: experts split into groups...
  c.router.topk_groups = 1          # ...a token may use only its best topk_groups of them
  c.router.group_score = "top2_sum"  # group score: "top2_sum" of biased scores (V3) | "max" (V2)

  # ---- balancing: keeping the experts' load even (moe_jax/routing/settings.py) --------------
  c.balancing = ml_collections.ConfigDict()
  c.balancing.bias_update_rate = 1e-2  # gamma of the aux-loss-free bias update (0 turns it off);
                                       # DeepSeek-V3 used 1e-3 over far longer runs
  c.balancing.bias_update_rule = "sign"  # "sign": b += gamma*sign(mean-load) | "proportional"
  c.balancing.bias_freeze_step = -1    # the bias changes in steps 1..this, then stays (-1: never)
  c.balancing.switch_loss_alpha = 0.0  # Switch balance loss alpha*E*sum f_i P_i
  c.balancing.sequence_loss_alpha = 1e-4  # DeepSeek-V3 sequence-wise balance loss (V3: 1e-4)
  c.balancing.z_loss_coef = 0.0        # router z-loss (ST-MoE used 1e-3)

  # ---- dispatch: how tokens reach the experts (moe_jax/dispatch/settings.py) ----------------
  c.dispatch = ml_collections.ConfigDict()
  c.dispatch.strategy = "capacity"  # "capacity" | "dropless" | "dense" | "reference"; docs/dispatch.md
  c.dispatch.capacity_factor = 1.25  # per-expert buffer = factor * tokens * K / E; overflow drops
  c.dispatch.expert_parallel = "none"  # experts sharded over mesh.expert: "all_to_all" (padded,
                                       # strategy "capacity") | "all_gather" (strategy
                                       # "dropless") | "ragged_all_to_all" (GPU/TPU, "dropless")
                                       # | "token_all_to_all" (each token once per rank,
                                       # "dropless"); "none" replicates them
  c.dispatch.expert_parallel_chunks = 1  # >1: each device's tokens in this many slices, so one
                                         # slice's exchange can overlap another's expert compute
  c.dispatch.ragged_capacity_factor = 0.0  # ragged_all_to_all: 0 sends every routed row; f > 0
                                           # caps each expert at ceil(f*T*K/E) of a device's
                                           # rows, bounding the receive buffers (overflow drops)
  c.dispatch.expert_replicas = 0  # spare slots per expert-parallel rank for copies of hot
                                  # experts (all_gather only); 0: none
  c.dispatch.replica_replan_every = 100  # steps between replica plans (each from the expert
                                         # counts summed since the last)
  c.dispatch.grouped_matmul = "auto"  # dropless expert matmuls: "mosaic" (Hopper) | "pallas"
                                      # (CUDA GPUs) | "interpret" | "tiles" (XLA, CPU's) |
                                      # "xla" (ragged_dot) | "auto"
  c.dispatch.gates_before_down = False  # dropless: gates scale the experts' activations
                                       # before the down projection (less memory, a little
                                       # slower: moe_jax/dispatch/dropless.py)
  c.dispatch.fp8_experts = False  # routed experts' matmuls in e4m3, DeepSeek-V3's 1x128 /
                                  # 128x128 scaling (kernels/fp8.py; on Hopper slower than bf16 now)

  # ---- optimizer (AdamW, linear warmup then cosine decay, global-norm clipping) ------------
  c.optimizer = ml_collections.ConfigDict()
  # learning rate, warmup, decay to zero and b2 chosen by experiments/default_run.py (rounds 3-6);
  # the tiny size keeps 3e-3, b2 0.95 and a floor of 0.1
  c.optimizer.learning_rate = 1.2e-2
  c.optimizer.warmup_steps = 400
  c.optimizer.final_lr_fraction = 0.0  # the cosine decay ends at this fraction of the peak
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.99
  c.optimizer.weight_decay = 0.1
  c.optimizer.grad_clip_norm = 1.0
  c.optimizer.shard_over_data = False  # ZeRO-1: moments of replicated parameters split over `data`
  c.optimizer.moment_dtype = "float32"  # "bfloat16": Adam's moments stored in bf16 (DeepSeek-V3)

  # ---- training loop ----------------------------------------------------------------------
  c.train = ml_collections.ConfigDict()
  c.train.steps = 2330              # 4.8M tokens (16 MB of text), about 6.5 minutes on a 2-core CPU
  c.train.microbatches = 1          # >1: each batch in this many slices, gradients accumulated
                                    # (memory of one slice's activations; same optimizer step)
  c.train.log_every = 50
  c.train.eval_every = 2330         # once, at the end: the whole split costs 10-15 s on the CPU
  c.train.eval_batches = 0          # validation batches per evaluation; 0: the whole split
  c.train.checkpoint_every = 780
  c.train.checkpoints_to_keep = 2
  c.train.sample_tokens = 200       # length of the text sample printed at the end
  c.train.sample_prompt = "def "
  c.train.peak_tflops = 0.0         # one device's peak TFLOP/s for MFU; 0: from a table of known
                                    # GPUs/TPUs (moe_jax/throughput.py), no MFU when unknown
  c.train.metrics_port = 0          # >0: serve live routing metrics (Prometheus) on this port...
  c.train.metrics_host = "127.0.0.1"  # ...of this address ("0.0.0.0": every interface, for a
                                      # cluster's Prometheus; the default is this machine only)
  # bad numbers: a non-finite loss or gradient, or a loss above spike_factor x the mean of the
  # last spike_window steps, restores the newest checkpoint and skips the batches used since
  c.train.spike_factor = 2.0        # 0 turns spike detection off (non-finite values still roll back)
  c.train.spike_window = 50
  c.train.max_rollbacks = 3         # rollbacks in a row (no checkpoint between) before giving up
  c.train.compilation_cache_dir = "~/.cache/moe_jax/xla"  # compiled programs kept across runs
                                    # (jax's persistent cache): a restart, resume or sweep member
                                    # skips recompiling; "" turns it off; $JAX_COMPILATION_CACHE_DIR wins

  # ---- device mesh: sizes of the named axes; -1 takes the devices left over -------------------
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                  # model replicas
  c.mesh.fsdp = 1                   # replicas that split parameters, gradients and optimizer
                                    # state (FSDP: sharding.embed), gathered per layer by XLA
  c.mesh.tensor = 1                 # attention heads and MLP widths split (sharding.heads, mlp)
  c.mesh.expert = 1                 # routed experts split (dispatch.expert_parallel)
  c.mesh.stage = 1                  # pipeline stages: the MoE blocks split into consecutive
                                    # groups, one per device (two for dualpipev); needs
                                    # model.scan_layers; train.microbatches are its micro-batches
  # Hybrid mesh for multi-host or multi-slice runs: how many granules (TPU slices, else hosts)
  # each axis spans; the axis's size above is its total, each granule holding size / dcn_<axis>
  # of it, so only these axes' collectives cross the data-centre network (usually data or fsdp).
  c.mesh.dcn_data = 1
  c.mesh.dcn_fsdp = 1
  c.mesh.dcn_tensor = 1
  c.mesh.dcn_expert = 1
  c.mesh.dcn_stage = 1

  # ---- pipeline parallelism (mesh.stage > 1) ------------------------------------------------
  c.pipeline = ml_collections.ConfigDict()
  c.pipeline.schedule = "1f1b"      # "gpipe" | "1f1b" | "dualpipev" (DeepSeek's DualPipeV:
                                    # 2 stages per device, >= 2 x mesh.stage micro-batches)
  c.pipeline.stage_blocks = ""      # MoE blocks per stage, first first ("9,7": the last stage,
                                    # which also runs the output head, lighter); "": even

  # ---- sharding rules: logical axis name -> mesh axes ("a,b"; "" replicates) ----------------
  # Parameter dimensions carry logical names from creation (moe_jax/layers/params.py).
  c.sharding = ml_collections.ConfigDict()
  c.sharding.batch = "data,fsdp,expert"  # every axis that splits tokens
  c.sharding.experts = "expert"     # routed experts (required by dispatch.expert_parallel)
  c.sharding.router = ""
  c.sharding.embed = "fsdp"         # every parameter with a model-width dimension: FSDP
  c.sharding.mlp = "tensor"
  c.sharding.heads = "tensor"
  c.sharding.kv_heads = "tensor"
  c.sharding.head_dim = ""
  c.sharding.latent = ""            # MLA's query and key/value latents
  c.sharding.vocab = ""
  c.sharding.layers = ""            # the leading dimension of scanned blocks' parameters

  size, _, overrides = (arg or "").partition(",")
  if size == "tiny":
    c.data.tokenizer = "bytes"
    c.model.vocab_size = 260
    c.model.d_model = 64
    c.model.num_layers = 2
    c.model.num_heads = 2
    c.model.num_kv_heads = 1
    c.model.head_dim = 32
    c.model.dense_mlp_dim = 128
    c.model.num_routed_experts = 8
    c.model.expert_dim = 32
    c.data.seq_len = 64
    c.data.batch_size = 8
    c.train.steps = 40
    c.train.log_every = 10
    c.train.eval_every = 20
    c.train.eval_batches = 2
    c.train.checkpoint_every = 20
    c.train.sample_tokens = 32
    c.optimizer.warmup_steps = 5
    c.optimizer.learning_rate = 3e-3
    c.optimizer.b2 = 0.95
    c.optimizer.final_lr_fraction = 0.1
  elif size == "gpu":
    set_gpu_size(c)
  elif size not in ("", "default"):
    raise ValueError(f"configs/default.py: unknown size {size!r}; expected 'default', 'tiny' "
                     f"or 'gpu'")
  apply_shorthands(c, overrides)
  return c


def set_gpu_size(c: ml_collections.ConfigDict) -> None:
  """One GPU, ten minutes (README "Ten minutes on one GPU"): 8 blocks (1 dense, 7 MoE) of
  width 512, 64 routed experts of width 256 plus one shared, top-6, MTP depth 1, bfloat16,
  dropless; 6,000 steps of 64 x 1,024 bytes of the `python` corpus (393M bytes, about one
  epoch of it), evaluated on the whole validation split (the `stdlib` source's)."""
  c.data.source = "python"
  c.data.tokenizer = "bytes"
  c.model.vocab_size = 260
  c.data.seq_len = 1024
  c.data.batch_size = 64
  c.model.d_model = 512
  c.model.num_layers = 8
  c.model.num_heads = 8
  c.model.num_kv_heads = 4
  c.model.head_dim = 64
  c.model.dense_mlp_dim = 1536
  c.model.num_routed_experts = 64
  c.model.expert_dim = 256
  c.router.top_k = 6
  c.model.compute_dtype = "bfloat16"
  c.model.mtp_depth = 1
  c.dispatch.strategy = "dropless"
  c.optimizer.learning_rate = 3e-3
  c.optimizer.b2 = 0.95
  c.optimizer.final_lr_fraction = 0.1
  c.optimizer.warmup_steps = 200
  c.train.steps = 6000
  c.train.log_every = 50
  c.train.eval_every = 1000
  c.train.eval_batches = 0
  c.train.checkpoint_every = 1000


_SHORTHANDS = {"steps": "train.steps", "batch": "data.batch_size", "seq": "data.seq_len"}


def apply_shorthands(c: ml_collections.ConfigDict, overrides: str) -> None:
  """Applies "steps=N,batch=B,seq=S,ep=VARIANT" from the config argument string.

  ep=VARIANT puts every device on the `expert` axis and turns on that expert-parallel
  variant (all_to_all | all_gather | token_all_to_all | ragged_all_to_all) with the
  dispatcher it implies.
  """
  for item in filter(None, overrides.split(",")):
    key, sep, value = item.partition("=")
    if sep and key == "ep":
      # Imported here, not at the top: loading this file then needs no jax, so a mistake on
      # the command line is refused without importing it.
      from moe_jax.dispatch.expert_parallel import DISPATCHER_OF_VARIANT
      c.dispatch.expert_parallel, c.mesh.data, c.mesh.expert = value, 1, -1
      c.dispatch.strategy = DISPATCHER_OF_VARIANT.get(value, c.dispatch.strategy)
      continue
    if not sep or key not in _SHORTHANDS:
      raise ValueError(f"configs/default.py: bad argument {item!r}; use "
                       f"{sorted(_SHORTHANDS)}=N or ep=VARIANT")
    section, field = _SHORTHANDS[key].split(".")
    c[section][field] = int(value)
