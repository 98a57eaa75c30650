"""Adapters resolve every part; unfusing experts and routing all tokens leave outputs unchanged."""
import pytest
import torch

from models import ModelLoadError, get_spec, load_model, resolve
from models.experts import LinearExperts, fuse_experts, route_all_tokens, unfuse_experts
from models.spec import decoder_layers
from models.tiny import tiny_model

from .conftest import ALL_ARCHS, MOE_ARCHS

EXPECTED = {  # arch: (dense layer indices, experts, shared experts, shared-expert gate)
    "mixtral": ([], 4, 0, False),
    "olmoe": ([], 8, 0, False),
    "qwen2_moe": ([0], 4, 1, True),
    "qwen3_moe": ([], 4, 0, False),
    "deepseek": ([0], 4, 1, False),
    "llama": ([0, 1], 0, 0, False),
    "mistral": ([0, 1], 0, 0, False),
}


def _ids(tok, n=2):
    text = ["The old lighthouse keeper climbed the stairs as the storm rolled in from the sea."] * n
    return tok(text, return_tensors="pt").input_ids


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_resolve_every_part(arch):
    model, _ = tiny_model(arch)
    spec = get_spec(model)
    unfuse_experts(model, spec)
    dense, n_exp, n_shared, has_gate = EXPECTED[arch]
    for i, layer in enumerate(decoder_layers(model, spec)):
        view = resolve(spec, layer, model.config, i)
        assert len(view.attn_in) == 3 and view.attn_out is not None
        assert view.attn_norm is layer.input_layernorm and view.mlp_norm is layer.post_attention_layernorm
        if i in dense:
            assert not view.is_moe and view.dense is not None and view.router is None
            continue
        assert view.is_moe and view.router.weight.shape[0] == n_exp
        assert view.num_experts == n_exp and view.top_k == 2
        assert len(view.shared) == n_shared and (view.shared_gate is not None) == has_gate
        readers = view.moe_in_readers()
        assert len(readers) == 2 * (n_exp + n_shared) + 1 + int(has_gate)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_unfuse_route_all_and_fuse_are_exact(arch):
    model, tok = tiny_model(arch, dtype=torch.float64)
    spec = get_spec(model)
    ids = _ids(tok)
    keys = set(model.state_dict())
    with torch.no_grad():
        ref = model(ids).logits
        unfuse_experts(model, spec)
        unfused = model(ids).logits
        with route_all_tokens(model, spec, chunk=7):
            routed_all = model(ids).logits
        fuse_experts(model, spec)
        refused = model(ids).logits
    torch.testing.assert_close(unfused, ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(routed_all, ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(refused, ref, rtol=0, atol=1e-12)
    assert set(model.state_dict()) == keys


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_route_all_tokens_feeds_every_expert_every_token(arch):
    model, tok = tiny_model(arch)
    spec = get_spec(model)
    unfuse_experts(model, spec)
    ids = _ids(tok, n=1)
    layer_i = next(i for i in range(len(decoder_layers(model, spec))) if spec.is_moe_layer(model.config, i))
    experts = resolve(spec, decoder_layers(model, spec)[layer_i], model.config, layer_i).experts_module
    assert isinstance(experts, LinearExperts)
    seen = {}
    hooks = [e.gate_proj.register_forward_pre_hook(lambda m, a, e=e_i: seen.__setitem__(e, seen.get(e, 0) + a[0].shape[0]))
             for e_i, e in enumerate(experts)]
    with torch.no_grad():
        model(ids)
        routed = dict(seen)
        seen.clear()
        with route_all_tokens(model, spec, chunk=5):
            model(ids)
    for h in hooks:
        h.remove()
    n_tokens = ids.numel()
    assert sum(routed.values()) == 2 * n_tokens  # top-2
    assert all(seen[e] == n_tokens for e in range(len(experts)))


def test_unknown_model_and_path_errors():
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model("./definitely/not/a/model")
    with pytest.raises(ModelLoadError, match="demo-mixtral"):
        load_model("no-such-org/no-such-model")
    with pytest.raises(ModelLoadError, match="unknown tiny model tiny-gpt2; choose from tiny-mixtral"):
        load_model("tiny-gpt2")
