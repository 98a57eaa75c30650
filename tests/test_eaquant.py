"""EAQuant's three components: exact in FP, never worse than the default on their own objectives."""
import pytest
import torch

from duquant.config import DuQuantConfig, QuantConfig
from duquant.pipeline import Extensions, quantize_model
from duquant.stats import collect
from eaquant_ext.balance import balance_calibration, routing_counts, select_extra, threshold
from eaquant_ext.router_align import align_router, experts_in_kl, objective
from eaquant_ext.smoothing import aggregate, expert_requirements, moe_smoothing, requirement
from models import get_spec, resolve
from models.experts import unfuse_experts
from models.spec import decoder_layers

from .helpers import outlier_model, rel_err, tiny_data

FP = QuantConfig(16, 16, 16, 16, 16)
FAST = dict(block_size=32, max_rotation_step=16)


def _routing(model, x):
    picks = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, a, out: picks.append(out[2].sort(-1).values))
             for layer in model.model.layers if hasattr(layer.mlp, "gate")]
    with torch.no_grad():
        logits = model(x).logits
    for h in hooks:
        h.remove()
    return logits, picks


@pytest.mark.parametrize("rule", ["maximum", "expert_frequency", "router_logits"])
@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "deepseek"])
def test_aggregated_smoothing_keeps_logits_and_routing(arch, rule):
    model, tok = outlier_model(arch)
    calib, x = tiny_data(tok)
    ref, ref_routes = _routing(model, x)
    ext = Extensions(moe_smoothing=moe_smoothing(rule, include_router=True))
    quantize_model(model, get_spec(model), calib, FP, DuQuantConfig(rotate=False, permute=False, fit_at_16_bits=True), ext, seed=0)
    out, routes = _routing(model, x)
    assert rel_err(out, ref) < 1e-4
    assert all(torch.equal(a, b) for a, b in zip(routes, ref_routes))


def _first_moe_stats(arch):
    model, tok = outlier_model(arch)
    spec = get_spec(model)
    unfuse_experts(model, spec)
    calib, _ = tiny_data(tok)
    i = next(i for i in range(len(decoder_layers(model, spec))) if spec.is_moe_layer(model.config, i))
    view = resolve(spec, decoder_layers(model, spec)[i], model.config, i)
    hooked = [view.router] + [e.gate_proj for e in view.experts]
    with collect(hooked, view.router, view.num_experts, 256, 0) as stats, torch.no_grad():
        model(calib)
    return view, stats


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_maximum_rule_covers_every_expert_and_the_router(arch):
    view, stats = _first_moe_stats(arch)
    x = stats[view.router].absmax
    cfg = DuQuantConfig(alpha=0.6)
    s = aggregate(view, stats, cfg, "maximum", include_router=True).double()
    assert torch.all(s[None] >= expert_requirements(view, [x] * view.num_experts, cfg) - 1e-6)
    assert torch.all(s >= requirement(x, [view.router], cfg) - 1e-6)
    for sh in view.shared:
        assert torch.all(s >= requirement(x, sh.in_projs, cfg) - 1e-6)


def test_weighted_rules_use_routing_statistics():
    view, stats = _first_moe_stats("olmoe")
    freq = aggregate(view, stats, DuQuantConfig(), "expert_frequency", include_router=False)
    probs = aggregate(view, stats, DuQuantConfig(), "router_logits", include_router=False)
    assert torch.isfinite(freq).all() and torch.isfinite(probs).all() and not torch.equal(freq, probs)


def test_kl_span():
    assert experts_in_kl(2, 8, 0) == 2 and experts_in_kl(2, 8, 100) == 8 and experts_in_kl(4, 32, 25) == 11
    fp, q = torch.randn(64, 8, dtype=torch.float64), torch.randn(64, 8, dtype=torch.float64)
    full = (fp.softmax(-1) * (fp.log_softmax(-1) - q.log_softmax(-1))).sum(-1).mean()
    assert objective(fp, q, 8) == pytest.approx(((fp - q) ** 2).sum(-1).mean().item() + full.item())


@pytest.mark.parametrize("bits", [(3, 4), (4, 4), (8, 8)])
def test_router_alignment_never_worse_than_min_max(bits):
    torch.manual_seed(0)
    w = torch.randn(8, 64, dtype=torch.float64)
    x = torch.randn(512, 64, dtype=torch.float64)
    x[:, [3, 9]] *= 20
    quant = QuantConfig(4, 4, router_wbits=bits[0], router_abits=bits[1])
    for kl_top in (0, 100):
        _, ratios, info = align_router(w, x, quant, top_k=2, kl_top=kl_top, grid=10, rounds=1)
        for start in (1.0, quant.swc):  # plain min/max, and the default clip ratio
            quant_start = QuantConfig(4, 4, router_wbits=bits[0], router_abits=bits[1], swc=start)
            _, _, base = align_router(w, x, quant_start, top_k=2, kl_top=kl_top, grid=1, rounds=0)
            assert info["aligned"]["objective"] <= base["default"]["objective"] + 1e-12
        assert ratios.shape == (8,)


def test_select_extra_fills_a_starved_expert_and_respects_the_cap():
    base = torch.tensor([[[40, 40, 40, 0]], [[40, 40, 40, 0]]])  # 2 sequences, 1 layer, expert 3 starved
    pool = torch.zeros(6, 1, 4, dtype=torch.long)
    pool[:, 0, :3] = 20
    pool[4, 0, 3] = 50
    pool[1, 0, 3] = 30
    chosen, passed = select_extra(base, pool, thresh=60, cap=4)
    assert passed and chosen[:2] == [4, 1]
    chosen, passed = select_extra(base, pool, thresh=1000, cap=3)
    assert not passed and len(chosen) == 3


def test_select_extra_leaves_a_balanced_set_unchanged():
    base = torch.full((4, 2, 8), 16)
    pool = torch.randint(0, 30, (8, 2, 8))
    assert threshold(2, 4 * 64, 8, 1.0) == 64
    chosen, passed = select_extra(base, pool, thresh=threshold(2, 4 * 64, 8, 1.0), cap=8)
    assert chosen == [] and passed


def test_balance_calibration_on_a_model_raises_the_minimum():
    model, tok = outlier_model("olmoe")
    spec = get_spec(model)
    base, _ = tiny_data(tok, nsamples=4)
    pool, _ = tiny_data(tok, nsamples=12)
    counts = routing_counts(model, spec, base)
    assert counts.shape == (4, 2, 8) and torch.all(counts.sum(-1) == 64 * 2)
    extra, rep = balance_calibration(model, spec, base, pool, top_k=2, ratio=1.0, cap=12)
    before, after = torch.tensor(rep["counts_before"]), torch.tensor(rep["counts_after"])
    assert rep["starved_before"] > 0 and after.min() > before.min()
    assert rep["starved_after"] < rep["starved_before"]
    assert (rep["starved_after"] == 0) == (rep["stop"] == "passed")
    assert extra.shape[0] == rep["added_sequences"]
    none, rep0 = balance_calibration(model, spec, base, pool, top_k=2, ratio=0.0, cap=12)
    assert none is None and rep0["added_sequences"] == 0


def test_extra_sequences_calibrate_experts_only():
    model, tok = outlier_model("mixtral")
    calib, _ = tiny_data(tok)
    extra, _ = tiny_data(tok, nsamples=3)
    rep = quantize_model(model, get_spec(model), calib, QuantConfig(4, 4), DuQuantConfig(**FAST),
                         seed=0, expert_extra_ids=extra)
    for layer in rep.layers:
        assert sum(layer["expert_tokens"]) == calib.numel() * 2
        assert sum(layer["expert_tokens_balanced"]) == (calib.numel() + extra.numel()) * 2
