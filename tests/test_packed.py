"""Saved quantized models rebuild the fake-quantized model bit for bit from packed integers; a
killed run resumes to the uninterrupted result; broken inputs fail with one line."""
import json

import pytest
import torch

import duquant.pipeline as pipeline
import main
from duquant import packed
from duquant.config import DuQuantConfig, GPTQConfig, QuantConfig
from duquant.packed import QuantizedLoadError, load_quantized, pack_codes, save_quantized, unpack_codes
from duquant.pipeline import Extensions, quantize_model
from eaquant_ext.router_align import router_quantizer
from models import get_spec

from .conftest import MOE_ARCHS
from .helpers import outlier_model, tiny_data

FAST = DuQuantConfig(block_size=32, max_rotation_step=16)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("sym", [False, True])
def test_codes_round_trip_through_packing(bits, sym):
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if sym else (0, 2**bits - 1)
    q = torch.randint(lo, hi + 1, (5, 37), dtype=torch.int16).to(torch.int8 if sym else torch.uint8)
    p = pack_codes(q, bits, sym)
    per_byte = 4 if bits <= 2 else 2 if bits <= 4 else 1
    assert p.dtype == torch.uint8 and p.shape == (5, -(-37 // per_byte))
    assert torch.equal(unpack_codes(p, bits, sym, 37), q)


def _quantized(arch, quant=QuantConfig(4, 4), dtype=torch.float32, **kw):
    model, tok = outlier_model(arch, dtype)
    calib, x = tiny_data(tok)
    report = quantize_model(model, get_spec(model), calib, quant, FAST, seed=0, **kw)
    return model, tok, x, report


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("arch", MOE_ARCHS + ["llama"])
def test_saved_model_reproduces_the_logits_exactly(arch, tmp_path):
    model, tok, x, _ = _quantized(arch)
    info = save_quantized(model, tok, tmp_path / "q", {"method": "duquant"})
    loaded, tok2, meta = load_quantized(tmp_path / "q")
    assert torch.equal(_logits(loaded, x), _logits(model, x))
    assert tok2 is not None and meta["run"] == {"method": "duquant"} and meta["kv"]
    assert all(e["bits"] in (4, 8) for e in meta["linears"].values())
    assert info["ratio"] <= 0.3


def test_router_align_and_grouped_act_order_gptq_in_bf16_round_trip(tmp_path):
    ext = Extensions(quantize_router=router_quantizer(0, 5, 1))
    gptq = GPTQConfig(act_order=True, group_size=32, min_tokens=1)
    model, tok, x, _ = _quantized("mixtral", QuantConfig(3, 4), torch.bfloat16, ext=ext, gptq=gptq)
    save_quantized(model, tok, tmp_path / "q", {})
    loaded, _, meta = load_quantized(tmp_path / "q")
    assert torch.equal(_logits(loaded, x), _logits(model, x))
    assert any(key.endswith(".g_idx") for key in packed.read_saved(tmp_path / "q")[1])
    assert {e["bits"] for e in meta["linears"].values()} == {3, 8}


def test_save_refuses_a_directory_that_is_not_a_saved_model(tmp_path):
    model, tok, _, _ = _quantized("olmoe")
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "notes.txt").write_text("mine")
    with pytest.raises(QuantizedLoadError, match="not a saved quantized model"):
        save_quantized(model, tok, tmp_path / "q", {})
    assert (tmp_path / "q" / "notes.txt").read_text() == "mine"


def test_interrupted_save_leaves_nothing_that_loads(tmp_path, monkeypatch):
    model, tok, _, _ = _quantized("olmoe")

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(packed, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_quantized(model, tok, tmp_path / "q", {})
    assert list(tmp_path.iterdir()) == []


def test_corrupt_or_truncated_saves_fail_with_one_line(tmp_path):
    model, tok, _, _ = _quantized("olmoe")
    save_quantized(model, tok, tmp_path / "q", {})
    weights = tmp_path / "q" / packed.WEIGHTS
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(QuantizedLoadError, match="missing or corrupt"):
        load_quantized(tmp_path / "q")
    (tmp_path / "q" / packed.QUANT_CONFIG).write_text("{")
    with pytest.raises(QuantizedLoadError, match="corrupt"):
        load_quantized(tmp_path / "q")
    with pytest.raises(QuantizedLoadError, match="not a saved quantized model"):
        load_quantized(tmp_path)


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    ext = Extensions(quantize_router=router_quantizer(0, 5, 1))
    full, _, x, full_report = _quantized("deepseek", ext=ext, gptq=GPTQConfig(min_tokens=1))
    resolve = pipeline.resolve

    def killed_at_layer_2(spec, layer, config, i):
        if i == 2:
            raise KeyboardInterrupt
        return resolve(spec, layer, config, i)

    monkeypatch.setattr(pipeline, "resolve", killed_at_layer_2)
    with pytest.raises(KeyboardInterrupt):
        _quantized("deepseek", ext=ext, gptq=GPTQConfig(min_tokens=1), checkpoint_dir=tmp_path)
    assert json.loads((tmp_path / "progress.json").read_text()) == {"done": 2}
    monkeypatch.setattr(pipeline, "resolve", resolve)
    resumed, _, _, report = _quantized("deepseek", ext=ext, gptq=GPTQConfig(min_tokens=1), checkpoint_dir=tmp_path)
    assert report.resumed_from == 2
    assert torch.equal(_logits(resumed, x), _logits(full, x))
    strip = [{k: v for k, v in layer.items() if k != "gptq"} for layer in full_report.layers]
    assert [{k: v for k, v in layer.items() if k != "gptq"} for layer in report.layers] == strip


def _main(argv, capsys) -> tuple[int, str]:
    code = main.main(argv)
    return code, capsys.readouterr().err


def test_cli_save_load_and_bad_inputs(tmp_path, capsys):
    common = ["--model", "tiny-olmoe", "--nsamples", "2", "--seqlen", "32", "--rotation_tokens", "64",
              "--eval_ppl", "wikitext2", "--ppl_samples", "2", "--no-compare_fp"]
    assert main.main(common + ["--output_dir", str(tmp_path / "r1"), "--save_dir", str(tmp_path / "q")]) == 0
    first = json.loads((tmp_path / "r1" / "results.json").read_text())
    assert first["saved"]["ratio"] <= 0.3 and not (tmp_path / "r1" / "partial").exists()
    assert main.main(["--load", str(tmp_path / "q"), "--seqlen", "32", "--eval_ppl", "wikitext2", "--ppl_samples", "2",
                      "--output_dir", str(tmp_path / "r2")]) == 0
    again = json.loads((tmp_path / "r2" / "results.json").read_text())
    assert again["ppl"] == first["ppl"] and again["method"] == first["method"]
    capsys.readouterr()
    code, err = _main(["--load", str(tmp_path / "q"), "--wbits", "3", "--output_dir", str(tmp_path / "r3")], capsys)
    assert code == 2 and "does not match the saved model" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "other").mkdir()
    code, err = _main(common + ["--save_dir", str(tmp_path / "other")], capsys)
    assert code == 2 and "is not a saved quantized model" in err


def test_checkpoint_with_nan_weights_is_refused(tmp_path, capsys):
    from models.tiny import tiny_model

    model, tok = tiny_model("mixtral")
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "bad")
    tok.save_pretrained(tmp_path / "bad")
    code, err = _main(["--model", str(tmp_path / "bad"), "--output_dir", str(tmp_path / "r")], capsys)
    assert code == 2 and "NaN or Inf" in err and "q_proj" in err and not (tmp_path / "r").exists()


def test_calibration_set_too_small_is_refused():
    from duquant.data import DataError, calibration_segments
    from models.tiny import tiny_model

    _, tok = tiny_model("mixtral")
    with pytest.raises(DataError, match="too small for 1000 x 2048"):
        calibration_segments("c4", tok, 1000, 2048, 0)


@pytest.mark.parametrize("arch", ["glm4_moe", "deepseek_v3", "dots1"])
def test_router_buffers_survive_save_and_load(arch, tmp_path):
    """A router's persistent buffer (the score-correction bias of GLM-4.5, DeepSeek-V3, dots1) is
    saved with the quantized router and loaded back (once left out, and the load refused)."""
    model, tok, x, _ = _quantized(arch, QuantConfig(4, 4, 16))
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b))
    save_quantized(model, tok, tmp_path / "q", {})
    loaded, _, _ = load_quantized(tmp_path / "q")
    biases = [k for k in packed.read_saved(tmp_path / "q")[1] if k.endswith("e_score_correction_bias")]
    assert biases and torch.equal(_logits(loaded, x), _logits(model, x))
