"""MoEQuant's parts: GPTQ (alone and after DuQuant's transforms), AGQ, EBSS, and the CLI switches."""
import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import main
from duquant.config import DuQuantConfig, GPTQConfig, QuantConfig
from duquant.data import calibration_segments, ppl_segments
from duquant.gptq import Hessian, gptq_quantize
from duquant.pipeline import Extensions, quantize_model
from duquant.quantizer import WeightQuantizer
from eaquant_ext.moequant.agq import affinity_weights, gate_approximation
from duquant.diagnostics import expert_balance_std
from eaquant_ext.balance import routing_counts
from eaquant_ext.moequant.ebss import ebss_calibration
from models import get_spec, load_model

from .helpers import outlier_model

FAST = dict(block_size=32, max_rotation_step=16)
Q4 = WeightQuantizer(4, False, 0.8)


_DATA: dict = {}


def tiny_data(tok, nsamples=2, seqlen=64):
    """helpers.tiny_data, tokenized once per module (WikiText-2 takes seconds to tokenize); every
    tiny model shares the zoo tokenizer."""
    key = (tok.name_or_path, nsamples, seqlen)
    if key not in _DATA:
        _DATA[key] = calibration_segments("c4", tok, nsamples, seqlen, 0), ppl_segments("wikitext2", tok, seqlen, 2)
    return _DATA[key]


def _correlated(n=512, dim=96, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=g, dtype=dtype) / dim**0.5
    return torch.randn(n, dim, generator=g, dtype=dtype) @ mix + 0.05 * torch.randn(n, dim, generator=g, dtype=dtype)


def _weight(out=32, dim=96, seed=1, dtype=torch.float64):
    return torch.randn(out, dim, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---- GPTQ ----

@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_with_diagonal_hessian_is_rtn(act_order):
    w = _weight()
    for h in (torch.eye(96, dtype=w.dtype), torch.diag(torch.rand(96, dtype=w.dtype) + 0.5)):
        q = gptq_quantize(w, h, Q4, blocksize=32, act_order=act_order).weight
        assert torch.equal(q, Q4(w))
    near = torch.eye(96, dtype=w.dtype) + 1e-9 * (lambda a: a + a.T)(torch.randn(96, 96, dtype=w.dtype))
    assert torch.equal(gptq_quantize(w, near, Q4, act_order=act_order)[0], Q4(w))


@pytest.mark.parametrize("kw", [{}, {"act_order": True}, {"blocksize": 16}, {"group_size": 48, "act_order": True}])
def test_gptq_beats_round_to_nearest_on_layer_output(kw):
    x, w = _correlated(), _weight()
    h = Hessian(96, "cpu", torch.float64)
    h.add(x)
    q, loss = gptq_quantize(w, h.matrix(), Q4, **kw)[:2]
    err = (x @ w.T - x @ q.T).norm()
    rtn = (x @ w.T - x @ Q4(w).T).norm()
    assert err < 0.85 * rtn and loss.item() > 0
    levels = [row.unique().numel() for row in q]  # still the 4-bit per-channel grid (per group with group_size)
    assert max(levels) <= (16 if "group_size" not in kw else 16 * 2)


def test_gptq_batched_over_experts_matches_one_by_one():
    ws = torch.stack([_weight(seed=s) for s in range(3)])
    hs = []
    for s in range(3):
        h = Hessian(96, "cpu", torch.float64)
        h.add(_correlated(seed=10 + s))
        hs.append(h.matrix())
    batched = gptq_quantize(ws, torch.stack(hs), Q4, act_order=True, group_size=32).weight
    for w, h, q in zip(ws, hs, batched):
        assert torch.allclose(gptq_quantize(w, h, Q4, act_order=True, group_size=32)[0], q)


def test_agq_with_equal_affinities_is_gptq():
    x, w = _correlated(), _weight()
    plain, ones, const = (Hessian(96, "cpu", torch.float64) for _ in range(3))
    plain.add(x)
    ones.add(x, torch.ones(x.shape[0], dtype=x.dtype))
    const.add(x, torch.full((x.shape[0],), 0.37, dtype=x.dtype))
    ref = gptq_quantize(w, plain.matrix(), Q4)[0]
    assert torch.equal(gptq_quantize(w, ones.matrix(), Q4)[0], ref)
    assert torch.allclose(const.matrix(), plain.matrix(), rtol=1e-12)
    assert torch.equal(gptq_quantize(w, const.matrix(), Q4)[0], ref)


def _equal_scores(router):
    """Every routed expert gets affinity 1 (the routing itself is unchanged)."""
    router.register_forward_hook(lambda m, a, out: (out[0], torch.ones_like(out[1]), out[2]))


def test_agq_in_the_pipeline_reduces_to_gptq_when_affinities_are_equal():
    base, tok = outlier_model("mixtral")
    for layer in base.model.layers:
        _equal_scores(layer.mlp.gate)
    calib, _ = tiny_data(tok)
    weights = []
    for ext in (Extensions(), Extensions(hessian_weights=affinity_weights(gate=True))):
        model = copy.deepcopy(base)
        report = quantize_model(model, get_spec(model), calib, QuantConfig(4, 4), DuQuantConfig(**FAST), ext,
                                seed=0, gptq=GPTQConfig())
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
    assert report.layers[0]["gptq"]["agq"]["mean_affinity"] == pytest.approx(1.0)
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_agq_changes_the_expert_weights():
    base, tok = outlier_model("olmoe")
    calib, _ = tiny_data(tok)
    out = []
    for ext in (Extensions(), Extensions(hessian_weights=affinity_weights(gate=False))):
        model = copy.deepcopy(base)
        quantize_model(model, get_spec(model), calib, QuantConfig(4, 16), DuQuantConfig.rtn(), ext, seed=0,
                       gptq=GPTQConfig(min_tokens=1))
        out.append(model.model.layers[0].mlp.experts[0])
    assert torch.equal(out[0].gate_proj.weight, out[1].gate_proj.weight)  # --no-agq_gate: gate_proj unweighted
    assert not torch.equal(out[0].up_proj.weight, out[1].up_proj.weight)
    assert not torch.equal(out[0].down_proj.weight, out[1].down_proj.weight)


def approximation_cosine(g: torch.Tensor, c: float, act=F.silu) -> float:
    """R4: cosine similarity between the approximated and the exact gate-layer output."""
    a, b = gate_approximation(g.double(), c, act)
    return F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def _qkv_calibration_errors(cfg) -> list[float]:
    """Layer 0's q/k/v output error on the calibration rows with GPTQ and with round-to-nearest, in
    the basis the weights live in: inputs as the QLinears' inner linears receive them (transformed),
    FP weights as transformed by the same (seeded) transforms at 16 bits."""
    base, tok = outlier_model("mixtral")
    calib, _ = tiny_data(tok, nsamples=4)
    fp = copy.deepcopy(base)
    quantize_model(fp, get_spec(fp), calib, QuantConfig(16, 16), dataclasses.replace(cfg, fit_at_16_bits=True), seed=0)
    errors = []
    for gptq in (GPTQConfig(), None):
        quant = copy.deepcopy(base)
        quantize_model(quant, get_spec(quant), calib, QuantConfig(3, 16), cfg, seed=0, gptq=gptq)
        rows = {}
        attn = quant.model.layers[0].self_attn
        handles = [getattr(attn, n).inner.register_forward_pre_hook(
            lambda m, a, n=n: rows.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1])))
            for n in ("q_proj", "k_proj", "v_proj")]
        with torch.no_grad():
            quant(calib)
        for h in handles:
            h.remove()
        errors.append(sum((torch.cat(x) @ (getattr(fp.model.layers[0].self_attn, n).inner.weight
                                           - getattr(attn, n).inner.weight).T).pow(2).sum().item()
                          for n, x in rows.items()))
    return errors


@pytest.mark.parametrize("cfg", [DuQuantConfig.rtn(), DuQuantConfig(**FAST)], ids=["rtn", "duquant"])
def test_gptq_uses_what_the_weights_multiply_alone_and_after_the_transforms(cfg):
    """After DuQuant, GPTQ must see the transformed weight and the Hessian of the transformed,
    activation-quantized inputs; it then lowers the error GPTQ minimizes, in that basis."""
    with_gptq, rtn = _qkv_calibration_errors(cfg)
    assert with_gptq < 0.9 * rtn


def test_gptq_dead_expert_falls_back_to_rtn_without_nan(caplog):
    model, tok = outlier_model("mixtral")
    for layer in model.model.layers:
        def starve(module, args, out):
            logits = out[0].clone()
            logits[:, 1] = float("-inf")
            top = F.softmax(logits.float(), -1).topk(module.top_k, dim=-1)
            return out[0], top.values / top.values.sum(-1, keepdim=True), top.indices
        layer.mlp.gate.register_forward_hook(starve)
    calib, x = tiny_data(tok)
    report = quantize_model(model, get_spec(model), calib, QuantConfig(4, 4), DuQuantConfig(**FAST),
                            Extensions(hessian_weights=affinity_weights()), seed=0, gptq=GPTQConfig())
    for layer in report.layers:
        assert {f"mlp.experts.1.{p}" for p in ("gate_proj", "up_proj", "down_proj")} <= set(layer["gptq"]["fallback"])
    assert "GPTQ fell back to round-to-nearest" in caplog.text
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with torch.no_grad():
        assert torch.isfinite(model(x).logits).all()


def test_gptq_agq_with_shared_experts_and_route_all_tokens():
    """Qwen2-MoE: shared expert, sigmoid shared-expert gate (grouped with the router), a dense layer."""
    model, tok = outlier_model("qwen2_moe")
    calib, x = tiny_data(tok)
    report = quantize_model(model, get_spec(model), calib, QuantConfig(4, 8), DuQuantConfig(**FAST),
                            Extensions(hessian_weights=affinity_weights()), seed=0, route_all=True, gptq=GPTQConfig())
    moe = [layer for layer in report.layers if layer["moe"]]
    assert moe and all(0.99 < layer["gptq"]["router_out_cos"] <= 1 + 1e-9 for layer in moe)
    assert all(set(layer["gptq"]["agq"]["gate_approx_cos"]) == {"0.1", "0.3", "0.5", "0.7", "0.9"} for layer in moe)
    with torch.no_grad():
        assert torch.isfinite(model(x).logits).all()


# ---- AGQ's gate-layer approximation (R4) ----

def test_gate_approximation_is_exact_at_c_one_and_improves_with_c():
    g = 3 * torch.randn(256, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    approx, exact = gate_approximation(g, 1.0)
    assert torch.equal(approx, exact) and torch.equal(exact, F.silu(g))
    assert approximation_cosine(g, 1.0) == pytest.approx(1.0, abs=1e-12)
    assert approximation_cosine(g, 1 - 1e-6) == pytest.approx(1.0, abs=1e-6)
    cos = [approximation_cosine(g, c / 10) for c in range(1, 10)]
    assert cos == sorted(cos) and cos[0] < 0.95 < cos[-1]
    per_token = torch.rand(256, dtype=torch.float64)
    a, b = gate_approximation(g, per_token)
    assert torch.allclose(b, per_token[:, None] * F.silu(g))


# ---- EBSS ----

def test_ebss_is_balanced_and_cached(tmp_path):
    model, tok = load_model("demo-mixtral", torch.float32)
    spec = get_spec(model)
    n, seqlen, top_k = 4, 48, model.config.num_experts_per_tok
    ids, info = ebss_calibration(model, spec, tok, "demo-mixtral", n, seqlen, tau=0.1, width=4, seed=0,
                                 cache_dir=tmp_path)
    assert ids.shape == (n, seqlen) and ids.dtype == torch.long and not info["cached"]
    assert (ids[:, 0] == tok.bos_token_id).all() and len(set(ids[:, 1].tolist())) == n
    assert not torch.isin(ids[:, 1:], torch.tensor(tok.all_special_ids)).any()
    counts = routing_counts(model, spec, ids)
    assert expert_balance_std(counts, top_k) == pytest.approx(info["balance_std"], rel=1e-6)
    c4 = [expert_balance_std(routing_counts(model, spec, calibration_segments("c4", tok, n, seqlen, s)), top_k)
          for s in range(2)]
    assert info["balance_std"] < min(c4)
    again, info2 = ebss_calibration(model, spec, tok, "demo-mixtral", n, seqlen, tau=0.1, width=4, seed=0,
                                    cache_dir=tmp_path)
    assert info2["cached"] and torch.equal(again, ids)
    assert [p.name for p in tmp_path.iterdir()] == [Path(info["cache"]).name]


def test_expert_balance_std():
    even = torch.full((3, 2, 8), 5)
    assert expert_balance_std(even, top_k=2) == 0.0
    skew = torch.zeros(1, 1, 4)
    skew[0, 0, 0] = 10  # top-1: every token on expert 0 -> frequencies (1, 0, 0, 0)
    assert expert_balance_std(skew, top_k=1) == pytest.approx(torch.tensor([1.0, 0, 0, 0]).std().item())


# ---- CLI ----

def _run(capsys, *argv):
    rc = main.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_gptq_end_to_end(tmp_path, capsys):
    rc, out, _ = _run(capsys, "--model", "tiny-mixtral", "--method", "duquant", "--gptq", "--act_order",
                      "--wbits", "4", "--abits", "16", "--nsamples", "2", "--seqlen", "64", "--eval_ppl", "wikitext2",
                      "--ppl_samples", "1", "--block_size", "32", "--max_rotation_step", "8", "--no-compare_fp",
                      "--output_dir", str(tmp_path))
    assert rc == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["method"] == "duquant+gptq" and res["config"]["gptq"]["act_order"] is True
    assert res["config"]["moequant"]["agq"] is False and all("gptq" in layer for layer in res["layers"])
    assert res["ppl"]["wikitext2"] > 1 and "balance_std" in res["experts"] and "quantize_gptq" in res["timings"]


def test_cli_moequant_end_to_end(tmp_path, capsys):
    rc, out, _ = _run(capsys, "--model", "tiny-mixtral", "--method", "rtn", "--moequant", "--abits", "16",
                      "--nsamples", "2", "--seqlen", "32", "--ebss_width", "2", "--ebss_cache_dir", str(tmp_path / "c"),
                      "--eval_ppl", "", "--output_dir", str(tmp_path))
    assert rc == 0 and "EBSS calibration" in out
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["method"] == "moequant" and res["config"]["moequant"]["ebss"]
    assert res["config"]["moequant"]["agq"] and res["config"]["moequant"]["ebss_width"] == 2
    assert res["ebss"]["nsamples"] == 2 and 0 <= res["ebss"]["balance_std"]
    assert set(res["layers"][0]["gptq"]["agq"]["gate_approx_cos"]) == {"0.1", "0.3", "0.5", "0.7", "0.9"}


@pytest.mark.parametrize("argv, message", [
    (["--model", "tiny-llama", "--agq", "--seqlen", "64"], "require an MoE model"),
    (["--model", "tiny-llama", "--ebss", "--seqlen", "64"], "require an MoE model"),
    (["--model", "tiny-mixtral", "--calib_dataset", "ebss"], "--calib_dataset ebss is now --ebss"),
    (["--model", "tiny-llama", "--moequant", "--seqlen", "64"], "require an MoE model"),
    (["--model", "tiny-mixtral", "--act_order"], "add --gptq"),
    (["--model", "tiny-mixtral", "--method", "fp", "--gptq"], "not fp"),
    (["--model", "tiny-mixtral", "--gptq", "--percdamp", "0"], "--percdamp 0.0 is out of range; use a value in (0, 1)"),
    (["--model", "tiny-mixtral", "--moequant", "--agq_c", "0.1,2"], "--agq_c"),
])
def test_bad_moequant_input_is_one_line(argv, message, tmp_path, capsys):
    rc, _, err = _run(capsys, *argv, "--output_dir", str(tmp_path / "out"))
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, name", [
    (["--method", "rtn", "--moequant"], "moequant"),
    (["--recipe", "moequant"], "moequant"),
    (["--method", "moequant"], "moequant"),
    (["--method", "rtn", "--gptq"], "rtn+gptq"),
    (["--recipe", "gptq"], "rtn+gptq"),
    (["--gptq", "--agq", "--no-agq_gate"], "duquant+gptq+agq-nogate"),
    (["--moequant"], "duquant+moequant"),
    (["--recipe", "moequant", "--method", "duquant"], "duquant+moequant"),
    (["--recipe", "eaquant"], "eaquant"),
    (["--recipe", "eaquant", "--no-calib_balance"], "duquant+sa-maximum+ra"),
])
def test_method_names(argv, name):
    assert main.build_config(argv).method == name
