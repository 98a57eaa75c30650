"""The families added beyond the paper's four (docs/families.md): each loads, unfuses exactly, declares a
site for every linear, routes as its own MoE block does, stays exact through DuQuant at 16 bits, and
(for a few) runs W4A4 end to end. Not in conftest.ALL_ARCHS, which parametrizes the slower suites."""
import json
import math

import pytest
import torch
import torch.nn as nn

import main
from duquant.config import DuQuantConfig
from duquant.pipeline import quantize_model
from duquant.qlinear import QLinear
from duquant.recipes import RECIPES
from models import get_spec, resolve
from models.experts import route_all_tokens, unfuse_experts
from models.registry import MLA_KV
from models.routing import unwrapped
from models.sites import layer_sites
from models.spec import decoder_layers
from models.tiny import tiny_model, tiny_tokenizer

from .helpers import rel_err, tiny_data
from .test_fidelity import FAST, FP, official

MOE_FAMILIES = ["deepseek_v3", "deepseek_v32", "deepseek_v2", "glm4_moe", "dots1", "gpt_oss", "ernie4_5_moe", "granitemoe",
                "granitemoeshared", "dbrx", "phimoe", "minimax_m2", "hunyuan_v1_moe", "qwen3_next", "qwen3_5_moe_text", "llama4_text"]
FAMILIES = MOE_FAMILIES + ["qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"]
# EAQuant end to end once per kind of routing function (models/routing.py), to keep the suite short:
# the families left out share their routing with one of these and run W4A4 end to end.
EAQUANT_FAMILIES = ["deepseek_v3", "gpt_oss", "ernie4_5_moe", "dbrx", "phimoe", "minimax_m2", "hunyuan_v1_moe",
                    "qwen3_next", "llama4_text"]
# Routers that compute their logits in float32 whatever the model's dtype (DeepSeek-V3's, ERNIE's,
# HunYuan's), so a float64 model is exact only to float32 rounding of the logits.
FP64_TOL = 1e-6
# x_hat (1 + w) norms (Gemma, Qwen3-Next, Qwen3.5) compute in float32 whatever the model's dtype, and so
# does the Qwen linear-attention recurrence, which amplifies float32 rounding of the smoothed norms; a
# wrong fold would be off by order one.
FP32_MATH_TOL = {"qwen3_next": 5e-4, "qwen3_5_moe_text": 5e-4, "gemma": 1e-4, "gemma2": 1e-4, "gemma3_text": 1e-4}


def _biased(model: nn.Module) -> nn.Module:
    """Random correction biases: they are zeros at init, which would hide a routing that ignores them."""
    with torch.no_grad():
        for name, t in list(model.named_buffers()) + list(model.named_parameters()):
            if name.endswith("e_score_correction_bias"):
                t.copy_(torch.randn(t.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    return model


def _views(model: nn.Module):
    spec = get_spec(model)
    unfuse_experts(model, spec)
    return [resolve(spec, layer, model.config, i) for i, layer in enumerate(decoder_layers(model, spec))]


@pytest.mark.parametrize("arch", FAMILIES)
def test_unfusing_is_exact_and_every_linear_is_a_site_reader(arch):
    model, _ = tiny_model(arch, dtype=torch.float64)
    _biased(model)
    ids = torch.randint(0, 8192, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        views = _views(model)
        out = model(ids).logits
    assert (out - ref).abs().max().item() < 1e-12
    assert any(v.is_moe for v in views) == (arch in MOE_FAMILIES)
    for view in views:
        covered = {r for site in layer_sites(view) for r in site.smoothing_readers}
        linears = {n for n, m in view.layer.named_modules() if isinstance(m, nn.Linear) and m not in covered}
        assert not linears, f"layer {view.index}: {sorted(linears)} belong to no site"


@pytest.mark.parametrize("arch", [a for a in MOE_FAMILIES if a != "llama4_text"])  # Llama 4 refuses route-all
def test_routing_every_token_to_every_expert_leaves_logits_unchanged(arch):
    """Calibration's route-all mode runs every expert on every token but sums only the routed outputs."""
    model, _ = tiny_model(arch, dtype=torch.float64)
    _biased(model)
    ids = torch.randint(0, 8192, (2, 16), generator=torch.Generator().manual_seed(1))
    _views(model)
    with torch.no_grad():
        ref = model(ids).logits
        with route_all_tokens(model, get_spec(model)):
            out = model(ids).logits
    assert (out - ref).abs().max().item() < 1e-10


@pytest.mark.parametrize("arch", FAMILIES)
def test_fusing_back_restores_the_original_tensors(arch):
    """fuse_experts (for a plain HF checkpoint) undoes unfusing: biases, interleaving, offset norms."""
    from models.experts import fuse_experts

    model, _ = tiny_model(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _views(model)
    fuse_experts(model, get_spec(model))
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def _sorted(index: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    order = index.argsort(-1)
    return index.gather(-1, order), weights.gather(-1, order)


def _block_routing(view, x: torch.Tensor) -> dict:
    """Run the MoE block on x; what its router returned and what it passed to its experts."""
    seen: dict = {}

    def experts_call(module, args, kwargs):
        passed = (list(args) + list(kwargs.values()))[1:3]
        if passed:  # experts called with (hidden, index, weights); Llama 4's get routing-scaled rows only
            seen["index"], seen["weights"] = passed

    def router_call(module, args, out):
        seen["x"], seen["out"] = args[0], out

    hooks = [view.experts_module.register_forward_pre_hook(experts_call, with_kwargs=True),
             view.router.register_forward_hook(router_call)]
    with torch.no_grad():
        view.mlp(x)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("arch", MOE_FAMILIES + ["mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "deepseek"])
def test_routing_function_reproduces_the_blocks_own_choice(arch):
    model, _ = tiny_model(arch)
    _biased(model)
    for view in [v for v in _views(model) if v.is_moe]:
        x = torch.randn(1, 200, model.config.hidden_size, generator=torch.Generator().manual_seed(view.index))
        seen = _block_routing(view, x)
        routing = view.routing
        from_output = routing.from_output(seen["out"])
        block = _sorted(seen.get("index", from_output.index), seen.get("weights", from_output.weights))
        from_logits = routing.from_logits(from_output.logits)
        for r in (from_output, from_logits):
            mine = _sorted(r.index, r.weights)
            assert torch.equal(mine[0], block[0])
            torch.testing.assert_close(mine[1], block[1].to(mine[1].dtype), rtol=0, atol=1e-6)
        x_router = seen["x"].reshape(-1, seen["x"].shape[-1]).float()
        logits = routing.logits_of_weight(x_router, unwrapped(view.router).weight.float())
        torch.testing.assert_close(logits, from_output.logits.float(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(from_output.probs.sum(-1), torch.ones(200), rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["deepseek_v3", "deepseek_v2", "glm4_moe", "ernie4_5_moe", "minimax_m2"])
def test_grouped_or_biased_routing_differs_from_plain_softmax_top_k(arch):
    """The previous test can fail: for these families a softmax top-k of the logits picks other experts."""
    model, _ = tiny_model(arch)
    _biased(model)
    view = next(v for v in _views(model) if v.is_moe)
    seen = _block_routing(view, torch.randn(1, 200, model.config.hidden_size, generator=torch.Generator().manual_seed(0)))
    logits = view.routing.from_output(seen["out"]).logits
    naive = logits.float().softmax(-1).topk(view.top_k, -1).indices
    assert not view.routing.same_experts(naive, seen["index"]).all()


def test_llama4_weights_scale_the_experts_input():
    """Llama 4 multiplies each token by sigmoid(top logit) before its expert, so an expert sees its own
    tokens scaled and nothing else; AGQ (which weighs outputs) refuses it."""
    from duquant.config import ConfigError
    from eaquant_ext.moequant.agq import AffinityWeighting

    model, _ = tiny_model("llama4_text")
    view = next(v for v in _views(model) if v.is_moe)
    x = torch.randn(1, 50, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    rows: list = []
    hook = view.experts[0].gate_proj.register_forward_pre_hook(lambda m, a: rows.append(a[0]))
    seen = _block_routing(view, x)
    hook.remove()
    chosen = view.routing.from_output(seen["out"])
    mine = (chosen.index[:, 0] == 0).nonzero().squeeze(-1)
    torch.testing.assert_close(rows[0], x[0, mine] * chosen.weights[mine, :1])
    with pytest.raises(ConfigError, match="scales the experts' input"):
        AffinityWeighting(view)


def _outliers(model: nn.Module) -> nn.Module:
    """Outlier channels planted in every layer's two norms (as tests/helpers.py outlier_model does),
    through the adapter's paths and its norms' weight offset (gamma = offset + w)."""
    spec = get_spec(model)
    with torch.no_grad():
        for layer in decoder_layers(model, spec):
            for path, channels in ((spec.attn_norm, [3, 17, 40]), (spec.mlp_norm, [5, 33])):
                norm = layer.get_submodule(path)
                norm.weight[channels] = (norm.weight[channels] + spec.norm_weight_offset) * 25 - spec.norm_weight_offset
                if getattr(norm, "bias", None) is not None:  # LayerNorm biases start at zero, hiding an unscaled bias
                    norm.bias.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
    return model


@pytest.mark.parametrize("recipe", ["official", "fast"])
@pytest.mark.parametrize("arch", FAMILIES)
def test_duquant_at_16_bits_leaves_logits_unchanged(arch, recipe):
    model, tok = _outliers(_biased(tiny_model(arch, dtype=torch.float64)[0])), tiny_tokenizer()
    calib, x = tiny_data(tok)
    with torch.no_grad():
        ref = model(x).logits
    cfg = official() if recipe == "official" else DuQuantConfig(**FAST, **RECIPES["fast"][0])
    quantize_model(model, get_spec(model), calib, FP, cfg, seed=0)
    with torch.no_grad():
        out = model(x).logits
    assert sum(isinstance(m, QLinear) and m.transform is not None for m in model.modules()) > 10
    assert rel_err(out, ref) < FP32_MATH_TOL.get(arch, FP64_TOL)


W4A4 = ["--wbits", "4", "--abits", "4", "--nsamples", "2", "--seqlen", "32", "--rotation_tokens", "32",
        "--eval_ppl", "wikitext2", "--ppl_samples", "2", "--no-compare_fp"]


def test_mla_refuses_kv_quantization_with_its_reason(tmp_path, capsys):
    assert get_spec(tiny_model("deepseek_v2")[0]).attn_in == ("self_attn.q_proj", "self_attn.kv_a_proj_with_mqa")
    assert main.main(["--model", "tiny-deepseek_v3", *W4A4, "--kv_bits", "4", "--output_dir", str(tmp_path)]) == 2
    assert MLA_KV in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["glm4_moe", "gpt_oss"])
def test_router_alignment_optimises_the_familys_routing(arch):
    """Alignment on a sigmoid router with a correction bias (GLM-4.5) and a router with a logit bias
    (gpt-oss): the metrics are the family's, and alignment never loses on its objective."""
    from duquant.config import QuantConfig
    from eaquant_ext.router_align import align_router, routing_metrics

    model, _ = tiny_model(arch)
    _biased(model)
    view = next(v for v in _views(model) if v.is_moe)
    x = torch.randn(300, model.config.hidden_size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    w = unwrapped(view.router).weight.detach().double()
    quant = QuantConfig(4, 4, router_wbits=3, router_abits=8)
    _, _, info = align_router(w, x, quant, view.top_k, 50, grid=6, rounds=1, routing=view.routing)
    assert info["aligned"]["objective"] <= info["default"]["objective"]
    same = routing_metrics(view.routing.logits_of_weight(x, w), view.routing.logits_of_weight(x, w), view.top_k,
                           view.routing)
    assert same == {"topk_agreement": 1.0, "kl": 0.0}


@pytest.mark.parametrize("arch", FAMILIES)
def test_w4a4_end_to_end(arch, tmp_path):
    rc = main.main(["--model", f"tiny-{arch}", *W4A4, "--kv_bits", "16", "--output_dir", str(tmp_path)])
    assert rc == 0
    result = json.loads((tmp_path / "results.json").read_text())
    ppl = result["ppl"]["wikitext2"]
    assert math.isfinite(ppl) and ppl > 1


# Families whose hub checkpoints store one tensor per expert (save_pretrained writes them that way
# through transformers' conversion mapping); gpt-oss and Granite store them fused.
PER_EXPERT_HUB = {"deepseek_v3", "deepseek_v32", "deepseek_v2", "glm4_moe", "dots1", "ernie4_5_moe", "minimax_m2",
                  "hunyuan_v1_moe", "qwen3_next", "qwen3_5_moe_text", "phimoe"}


@pytest.mark.parametrize("arch", FAMILIES)
def test_saved_checkpoint_loads_whole_and_streamed(arch, tmp_path):
    from safetensors import safe_open

    from models import load_model

    ref, tok = tiny_model(arch)
    ref.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        per_expert = any(".experts.0." in k for k in f.keys())
    assert per_expert == (arch in PER_EXPERT_HUB)
    ids = torch.randint(0, 8192, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref(ids).logits
        for stream in (False, True):
            model, _ = load_model(str(tmp_path), stream=stream)
            assert torch.equal(model(ids).logits, expected)


FP4_MAGNITUDES = {0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0}  # e2m1, at block scale 2^0


def _mxfp4_checkpoint(path):
    """A tiny gpt-oss saved as the hub ships it: experts as MXFP4 `*_blocks` (two FP4 codes a byte, 32
    values per block along the input) and `*_scales` (E8M0 exponents), plus its quantization_config."""
    from safetensors.torch import load_file, save_file

    model, tok = tiny_model("gpt_oss", intermediate_size=32)  # MXFP4 blocks need widths divisible by 32
    model.save_pretrained(path)
    tok.save_pretrained(path)
    tensors = load_file(path / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        e, d_in, d_out = tensors.pop(name).shape
        tensors[name + "_blocks"] = torch.randint(0, 256, (e, d_out, d_in // 32, 16), dtype=torch.uint8, generator=g)
        tensors[name + "_scales"] = torch.full((e, d_out, d_in // 32), 127, dtype=torch.uint8)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (path / "config.json").write_text(json.dumps(config))


def test_mxfp4_gpt_oss_is_dequantized_on_load_and_refused_with_stream(tmp_path):
    from models import ModelLoadError, load_model

    _mxfp4_checkpoint(tmp_path)
    model, _ = load_model(str(tmp_path))
    values = model.model.layers[0].mlp.experts.gate_up_proj.abs().unique().tolist()
    assert set(values) <= FP4_MAGNITUDES and len(values) == len(FP4_MAGNITUDES)
    views = _views(model)
    assert all(len(v.experts) == 4 for v in views)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 8192, (1, 8))).logits).all()
    with pytest.raises(ModelLoadError, match="MXFP4"):
        load_model(str(tmp_path), stream=True)


@pytest.mark.parametrize("arch", EAQUANT_FAMILIES)
def test_eaquant_w3a4_end_to_end(arch, tmp_path):
    # C4's extra sequences: drawing from Gutenberg tokenizes whole books (seconds a test); the bundled
    # default source runs end to end in tests/test_export_transforms.py.
    rc = main.main(["--model", f"tiny-{arch}", "--recipe", "eaquant", *W4A4, "--wbits", "3", "--kv_bits", "16",
                    "--balance_dataset", "c4", "--output_dir", str(tmp_path)])
    assert rc == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert math.isfinite(result["ppl"]["wikitext2"])
    assert 0 <= result["router"]["mean_topk_agreement"] <= 1
