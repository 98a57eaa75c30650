"""Checkpoints read tensor by tensor (models.lazy): loaded whole or streamed (--stream: decoder layers
read one at a time), they give the same model, quantization and scores as the model that was saved,
with at most one layer resident when streamed."""
import json

import pytest
import torch
from safetensors.torch import save_file

import main
from duquant.config import DuQuantConfig, QuantConfig
from duquant.evaluate import perplexity
from duquant.packed import load_quantized, save_quantized
from duquant.pipeline import quantize_model
from models import ModelLoadError, decoder_layers, get_spec, load_model

from .conftest import MOE_ARCHS
from .helpers import outlier_model, tiny_data

FAST = DuQuantConfig(block_size=32, max_rotation_step=16)


def _saved(arch, path, fused_names=False):
    """A tiny outlier model on disk: as save_pretrained writes it (per-expert tensors for the archs whose
    hub checkpoints have them), or with the in-memory (fused) names as one safetensors file."""
    model, tok = outlier_model(arch)
    if fused_names:
        model.config.save_pretrained(path)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    else:
        model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok


def _layer_tensors_on_meta(model) -> bool:
    return all(t.device.type == "meta" for layer in decoder_layers(model, get_spec(model)) for t in layer.state_dict().values())


@pytest.mark.parametrize("fused_names", [False, True])
@pytest.mark.parametrize("arch", MOE_ARCHS + ["llama"])
def test_streamed_model_gives_the_same_logits(arch, fused_names, tmp_path):
    ref, _ = _saved(arch, tmp_path, fused_names)
    loaded, _ = load_model(str(tmp_path))
    model, _ = load_model(str(tmp_path), stream=True)
    assert _layer_tensors_on_meta(model)
    ids = torch.randint(0, 8000, (2, 24))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
        assert torch.equal(loaded(ids).logits, ref(ids).logits)
    stream = model.layer_stream
    assert stream.peak_resident == 1 and not stream.resident and _layer_tensors_on_meta(model)


@pytest.mark.parametrize("arch", ["mixtral", "deepseek"])
def test_streamed_quantization_equals_in_memory(arch, tmp_path):
    _saved(arch, tmp_path)
    results = []
    for stream in (False, True):
        model, tok = load_model(str(tmp_path), stream=stream)
        spec = get_spec(model)
        calib, x = tiny_data(tok)
        quantize_model(model, spec, calib, QuantConfig(4, 4), FAST, seed=0)
        results.append(perplexity(model, spec, x))
        with torch.no_grad():
            results.append(model(x).logits)
        if stream:
            s = model.layer_stream
            assert s.peak_resident == 1 and s.spilled == set(range(len(decoder_layers(model, spec))))
            assert _layer_tensors_on_meta(model)
    assert results[0] == results[2]
    assert torch.equal(results[1], results[3])


def test_cli_stream_matches_and_bad_inputs(tmp_path, capsys):
    _saved("mixtral", tmp_path / "ckpt")
    common = ["--model", str(tmp_path / "ckpt"), "--nsamples", "2", "--seqlen", "32", "--eval_ppl", "wikitext2",
              "--ppl_samples", "2", "--block_size", "32", "--max_rotation_step", "8", "--no-compare_fp"]
    assert main.main(common + ["--output_dir", str(tmp_path / "a")]) == 0
    assert main.main(common + ["--output_dir", str(tmp_path / "b"), "--stream", "--stream_dir", str(tmp_path / "spill")]) == 0
    ppl = [json.loads((tmp_path / d / "results.json").read_text())["ppl"] for d in "ab"]
    assert ppl[0] == ppl[1]
    assert sorted(p.name for p in (tmp_path / "spill").iterdir()) == ["layer0.pt", "layer1.pt"]
    capsys.readouterr()
    for argv, needle in [
        (["--model", "tiny-mixtral", "--stream"], "built in memory"),
        (common + ["--stream_dir", str(tmp_path / "s")], "only applies with --stream"),
    ]:
        assert main.main(argv + ["--output_dir", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_streamed_quantized_model_saves_and_loads_exactly(arch, tmp_path):
    _saved(arch, tmp_path / "ckpt")
    model, tok = load_model(str(tmp_path / "ckpt"), stream=True)
    calib, x = tiny_data(tok)
    quantize_model(model, get_spec(model), calib, QuantConfig(4, 4, kv_bits=4), FAST, seed=0)
    save_quantized(model, tok, tmp_path / "q", {})
    assert model.layer_stream.peak_resident == 1
    loaded, _, _ = load_quantized(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


def test_stream_refuses_missing_safetensors_and_nan(tmp_path):
    model, tok = outlier_model("mixtral")
    model.config.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="needs a safetensors checkpoint"):
        load_model(str(tmp_path), stream=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["model.layers.1.input_layernorm.weight"][0] = float("nan")
    save_file(state, str(tmp_path / "model.safetensors"))
    streamed, _ = load_model(str(tmp_path), stream=True)
    with pytest.raises(ModelLoadError, match="NaN or Inf values in model.layers.1.input_layernorm.weight"):
        streamed(torch.randint(0, 8000, (1, 8)))
