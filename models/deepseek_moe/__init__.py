"""DeepSeek-MoE v1, registered with the Auto classes under the original model_type "deepseek"."""
from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_deepseek_moe import DeepseekMoeConfig
from .modeling_deepseek_moe import DeepseekMoeForCausalLM, DeepseekMoeModel, is_moe_layer

AutoConfig.register("deepseek", DeepseekMoeConfig, exist_ok=True)
AutoModelForCausalLM.register(DeepseekMoeConfig, DeepseekMoeForCausalLM, exist_ok=True)

__all__ = ["DeepseekMoeConfig", "DeepseekMoeForCausalLM", "DeepseekMoeModel", "is_moe_layer"]
