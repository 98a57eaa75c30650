"""The DuQuant pipeline: exact at 16 bits on every architecture, better than RTN at 4 bits, robust
to starved experts."""
import copy

import pytest
import torch
import torch.nn.functional as F

from duquant.config import DuQuantConfig, QuantConfig
from duquant import fitting
from duquant.pipeline import quantize_model
from duquant.transforms import BlockRotation
from models import get_spec
from models.experts import unfuse_experts
from models.spec import decoder_layers, moe_routers

from .conftest import ALL_ARCHS
from .helpers import outlier_model, rel_err, tiny_data

FP = QuantConfig(16, 16, 16, 16, 16)
FAST = dict(block_size=32, max_rotation_step=16, fit_at_16_bits=True)  # fit_at_16_bits: the FP checks fit transforms too


def _quantize(arch, quant, cfg, dtype=torch.float32):
    model, tok = outlier_model(arch, dtype)
    calib, x = tiny_data(tok)
    with torch.no_grad():
        ref = model(x).logits
    report = quantize_model(model, get_spec(model), calib, quant, cfg, seed=0)
    with torch.no_grad():
        out = model(x).logits
    return model, ref, out, report


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.float64, 1e-8)])
@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_all_transforms_at_16_bits_leave_logits_unchanged(arch, dtype, tol):
    model, ref, out, _ = _quantize(arch, FP, DuQuantConfig(**FAST), dtype)
    rotations = [m for m in model.modules() if isinstance(m, BlockRotation)]
    eye = [torch.allclose(r.blocks, torch.eye(r.blocks.shape[-1], dtype=r.blocks.dtype).expand_as(r.blocks)) for r in rotations]
    assert rotations and not all(eye), "the planted outliers should make some rotations non-trivial"
    assert rel_err(out, ref) < tol


@pytest.mark.parametrize("step", ["smooth", "rotate", "permute"])
@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "deepseek"])
def test_each_transform_alone_is_exact(arch, step):
    cfg = DuQuantConfig(smooth=step == "smooth", rotate=step == "rotate", permute=step == "permute", **FAST)
    _, ref, out, _ = _quantize(arch, FP, cfg)
    assert rel_err(out, ref) < 1e-4


def _first_layer_error(arch, quant, cfg) -> float:
    """Error of the first decoder layer's output, whose input (the embeddings) is exact: a random
    model's logits are too chaotic to rank quantizers, one layer's output is not."""
    model, tok = outlier_model(arch)
    calib, x = tiny_data(tok, nsamples=4)
    with torch.no_grad():
        ref = model(x, output_hidden_states=True).hidden_states[1]
    quantize_model(model, get_spec(model), calib, quant, cfg, seed=0)
    with torch.no_grad():
        out = model(x, output_hidden_states=True).hidden_states[1]
    return ((out - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
@pytest.mark.parametrize("wbits", [4, 3])
def test_duquant_beats_rtn(arch, wbits):
    quant = QuantConfig(wbits, 4, 16, 8, 8)
    rtn = _first_layer_error(arch, quant, DuQuantConfig.rtn())
    duq = _first_layer_error(arch, quant, DuQuantConfig(**FAST))
    assert duq < 0.9 * rtn


def _starve_expert(router: torch.nn.Module, expert: int) -> None:
    """Re-route so that `expert` never receives a token (as a dead expert in a real model would)."""
    def hook(module, args, out):
        logits = out[0].clone()
        logits[:, expert] = float("-inf")
        top = F.softmax(logits.float(), -1).topk(module.top_k, dim=-1)
        return out[0], top.values / top.values.sum(-1, keepdim=True), top.indices
    router.register_forward_hook(hook)


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])  # down-in folded into up's rows / applied online
def test_expert_with_zero_tokens_falls_back_without_nan(arch, caplog):
    model, tok = outlier_model(arch)
    for router in moe_routers(model, get_spec(model)):
        _starve_expert(router, expert=1)
    calib, x = tiny_data(tok)
    kv_bits = 16 if get_spec(model).kv_quant_unsupported else 4
    report = quantize_model(model, get_spec(model), calib, QuantConfig(4, 4, kv_bits), DuQuantConfig(**FAST), seed=0)
    for layer in report.layers:
        assert layer["expert_tokens"][1] == 0 and layer["fallback_experts"] == [1]
        assert 0.0 <= layer["topk_agreement"] <= 1.0
    assert "fewer than" in caplog.text
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(b).all() for b in model.buffers())
    with torch.no_grad():
        assert torch.isfinite(model(x).logits).all()


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_routing_agreement_is_perfect_at_16_bits(arch):
    _, _, _, report = _quantize(arch, FP, DuQuantConfig(**FAST))
    for layer in report.layers:
        if layer["moe"]:
            assert layer["topk_agreement"] == 1.0 and abs(layer["router_kl"]) < 1e-6


def test_report_counts_every_routed_token():
    model, tok = outlier_model("olmoe")
    calib, _ = tiny_data(tok)
    report = quantize_model(model, get_spec(model), calib, QuantConfig(4, 4), DuQuantConfig(**FAST), seed=0)
    for layer in report.layers:
        assert sum(layer["expert_tokens"]) == calib.numel() * model.config.num_experts_per_tok


def test_quantization_is_deterministic_given_seed():
    outs = [_quantize("mixtral", QuantConfig(4, 4), DuQuantConfig(**FAST))[2] for _ in range(2)]
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_same_input_readers_share_one_transform():
    model, _, _, _ = _quantize("mixtral", FP, DuQuantConfig(**FAST))
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.transform is attn.k_proj.transform is attn.v_proj.transform
    assert copy.deepcopy(attn.q_proj).transform is not None


def test_expert_rotations_fitted_in_several_searches_match_one(monkeypatch):
    """FIT_BATCH_ENTRIES splits the experts' joint rotation search (host memory at scale); each
    expert's transform must not depend on which experts shared its search."""
    whole = _quantize("mixtral", QuantConfig(4, 4), DuQuantConfig(**FAST))[2]
    monkeypatch.setattr(fitting, "FIT_BATCH_ENTRIES", 1)  # one site per search
    split = _quantize("mixtral", QuantConfig(4, 4), DuQuantConfig(**FAST))[2]
    torch.testing.assert_close(split, whole, rtol=0, atol=1e-6)  # bit-identical here


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_statistics_sample_is_the_rows_with_the_smallest_keys(dtype):
    """Priority sampling: whatever the batches, the sample is the `cap` rows of all batches whose
    random keys are smallest, in key order and at least float32; max |x| and the count see all rows."""
    from duquant.stats import InputStats

    batches = [torch.randn(n, 6, generator=torch.Generator().manual_seed(n)).to(dtype) for n in (7, 30, 0, 40, 100, 3)]
    stats = InputStats(cap=50, generator=torch.Generator().manual_seed(1))
    for x in batches:
        stats.update(x)
    gen = torch.Generator().manual_seed(1)
    keys = torch.cat([torch.rand(x.shape[0], generator=gen) for x in batches])
    rows = torch.cat(batches).float()
    order = keys.argsort()[:50]
    assert stats.sample.dtype == torch.float32
    assert torch.equal(stats.sample, rows[order]) and torch.equal(stats._keys, keys[order])
    assert stats.count == rows.shape[0] and torch.equal(stats.absmax, rows.abs().amax(0))


@pytest.mark.parametrize("arch, propagation", [("mixtral", "quantized"), ("qwen2_moe", "quantized"), ("olmoe", "fp")])
def test_agreement_only_passes_compute_no_expert_and_change_nothing(arch, propagation, monkeypatch):
    """The last layer's outputs feed no layer and an FP-propagated run's agreement pass only needs
    the router: those passes skip the experts, with the same report and model as full passes."""
    from duquant import pipeline

    def run(skip: bool):
        model, tok = outlier_model(arch)
        calib, x = tiny_data(tok)
        if not skip:
            monkeypatch.setattr(pipeline, "unneeded_readers", lambda view, hooks: [])
            monkeypatch.setattr(pipeline, "propagate", lambda *a: original(*a[:-1], None))
        spec = get_spec(model)
        expert_calls = []
        last = decoder_layers(model, spec)[-1]
        unfuse_experts(model, spec, len(decoder_layers(model, spec)) - 1)
        downs = [m for n, m in last.named_modules() if n.endswith("down_proj") and isinstance(m, torch.nn.Linear)]
        for m in downs:
            m.register_forward_hook(lambda mod, i, out: expert_calls.append(bool(out.any())))
        report = quantize_model(model, spec, calib, QuantConfig(4, 4), DuQuantConfig(**FAST, propagation=propagation), seed=0)
        monkeypatch.undo()
        with torch.no_grad():
            return report, model(x).logits, expert_calls

    original = pipeline.propagate
    (rep_skip, out_skip, calls_skip), (rep_full, out_full, calls_full) = run(True), run(False)
    assert rep_skip.layers == rep_full.layers and torch.equal(out_skip, out_full)
    assert sum(calls_full) > sum(calls_skip)  # the skipped run computed fewer expert outputs


def test_no_site_input_holds_a_batch_after_quantization():
    from duquant.qlinear import SiteInput
    model, tok = outlier_model("qwen2_moe")  # shared experts read the router's site
    calib, _ = tiny_data(tok)
    quantize_model(model, get_spec(model), calib, QuantConfig(4, 4), DuQuantConfig(**FAST), seed=0)
    assert all(m._round.x is None for m in model.modules() if isinstance(m, SiteInput))
