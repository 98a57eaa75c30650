"""One adapter per architecture, keyed by the Hugging Face class name in `config.architectures`."""
from __future__ import annotations

from .deepseek_moe import is_moe_layer as _deepseek_is_moe
from .spec import ModelSpec, always_moe, never_moe


def _qwen_is_moe(config, i: int) -> bool:
    """Qwen-MoE interleaves dense layers through `mlp_only_layers` and `decoder_sparse_step`."""
    return (
        i not in getattr(config, "mlp_only_layers", [])
        and config.num_experts > 0
        and (i + 1) % config.decoder_sparse_step == 0
    )


MIXTRAL = ModelSpec(name="mixtral", is_moe_layer=always_moe)
OLMOE = ModelSpec(name="olmoe", num_experts_attr="num_experts")
QWEN2_MOE = ModelSpec(
    name="qwen2_moe",
    shared_experts="shared_expert",
    shared_expert_gate="shared_expert_gate",
    is_moe_layer=_qwen_is_moe,
    num_experts_attr="num_experts",
)
QWEN3_MOE = ModelSpec(name="qwen3_moe", is_moe_layer=_qwen_is_moe, num_experts_attr="num_experts")
DEEPSEEK_MOE = ModelSpec(
    name="deepseek_moe",
    shared_experts="shared_experts",
    is_moe_layer=_deepseek_is_moe,
    num_experts_attr="n_routed_experts",
)
LLAMA = ModelSpec(name="llama", router=None, experts=None, is_moe_layer=never_moe)

SPECS: dict[str, ModelSpec] = {
    "MixtralForCausalLM": MIXTRAL,
    "OlmoeForCausalLM": OLMOE,
    "Qwen2MoeForCausalLM": QWEN2_MOE,
    "Qwen3MoeForCausalLM": QWEN3_MOE,
    "DeepseekMoeForCausalLM": DEEPSEEK_MOE,
    "DeepseekForCausalLM": DEEPSEEK_MOE,
    "LlamaForCausalLM": LLAMA,
    "MistralForCausalLM": LLAMA,
}


def get_spec(model) -> ModelSpec:
    """The adapter for a loaded model, from its class (the same key real checkpoints carry)."""
    name = type(model).__name__
    if name not in SPECS:
        raise ValueError(f"unsupported model class {name}; supported: {', '.join(sorted(SPECS))}")
    return SPECS[name]
