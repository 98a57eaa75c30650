"""Our DeepSeek-MoE v1 port: original parameter names, Auto-class loading, exact MoE semantics."""
import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from models.deepseek_moe import DeepseekMoeConfig, DeepseekMoeForCausalLM
from models.tiny import tiny_config, tiny_tokenizer


def _model(**overrides):
    torch.manual_seed(0)
    return DeepseekMoeForCausalLM(tiny_config("deepseek", initializer_range=0.1, **overrides)).eval()


def _ids():
    return tiny_tokenizer()(["A dense first layer, then fine-grained experts."], return_tensors="pt").input_ids


def test_save_load_round_trip_with_original_names(tmp_path):
    model = _model()
    keys = set(model.state_dict())
    for k in ("model.layers.0.mlp.gate_proj.weight", "model.layers.1.mlp.gate.weight",
              "model.layers.1.mlp.experts.3.down_proj.weight", "model.layers.2.mlp.shared_experts.up_proj.weight"):
        assert k in keys
    assert not any("gate_up_proj" in k for k in keys)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is DeepseekMoeForCausalLM
    with torch.no_grad():
        torch.testing.assert_close(loaded(_ids()).logits, model(_ids()).logits, rtol=0, atol=0)


def test_loads_an_original_style_checkpoint_without_remote_code(tmp_path):
    model = _model()
    config = model.config.to_dict()
    config.update(architectures=["DeepseekForCausalLM"], model_type="deepseek",
                  auto_map={"AutoConfig": "configuration_deepseek.DeepseekConfig",
                            "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM"})
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"),
              metadata={"format": "pt"})
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(_ids()).logits, model(_ids()).logits, rtol=0, atol=0)


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_moe_block_matches_reference(norm_topk_prob):
    model = _model(norm_topk_prob=norm_topk_prob)
    block = model.model.layers[1].mlp
    x = torch.randn(1, 7, 64)
    with torch.no_grad():
        out = block(x)
        h = x.reshape(-1, 64)
        probs = (h @ block.gate.weight.T).softmax(-1)
        w, idx = probs.topk(2, dim=-1)
        if norm_topk_prob:
            w = w / w.sum(-1, keepdim=True)
        ref = block.shared_experts(h).clone()
        for t in range(h.shape[0]):
            for j in range(2):
                ref[t] += w[t, j] * block.experts[int(idx[t, j])](h[t])
    torch.testing.assert_close(out.reshape(-1, 64), ref, rtol=1e-5, atol=1e-5)
    weights = block.gate(h)[1]
    assert torch.allclose(weights.sum(-1), torch.ones(7)) == norm_topk_prob


def test_generate_with_cache_matches_without():
    model = _model()
    with torch.no_grad():
        a = model.generate(_ids(), max_new_tokens=5, do_sample=False)
        b = model.generate(_ids(), max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(a, b) and a.shape[1] == _ids().shape[1] + 5


def test_unsupported_scoring_function():
    with pytest.raises(ValueError, match="scoring_func"):
        DeepseekMoeForCausalLM(DeepseekMoeConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
                                                 vocab_size=256, n_routed_experts=4, scoring_func="sigmoid"))
