"""DeepSeek-MoE v1 for transformers 5, written for this project because the hub's remote code no longer loads.

Parameter names are the original checkpoint's (`mlp.gate.weight`, `mlp.experts.{j}.*_proj`,
`mlp.shared_experts.*_proj`), so deepseek-ai/deepseek-moe-16b-base loads without conversion and without
remote code. The MoE block follows the module protocol of transformers 5's Mixtral and OLMoE blocks (a router
returning (logits, top-k weights, top-k indices) and an experts module called with them), so code that hooks
those blocks handles this one too; the experts stay one `nn.Linear` per projection, as in the checkpoint.
Attention, RoPE and RMSNorm are Llama's, which DeepSeek-MoE v1 uses unchanged.
"""
import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_utils import PreTrainedModel, slice_logits_to_keep
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRMSNorm, LlamaRotaryEmbedding
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_deepseek_moe import DeepseekMoeConfig


def is_moe_layer(config: DeepseekMoeConfig, layer_idx: int) -> bool:
    """The first `first_k_dense_replace` layers, and layers off the `moe_layer_freq` grid, keep a dense MLP."""
    dense = layer_idx < config.first_k_dense_replace or layer_idx % config.moe_layer_freq != 0
    return bool(config.n_routed_experts) and not dense


class DeepseekMoeMLP(nn.Module):
    """SwiGLU MLP; the dense MLP, every routed expert and the shared experts differ only in width."""

    def __init__(self, config: DeepseekMoeConfig, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DeepseekMoeGate(nn.Module):
    """Softmax top-k router.

    Logits are computed in (at least) float32, as the original does, so that a bf16 model routes tokens the way
    the checkpoint was trained to. DeepSeek-MoE-16B leaves the top-k weights unnormalized (`norm_topk_prob`
    False), so they sum to less than one.
    """

    def __init__(self, config: DeepseekMoeConfig):
        super().__init__()
        if config.scoring_func != "softmax":
            raise ValueError(f"DeepSeek-MoE v1 supports only scoring_func='softmax', got {config.scoring_func!r}")
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.n_routed_experts
        self.norm_topk_prob = config.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(self.num_experts, config.hidden_size))

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden_states = hidden_states.reshape(-1, hidden_states.shape[-1])
        dtype = torch.promote_types(hidden_states.dtype, torch.float32)
        router_logits = F.linear(hidden_states.to(dtype), self.weight.to(dtype))
        top_k_weights, top_k_index = router_logits.softmax(dim=-1).topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            top_k_weights = top_k_weights / (top_k_weights.sum(dim=-1, keepdim=True) + 1e-20)
        return router_logits, top_k_weights, top_k_index


class DeepseekMoeExperts(nn.ModuleList):
    """The routed experts as separate MLPs (the checkpoint's layout), called like transformers 5's fused experts."""

    def __init__(self, config: DeepseekMoeConfig):
        super().__init__(DeepseekMoeMLP(config, config.moe_intermediate_size) for _ in range(config.n_routed_experts))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        out = torch.zeros_like(hidden_states)
        for expert_idx in top_k_index.unique().tolist():
            token_idx, slot = torch.where(top_k_index == expert_idx)
            y = self[expert_idx](hidden_states[token_idx]) * top_k_weights[token_idx, slot, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


class DeepseekMoeSparseMoeBlock(nn.Module):
    """Fine-grained routed experts plus always-active shared experts that every token passes through."""

    def __init__(self, config: DeepseekMoeConfig):
        super().__init__()
        self.gate = DeepseekMoeGate(config)
        self.experts = DeepseekMoeExperts(config)
        self.shared_experts = None
        if config.n_shared_experts:
            self.shared_experts = DeepseekMoeMLP(config, config.moe_intermediate_size * config.n_shared_experts)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        hidden_states = hidden_states.reshape(-1, shape[-1])
        _, top_k_weights, top_k_index = self.gate(hidden_states)
        out = self.experts(hidden_states, top_k_index, top_k_weights)
        if self.shared_experts is not None:
            out = out + self.shared_experts(hidden_states)
        return out.reshape(shape)


class DeepseekMoeDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: DeepseekMoeConfig, layer_idx: int):
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx)
        moe = is_moe_layer(config, layer_idx)
        self.mlp = DeepseekMoeSparseMoeBlock(config) if moe else DeepseekMoeMLP(config, config.intermediate_size)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        attn_out, _ = self.self_attn(
            self.input_layernorm(hidden_states),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            **kwargs,
        )
        hidden_states = hidden_states + attn_out
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class DeepseekMoePreTrainedModel(PreTrainedModel):
    config: DeepseekMoeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DeepseekMoeDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_record_outputs = {
        "router_logits": OutputRecorder(DeepseekMoeGate, index=0),
        "hidden_states": DeepseekMoeDecoderLayer,
        "attentions": LlamaAttention,
    }

    @torch.no_grad()
    def _init_weights(self, module):
        # The base class covers linears, embeddings, RMSNorms and RoPE buffers; the router is a bare Parameter.
        super()._init_weights(module)
        if isinstance(module, DeepseekMoeGate):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)


class DeepseekMoeModel(DeepseekMoePreTrainedModel):
    def __init__(self, config: DeepseekMoeConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(DeepseekMoeDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoeModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device).unsqueeze(0) + past_seen

        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
        )
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids=position_ids)
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                position_embeddings=position_embeddings,
                attention_mask=causal_mask,
                past_key_values=past_key_values,
                position_ids=position_ids,
                **kwargs,
            )
        return MoeModelOutputWithPast(last_hidden_state=self.norm(hidden_states), past_key_values=past_key_values)


class DeepseekMoeForCausalLM(DeepseekMoePreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DeepseekMoeConfig):
        super().__init__(config)
        self.model = DeepseekMoeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoeCausalLMOutputWithPast:
        outputs: MoeModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return MoeCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
        )

