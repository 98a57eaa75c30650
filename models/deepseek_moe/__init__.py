"""DeepSeek-MoE v1, registered with the Auto classes under the original model_type "deepseek".

Importing this package is what lets `AutoModelForCausalLM.from_pretrained` open both our saved models and the
original deepseek-ai checkpoints without `trust_remote_code` (a locally registered class also takes precedence
over the checkpoint's `auto_map` when remote code is allowed).
"""
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_deepseek_moe import DeepseekMoeConfig
from .modeling_deepseek_moe import (
    DeepseekMoeExperts,
    DeepseekMoeForCausalLM,
    DeepseekMoeGate,
    DeepseekMoeMLP,
    DeepseekMoeModel,
    DeepseekMoePreTrainedModel,
    DeepseekMoeSparseMoeBlock,
    is_moe_layer,
)

AutoConfig.register("deepseek", DeepseekMoeConfig, exist_ok=True)
AutoModel.register(DeepseekMoeConfig, DeepseekMoeModel, exist_ok=True)
AutoModelForCausalLM.register(DeepseekMoeConfig, DeepseekMoeForCausalLM, exist_ok=True)

__all__ = [
    "DeepseekMoeConfig",
    "DeepseekMoeExperts",
    "DeepseekMoeForCausalLM",
    "DeepseekMoeGate",
    "DeepseekMoeMLP",
    "DeepseekMoeModel",
    "DeepseekMoePreTrainedModel",
    "DeepseekMoeSparseMoeBlock",
    "is_moe_layer",
]
