"""DeepSeek-MoE v1 port: original parameter names, Auto-class loading without remote code, exact MoE semantics."""
import importlib
import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import models.deepseek_moe
from models.deepseek_moe import DeepseekMoeConfig, DeepseekMoeForCausalLM

TINY = dict(
    vocab_size=256, hidden_size=64, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=3,
    first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=2,
    moe_intermediate_size=32, intermediate_size=128, max_position_embeddings=128,
    bos_token_id=0, eos_token_id=1, pad_token_id=2,
    # A wider init than 0.02 makes routing and greedy choices decisive, as in trained models.
    initializer_range=0.1,
)


def _model(**overrides) -> DeepseekMoeForCausalLM:
    torch.manual_seed(0)
    return DeepseekMoeForCausalLM(DeepseekMoeConfig(**{**TINY, **overrides})).eval()


def _ids() -> torch.Tensor:
    return torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(1))


def _assert_same_model(loaded, model):
    """Weights must round-trip bit for bit; logits only up to rounding, because the loaded tensors are
    memory-mapped at a different alignment, which makes CPU BLAS pick other kernels."""
    assert type(loaded) is DeepseekMoeForCausalLM
    expected = model.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in loaded.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(loaded(_ids()).logits, model(_ids()).logits, rtol=0, atol=1e-6)


def test_importing_twice_keeps_the_registration():
    importlib.reload(models.deepseek_moe)
    importlib.reload(models.deepseek_moe)


def test_save_load_round_trip_with_original_names(tmp_path):
    model = _model()
    keys = set(model.state_dict())
    for key in (
        "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
        "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
        "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight",
        "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.down_proj.weight",
        "model.layers.1.mlp.gate.weight", "model.layers.1.mlp.experts.7.gate_proj.weight",
        "model.layers.2.mlp.experts.3.down_proj.weight", "model.layers.2.mlp.shared_experts.up_proj.weight",
    ):
        assert key in keys, key
    assert not any("gate_up_proj" in k for k in keys)
    assert "model.layers.1.mlp.gate_proj.weight" not in keys and "model.layers.0.mlp.gate.weight" not in keys
    assert model.state_dict()["model.layers.1.mlp.gate.weight"].shape == (8, 64)
    assert model.state_dict()["model.layers.1.mlp.shared_experts.gate_proj.weight"].shape == (64, 64)

    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["architectures"] == ["DeepseekMoeForCausalLM"] and saved["model_type"] == "deepseek"
    _assert_same_model(AutoModelForCausalLM.from_pretrained(tmp_path), model)


def test_loads_an_original_checkpoint_without_remote_code(tmp_path):
    model = _model()
    # Written the way the original repository's config.json is: legacy RoPE keys, auto_map, remote class name.
    config = {
        **TINY, "model_type": "deepseek", "architectures": ["DeepseekForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekConfig",
                     "AutoModel": "modeling_deepseek.DeepseekModel",
                     "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM"},
        "rope_theta": 10000, "rope_scaling": None, "pretraining_tp": 1, "moe_layer_freq": 1,
        "norm_topk_prob": False, "scoring_func": "softmax", "aux_loss_alpha": 0.001, "seq_aux": True,
        "torch_dtype": "float32", "transformers_version": "4.36.0",
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"),
              metadata={"format": "pt"})
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert loaded.config.rope_parameters == {"rope_type": "default", "rope_theta": 10000}
    _assert_same_model(loaded, model)


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_moe_block_matches_reference(norm_topk_prob):
    block = _model(norm_topk_prob=norm_topk_prob).model.layers[1].mlp
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = block(x)
        h = x.reshape(-1, 64)
        weights, index = (h @ block.gate.weight.T).softmax(-1).topk(2, dim=-1)
        if norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        ref = torch.stack([
            sum(weights[t, j] * block.experts[int(index[t, j])](h[t]) for j in range(2)) + block.shared_experts(h[t])
            for t in range(h.shape[0])
        ])
    torch.testing.assert_close(out, ref.reshape(2, 5, 64), rtol=1e-5, atol=1e-5)


def test_norm_topk_prob_renormalizes_only_when_set():
    h = torch.randn(6, 64, generator=torch.Generator().manual_seed(3))
    for norm in (False, True):
        gate = _model(norm_topk_prob=norm).model.layers[1].mlp.gate
        with torch.no_grad():
            logits, weights, index = gate(h)
        assert logits.shape == (6, 8) and weights.shape == index.shape == (6, 2)
        probs = logits.softmax(-1).gather(-1, index)
        expected = probs / probs.sum(-1, keepdim=True) if norm else probs
        torch.testing.assert_close(weights, expected)
        assert torch.allclose(weights.sum(-1), torch.ones(6)) == norm


def test_router_logits_are_recorded_for_moe_layers_only():
    with torch.no_grad():
        out = _model()(_ids(), output_router_logits=True)
    assert len(out.router_logits) == 2 and out.router_logits[0].shape == (2 * 9, 8)


def test_generate_with_cache_matches_greedy_without_cache():
    model = _model()
    ids = _ids()
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 2, 0  # a left-padded row, as batched generation pads
    with torch.no_grad():
        cached = model.generate(ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False)
        uncached = model.generate(ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                                  use_cache=False)
    assert cached.shape == (2, 9 + 5)
    assert torch.equal(cached, uncached)


def test_unsupported_scoring_function():
    with pytest.raises(ValueError, match="scoring_func"):
        _model(scoring_func="sigmoid")
