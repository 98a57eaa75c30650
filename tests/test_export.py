"""compressed-tensors exports load with plain transformers and give the fake-quantized model's logits
bit for bit, once the parts the export says it cannot keep are undone in the in-memory model too."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import main
from duquant import export, kvquant
from duquant.config import DuQuantConfig, GPTQConfig, QuantConfig
from duquant.packed import load_quantized, save_quantized
from duquant.pipeline import quantize_model
from duquant.qlinear import QLinear
from duquant.quantizer import ActQuantizer
from models import get_spec
from models.tiny import tiny_model

from .conftest import MOE_ARCHS
from .helpers import outlier_model, tiny_data

ROOT = Path(__file__).resolve().parent.parent
# Exact settings: full-precision router inputs, no clipping of activations, no KV quantization.
EXACT = dict(kv_bits=16, router_abits=16, lac=1.0)


@pytest.fixture(autouse=True)
def one_thread():
    """Bit-for-bit logits need the same summation order on both sides: transformers runs the loaded
    fused experts through other kernels than our per-expert linears, which agree exactly on one
    thread but not always on several (docs/export.md)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _quantized(arch, quant, dtype=torch.float32, gptq=None, cfg=None):
    model, tok = outlier_model(arch, dtype)
    calib, x = tiny_data(tok)
    quantize_model(model, get_spec(model), calib, quant, cfg or DuQuantConfig.rtn(), seed=0, gptq=gptq)
    return model, tok, x


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


# Families whose loaded checkpoint runs transformers' fused-expert kernels (3-D expert tensors).
FUSED = {"mixtral", "olmoe", "qwen2_moe", "qwen3_moe"}


def _assert_same_logits(loaded, model, x, arch):
    """Bit for bit, except through transformers' fused-expert kernels: they sum in another order than
    our per-expert linears, which agrees exactly on one thread on some CPUs but not on others
    (docs/export.md); there the logits agree to 1e-5."""
    a, b = _logits(loaded, x), _logits(model, x)
    if arch in FUSED:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(a, b)


def _export_and_load(model, tok, path):
    info = export.export_compressed_tensors(model, tok, path, {"test": True})
    return info, AutoModelForCausalLM.from_pretrained(path).eval()


def _without_lost_parts(model, path):
    """The in-memory model with what `path`'s export lists as lost undone: inputs of linears outside
    the config groups (routers, fused experts) in full precision, activation clip ratio 1, no KV quantization."""
    config = json.loads((Path(path) / "config.json").read_text())["quantization_config"]
    ignored = set(config["ignore"])
    experts = export.fused_expert_names(model, get_spec(model))
    decoded = set(json.loads((Path(path) / export.INFO).read_text())["decoded_linears"])
    for name, m in model.named_modules():
        if isinstance(m, QLinear):
            if name in experts or name in ignored or name in decoded:
                m.act_quant = ActQuantizer(16)
            elif m.act_quant.bits < 16:
                m.act_quant = ActQuantizer(m.act_quant.bits, m.act_quant.sym, 1.0, m.act_quant.with_zero)
    if model.config._attn_implementation == kvquant.IMPLEMENTATION:
        model.set_attn_implementation("sdpa")
    return model


def _module_names(path):
    with safe_open(str(Path(path) / "model.safetensors"), "pt") as f:
        return {k.rpartition(".")[0] for k in f.keys()}


@pytest.mark.parametrize("arch", MOE_ARCHS + ["llama"])
def test_weight_only_export_reproduces_the_logits_bit_for_bit(arch, tmp_path):
    model, tok, x = _quantized(arch, QuantConfig(4, 16, **EXACT))
    info, loaded = _export_and_load(model, tok, tmp_path / "ct")
    assert info["lost"] == []
    _assert_same_logits(loaded, model, x, arch)
    # Names as transformers' own save_pretrained writes them (per expert, the hub's spelling).
    fp, _ = tiny_model(arch)
    fp.save_pretrained(tmp_path / "fp")
    assert _module_names(tmp_path / "ct") == _module_names(tmp_path / "fp")


@pytest.mark.parametrize("arch, quant, group_size", [
    ("mixtral", QuantConfig(3, 16, **EXACT), 16),
    ("deepseek", QuantConfig(3, 16, **EXACT), 16),
    ("qwen3_moe", QuantConfig(8, 16, w_sym=True, **EXACT), None),
    ("llama", QuantConfig(8, 16, **EXACT), 32),
])
def test_gptq_per_group_and_8_bit_exports_reproduce_the_logits_bit_for_bit(arch, quant, group_size, tmp_path):
    gptq = GPTQConfig(group_size=group_size, min_tokens=1)
    model, tok, x = _quantized(arch, quant, gptq=gptq)
    info, loaded = _export_and_load(model, tok, tmp_path / "ct")
    assert info["lost"] == []
    _assert_same_logits(loaded, model, x, arch)
    groups = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["config_groups"]
    assert {g["weights"]["group_size"] for g in groups.values()} == {group_size}


def test_bfloat16_export_reproduces_the_logits_bit_for_bit_once_cast(tmp_path):
    """transformers 5.23 leaves decompressed fused experts in the scales' float32 (docs/export.md); their
    parameters cast to the model dtype (buffers such as RoPE's stay as they are) hold exactly the toolkit's
    bfloat16 weights."""
    model, tok, x = _quantized("olmoe", QuantConfig(4, 16, **EXACT), torch.bfloat16)
    _, loaded = _export_and_load(model, tok, tmp_path / "ct")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16, torch.float32}
    for p in loaded.parameters():
        p.data = p.data.to(torch.bfloat16)
    _assert_same_logits(loaded, model, x, "olmoe")


def _inputs(model, x) -> dict:
    """The input of every QLinear of `model` in one forward over `x`."""
    seen, hooks = {}, []

    def keep(name):
        def hook(module, args, out):
            seen.setdefault(name, args[0])
        return hook

    for name, m in model.named_modules():
        if isinstance(m, QLinear):
            hooks.append(m.register_forward_hook(keep(name)))
    _logits(model, x)
    for h in hooks:
        h.remove()
    return seen


def _code_flips(model, loaded, x) -> tuple[int, int]:
    """(elements whose quantized input differs, all elements) over every input-quantized linear, with
    compressed-tensors' own quantizer on the loaded modules and ours on the in-memory ones; each
    differing element is asserted to be one quantization step off."""
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    flips = total = 0
    for name, inp in _inputs(model, x).items():
        ours = model.get_submodule(name).act_quant
        scheme = getattr(loaded.get_submodule(name), "quantization_scheme", None) if ours.bits < 16 else None
        if scheme is None:
            continue
        a, b = ours(inp), forward_quantize(loaded.get_submodule(name), inp, "input", scheme.input_activations)
        step = (inp.amax(-1, keepdim=True).clamp(min=0) - inp.amin(-1, keepdim=True).clamp(max=0)) / (2**ours.bits - 1)
        assert bool(((a - b).abs() <= 1.01 * step).all())
        flips, total = flips + int((a != b).sum()), total + a.numel()
    return flips, total


@pytest.mark.parametrize("arch, quant, fused", [
    ("mixtral", QuantConfig(8, 8, w_sym=True, **EXACT), True),
    ("qwen2_moe", QuantConfig(4, 4, **EXACT), True),
    ("deepseek", QuantConfig(4, 8, **EXACT), False),
    ("llama", QuantConfig(8, 8, **EXACT), False),
])
def test_activation_quantized_export_matches_the_model_less_its_listed_losses(arch, quant, fused, tmp_path):
    """Weights bit for bit; inputs quantized alike but for elements within float rounding of a code
    boundary (compressed-tensors rounds x/s + z, the toolkit x/s then adds z): at most 1 in 10^4 of them,
    one step apart; logits within 5% of their range, the same top-1 token for at least 98% of positions."""
    model, tok, x = _quantized(arch, quant)
    info, loaded = _export_and_load(model, tok, tmp_path / "ct")
    assert any("expert linears" in line for line in info["lost"]) == fused
    assert len(info["lost"]) == int(fused)
    out = _logits(loaded, x)  # decompresses the weights
    ref = _without_lost_parts(model, tmp_path / "ct")
    loaded_weights = dict(loaded.named_parameters())
    for name, m in ref.named_modules():
        if isinstance(m, QLinear) and f"{name}.weight" in loaded_weights:
            assert torch.equal(loaded_weights[f"{name}.weight"], m.inner.weight), name
    flips, total = _code_flips(ref, loaded, x)
    assert total > 0 and flips <= 1e-4 * total
    expected = _logits(ref, x)
    assert (out - expected).abs().max() <= 0.05 * expected.abs().max()
    assert (out.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.98


def test_default_w4a4_rtn_export_lists_exactly_what_it_drops(tmp_path):
    """Router at 8 bits, activation clip 0.9, 4-bit KV: each is named, and undoing just those in the
    in-memory model gives the exported logits."""
    model, tok, x = _quantized("mixtral", QuantConfig(4, 4))
    info, loaded = _export_and_load(model, tok, tmp_path / "ct")
    kinds = ["expert linears", "routers", "clip ratio (--lac 0.9)", "KV-cache"]
    assert [next(k for k in kinds if k in line) for line in info["lost"]] == kinds
    before = _logits(model, x)
    ref = _without_lost_parts(model, tmp_path / "ct")
    out, expected = _logits(loaded, x), _logits(ref, x)
    flips, total = _code_flips(ref, loaded, x)
    assert total > 0 and flips <= 1e-4 * total
    assert (out - expected).abs().max() <= 0.05 * expected.abs().max()
    assert (out - before).abs().max() > (out - expected).abs().max()


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_smoothing_folded_into_v_proj_exports_where_attention_has_one_value_head_per_query_head(kv_heads, tmp_path):
    """SmoothQuant-style DuQuant (no rotations) folds every smoothing into a norm, up_proj or v_proj on
    multi-head attention, so it exports as a plain compressed-tensors checkpoint; with grouped-query
    attention o_proj's stays online, so it exports with the online modeling file (tests/test_export_transforms.py)."""
    model, tok = tiny_model("llama", num_key_value_heads=kv_heads)
    calib, x = tiny_data(tok)
    smooth_only = DuQuantConfig(rotate=False, permute=False, o_smooth="fold_v")
    quantize_model(model, get_spec(model), calib, QuantConfig(8, 8, **EXACT), smooth_only, seed=0)
    info = export.export_compressed_tensors(model, tok, tmp_path / "ct", {})
    assert info["online"] == (kv_heads == 2)
    if kv_heads == 2:
        return
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct").eval()
    flips, total = _code_flips(model, loaded, x)
    assert info["lost"] == [] and total > 0 and flips <= 1e-4 * total
    out, expected = _logits(loaded, x), _logits(model, x)
    assert (out - expected).abs().max() <= 0.05 * expected.abs().max()


def test_refusals_name_the_problem_and_write_nothing(tmp_path):
    duq, tok, _ = _quantized("deepseek", QuantConfig(4, 4, **EXACT), cfg=DuQuantConfig(block_size=32, max_rotation_step=4))
    with pytest.raises(export.ExportError, match="DeepseekMoeForCausalLM is not a transformers class"):
        export.export_compressed_tensors(duq, tok, tmp_path / "a", {})
    grouped, _, _ = _quantized("llama", QuantConfig(4, 16, **EXACT), gptq=GPTQConfig(act_order=True, group_size=16,
                                                                                       min_tokens=1))
    with pytest.raises(export.ExportError, match="act_order"):
        export.export_compressed_tensors(grouped, tok, tmp_path / "b", {})
    w8, _, _ = _quantized("mixtral", QuantConfig(8, 16, **EXACT))
    with pytest.raises(export.ExportError, match="8-bit asymmetric"):
        export.export_compressed_tensors(w8, tok, tmp_path / "c", {})
    fp, _ = tiny_model("llama")
    with pytest.raises(export.ExportError, match="nothing in the model is quantized"):
        export.export_compressed_tensors(fp, tok, tmp_path / "d", {})
    (tmp_path / "mine").mkdir()
    with pytest.raises(export.ExportError, match="not an earlier export"):
        export.export_compressed_tensors(w8, tok, tmp_path / "mine", {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_export_of_a_loaded_model_equals_the_export_after_quantizing(tmp_path):
    model, tok, x = _quantized("qwen2_moe", QuantConfig(4, 16, **EXACT))
    export.export_compressed_tensors(model, tok, tmp_path / "direct", {})
    save_quantized(model, tok, tmp_path / "saved", {})
    loaded, tok2, _ = load_quantized(tmp_path / "saved")
    export.export_compressed_tensors(loaded, tok2, tmp_path / "via_load", {})
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "direct" / name).read_bytes() == (tmp_path / "via_load" / name).read_bytes()


CLI = ["--model", "tiny-llama", "--nsamples", "2", "--seqlen", "64", "--eval_ppl", "", "--no-compare_fp"]


def test_cli_exports_after_quantizing_and_after_load_alike(tmp_path, capsys):
    ct, again = tmp_path / "ct", tmp_path / "ct_loaded"
    assert main.main([*CLI, "--model", "tiny-mixtral", "--method", "rtn", "--wbits", "4", "--abits", "16",
                      "--output_dir", str(tmp_path / "r"),
                      "--save_dir", str(tmp_path / "saved"), "--export", "compressed-tensors", str(ct)]) == 0
    assert main.main(["--load", str(tmp_path / "saved"), "--eval_ppl", "", "--output_dir", str(tmp_path / "r2"),
                      "--export", "compressed-tensors", str(again)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("warning: the compressed-tensors export does not keep the 8-bit input quantization") == 2
    assert (ct / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()
    result = json.loads((tmp_path / "r2" / "results.json").read_text())
    assert result["exported"]["dir"] == str(again) and result["exported"]["lost"]


def test_streamed_model_exports_the_same_checkpoint(tmp_path):
    fp, tok = tiny_model("qwen3_moe")
    fp.save_pretrained(tmp_path / "fp")
    tok.save_pretrained(tmp_path / "fp")
    run = [*CLI, "--model", str(tmp_path / "fp"), "--method", "rtn", "--wbits", "4", "--abits", "16"]
    for name, extra in (("streamed", ["--stream"]), ("in_memory", [])):
        assert main.main([*run, *extra, "--output_dir", str(tmp_path / f"r_{name}"),
                          "--export", "compressed-tensors", str(tmp_path / name)]) == 0
    assert (tmp_path / "streamed" / "model.safetensors").read_bytes() == \
        (tmp_path / "in_memory" / "model.safetensors").read_bytes()


def test_cli_refuses_an_inexpressible_export_before_quantizing(tmp_path, capsys):
    out = tmp_path / "results"
    assert main.main([*CLI, "--model", "tiny-deepseek", "--method", "duquant", "--output_dir", str(out),
                      "--export", "compressed-tensors", str(tmp_path / "ct")]) == 2
    assert "error: DeepseekMoeForCausalLM is not a transformers class" in capsys.readouterr().err
    assert main.main([*CLI, "--method", "rtn", "--export", "gguf", str(tmp_path / "ct")]) == 2
    assert "error: --export format 'gguf' is unknown" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def mixtral_export(tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "ct"
    model, tok, _ = _quantized("mixtral", QuantConfig(4, 16, **EXACT))
    export.export_compressed_tensors(model, tok, path, {})
    return path, model, tok


def test_lm_eval_scores_an_export_as_the_toolkit_scores_the_model(mixtral_export):
    """What the CLI below does, in-process and without indexing lm-eval's own task catalogue: lm-eval
    builds the model itself from the directory (transformers + compressed-tensors); the scores equal
    the toolkit's own lm-eval run on the in-memory model."""
    from lm_eval import simple_evaluate

    from duquant.zeroshot import evaluate_tasks, task_manager

    path, model, tok = mixtral_export
    out = simple_evaluate(model="hf", model_args=f"pretrained={path}", tasks=["arc_easy"], limit=20,
                          device="cpu", task_manager=task_manager(), bootstrap_iters=0)
    ours = evaluate_tasks(model, tok, ["arc_easy"], 20, 1, "cpu")["arc_easy"]
    for metric in ("acc,none", "acc_norm,none"):
        assert out["results"]["arc_easy"][metric] == ours[metric]


@pytest.mark.skipif(not os.environ.get("DUQUANT_SLOW_TESTS"), reason="about 30 s (lm-eval's CLI indexes its whole "
                    "task catalogue first); set DUQUANT_SLOW_TESTS=1 to run it")
def test_lm_eval_cli_scores_an_export_offline(mixtral_export, tmp_path):
    path = mixtral_export[0]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={path}",
           "--include_path", str(ROOT / "data" / "tasks" / "lm_eval"), "--tasks", "arc_easy", "--limit", "20",
           "--device", "cpu", "--output_path", str(tmp_path / "eval")]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(next((tmp_path / "eval").rglob("results_*.json")).read_text())["results"]["arc_easy"]
    assert 0.0 <= results["acc,none"] <= 1.0 and results["alias"] == "arc_easy"
