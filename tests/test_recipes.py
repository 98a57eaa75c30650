"""The run configuration: recipes, --set, the everyday semantics of 16 bits and --method fp, data-free
runs and the RTN baseline."""
import json

import pytest
import torch

import main
from duquant import data
from duquant.recipes import METHOD_RECIPES, RECIPES

TINY = ["--model", "tiny-mixtral", "--seqlen", "64", "--nsamples", "2", "--rotation_tokens", "64", "--block_size", "32",
        "--max_rotation_step", "8", "--eval_ppl", "wikitext2", "--ppl_samples", "2"]


def _methods(run):
    return run.quant, run.duquant, run.eaquant, run.moequant, run.gptq


@pytest.mark.parametrize("spellings", [
    (["--recipe", "eaquant"], ["--method", "eaquant"], ["--eaquant"]),
    (["--recipe", "moequant"], ["--method", "moequant"], ["--method", "rtn", "--moequant"]),
    (["--recipe", "gptq"], ["--method", "rtn", "--gptq"]),
    (["--recipe", "eaquant,official"], ["--recipe", "official", "--method", "eaquant"]),
])
def test_a_recipe_and_its_old_spellings_build_the_same_configuration(spellings):
    runs = [main.build_config(argv) for argv in spellings]
    assert all(_methods(r) == _methods(runs[0]) and r.method == runs[0].method for r in runs)


def test_explicit_options_beat_recipes_and_set_beats_both():
    run = main.build_config(["--recipe", "eaquant,official", "--no-router_align", "--rotation", "paper",
                             "--set", "min_expert_tokens=4", "--set", "eaquant.kl_top=10"])
    assert run.eaquant.smooth_aggregate == "maximum" and not run.eaquant.router_align and run.eaquant.calib_balance
    assert run.method == "duquant+sa-maximum+cb"
    assert run.duquant.rotation == "paper" and run.duquant.rotation_data == "layer_mean"  # official's EAQuant value
    assert run.duquant.min_expert_tokens == 4 and run.eaquant.kl_top == 10
    assert run.duquant.expert_down_smooth == "outlier_mask" and run.eaquant.balance_rule == "official"
    assert run.eaquant.fill_ratio == 2.0 and not run.eaquant.extra_sequences  # no extra text under that rule
    assert main.build_config(["--recipe", "eaquant"]).eaquant.extra_sequences


def test_the_fast_recipe_sets_reflection_steps_and_layer_order_unless_given():
    run = main.build_config(["--recipe", "eaquant,fast"])
    assert run.duquant.spreading == "reflection" and run.duquant.fit_order == "layer"
    assert run.eaquant.router_align and run.method == main.build_config(["--recipe", "eaquant"]).method
    run = main.build_config(["--recipe", "duquant,fast", "--fit_order", "sequential"])
    assert run.duquant.spreading == "reflection" and run.duquant.fit_order == "sequential"


@pytest.mark.parametrize("argv, message", [
    (["--recipe", "eaquant,moequant"], "two recipes of one kind"),
    (["--recipe", "fastest"], "unknown name fastest"),
    (["--set", "alpha"], "expected KEY=VALUE"),
    (["--set", "no_such_key=1"], "no such option"),
    (["--set", "alpha=high"], "is not a valid float"),
    (["--set", "alpha=2"], "must be in [0, 1]"),
    (["--calib_dataset", "ebss"], "--calib_dataset ebss is now --ebss"),
    (["--recipe", "eaquant", "--method", "rtn"], "EAQuant options build on DuQuant"),
])
def test_bad_recipes_and_settings_are_one_line(argv, message, tmp_path, capsys):
    assert main.main([*TINY, *argv, "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_help_recipes_lists_every_recipe_and_settable_section(capsys):
    with pytest.raises(SystemExit) as e:
        main.build_config(["--help-recipes"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert all(name in out for name in [*METHOD_RECIPES, *RECIPES])
    assert all(f"  {section}:" in out for section in ("quant", "duquant", "eaquant", "moequant", "gptq", "data", "eval"))


def test_16_bits_quantize_nothing_router_included(tmp_path, capsys, monkeypatch):
    run = main.build_config(["--wbits", "16", "--abits", "16"])
    assert (run.quant.router_wbits, run.quant.router_abits, run.quant.kv_bits) == (16, 16, 16)
    assert main.build_config(["--wbits", "16", "--abits", "16", "--router_wbits", "8"]).quant.router_wbits == 8
    monkeypatch.setattr(main, "calibration_segments", lambda *a, **k: pytest.fail("16 bits read calibration data"))
    assert main.main([*TINY, "--wbits", "16", "--abits", "16", "--output_dir", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["ppl"] == res["ppl_fp"] and res["kl_fp"]["wikitext2"]["top1_agreement"] == 1.0
    assert res["timings"].get("quantize_fitting", 0.0) == 0.0


def test_fp_records_and_prints_no_bit_widths(tmp_path, capsys):
    assert main.main([*TINY, "--recipe", "fp", "--output_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["config"]["quant"] is None and res["method"] == "fp"
    assert "w16a16" not in out.lower() and "w4a4" not in out.lower() and "| fp |" in out.lower()


def test_rtn_is_data_free_and_the_baseline_matches_an_rtn_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(main, "calibration_segments", lambda *a, **k: pytest.fail("RTN read calibration data"))
    assert main.main([*TINY, "--recipe", "rtn", "--output_dir", str(tmp_path / "rtn")]) == 0
    rtn = json.loads((tmp_path / "rtn" / "results.json").read_text())
    monkeypatch.undo()
    assert main.main([*TINY, "--recipe", "duquant", "--baseline", "rtn", "--output_dir", str(tmp_path / "dq")]) == 0
    dq = json.loads((tmp_path / "dq" / "results.json").read_text())
    assert dq["ppl_rtn"] == pytest.approx(rtn["ppl"], rel=1e-9) and "wikitext2" in dq["kl_rtn"]
    assert "| RTN |" in capsys.readouterr().out


def test_results_record_the_resolved_configuration(tmp_path):
    run = main.build_config([*TINY, "--recipe", "eaquant,official", "--output_dir", str(tmp_path)])
    with pytest.raises(Exception):
        run.duquant.alpha = 0.1  # frozen: nothing changes a configuration after it is built
    assert run.fingerprint() == main.build_config([*TINY, "--recipe", "eaquant,official", "--eval_ppl", "c4",
                                                   "--output_dir", str(tmp_path / "x")]).fingerprint()
    assert run.fingerprint() != main.build_config([*TINY, "--recipe", "eaquant", "--output_dir", str(tmp_path)]).fingerprint()


def test_nothing_is_fitted_for_16_bit_sites():
    """W4A4 with the router left at 16 bits and no shared experts: the MoE input still carries the
    experts' smoothing, so its site is fitted; a run at 16 bits everywhere fits nothing at all."""
    from duquant.config import DuQuantConfig, QuantConfig
    from duquant.pipeline import quantize_model
    from duquant.qlinear import QLinear
    from models import get_spec
    from models.tiny import tiny_model

    model, tok = tiny_model("mixtral")
    report = quantize_model(model, get_spec(model), None, QuantConfig(16, 16), DuQuantConfig(block_size=32), seed=0)
    assert not any(isinstance(m, QLinear) for m in model.modules()) and "capture" not in report.timings
    calib = data.calibration_segments("c4", tok, 2, 64, 0)
    quantize_model(model, get_spec(model), calib, QuantConfig(4, 4, router_wbits=16, router_abits=16),
                   DuQuantConfig(block_size=32, max_rotation_step=8), seed=0)
    assert isinstance(model.model.layers[0].mlp.gate, QLinear) and model.model.layers[0].mlp.gate.bits == 16
    with torch.no_grad():
        assert torch.isfinite(model(calib[:1]).logits).all()


@pytest.mark.parametrize("argv, w_clip", [
    ([], "mse"),  # DuQuant at 4-bit weights: the per-row search on the published EAQuant grid
    (["--wbits", "8"], "mse"),
    (["--wbits", "3"], "minmax"),  # below 4 bits the fixed ratio (docs/fidelity.md, "Weight clipping")
    (["--eaquant"], "mse"),
    (["--method", "rtn"], "minmax"),
    (["--recipe", "gptq"], "minmax"),
    (["--recipe", "official"], "minmax"),  # the published DuQuant code: swc
    (["--recipe", "eaquant,official", "--wbits", "3"], "mse"),  # the published EAQuant code searches at any width
    (["--wbits", "3", "--w_clip", "mse"], "mse"),  # explicit options win
    (["--w_clip", "minmax"], "minmax"),
])
def test_weight_clip_default_follows_method_and_width(argv, w_clip):
    quant = main.build_config(argv).quant
    assert quant.w_clip == w_clip
    if w_clip == "mse" and "--w_clip" not in argv:
        assert quant.mse_grid == "official"
