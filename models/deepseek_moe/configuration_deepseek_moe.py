"""Configuration of DeepSeek-MoE v1 (deepseek-ai/deepseek-moe-16b-base), under its original model_type.

Llama attention and norms plus fine-grained routed experts, always-on shared experts, and dense
first layers; the field names and 16B defaults are the original checkpoint's.
"""
from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig


@strict
class DeepseekMoeConfig(LlamaConfig):
    model_type = "deepseek"

    vocab_size: int = 102400
    hidden_size: int = 2048
    intermediate_size: int = 10944
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    max_position_embeddings: int = 4096
    bos_token_id: int | None = 100000
    eos_token_id: int | list[int] | None = 100001
    moe_intermediate_size: int = 1408
    n_shared_experts: int | None = 2
    n_routed_experts: int | None = 64
    num_experts_per_tok: int = 6
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 1
    norm_topk_prob: bool = False
    scoring_func: str = "softmax"
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True
