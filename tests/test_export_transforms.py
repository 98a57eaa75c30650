"""DuQuant / EAQuant exports (online transforms): transformers with the exported modeling file
(`trust_remote_code=True`) gives the in-memory fake-quantized model's logits bit for bit, router
W8A8, 4-bit KV cache and activation clip ratio included; without the online parts it does not."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import main
from duquant import export
from duquant.config import DuQuantConfig, QuantConfig
from duquant.export import online
from duquant.packed import load_quantized, save_quantized
from duquant.pipeline import quantize_model
from models import get_spec
from models.tiny import tiny_model

from .helpers import outlier_model, tiny_data

# Small rotation blocks keep the tiny fits fast; 20 leaves a tail block and makes the site transforms
# cheaper as steps than as one matrix (duquant/transforms.py act_matrix), 32 gives dense matrices.
DUQUANT = DuQuantConfig(block_size=32, max_rotation_step=4)
STEPS = DuQuantConfig(block_size=20, max_rotation_step=4)


@pytest.fixture(autouse=True)
def one_thread():
    """Both sides must sum in the same order for equal bits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _quantized(arch, cfg=DUQUANT, dtype=torch.float32, quant=QuantConfig(4, 4), **model_args):
    model, tok = outlier_model(arch, dtype) if not model_args else tiny_model(arch, **model_args)
    calib, x = tiny_data(tok)
    quantize_model(model, get_spec(model), calib, quant, cfg, seed=0)
    return model, tok, x


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


def _without_online_parts(loaded):
    """The loaded model as plain transformers runs it: no pre-hooks, transformers' own expert
    forward, plain SDPA."""
    for m in loaded.modules():
        m._forward_pre_hooks.clear()
        m.__dict__.pop("forward", None)
    loaded.set_attn_implementation("sdpa")
    return loaded


@pytest.mark.parametrize("arch", ["mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "llama"])
def test_duquant_w4a4_export_reproduces_the_logits_bit_for_bit(arch, tmp_path):
    """Default W4A4: rotations and permutation at every site, router W8A8, 4-bit KV, clip 0.9."""
    model, tok, x = _quantized(arch)
    info = export.export_compressed_tensors(model, tok, tmp_path / "ct", {})
    assert info["online"] and info["lost"] == []
    loaded = _load(tmp_path / "ct")
    expected = _logits(model, x)
    assert torch.equal(_logits(loaded, x), expected)
    # Control: the same checkpoint without the modeling file's online parts is another model.
    assert (_logits(_without_online_parts(loaded), x) - expected).abs().max() > 0.05 * expected.abs().max()


@pytest.mark.parametrize("arch, cfg, model_args", [
    ("llama", STEPS, {}),
    ("qwen2_moe", STEPS, {}),
    # SmoothQuant-style: with grouped-query attention o_proj's smoothing stays online (a scale alone).
    ("llama", DuQuantConfig(rotate=False, permute=False, o_smooth="fold_v"), {"num_key_value_heads": 2}),
])
def test_transforms_applied_as_steps_reproduce_the_logits_bit_for_bit(arch, cfg, model_args, tmp_path):
    model, tok, x = _quantized(arch, cfg, **model_args)
    export.export_compressed_tensors(model, tok, tmp_path / "ct", {})
    kinds = {k for steps in json.loads((tmp_path / "ct" / "config.json").read_text())["duquant_online"]["sites"].values()
             for k in steps}
    assert kinds == {"smooth"} if not cfg.rotate else {"smooth", "rotation", "permutation"} <= kinds
    assert torch.equal(_logits(_load(tmp_path / "ct"), x), _logits(model, x))


@pytest.mark.parametrize("quant", [QuantConfig(4, 4, a_sym=True, w_sym=True), QuantConfig(4, 4, act_range="minmax")])
def test_symmetric_and_minmax_input_grids_reproduce_the_logits_bit_for_bit(quant, tmp_path):
    model, tok, x = _quantized("qwen3_moe", quant=quant)
    export.export_compressed_tensors(model, tok, tmp_path / "ct", {})
    assert torch.equal(_logits(_load(tmp_path / "ct"), x), _logits(model, x))


def test_bfloat16_duquant_export_reproduces_the_logits_bit_for_bit(tmp_path):
    """The modeling file casts the decompressed fused experts (float32 in transformers 5.23) to the model dtype."""
    model, tok, x = _quantized("olmoe", dtype=torch.bfloat16)
    export.export_compressed_tensors(model, tok, tmp_path / "ct", {})
    loaded = _load(tmp_path / "ct")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert torch.equal(_logits(loaded, x), _logits(model, x))


def test_loading_without_trust_remote_code_is_refused(tmp_path):
    model, tok, _ = _quantized("llama")
    export.export_compressed_tensors(model, tok, tmp_path / "ct", {})
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "ct", trust_remote_code=False)


def test_export_of_a_saved_duquant_model_equals_the_export_after_quantizing(tmp_path):
    model, tok, _ = _quantized("mixtral")
    export.export_compressed_tensors(model, tok, tmp_path / "direct", {})
    save_quantized(model, tok, tmp_path / "saved", {})
    loaded, tok2, _ = load_quantized(tmp_path / "saved")
    export.export_compressed_tensors(loaded, tok2, tmp_path / "via_load", {})
    for name in ("model.safetensors", online.TENSORS, online.MODELING, "config.json"):
        assert (tmp_path / "direct" / name).read_bytes() == (tmp_path / "via_load" / name).read_bytes(), name


CLI = ["--model", "tiny-mixtral", "--nsamples", "2", "--seqlen", "64", "--eval_ppl", "", "--no-compare_fp",
       "--block_size", "32", "--max_rotation_step", "4"]


def test_cli_eaquant_w3a4_export_reproduces_the_saved_model_bit_for_bit(tmp_path, capsys):
    """EAQuant (router alignment, expert-aware smoothing, balanced calibration) at W3A4 through the CLI:
    the export gives the logits of the model saved by the same run."""
    assert main.main([*CLI, "--recipe", "eaquant", "--wbits", "3", "--abits", "4", "--output_dir", str(tmp_path / "r"),
                      "--save_dir", str(tmp_path / "saved"), "--export", "compressed-tensors", str(tmp_path / "ct")]) == 0
    assert "warning:" not in capsys.readouterr().out
    exported = json.loads((tmp_path / "r" / "results.json").read_text())["exported"]
    assert exported["online"] and exported["lost"] == []
    assert json.loads((tmp_path / "ct" / export.INFO).read_text())["kept_online"]
    saved, tok, _ = load_quantized(tmp_path / "saved")
    x = tiny_data(tok)[1]
    assert torch.equal(_logits(_load(tmp_path / "ct"), x), _logits(saved, x))


def test_lm_eval_scores_a_duquant_export_as_the_toolkit_scores_the_model(tmp_path):
    """lm-eval builds the model itself from the directory (`trust_remote_code=True`), as its CLI does
    (docs/export.md); the scores equal the toolkit's own lm-eval run on the in-memory model."""
    from lm_eval import simple_evaluate

    from duquant.zeroshot import evaluate_tasks, task_manager

    model, tok, _ = _quantized("mixtral")
    export.export_compressed_tensors(model, tok, tmp_path / "ct", {})
    out = simple_evaluate(model="hf", model_args=f"pretrained={tmp_path / 'ct'},trust_remote_code=True",
                          tasks=["arc_easy"], limit=8, device="cpu", task_manager=task_manager(), bootstrap_iters=0)
    ours = evaluate_tasks(model, tok, ["arc_easy"], 8, 1, "cpu")["arc_easy"]
    for metric in ("acc,none", "acc_norm,none"):
        assert out["results"]["arc_easy"][metric] == ours[metric]


def test_a_routers_score_correction_bias_is_exported(tmp_path):
    """GLM-4.5's router keeps a persistent bias beside its weight (not in the toolkit's saved state)."""
    model, tok = tiny_model("glm4_moe")
    with torch.no_grad():
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    calib, x = tiny_data(tok)
    quantize_model(model, get_spec(model), calib, QuantConfig(4, 4), DUQUANT, seed=0)
    export.export_compressed_tensors(model, tok, tmp_path / "ct", {})
    assert torch.equal(_logits(_load(tmp_path / "ct"), x), _logits(model, x))


def test_streamed_duquant_model_exports_the_same_checkpoint(tmp_path):
    fp, tok = tiny_model("qwen3_moe")
    fp.save_pretrained(tmp_path / "fp")
    tok.save_pretrained(tmp_path / "fp")
    run = [*CLI, "--model", str(tmp_path / "fp"), "--method", "duquant"]
    for name, extra in (("streamed", ["--stream"]), ("in_memory", [])):
        assert main.main([*run, *extra, "--output_dir", str(tmp_path / f"r_{name}"),
                          "--export", "compressed-tensors", str(tmp_path / name)]) == 0
    for name in ("model.safetensors", online.TENSORS, "config.json"):
        assert (tmp_path / "streamed" / name).read_bytes() == (tmp_path / "in_memory" / name).read_bytes(), name
