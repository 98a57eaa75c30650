"""Tiny randomly initialised models of every supported architecture, for tests and smoke runs.

They use the zoo's real tokenizer so every code path (data, perplexity, lm-eval) runs unchanged.
Hidden size 64 and expert width 48 exercise both a full rotation block and a smaller tail block.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .errors import ModelLoadError

TOKENIZER_DIR = Path(__file__).resolve().parent / "zoo" / "tokenizer"

_BASE = dict(
    vocab_size=8192, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
    bos_token_id=0, eos_token_id=1, pad_token_id=2,
)
TINY = {
    "mixtral": dict(model_type="mixtral", intermediate_size=48, num_local_experts=4, num_experts_per_tok=2),
    "olmoe": dict(model_type="olmoe", intermediate_size=48, num_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(
        model_type="qwen2_moe", intermediate_size=96, moe_intermediate_size=48, shared_expert_intermediate_size=96,
        num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[0], num_hidden_layers=3,
    ),
    "qwen3_moe": dict(
        model_type="qwen3_moe", intermediate_size=96, moe_intermediate_size=48, num_experts=4,
        num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[], head_dim=16,
    ),
    "deepseek": dict(
        model_type="deepseek", intermediate_size=96, moe_intermediate_size=48, n_routed_experts=4,
        num_experts_per_tok=2, n_shared_experts=2, first_k_dense_replace=1, num_hidden_layers=3,
    ),
    "llama": dict(model_type="llama", intermediate_size=96),
    "mistral": dict(model_type="mistral", intermediate_size=96),
    "qwen2": dict(model_type="qwen2", intermediate_size=96),
    "qwen3": dict(model_type="qwen3", intermediate_size=96, head_dim=16),
    "gemma": dict(model_type="gemma", intermediate_size=96, head_dim=16),
    "gemma2": dict(model_type="gemma2", intermediate_size=96, head_dim=16, sliding_window=8),
    "gemma3_text": dict(model_type="gemma3_text", intermediate_size=96, head_dim=16, sliding_window=8),
    # MLA with a query LoRA, 8 experts in 4 groups (2 kept per token), scaled sigmoid routing.
    "deepseek_v3": dict(
        model_type="deepseek_v3", num_hidden_layers=3, num_key_value_heads=4, intermediate_size=96,
        moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4,
        topk_group=2, first_k_dense_replace=1, routed_scaling_factor=2.5, q_lora_rank=32, kv_lora_rank=32,
        qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
    ),
    # DeepSeek-V3.2: V3 plus the sparse-attention indexer, keeping 8 of the 64 test tokens.
    "deepseek_v32": dict(
        model_type="deepseek_v32", num_hidden_layers=3, num_key_value_heads=4, intermediate_size=96,
        moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4,
        topk_group=2, first_k_dense_replace=1, routed_scaling_factor=2.5, q_lora_rank=32, kv_lora_rank=32,
        qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, index_topk=8, index_head_dim=16, index_n_heads=2,
    ),
    # MLA without a query LoRA (V2-Lite), group-limited greedy softmax routing (one group kept, so the
    # limit changes choices: with as many groups kept as experts chosen, it never does).
    "deepseek_v2": dict(
        model_type="deepseek_v2", num_hidden_layers=3, num_key_value_heads=4, intermediate_size=96,
        moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4,
        topk_group=1, topk_method="group_limited_greedy", first_k_dense_replace=1, routed_scaling_factor=1.5,
        q_lora_rank=None, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
    ),
    "glm4_moe": dict(
        model_type="glm4_moe", num_hidden_layers=3, intermediate_size=96, moe_intermediate_size=32,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
        first_k_dense_replace=1, routed_scaling_factor=1.5, use_qk_norm=True, head_dim=16, attention_bias=True,
    ),
    "dots1": dict(
        model_type="dots1", num_hidden_layers=3, intermediate_size=96, moe_intermediate_size=32,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
        first_k_dense_replace=1, routed_scaling_factor=1.5, head_dim=16,
    ),
    # Alternating sliding-window / full attention with sinks, expert biases, clamped SwiGLU.
    "gpt_oss": dict(
        model_type="gpt_oss", intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, head_dim=16,
        layer_types=["sliding_attention", "full_attention"], sliding_window=8,
        rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=32.0, original_max_position_embeddings=16,
                             beta_fast=32.0, beta_slow=1.0, truncate=False),
    ),
    "ernie4_5_moe": dict(
        model_type="ernie4_5_moe", num_hidden_layers=3, intermediate_size=96, moe_intermediate_size=48,
        moe_num_experts=4, moe_k=2, moe_num_shared_experts=1, moe_layer_start_index=1, moe_layer_interval=1,
        moe_layer_end_index=2,
    ),
    "granitemoe": dict(model_type="granitemoe", intermediate_size=48, num_local_experts=4, num_experts_per_tok=2),
    "granitemoeshared": dict(
        model_type="granitemoeshared", intermediate_size=48, shared_intermediate_size=96, num_local_experts=4,
        num_experts_per_tok=2,
    ),
    # Fused Wqkv attention, LayerNorms, MoE settings nested in ffn_config / attn_config.
    "dbrx": dict(
        model_type="dbrx", d_model=64, n_heads=4, n_layers=2, max_seq_len=512,
        attn_config=dict(kv_n_heads=2, clip_qkv=8.0, rope_theta=10000.0),
        ffn_config=dict(hidden_size=64, ffn_hidden_size=48, moe_num_experts=4, moe_top_k=2),
    ),
    # Sparse-mixer top-2 routing; LayerNorms with biases.
    "phimoe": dict(model_type="phimoe", intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, head_dim=16),
    "minimax_m2": dict(
        model_type="minimax_m2", intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, head_dim=16,
    ),
    # Hybrid: Gated DeltaNet linear attention, then gated full attention; (1 + w) norms.
    "qwen3_next": dict(
        model_type="qwen3_next", intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48,
        num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[], head_dim=16,
        layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4,
    ),
    "qwen3_5_moe_text": dict(
        model_type="qwen3_5_moe_text", moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=4,
        num_experts_per_tok=2, head_dim=16, layer_types=["linear_attention", "full_attention"],
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
        linear_conv_kernel_dim=4,
    ),
    # Top-1 sigmoid routing scaling the experts' input, a shared expert, a dense second layer, NoPE layers.
    "llama4_text": dict(
        model_type="llama4_text", intermediate_size=48, intermediate_size_mlp=96, num_local_experts=4,
        num_experts_per_tok=1, head_dim=16, moe_layers=[0], attention_chunk_size=16,
    ),
    "hunyuan_v1_moe": dict(
        model_type="hunyuan_v1_moe", intermediate_size=48, num_experts=4, moe_topk=2, head_dim=16,
    ),
}


def tiny_config(arch: str, **overrides):
    from transformers import AutoConfig

    from . import deepseek_moe  # noqa: F401  (registers model_type "deepseek")

    if arch not in TINY:
        raise ModelLoadError(f"unknown tiny model tiny-{arch}; choose from {', '.join('tiny-' + a for a in TINY)}")
    kw = {**_BASE, **TINY[arch], **overrides}
    return AutoConfig.for_model(kw.pop("model_type"), **kw)


def tiny_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def tiny_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """(model, tokenizer) with random weights; a larger init std makes routing decisive, as in trained models."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch, initializer_range=0.1, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    if dtype == torch.float64 and model._can_set_experts_implementation():
        model.set_experts_implementation("eager")  # grouped_mm kernels have no float64 path
    return model, tiny_tokenizer()
