"""One adapter per architecture, keyed by the Hugging Face class name in `config.architectures`."""
from __future__ import annotations

from dataclasses import replace
from typing import Callable

from . import routing
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
    routing=routing.softmax_topk_eps,
)
LLAMA = ModelSpec(name="llama", router=None, experts=None, is_moe_layer=never_moe)
QWEN2 = ModelSpec(name="qwen2", router=None, experts=None, is_moe_layer=never_moe)
QWEN3 = ModelSpec(name="qwen3", router=None, experts=None, is_moe_layer=never_moe)
# Gemma's norms compute x_hat (1 + w); Gemma 2/3 normalize the MLP input with pre_feedforward_layernorm
# (post_attention_layernorm / post_feedforward_layernorm normalize block outputs and are no fold targets).
GEMMA = ModelSpec(name="gemma", router=None, experts=None, is_moe_layer=never_moe, norm_weight_offset=1.0)
GEMMA2 = ModelSpec(name="gemma2", router=None, experts=None, is_moe_layer=never_moe, norm_weight_offset=1.0,
                   mlp_norm="pre_feedforward_layernorm")
GEMMA3_TEXT = replace(GEMMA2, name="gemma3_text")


def _after_dense_prefix(config, i: int) -> bool:
    """DeepSeek-V2/V3, GLM-4.5, dots1: the first `first_k_dense_replace` layers are dense."""
    return i >= config.first_k_dense_replace


def _ernie_is_moe(config, i: int) -> bool:
    """ERNIE 4.5: every `moe_layer_interval`-th layer within [moe_layer_start_index, moe_layer_end_index]."""
    return (i + 1) % config.moe_layer_interval == 0 and config.moe_layer_start_index <= i <= config.moe_layer_end_index


MLA_KV = ("MLA caches the compressed latent (kv_a_layernorm's output and the shared RoPE key), not per-head "
          "K/V; quantizing that latent cache is not implemented, so --kv_bits must stay 16")
SINKS_KV = ("its attention sinks need the eager attention path, which --kv_bits' quantized SDPA attention "
            "(duquant/kvquant.py) would replace; --kv_bits must stay 16")


# DeepSeek-V3.2's sparse-attention indexer: wk and weights_proj read input_layernorm's output, wq_b
# reads q_a_layernorm's, so they are readers of those sites (they must carry the folded smoothing).
INDEXER_ATTN_IN = ("self_attn.indexer.wk", "self_attn.indexer.weights_proj")
INDEXER_Q_IN = ("self_attn.indexer.wq_b",)


def _mla(name: str, q_lora: bool, indexer: bool = False, **kw) -> ModelSpec:
    """DeepSeek-V2/V3 multi-head latent attention. q_a_proj (or q_proj without a query LoRA) and
    kv_a_proj_with_mqa read input_layernorm; q_b_proj reads q_a_layernorm and kv_b_proj reads
    kv_a_layernorm (inner norm sites). o_proj's input channels are heads of kv_b_proj's value half,
    not one v_proj row each, so o-in smoothing is applied online (attn_value None)."""
    q_in = "self_attn.q_a_proj" if q_lora else "self_attn.q_proj"
    q_inner = ("self_attn.q_b_proj",) + (INDEXER_Q_IN if indexer else ())
    inner = (("self_attn.q_a_layernorm", q_inner),) if q_lora else ()
    return ModelSpec(
        name=name, attn_in=(q_in, "self_attn.kv_a_proj_with_mqa") + (INDEXER_ATTN_IN if indexer else ()),
        attn_value=None,
        inner_norms=inner + (("self_attn.kv_a_layernorm", ("self_attn.kv_b_proj",)),),
        shared_experts="shared_experts", is_moe_layer=_after_dense_prefix, num_experts_attr="n_routed_experts",
        kv_quant_unsupported=MLA_KV, **kw)


def _mla_variant(**kw) -> Callable[[object], ModelSpec]:
    """The adapter of an MLA checkpoint: with or without a query LoRA (DeepSeek-V2-Lite has none)."""
    with_lora, without = _mla(q_lora=True, **kw), _mla(q_lora=False, **kw)
    return lambda config: with_lora if config.q_lora_rank is not None else without


HYBRID_KV = ("its linear-attention layers keep a recurrent state, not a KV cache, and per-layer KV quantization "
             "of the full-attention layers alone is not implemented; --kv_bits must stay 16")


def _linear_attention(attn_in: tuple[str, ...]) -> Callable[[object, int], dict]:
    """Qwen3-Next / Qwen3.5: `layer_types` says which layers are Gated DeltaNet linear attention. Their
    input projections read input_layernorm; out_proj reads the gated-normed recurrent output, which no
    per-channel weight produces (the gated norm's weight is shared by all heads), so its smoothing is
    applied online. The recurrence (conv1d, decay, delta rule) stays in full precision."""
    linear = dict(attn="linear_attn", attn_in=attn_in, attn_out="linear_attn.out_proj", attn_value=None)
    return lambda config, i: linear if config.layer_types[i] == "linear_attention" else {}


def _llama4_is_moe(config, i: int) -> bool:
    """Llama 4 lists its MoE layers (Maverick interleaves dense ones)."""
    return i in config.moe_layers


LLAMA4_TEXT = ModelSpec(name="llama4_text", mlp="feed_forward", router="router", shared_experts="shared_expert",
                        is_moe_layer=_llama4_is_moe, expert_kind="input_weighted_swiglu",
                        routing=routing.sigmoid_top_logits_dense)
QWEN3_NEXT = ModelSpec(
    name="qwen3_next", shared_experts="shared_expert", shared_expert_gate="shared_expert_gate",
    is_moe_layer=_qwen_is_moe, num_experts_attr="num_experts", norm_weight_offset=1.0,
    layer_overrides=_linear_attention(("linear_attn.in_proj_qkvz", "linear_attn.in_proj_ba")),
    kv_quant_unsupported=HYBRID_KV)
QWEN3_5_MOE = ModelSpec(
    name="qwen3_5_moe_text", shared_experts="shared_expert", shared_expert_gate="shared_expert_gate",
    num_experts_attr="num_experts", norm_weight_offset=1.0,
    layer_overrides=_linear_attention(("linear_attn.in_proj_qkv", "linear_attn.in_proj_z", "linear_attn.in_proj_b",
                                       "linear_attn.in_proj_a")),
    kv_quant_unsupported=HYBRID_KV)
GLM4_MOE = ModelSpec(name="glm4_moe", shared_experts="shared_experts", is_moe_layer=_after_dense_prefix,
                     num_experts_attr="n_routed_experts", routing=routing.sigmoid_grouped)
DOTS1 = ModelSpec(name="dots1", shared_experts="shared_experts", is_moe_layer=_after_dense_prefix,
                  num_experts_attr="n_routed_experts", routing=routing.sigmoid_grouped)
GPT_OSS = ModelSpec(name="gpt_oss", router="router", expert_kind="clamped_swiglu",
                    routing=routing.top_logits_softmax, kv_quant_unsupported=SINKS_KV)
ERNIE4_5_MOE = ModelSpec(name="ernie4_5_moe", shared_experts="shared_experts", is_moe_layer=_ernie_is_moe,
                         num_experts_attr="num_experts", routing=routing.softmax_biased)
GRANITEMOE = ModelSpec(name="granitemoe", mlp="block_sparse_moe", router="router",
                       routing=routing.top_logits_softmax)
GRANITEMOESHARED = ModelSpec(name="granitemoeshared", mlp="block_sparse_moe", router="router",
                             shared_experts="shared_mlp", shared_in_layer=True,
                             shared_fused=("input_linear", "output_linear", "activation"),
                             routing=routing.top_logits_softmax)
DBRX = ModelSpec(
    name="dbrx", layers="transformer.blocks", final_norm="transformer.norm_f", attn_norm="norm_attn_norm.norm_1",
    attn="norm_attn_norm.attn", attn_in=("norm_attn_norm.attn.Wqkv",), attn_out="norm_attn_norm.attn.out_proj",
    attn_value=None, mlp_norm="norm_attn_norm.norm_2", mlp="ffn", router="router.layer", expert_kind="dbrx_glu",
    num_experts_attr="ffn_config.moe_num_experts", top_k_attr="ffn_config.moe_top_k",
    routing=routing.softmax_topk_pnorm)
PHIMOE = ModelSpec(name="phimoe", router="router", routing=routing.sparse_mixer)
MINIMAX_M2 = ModelSpec(name="minimax_m2", routing=routing.sigmoid_block_biased)
HUNYUAN_V1_MOE = ModelSpec(name="hunyuan_v1_moe", router="gate.wg", shared_experts="shared_mlp",
                           num_experts_attr="num_experts", top_k_attr="moe_topk",
                           routing=routing.softmax_topk_of_logits)

# A class name maps to its adapter, or to a function of the config choosing between variants.
SPECS: dict[str, ModelSpec | Callable[[object], ModelSpec]] = {
    "MixtralForCausalLM": MIXTRAL,
    "OlmoeForCausalLM": OLMOE,
    "Qwen2MoeForCausalLM": QWEN2_MOE,
    "Qwen3MoeForCausalLM": QWEN3_MOE,
    "DeepseekMoeForCausalLM": DEEPSEEK_MOE,
    "DeepseekForCausalLM": DEEPSEEK_MOE,
    "LlamaForCausalLM": LLAMA,
    "MistralForCausalLM": LLAMA,
    "Qwen2ForCausalLM": QWEN2,
    "Qwen3ForCausalLM": QWEN3,
    "GemmaForCausalLM": GEMMA,
    "Gemma2ForCausalLM": GEMMA2,
    "Gemma3ForCausalLM": GEMMA3_TEXT,
    "DeepseekV3ForCausalLM": _mla_variant(name="deepseek_v3", routing=routing.sigmoid_grouped),
    "DeepseekV2ForCausalLM": _mla_variant(name="deepseek_v2", routing=routing.softmax_grouped_scaled),
    "DeepseekV32ForCausalLM": _mla(name="deepseek_v32", q_lora=True, indexer=True, routing=routing.sigmoid_grouped),
    "Glm4MoeForCausalLM": GLM4_MOE,
    "Dots1ForCausalLM": DOTS1,
    "GptOssForCausalLM": GPT_OSS,
    "Ernie4_5_MoeForCausalLM": ERNIE4_5_MOE,
    "GraniteMoeForCausalLM": GRANITEMOE,
    "DbrxForCausalLM": DBRX,
    "PhimoeForCausalLM": PHIMOE,
    "GraniteMoeSharedForCausalLM": GRANITEMOESHARED,
    "MiniMaxM2ForCausalLM": MINIMAX_M2,
    "HunYuanMoEV1ForCausalLM": HUNYUAN_V1_MOE,
    "Qwen3NextForCausalLM": QWEN3_NEXT,
    "Llama4ForCausalLM": LLAMA4_TEXT,
    "Qwen3_5MoeForCausalLM": QWEN3_5_MOE,
}


def get_spec(model) -> ModelSpec:
    """The adapter for a loaded model, from its class (the same key real checkpoints carry)."""
    name = type(model).__name__
    if name not in SPECS:
        raise ValueError(f"unsupported model class {name}; supported: {', '.join(sorted(SPECS))}")
    spec = SPECS[name]
    return spec if isinstance(spec, ModelSpec) else spec(model.config)


def _family_row(arch: str) -> str:
    """One README row, read off the adapter of tiny-`arch`'s class (models/tiny.py builds its config)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from .tiny import tiny_config

    config = tiny_config(arch)
    cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].__name__
    spec = SPECS[cls] if isinstance(SPECS[cls], ModelSpec) else SPECS[cls](config)
    moe = spec.router is not None
    shared = spec.shared_experts is not None or spec.shared_in_layer or spec.shared_fused is not None
    cells = [f"`{arch}`", cls, f"`{spec.routing.__name__}`" if moe else "dense",
             "yes" if shared else "-", "MLA (norms inside attention)" if spec.inner_norms else "standard",
             "hybrid" if spec.layer_overrides is not None else "-", spec.expert_kind if moe else "-",
             "16 bits only" if spec.kv_quant_unsupported else "yes"]
    return "| " + " | ".join(cells) + " |"


def family_table() -> str:
    """The README's family table, generated from the adapters (tests/test_models.py keeps README.md
    equal to it)."""
    from .tiny import TINY

    head = ("| `--model tiny-...` | class | routing (models/routing.py) | shared experts | attention | layers "
            "| experts | KV-cache quantization |\n|---|---|---|---|---|---|---|---|")
    return "\n".join([head] + [_family_row(arch) for arch in TINY])
