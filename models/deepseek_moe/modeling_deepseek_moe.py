"""DeepSeek-MoE v1 for transformers 5, written for this project (the hub's remote code no longer loads).

Parameter names are the original checkpoint's (`mlp.gate.weight`, `mlp.experts.{j}.*_proj`,
`mlp.shared_experts.*_proj`), so deepseek-ai/deepseek-moe-16b-base loads without conversion.
The MoE block follows transformers 5's module protocol (a router returning
(logits, top-k weights, top-k indices) and an experts module called with them), so the
quantization pipeline treats it like Mixtral or OLMoE. Attention, RoPE and norms are Llama's.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaModel,
    LlamaPreTrainedModel,
)

from .configuration_deepseek_moe import DeepseekMoeConfig


class DeepseekMoeMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, act: str):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act_fn = ACT2FN[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DeepseekMoeGate(nn.Module):
    """Softmax router; DeepSeek-MoE-16B does not renormalize the top-k weights (norm_topk_prob False)."""

    def __init__(self, config: DeepseekMoeConfig):
        super().__init__()
        if config.scoring_func != "softmax":
            raise ValueError(f"scoring_func {config.scoring_func!r} is not supported; DeepSeek-MoE v1 uses softmax")
        self.top_k, self.num_experts = config.num_experts_per_tok, config.n_routed_experts
        self.norm_topk_prob = config.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(self.num_experts, config.hidden_size))

    def forward(self, hidden_states: torch.Tensor):
        hidden_states = hidden_states.reshape(-1, hidden_states.shape[-1])
        logits = F.linear(hidden_states, self.weight)
        weights, index = torch.topk(logits.float().softmax(-1), self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        return logits, weights.to(hidden_states.dtype), index


class DeepseekMoeExperts(nn.ModuleList):
    """Per-expert MLPs (the original layout), called like transformers 5's fused experts."""

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        out = torch.zeros_like(hidden_states)
        for e in top_k_index.unique().tolist():
            token_idx, slot = torch.where(top_k_index == e)
            y = self[e](hidden_states[token_idx]) * top_k_weights[token_idx, slot, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


class DeepseekMoeBlock(nn.Module):
    def __init__(self, config: DeepseekMoeConfig):
        super().__init__()
        self.gate = DeepseekMoeGate(config)
        self.experts = DeepseekMoeExperts(
            DeepseekMoeMLP(config.hidden_size, config.moe_intermediate_size, config.hidden_act)
            for _ in range(config.n_routed_experts)
        )
        self.shared_experts = None
        if config.n_shared_experts:
            self.shared_experts = DeepseekMoeMLP(
                config.hidden_size, config.moe_intermediate_size * config.n_shared_experts, config.hidden_act
            )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1])
        _, weights, index = self.gate(flat)
        out = self.experts(flat, index, weights)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.reshape(shape)


def is_moe_layer(config: DeepseekMoeConfig, i: int) -> bool:
    return bool(config.n_routed_experts) and i >= config.first_k_dense_replace and i % config.moe_layer_freq == 0


class DeepseekMoeDecoderLayer(LlamaDecoderLayer):
    def __init__(self, config: DeepseekMoeConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        if is_moe_layer(config, layer_idx):
            self.mlp = DeepseekMoeBlock(config)
        else:
            self.mlp = DeepseekMoeMLP(config.hidden_size, config.intermediate_size, config.hidden_act)


class DeepseekMoePreTrainedModel(LlamaPreTrainedModel):
    config: DeepseekMoeConfig
    config_class = DeepseekMoeConfig
    _no_split_modules = ["DeepseekMoeDecoderLayer"]
    _can_record_outputs = {"hidden_states": DeepseekMoeDecoderLayer}

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, DeepseekMoeGate):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)


class DeepseekMoeModel(DeepseekMoePreTrainedModel, LlamaModel):
    def __init__(self, config: DeepseekMoeConfig):
        super().__init__(config)
        self.layers = nn.ModuleList(DeepseekMoeDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.post_init()


class DeepseekMoeForCausalLM(DeepseekMoePreTrainedModel, LlamaForCausalLM):
    def __init__(self, config: DeepseekMoeConfig):
        super().__init__(config)
        self.model = DeepseekMoeModel(config)
        self.post_init()
