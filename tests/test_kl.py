"""KL to FP and top-1 agreement (duquant/evaluate.py): zero when nothing is quantized, equal to a
direct full-logits computation, and computed without memory that grows with the FP logits."""
import json
import tempfile
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import main
from duquant.config import DuQuantConfig, QuantConfig
from duquant.data import calibration_segments, ppl_segments
from duquant.evaluate import FPStates, divergence_from_fp, perplexity
from duquant.layerwise import head_on, windows
from duquant.pipeline import quantize_model
from models import get_spec
from models.tiny import tiny_model

FAST = ["--nsamples", "2", "--seqlen", "64", "--ppl_samples", "3", "--block_size", "32", "--max_rotation_step", "8",
        "--rotation_tokens", "64"]


def _main(tmp_path, capsys, *argv):
    assert main.main(["--model", "tiny-mixtral", *FAST, "--output_dir", str(tmp_path), *argv]) == 0
    return json.loads((tmp_path / "results.json").read_text()), capsys.readouterr().out


def test_nothing_quantized_gives_zero_kl_and_full_agreement(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    res, out = _main(tmp_path / "out", capsys, "--method", "duquant", "--wbits", "16", "--abits", "16", "--kv_bits", "16",
                     "--router_wbits", "16", "--router_abits", "16", "--eval_ppl", "wikitext2,c4")
    assert set(res["kl_fp"]) == {"wikitext2", "c4"}
    for kl in res["kl_fp"].values():
        assert abs(kl["mean"]) < 1e-6 and abs(kl["p99"]) < 1e-5
        assert kl["top1_agreement"] == 1.0 and kl["tokens"] == 3 * 63
    assert "KL to FP" in out and "top-1 agreement" in out
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the FP states' folder is gone


def test_a_run_failing_after_the_fp_pass_leaves_no_states(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    argv = ["--model", "tiny-mixtral", *FAST, "--method", "rtn", "--eval_ppl", "wikitext2", "--plots",
            "--plot_layer", "5", "--output_dir", str(tmp_path / "out")]
    assert main.main(argv) == 2
    assert "FP wikitext2" in capsys.readouterr().err  # the FP pass ran before the error
    assert list(tmp_path.iterdir()) == []


def test_quantized_run_records_kl_and_fp_runs_record_none(tmp_path, capsys):
    res, out = _main(tmp_path / "q", capsys, "--method", "rtn", "--wbits", "3", "--abits", "4", "--eval_ppl", "wikitext2")
    kl = res["kl_fp"]["wikitext2"]
    assert kl["mean"] > 1e-3 and kl["p99"] > kl["mean"] and 0 < kl["top1_agreement"] < 1
    for argv in (["--method", "fp"], ["--method", "rtn", "--no-compare_fp"]):
        res, out = _main(tmp_path / argv[1], capsys, *argv, "--eval_ppl", "wikitext2")
        assert res["kl_fp"] == {} and "KL to FP" not in out


def test_fp_reference_is_reused_with_identical_figures_and_rebuilt_when_the_windows_change(tmp_path, capsys):
    ref = tmp_path / "ref"
    argv = ["--method", "rtn", "--wbits", "3", "--abits", "4", "--eval_ppl", "wikitext2", "--tasks", "arc_easy",
            "--limit", "4"]
    plain, _ = _main(tmp_path / "plain", capsys, *argv)
    first, _ = _main(tmp_path / "first", capsys, *argv, "--fp_reference", str(ref))
    second, out = _main(tmp_path / "second", capsys, *argv, "--fp_reference", str(ref))
    assert "FP evaluation read from" in out and "eval_fp" in first["timings"] and "eval_fp" not in second["timings"]
    assert first["fp_reference"] == second["fp_reference"] and len(list(ref.iterdir())) == 1
    for res in (first, second):
        assert res["ppl_fp"] == plain["ppl_fp"] and res["tasks_fp"] == plain["tasks_fp"]
        assert res["kl_fp"] == plain["kl_fp"] and res["ppl"] == plain["ppl"]
    other, out = _main(tmp_path / "other", capsys, *argv, "--ppl_samples", "2", "--fp_reference", str(ref))
    assert "FP evaluation read from" not in out and len(list(ref.iterdir())) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stored_states_reproduce_the_fp_logits_bit_for_bit(tmp_path, dtype):
    model, tok = tiny_model("mixtral", dtype=dtype)
    spec, seg = get_spec(model), ppl_segments("wikitext2", tok, 64, 3)
    states = FPStates(["wikitext2"], tmp_path)
    fp_ppl = perplexity(model, spec, seg, batch_size=2, keep=states.sets["wikitext2"])
    ppl, kl = divergence_from_fp(model, spec, seg, states.sets["wikitext2"], batch_size=2)
    assert ppl == fp_ppl and kl["mean"] == 0.0 and kl["p99"] == 0.0 and kl["top1_agreement"] == 1.0
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1
    with pytest.raises(RuntimeError, match="LM head changed"):
        divergence_from_fp(model, spec, seg, states.sets["wikitext2"], batch_size=2)
    states.close()


def _direct_kl(fp_logits: torch.Tensor, q_logits: torch.Tensor):
    """Per token, the next-token predictions 0..seqlen-2 of every window, from whole-model logits."""
    fp, q = fp_logits[:, :-1].flatten(0, 1), q_logits[:, :-1].flatten(0, 1)
    kl = F.kl_div(q.log_softmax(-1), fp.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    return kl, (fp.argmax(-1) == q.argmax(-1)).double().mean().item()


def test_kl_matches_a_direct_computation(tmp_path):
    model, tok = tiny_model("mixtral")
    spec = get_spec(model)
    seg = ppl_segments("wikitext2", tok, 64, 4)
    with torch.no_grad():
        fp_logits = model(seg).logits
    states = FPStates(["wikitext2"], tmp_path)
    perplexity(model, spec, seg, batch_size=2, keep=states.sets["wikitext2"])
    quantize_model(model, spec, calibration_segments("c4", tok, 2, 64, 0), QuantConfig(4, 4),
                   DuQuantConfig(block_size=32, max_rotation_step=8), seed=0)
    with torch.no_grad():
        q_logits = model(seg).logits
    ppl, ours = divergence_from_fp(model, spec, seg, states.sets["wikitext2"], batch_size=2)
    states.close()
    kl, agreement = _direct_kl(fp_logits, q_logits)
    assert kl.mean().item() > 1e-3  # a real quantization
    assert abs(ours["mean"] - kl.mean().item()) < 1e-4 * kl.mean().item()
    assert abs(ours["p99"] - float(np.percentile(kl.numpy(), 99))) < 1e-4 * ours["p99"]
    assert abs(ours["top1_agreement"] - agreement) <= 1 / kl.numel() and ours["tokens"] == kl.numel()
    assert ppl == perplexity(model, spec, seg, batch_size=2)  # the same perplexity as without the comparison
    assert not states.folder.exists()


class _PeakTensorBytes(TorchDispatchMode):
    """Peak bytes of the storages that tensors produced by torch ops keep alive, a storage counted
    until the last tensor (or view) produced on it is freed."""

    def __init__(self):
        super().__init__()
        self.refs: dict[int, list[int]] = {}  # data_ptr -> [tensors alive, bytes]
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes():
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        key = t.untyped_storage().data_ptr()
        entry = self.refs.setdefault(key, [0, t.untyped_storage().nbytes()])
        if entry[0] == 0:
            self.now += entry[1]
            self.peak = max(self.peak, self.now)
        entry[0] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self.refs[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.now -= entry[1]
            del self.refs[key]


def _peak_bytes(fn) -> int:
    with _PeakTensorBytes() as meter:
        fn()
    return meter.peak


def _kept_logits(model, spec, seg):
    """What the comparison must not do: hold every window's logits at once (the meter's control)."""
    hidden = [seg.new_zeros(seg.shape[0], seg.shape[1], model.config.hidden_size, dtype=torch.float32)]
    with head_on(model, spec, torch.device("cpu")) as logits_of:
        return [logits_of(h) for h in windows(hidden)]


def test_memory_does_not_grow_with_the_fp_logits(tmp_path):
    model, tok = tiny_model("mixtral")
    spec = get_spec(model)
    seqlen, vocab, hidden = 128, model.config.vocab_size, model.config.hidden_size
    quantize_model(model, spec, calibration_segments("c4", tok, 2, seqlen, 0), QuantConfig(4, 4),
                   DuQuantConfig.rtn(), seed=0)
    peaks, file_bytes = {}, {}
    for n in (2, 8):
        seg = ppl_segments("wikitext2", tok, seqlen, n)
        assert seg.shape[0] == n
        states = FPStates(["w"], tmp_path)
        perplexity(model, spec, seg, batch_size=2, keep=states.sets["w"])
        file_bytes[n] = states.sets["w"].path.stat().st_size
        peaks[n] = _peak_bytes(lambda: divergence_from_fp(model, spec, seg, states.sets["w"], batch_size=2))
        states.close()
    logits_bytes = seqlen * vocab * 4  # one window's fp32 logits
    assert file_bytes == {n: n * seqlen * hidden * 4 for n in (2, 8)}  # hidden floats per token on disk, not vocab
    assert peaks[8] - peaks[2] < logits_bytes  # six more windows' FP logits would add 6 x logits_bytes
    seg2, seg8 = (ppl_segments("wikitext2", tok, seqlen, n) for n in (2, 8))
    kept = _peak_bytes(lambda: _kept_logits(model, spec, seg8)) - _peak_bytes(lambda: _kept_logits(model, spec, seg2))
    assert kept >= 6 * logits_bytes  # the meter sees retained logits


def test_claims_say_whether_seed_ranges_are_apart():
    from bench.tables import claims_table

    runs = {"rtn-w4a4": [_run_result(12.0, 0.10, 0.5)],
            "duquant-w4a4": [_run_result(11.0, 0.02, 0.9), _run_result(11.2, 0.04, 0.8)],
            "eaquant-w4a4": [_run_result(10.8, 0.01, 0.9), _run_result(10.9, 0.015, 0.9)],
            "sa-w4a4": [_run_result(11.1, 0.03, 0.9), _run_result(10.8)],  # one run without KL
            "ra-w4a4": [_run_result(11.1, 0.03, 0.9), _run_result(11.3, 0.05, 0.9)]}
    lines = claims_table(runs)
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:-1]] for r in lines[4:-1]}
    assert rows["DuQuant vs RTN W4A4"] == ["2 vs 1", "-0.0700 lower", "-0.90 lower"]
    assert rows["EAQuant vs DuQuant W4A4"] == ["2 vs 2", "-0.0175 lower", "-0.25 lower"]
    assert rows["router_align vs DuQuant W4A4"] == ["2 vs 2", "+0.0100 within", "+0.10 within"]
    assert rows["smooth_aggregate vs DuQuant W4A4"] == ["2 vs 2", "-", "-0.15 within"]
    assert "calib_balance vs DuQuant W4A4" not in rows  # no runs, no row


def test_tables_whose_runs_all_stand_earlier_are_left_out(tmp_path):
    import json

    from bench.tables import model_section

    for name, ppl in (("duquant-w4a4-s0", 11.0), ("sa-w4a4-s0", 10.9)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(_run_result(ppl, 0.02, 0.9)))
    titles = [line for line in model_section(tmp_path).splitlines() if line.startswith("#### ")]
    assert titles[:2] == ["#### Table 1: W4A4, router W8A8", "#### Table 3 at W4A4 (not in the paper)"]
    assert not any("Table 4" in t for t in titles)  # its DuQuant and maximum rows are Table 3's


def _run_result(ppl: float, kl: float | None = None, top1: float | None = None) -> dict:
    res = {"ppl": {"wikitext2": ppl}, "timings": {}}
    if kl is not None:
        res["kl_fp"] = {"wikitext2": {"mean": kl, "p99": 4 * kl, "top1_agreement": top1, "tokens": 100}}
    return res


def test_tables_carry_kl_and_agreement_over_seeds():
    from bench.tables import TABLES, ppl_table

    runs = {"fp": [_run_result(10.0)],
            "duquant-w4a4": [_run_result(11.0, 0.02, 0.90), _run_result(11.2, 0.04, 0.80)],
            "eaquant-w4a4": [_run_result(10.9, 0.01, 0.95), _run_result(11.1)]}  # the second from an older run
    lines = ppl_table(TABLES[0], runs)
    head = [c.strip() for c in lines[2].split("|")[1:-1]]
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[1:-1]] for r in lines[4:-1]}
    kl, top1 = head.index("KL wikitext2"), head.index("top-1 wikitext2 (%)")
    assert rows["FP"][kl] == "-" and rows["FP"][top1] == "-"
    assert rows["DuQuant"][kl] == "0.0300 ± 0.0141" and rows["DuQuant"][top1] == "85.00 ± 7.07"
    assert rows["EAQuant"][kl] == "0.0100 (1 of 2)" and rows["EAQuant"][top1] == "95.00 (1 of 2)"
