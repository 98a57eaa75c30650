"""The fidelity options (duquant.config.CHOICES, `--recipe`): each is exact in full precision on every
architecture, does what its name says, and the recipes resolve with explicit options winning."""
import dataclasses

import pytest
import torch

import main
from eaquant_ext.cli import parse_args
from duquant import packed
from duquant.config import CHOICES, QUANT_CHOICES, DuQuantConfig, QuantConfig
from duquant.kvquant import KVQuant
from duquant.fp_stats import fp_site_statistics
from duquant.calibration import mean_sequence
from duquant.pipeline import quantize_model
from duquant.quantizer import WeightQuantizer, fake_quant, quant_params
from duquant.outlier_mask import outlier_mask as fitting_mask
from duquant.recipes import RECIPES
from duquant.stats import collect, hooked_sites
from duquant.transforms import Smooth, _givens_chain, _greedy_rotation, _spreading_matrix, fit_rotations
from models import get_spec, resolve
from models.experts import unfuse_experts
from models.spec import decoder_layers
from models.tiny import tiny_model

from .conftest import ALL_ARCHS
from .helpers import gen, outlier_model, rel_err, tiny_data

FP = QuantConfig(16, 16, 16, 16, 16)
FAST = dict(block_size=32, max_rotation_step=16, fit_at_16_bits=True)  # fit_at_16_bits: the FP checks fit transforms too


def official(**overrides) -> DuQuantConfig:
    values = {k: v for k, v in RECIPES["official"][0].items() if k in {f.name for f in dataclasses.fields(DuQuantConfig)}}
    return DuQuantConfig(**{**values, **FAST, **overrides})


def _logits_before_after(model, tok, cfg, quant=FP):
    calib, x = tiny_data(tok)
    with torch.no_grad():
        ref = model(x).logits
    quantize_model(model, get_spec(model), calib, quant, cfg, seed=0)
    with torch.no_grad():
        out = model(x).logits
    return ref, out


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.float64, 1e-8)])
@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_official_recipe_at_16_bits_leaves_logits_unchanged(arch, dtype, tol):
    model, tok = outlier_model(arch, dtype)
    ref, out = _logits_before_after(model, tok, official())
    assert rel_err(out, ref) < tol


@pytest.mark.parametrize("option, value", [(k, v) for k, vs in CHOICES.items() if k not in QUANT_CHOICES for v in vs[1:]])
def test_each_fidelity_choice_alone_is_exact(option, value):
    model, tok = outlier_model("mixtral")
    ref, out = _logits_before_after(model, tok, DuQuantConfig(**FAST, **{option: value}))
    assert rel_err(out, ref) < 1e-4


def _mha_llama():
    """A tiny Llama with as many value heads as query heads, where o-in smoothing can fold into v_proj."""
    model, tok = tiny_model("llama", num_key_value_heads=4)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[[3, 17]] *= 25
    return model, tok


def test_o_smoothing_folds_into_v_proj_exactly_and_only_with_multi_head_attention():
    model, tok = _mha_llama()
    ref, out = _logits_before_after(model, tok, DuQuantConfig(**FAST, o_smooth="fold_v"))
    assert rel_err(out, ref) < 1e-4
    o_transforms = [layer.self_attn.o_proj.transform for layer in model.model.layers]
    assert all(not any(isinstance(t, Smooth) for t in o.modules()) for o in o_transforms)
    gqa, tok = outlier_model("llama")  # 2 value heads for 4 query heads: stays online
    _logits_before_after(gqa, tok, DuQuantConfig(**FAST, o_smooth="fold_v"))
    assert all(any(isinstance(t, Smooth) for t in layer.self_attn.o_proj.transform.modules()) for layer in gqa.model.layers)


def test_fp_statistics_are_the_unquantized_models_input_maxima():
    model, tok = outlier_model("qwen2_moe")
    spec = get_spec(model)
    calib, _ = tiny_data(tok)
    maxima = [layer.absmax for layer in fp_site_statistics(model, spec, calib, None, "cpu")]
    unfuse_experts(model, spec)
    layers = decoder_layers(model, spec)
    views = [resolve(spec, layer, model.config, i) for i, layer in enumerate(layers)]
    sites = [m for v in views for m in hooked_sites(v)]
    with collect(sites, None, 0, 0, 0) as stats, torch.no_grad():
        model(calib)
    for layer, view, got in zip(layers, views, maxima):
        names = {m: n for n, m in layer.named_modules()}
        for m in hooked_sites(view):
            if stats[m].absmax is None:
                assert got[names[m]] is None
            else:
                torch.testing.assert_close(got[names[m]], stats[m].absmax, rtol=1e-5, atol=1e-6)


def test_fp_statistics_change_smoothing_only_after_the_first_layer():
    """Layer 0's inputs are the same for the FP and the quantized model, later layers' are not."""
    norms = {}
    for stats_rule in ("quantized", "fp"):
        model, tok = outlier_model("llama")
        calib, _ = tiny_data(tok)
        quantize_model(model, get_spec(model), calib, QuantConfig(4, 4), DuQuantConfig(**FAST, smooth_stats=stats_rule))
        norms[stats_rule] = [layer.input_layernorm.weight.clone() for layer in model.model.layers]
    assert torch.equal(norms["fp"][0], norms["quantized"][0])
    assert not torch.equal(norms["fp"][1], norms["quantized"][1])


def test_fp_propagation_calibrates_every_layer_on_fp_inputs():
    """With FP propagation, the statistics each layer sees are the FP model's: the same smoothing as
    reading FP statistics on quantized-propagated inputs."""
    norms = []
    for cfg in (dict(propagation="fp"), dict(smooth_stats="fp")):
        model, tok = outlier_model("llama")
        calib, _ = tiny_data(tok)
        quantize_model(model, get_spec(model), calib, QuantConfig(4, 4), DuQuantConfig(**FAST, **cfg))
        norms.append([layer.post_attention_layernorm.weight.clone() for layer in model.model.layers])
    for a, b in zip(*norms):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=0)


def test_official_eaquant_recipe_at_16_bits_leaves_logits_unchanged():
    model, tok = outlier_model("qwen2_moe")
    run = main.build_config(["--recipe", "eaquant,official", "--max_rotation_step", "16", "--block_size", "32"])
    cfg = official(**{k: getattr(run.duquant, k) for k in ("smooth_weight", "smooth_scale_floor", "o_smooth",
                                                            "rotation_data", "propagation", "expert_down_smooth")})
    assert cfg.expert_down_smooth == "outlier_mask"
    calib, x = tiny_data(tok)
    with torch.no_grad():
        ref = model(x).logits
    quantize_model(model, get_spec(model), calib, FP, cfg, main.extensions(run), seed=0)
    with torch.no_grad():
        assert rel_err(model(x).logits, ref) < 1e-4


def test_official_router_alignment_uses_one_ratio_for_all_rows():
    from eaquant_ext.router_align import align_router_official
    w = torch.randn(8, 64, generator=gen(1), dtype=torch.float64)
    x = torch.randn(256, 64, generator=gen(2), dtype=torch.float64)
    x[:, 5] *= 20
    _, ratios, info = align_router_official(w, x, QuantConfig(4, 4, router_wbits=4, router_abits=8), 2, 0)
    assert ratios.unique().numel() == 1 and 0.35 <= ratios[0].item() <= 1.0
    assert info["kl_experts"] == 2


def test_routed_expert_act_uses_each_experts_own_tokens():
    from eaquant_ext.smoothing import expert_act_absmax
    model, tok = outlier_model("mixtral")
    spec = get_spec(model)
    unfuse_experts(model, spec)
    view = resolve(spec, decoder_layers(model, spec)[0], model.config, 0)
    calib, _ = tiny_data(tok)
    with collect([view.router] + [e.gate_proj for e in view.experts], view.router, view.num_experts, 16, 0) as stats, \
            torch.no_grad():
        model(calib)
    routed = expert_act_absmax(view, stats, "routed")
    assert all(torch.all(r <= stats[view.router].absmax + 1e-6) for r in routed)
    assert any(not torch.equal(r, stats[view.router].absmax) for r in routed)
    assert all(torch.equal(r, stats[view.router].absmax) for r in expert_act_absmax(view, stats, "moe_in"))


def test_mean_sequence_is_the_elementwise_mean():
    xs = [torch.randn(1, 5, 3, generator=gen(i)) for i in range(4)]
    torch.testing.assert_close(mean_sequence(xs), torch.stack(xs).mean(0))


def test_redrawn_spreading_matrices_differ_per_site_and_joint_fits_stay_exact():
    g = gen(3)
    xs = [torch.randn(50, 64, generator=g, dtype=torch.float64) * torch.linspace(1, 20, 64) for _ in range(3)]
    joint = fit_rotations(xs, block_size=32, max_steps=12, seed=[1, 2, 3], seed2=[4, 5, 6])
    for x, t, s1, s2 in zip(xs, joint, (1, 2, 3), (4, 5, 6)):
        alone = fit_rotations([x], block_size=32, max_steps=12, seed=s1, seed2=s2)[0]
        torch.testing.assert_close(t.act(x), alone.act(x), rtol=0, atol=1e-9)
    same = fit_rotations(xs[:1], block_size=32, max_steps=12, seed=1)[0]
    assert not torch.allclose(same.act(xs[0]), joint[0].act(xs[0]))


@pytest.mark.parametrize("shared", [False, True])
def test_range_stop_keeps_the_prefix_with_the_smallest_max_minus_min(shared):
    x = torch.randn(1 if shared else 4, 200, 16, generator=gen(7))
    x[..., 3] *= 15
    g = _spreading_matrix(16, 0)
    span = lambda r: (x @ r).amax((1, 2)) - (x @ r).amin((1, 2))  # noqa: E731
    rot_range = _greedy_rotation(x.clone(), 30, g, shared, "range")
    rot_abs = _greedy_rotation(x.clone(), 30, g, shared, "absmax")
    assert torch.all(span(rot_range.float()) <= span(rot_abs.float()) + 1e-4)
    assert torch.all(span(rot_range.float()) <= span(torch.eye(16).expand_as(rot_range)) + 1e-4)


def test_minmax_activation_range_is_finer_on_a_positive_row():
    x = torch.linspace(2.0, 3.0, 64)[None]
    _, zero = quant_params(x, 4, with_zero=False)
    assert zero.item() < 0  # the grid starts at the row's minimum, above 0
    err_minmax = (fake_quant(x, 4, with_zero=False) - x).abs().max()
    err_zero = (fake_quant(x, 4) - x).abs().max()
    assert err_minmax < err_zero / 2


def test_minmax_weight_range_is_finer_on_a_positive_row():
    w = torch.linspace(2.0, 3.0, 64)[None].repeat(3, 1)
    err = {z: (WeightQuantizer(4, with_zero=z)(w) - w).abs().max() for z in (True, False)}
    assert err[False] < err[True] / 2


@pytest.mark.parametrize("kind", ["uniform", "official"])
def test_spreading_matrices_are_orthogonal_and_spread_coordinate_zero(kind):
    g = _spreading_matrix(64, 3, kind)
    torch.testing.assert_close(g @ g.T, torch.eye(64, dtype=g.dtype), rtol=0, atol=1e-12)
    assert g[0, 0].abs().item() == pytest.approx(64 ** -0.5)
    uniform = torch.allclose(g[0].abs(), torch.full((64,), 64 ** -0.5, dtype=g.dtype))
    assert uniform == (kind == "uniform")
    torch.testing.assert_close(_givens_chain(64)[0], torch.full((64,), 64 ** -0.5, dtype=torch.float64))


def test_qk_clip_clips_queries_and_keys_but_never_values():
    q, k, v = (torch.randn(1, 2, 8, 16, generator=gen(i)) for i in range(3))
    _, _, v_out = KVQuant(4, 16, clip=0.9)(q, k, v)
    q_out, _, _ = KVQuant(4, 16, clip=0.9)(q, k, v)
    torch.testing.assert_close(v_out, fake_quant(v, 4, clip=1.0))
    assert not torch.allclose(q_out, KVQuant(4, 16, clip=1.0)(q, k, v)[0])


def test_minmax_activation_range_survives_save_and_load(tmp_path):
    model, tok = outlier_model("mixtral")
    calib, x = tiny_data(tok)
    quant = QuantConfig(4, 4, act_range="minmax")
    quantize_model(model, get_spec(model), calib, quant, DuQuantConfig(**FAST), seed=0)
    with torch.no_grad():
        ref = model(x).logits
    packed.save_quantized(model, tok, tmp_path / "q", {"model": "tiny", "method": "duquant"})
    loaded, _, _ = packed.load_quantized(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, ref)


def test_recipe_fills_unset_options_and_explicit_options_win():
    args = parse_args(["--recipe", "official", "--rotation", "paper", "--no-smooth"])[0]
    assert args.smooth_stats == "fp" and args.rotation_data == "mean" and args.act_range == "minmax"
    assert args.rotation == "paper" and args.smooth is False
    assert parse_args([])[0].smooth_stats == "quantized"
    for name, (duquant, eaquant) in RECIPES.items():
        parsed = parse_args(["--recipe", name])[0]
        assert all(getattr(parsed, k) == v for k, v in duquant.items())
        for spelling in (["--recipe", name, "--method", "eaquant"], ["--recipe", f"eaquant,{name}"]):
            parsed = parse_args(spelling)[0]
            assert all(getattr(parsed, k) == v for k, v in eaquant.items())
    eaquant = parse_args(["--recipe", "official", "--eaquant"])[0]
    assert eaquant.propagation == "fp" and eaquant.align_rule == "official" and eaquant.smooth_weight == "all_readers"


def test_outlier_mask_scales_only_the_outlier_channels():
    """Two high candidates beyond Tukey's fence: the Otsu split keeps the lesser one ordinary (it sets
    the reference maximum); one low candidate: the fence alone decides."""
    from duquant.outlier_mask import ChannelRange, outlier_mask
    high = 1 + 0.1 * torch.rand(64, generator=gen(3))
    low = -1 - 0.1 * torch.rand(64, generator=gen(4))
    high[[5, 9]], low[20] = torch.tensor([30.0, 12.0]), -40.0
    s = outlier_mask(ChannelRange(high, low))
    ordinary = torch.ones(64, dtype=torch.bool)
    ordinary[[5, 20]] = False
    assert torch.equal(s[ordinary], torch.ones(62))
    assert torch.allclose(s[5], torch.tensor(30.0 / 12.0) ** 0.7)
    assert torch.allclose(s[20], (40.0 / -low[ordinary].min()) ** 0.7)


def test_otsu_split_separates_at_the_widest_gap():
    from duquant.outlier_mask import otsu_split
    assert otsu_split(torch.tensor([10.0, 9.5, 9.0, 3.0, 2.9]), high_side=True) == 3.0
    assert otsu_split(torch.tensor([-2.0, -2.5, -8.0, -8.5]), high_side=False) == -2.5


def test_channel_range_is_a_running_average_over_sequences():
    from duquant.outlier_mask import ChannelRange
    r = ChannelRange()
    r.update(torch.tensor([[1.0, -1.0], [2.0, 0.0]]))
    r.update(torch.tensor([[12.0, -11.0]]))
    assert torch.allclose(r.high, torch.tensor([0.9 * 2 + 0.1 * 12, 0.9 * 0 + 0.1 * -11]))
    assert torch.allclose(r.low, torch.tensor([0.9 * 1 + 0.1 * 12, 0.9 * -1 + 0.1 * -11]))


def test_outlier_mask_down_smoothing_runs_and_changes_the_quantized_model(monkeypatch):
    """Exactness in FP is test_each_fidelity_choice_alone_is_exact; here: at W4A4 every routed expert
    that saw tokens gets its mask from its own down-in range, and the option changes the result."""
    from duquant import fitting
    masked = []
    monkeypatch.setattr(fitting, "outlier_mask", lambda r: masked.append(r) or fitting_mask(r))
    out = {}
    for rule in ("alpha", "outlier_mask"):
        model, tok = outlier_model("olmoe")
        calib, x = tiny_data(tok)
        cfg = DuQuantConfig(block_size=32, max_rotation_step=16, expert_down_smooth=rule)
        quantize_model(model, get_spec(model), calib, QuantConfig(4, 4), cfg, seed=0)
        with torch.no_grad():
            out[rule] = model(x).logits
    assert len(masked) >= 2 * 4 and all(r.high is not None for r in masked)  # 2 layers x most of 8 experts
    assert torch.isfinite(out["outlier_mask"]).all()
    assert not torch.allclose(out["alpha"], out["outlier_mask"])


def test_published_balance_tops_up_each_experts_rows_in_order_up_to_the_budget():
    from duquant.calibration import fill_expert_rows
    from duquant.layerwise import capture_layer_inputs, observe
    model, tok = outlier_model("olmoe")
    spec = get_spec(model)
    unfuse_experts(model, spec)
    layer = decoder_layers(model, spec)[0]
    view = resolve(spec, layer, model.config, 0)
    calib, _ = tiny_data(tok, nsamples=4)
    inps, kwargs = capture_layer_inputs(model, spec, calib, "cpu")
    with collect(hooked_sites(view), None, 0, 64, 0) as stats:
        observe(layer, [mean_sequence(inps)], kwargs)
    own = {e: stats[x.gate_proj].count for e, x in enumerate(view.experts)}
    before = {e: stats[x.gate_proj].sample.clone() for e, x in enumerate(view.experts) if own[e]}
    with collect([x.gate_proj for x in view.experts], None, 0, 10**6, 0) as routed:
        observe(layer, inps, kwargs)
    budget = 40
    fill_expert_rows(layer, view, stats, inps, kwargs, budget)
    for e, x in enumerate(view.experts):
        want = min(budget, own[e] + routed[x.gate_proj].count)
        assert stats[x.gate_proj].count == want == stats[x.down_proj].count
        if own[e]:
            assert torch.equal(stats[x.gate_proj].sample[: min(own[e], budget)], before[e][:budget])
    assert any(own[e] < budget for e in own)  # the fill mattered for some expert


def test_sequential_fitting_sees_the_earlier_sites_quantized(monkeypatch):
    """In the first layer, attn-in fits on the same rows either way; o-in's rows come through quantized
    q/k/v (and down-in's through quantized gate/up) only under fit_order=sequential."""
    from duquant import fitting
    seen = {}
    original = fitting.rotate_sites

    def record(fits, lq):
        for f in fits:
            seen.setdefault(lq.cfg.fit_order, {}).setdefault(f.site.name, f.x.clone())  # layer 0's
        return original(fits, lq)

    monkeypatch.setattr(fitting, "rotate_sites", record)
    for order in ("layer", "sequential"):
        model, tok = outlier_model("llama")
        calib, _ = tiny_data(tok)
        quantize_model(model, get_spec(model), calib, QuantConfig(4, 4), DuQuantConfig(**{**FAST, "fit_at_16_bits": False},
                                                                                   fit_order=order), seed=0)
    layer, seq = seen["layer"], seen["sequential"]
    assert torch.equal(layer["attn_in"], seq["attn_in"])
    assert not torch.allclose(layer["o_in"], seq["o_in"]) and not torch.allclose(layer["down_in"], seq["down_in"])


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss", "dbrx", "llama4_text", "qwen3_next"])
def test_refresh_rows_are_a_full_pass_rows_while_attention_only_passes_skip_the_mlp(arch):
    """Sequential fitting's refresh (`site_rows`) stops attention-only passes after the attention,
    skips the linears no hooked input depends on and observes the expert-only extra data only for
    routed experts' sites: the rows and counts must be exactly those of a full pass over both sets."""
    from duquant.calibration import calibration, site_rows
    from duquant.layerwise import observe
    from duquant.stats import routed_expert_inputs
    from models.sites import layer_sites
    model, tok = tiny_model(arch)
    spec = get_spec(model)
    calib, _ = tiny_data(tok, nsamples=3)
    extra, _ = tiny_data(tok, nsamples=2)
    cfg = DuQuantConfig(**FAST, rotation_tokens=40)
    data = calibration(model, spec, calib, extra, cfg, torch.device("cpu"), False)  # layer 0's inputs serve any layer
    index = next(i for i in range(model.config.num_hidden_layers) if spec.is_moe_layer(model.config, i))
    unfuse_experts(model, spec, index)
    layer = decoder_layers(model, spec)[index]
    view = resolve(spec, layer, model.config, index)
    mlp_calls, downs_zero = [], []
    handles = [view.mlp.register_forward_hook(lambda *_: mlp_calls.append(1))]
    handles += [x.down_proj.register_forward_hook(lambda m, i, out: downs_zero.append(not out.any())) for x in view.experts]
    sites = layer_sites(view)
    for depth in sorted({s.depth for s in sites}):
        hooks = [s.hook for s in sites if s.depth == depth]
        mlp_calls.clear()
        downs_zero.clear()
        got = site_rows(model, spec, layer, view, data, cfg, 7, False, hooks)
        assert (not mlp_calls) == (depth < sites[-1].depth - 1)  # attention depths skip the MoE
        if depth >= sites[-1].depth - 1:  # the experts' inputs and down-ins: no expert output computed
            assert downs_zero and all(downs_zero)
        with collect(hooks, None, 0, cfg.rotation_tokens, 7) as want:
            observe(layer, data.inps, data.kwargs)
            want.frozen = set(hooks) - routed_expert_inputs(view)
            observe(layer, data.extra, data.kwargs)
        for h in hooks:
            assert got[h].count == want[h].count and torch.equal(got[h].sample, want[h].sample)
    for h in handles:
        h.remove()


# One family per attention kind: multi-head and grouped, MLA, sinks (eager), linear attention, fused QKV.
REPLAY_CASES = [(a, {}) for a in ["mixtral", "qwen2_moe", "deepseek", "llama", "deepseek_v3", "gpt_oss", "qwen3_next",
                                  "dbrx", "llama4_text"]] + [
    ("mixtral", {"rotation_data": "mean"}), ("olmoe", {"rotation_data": "layer_mean", "propagation": "fp"}),
    ("mixtral", {"gptq": True})]


@pytest.mark.parametrize("arch, options", REPLAY_CASES)
def test_refresh_passes_that_replay_the_attention_give_the_same_model(arch, options, monkeypatch):
    """Sequential fitting's refresh passes, and the propagation after them, replay the attention
    from the previous pass's record (duquant/attention_replay.py): the quantized model and the next
    layers' inputs must be bitwise the ones every pass computes, and every MoE or MLP pass and every
    propagation must have replayed, except where the attention returns its weights (gpt-oss's
    eager attention with sinks), which a record would have to hold, and after GPTQ, which rounds the
    attention's weights after fitting."""
    from duquant import attention_replay
    from duquant.config import GPTQConfig
    replayed = []
    original = attention_replay.AttentionReplay._replaying

    def counted(self, old, kind):
        replayed.append(kind)
        return original(self, old, kind)

    monkeypatch.setattr(attention_replay.AttentionReplay, "_replaying", counted)
    outs = []
    for replay in (True, False):
        model, tok = outlier_model(arch) if arch in ALL_ARCHS else tiny_model(arch)
        calib, x = tiny_data(tok)
        extra, _ = tiny_data(tok, nsamples=1)
        spec = get_spec(model)
        quant = QuantConfig(4, 4, 16 if spec.kv_quant_unsupported else None)  # MLA: no KV quantization
        cfg = {k: v for k, v in options.items() if k != "gptq"}
        quantize_model(model, spec, calib, quant, DuQuantConfig(**{**FAST, "fit_at_16_bits": False, **cfg}),
                       seed=0, expert_extra_ids=extra, gptq=GPTQConfig() if options.get("gptq") else None,
                       replay_attention=replay)
        with torch.no_grad():
            outs.append(model(x).logits)
        if replay:
            layers = 0 if arch == "gpt_oss" else model.config.num_hidden_layers
            # per layer the MLP-input pass replays o_proj's inputs, the down-in pass the outputs, and so
            # does the propagation after every layer but the last (of the sequences the refresh passes
            # saw: none of "layer_mean"'s, which is each layer's own mean input)
            propagations = 0 if options.get("rotation_data") == "layer_mean" or options.get("gptq") else layers - 1
            assert replayed.count("o_in") == layers and replayed.count("output") >= layers + propagations, replayed
            replayed.clear()
    assert not replayed  # --no-replay_attention computes every pass
    assert torch.equal(outs[0], outs[1])


def test_no_replay_attention_is_a_run_option_outside_the_fingerprint():
    """--no-replay_attention is a memory choice, not a method's: a partial run resumes across it."""
    run = main.build_config(["--no-replay_attention"])
    assert run.output.replay_attention is False and run.fingerprint() == main.build_config([]).fingerprint()
