"""Small model variants that between them create every kind of parameter, shared by the tests
of what shapes parameters (test_resume_settings.py) and of their axis names (test_logical_axes.py)."""

from moe_jax.model import ModelSpec

SMALL = ModelSpec(vocab_size=64, d_model=32, num_layers=3, num_heads=2, num_kv_heads=1,
                  head_dim=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                  v_head_dim=8, dense_mlp_dim=48, num_routed_experts=8, expert_dim=16)
VARIANTS = {
    "gqa": SMALL,
    "gqa, biases, per-head norms, gated shared expert, MTP":
        SMALL.replace(qkv_bias=True, qk_norm="per_head", shared_expert_gate=True, mtp_depth=1),
    "mla": SMALL.replace(attention="mla"),
    "mla with a query latent": SMALL.replace(attention="mla", q_lora_rank=16),
}
