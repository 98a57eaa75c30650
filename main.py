"""Quantize an MoE (or dense) model and evaluate it; one run, one results.json.

    python main.py                                   # the demo: bundled Mixtral-style model, FP vs RTN vs EAQuant W4A4
    python main.py --model demo-mixtral --recipe duquant --wbits 3 --abits 4
    python main.py --model demo-olmoe --recipe eaquant,official          # the published EAQuant code's choices
    python main.py --model mistralai/Mixtral-8x7B-v0.1 --device cuda --eval_ppl wikitext2,c4
    python main.py --model demo-mixtral --recipe eaquant --save_dir q/mixtral-w4a4   # packed integers
    python main.py --load q/mixtral-w4a4 --eval_ppl wikitext2                          # no recalibration
    python main.py --help-recipes                    # every recipe, and every option --set reaches
"""
from __future__ import annotations

import copy
import json
import logging
import shutil
import signal
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

import torch

from duquant import export
from duquant.config import ConfigError, DuQuantConfig
from duquant.data import DataError, calibration_segments, ppl_segments
from duquant.diagnostics import plot_run, summarize
from duquant.evaluate import FPStates, divergence_from_fp, perplexity, reference_key
from duquant.packed import QuantizedLoadError, check_save_dir, load_quantized, save_quantized
from duquant.pipeline import Extensions, needs_calibration, quantize_model
from duquant.resume import check_readable, finished_layers
from duquant.run_info import peak_memory_mb, seed_everything, versions
from duquant.zeroshot import evaluate_tasks
from eaquant_ext.balance import balance_calibration
from eaquant_ext.cli import DTYPES, RunConfig, build_config, parse_device, saved_label
from eaquant_ext.moequant.agq import affinity_weights
from eaquant_ext.moequant.ebss import ebss_calibration
from eaquant_ext.router_align import router_quantizer
from eaquant_ext.smoothing import moe_smoothing
from models import DEFAULT_MODEL, ModelLoadError, get_spec, load_model, resolve_model_name
from models.spec import config_value
from models.files import (PathError, check_output_dir, describe, remove_stale_temporaries, write_dir_atomically,
                          write_file_atomically)

# `python main.py` with no arguments: sizes chosen to finish in minutes on 2 CPU cores; Gutenberg is
# the zoo models' own held-out text, and the RTN baseline shows what the method recovers.
DEMO_ARGS = ["--model", DEFAULT_MODEL, "--recipe", "eaquant", "--wbits", "4", "--abits", "4",
             "--nsamples", "32", "--seqlen", "512", "--rotation_tokens", "512", "--eval_ppl", "gutenberg",
             "--ppl_samples", "40", "--baseline", "rtn"]
log = logging.getLogger("main")
FP_RESULTS = "fp.json"  # the FP figures in a --fp_reference folder, beside the FP states


def extensions(run: RunConfig) -> Extensions:
    ea, mq = run.eaquant, run.moequant
    return Extensions(
        moe_smoothing=moe_smoothing(ea.smooth_aggregate, ea.smooth_aggregate_router, ea.expert_act)
        if ea.smooth_aggregate else None,
        quantize_router=router_quantizer(ea.kl_top, ea.align_grid, ea.align_rounds, ea.align_rule)
        if ea.router_align else None,
        hessian_weights=affinity_weights(mq.agq_gate, mq.agq_c) if mq.agq else None,
    )


def evaluate(model, spec, tokenizer, segments: dict, run: RunConfig, device, label: str,
             keep: FPStates | None = None, against: FPStates | None = None, tasks: bool = True) -> tuple[dict, dict, dict, dict]:
    """Perplexity on every set, then the zero-shot tasks: the same for the FP and the quantized model.
    The FP pass keeps its last-layer states in `keep`; the quantized pass compares with them (`against`)
    for each set's KL to FP and top-1 agreement (duquant/evaluate.py, docs/evaluation.md)."""
    ev = run.eval
    ppl, kl, results, times = {}, {}, {}, {}
    t = time.time()
    for name, seg in segments.items():
        desc = f"{label} {name}"
        if against is not None:
            ppl[name], kl[name] = divergence_from_fp(model, spec, seg, against.sets[name], device, ev.eval_batch_size, desc)
        else:
            ppl[name] = perplexity(model, spec, seg, device, ev.eval_batch_size, desc, keep.sets[name] if keep else None)
    times["eval"] = time.time() - t
    if ev.tasks and tasks:
        t = time.time()
        results = evaluate_tasks(model, tokenizer, list(ev.tasks), ev.limit, ev.eval_batch_size, device)
        times["tasks"] = time.time() - t
    return ppl, kl, results, times


def plot_layer(run: RunConfig, model) -> int:
    """The layer whose channel profile --plots draws (default: the middle one)."""
    n = model.config.num_hidden_layers
    layer = n // 2 if run.eval.plot_layer is None else run.eval.plot_layer
    if not 0 <= layer < n:
        raise ConfigError(f"--plot_layer {layer} is out of range; the model has layers 0..{n - 1}")
    return layer


def write_json_atomic(path: Path, obj: dict) -> None:
    write_file_atomically(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2)))


def run_loaded(run: RunConfig, out_dir: Path) -> dict:
    """Evaluate a saved quantized model: its own config decides the method and bits."""
    device = parse_device(run.device)
    t = time.time()
    model, tokenizer, saved = load_quantized(Path(run.output.load))
    timings = {"load": time.time() - t}
    saved_label(saved, Path(run.output.load), run.given_bits)
    cfg = saved["run"]
    if tokenizer is None:
        raise ConfigError(f"{run.output.load} holds no tokenizer; save it again with main.py --save_dir")
    spec = get_spec(model)
    run = replace(run, data=replace(run.data, seqlen=min(run.data.seqlen, getattr(model.config, "max_position_embeddings", run.data.seqlen))))
    bits = f" w{cfg['quant']['wbits']}a{cfg['quant']['abits']}" if cfg.get("quant") else ""
    print(f"loaded {run.output.load} ({cfg['method']}{bits}) in {timings['load']:.1f} s; "
          f"eval {','.join(run.eval.eval_ppl) or 'none'} (windows {run.eval.ppl_samples or 'all'}), device {device}")
    segments = {name: ppl_segments(name, tokenizer, run.data.seqlen, run.eval.ppl_samples) for name in run.eval.eval_ppl}
    result = {"model": cfg["model"], "method": cfg["method"], "seed": cfg.get("seed"), "loaded_from": run.output.load,
              "config": cfg, "eval": asdict(run.eval), "ppl_fp": {}, "kl_fp": {}, "tasks_fp": {}, "timings": timings}
    if run.output.export is not None:
        result["exported"] = export_model(run, model, tokenizer, cfg)
    result["ppl"], _, result["tasks"], times = evaluate(model, spec, tokenizer, segments, run, device, cfg["method"])
    timings.update(times)
    result["peak_memory_mb"] = peak_memory_mb(device)
    result["versions"] = versions()
    write_json_atomic(out_dir / "results.json", result)
    print_summary(result, out_dir)
    return result


def export_model(run: RunConfig, model, tokenizer, run_config: dict) -> dict:
    """--export: write the model, and say on one line each what the export could not keep."""
    fmt, out = run.output.export[0], Path(run.output.export[1])
    info = export.export_compressed_tensors(model, tokenizer, out, run_config)
    for line in info["lost"]:
        print(f"warning: the {fmt} export does not keep {line}")
    print(f"exported {out} ({fmt}): {info['total_bytes'] / 2**20:.1f} MiB"
          + (f", {info['decoded_linears']} linears as decoded weights" if info["decoded_linears"] else ""))
    return {"format": fmt, "dir": str(out), **info}


def execute(run: RunConfig) -> dict:
    """Check every path, then run; a run refused or failing before its first finished layer leaves
    nothing behind."""
    out_dir = Path(run.output.output_dir)
    if run.output.load is not None:
        check_output_dir(out_dir, "--output_dir")
        with cleaned_up_on_failure(out_dir, run):
            return run_loaded(run, out_dir)
    if run.output.export is not None:
        export.check_request(run.output.export[0], Path(run.output.export[1]))
        export.check_configs(run.base_method != "fp", run.duquant or DuQuantConfig.rtn(), run.gptq)
    if run.output.save_dir is not None:
        check_save_dir(Path(run.output.save_dir))  # before the quantization it would otherwise waste
    check_paths(run, out_dir)
    with cleaned_up_on_failure(out_dir, run):
        return quantize_and_evaluate(run, out_dir)


def load_for_run(run: RunConfig) -> tuple:
    """The model, with the run's checks that need it; returns (run, model, tokenizer, spec, device,
    timings), `run` with the seqlen capped at the model's positions."""
    device = parse_device(run.device)
    dtype = DTYPES.get(run.dtype) or (torch.float32 if device.type == "cpu" else torch.bfloat16)
    t = time.time()
    model, tokenizer = load_model(run.model, dtype, stream=run.output.stream, spill_dir=run.output.stream_dir)
    spec = get_spec(model)
    timings = {"load": time.time() - t}
    if run.output.export is not None and run.quant is not None:
        export.check_model(model, spec, run.quant.wbits, run.quant.w_sym, run.duquant)
    max_pos = getattr(model.config, "max_position_embeddings", run.data.seqlen)
    if run.data.seqlen > max_pos:
        print(f"notice: --seqlen {run.data.seqlen} exceeds the model's {max_pos} positions; using {max_pos}")
        run = replace(run, data=replace(run.data, seqlen=max_pos))
    reason = spec.kv_quant_unsupported
    if reason and run.quant is not None and run.quant.kv_bits < 16 and not run.kv_bits_given:
        print(f"notice: KV cache left at 16 bits for {type(model).__name__} ({reason})")
        run = replace(run, quant=replace(run.quant, kv_bits=16))
    check_model_support(run, model, spec)
    return run, model, tokenizer, spec, device, timings


def check_model_support(run: RunConfig, model, spec) -> None:
    name = f"{run.model} ({type(model).__name__})"
    if (run.data.route_all_tokens or run.eaquant.any) and spec.router is None:
        option = "--route_all_tokens" if run.data.route_all_tokens else "EAQuant options (--recipe eaquant and its components)"
        raise ConfigError(f"{option} require an MoE model, but {name} has no MoE layers")
    if run.moequant.any and spec.router is None:
        raise ConfigError(f"MoEQuant options (--recipe moequant, --agq, --ebss) require an MoE model, but {name} has no MoE layers")
    reason = spec.kv_quant_unsupported
    if run.quant is not None and run.quant.kv_bits < 16 and reason:
        raise ConfigError(f"--kv_bits {run.quant.kv_bits}: {reason}; pass --kv_bits 16 for {name}")


def describe_run(run: RunConfig, model, ext: Extensions) -> str:
    q = run.quant
    bits = "" if q is None else f" {q.tag} (kv {q.kv_bits}, router w{q.router_wbits}a{q.router_abits})"
    calib = "" if q is None else f", calibration {run.data.nsamples} x {run.data.seqlen} from " + (
        "EBSS" if run.moequant.ebss else run.data.calib_dataset)
    if q is not None and not needs_calibration(q, run.duquant, run.gptq, ext):
        calib = ", data-free (no calibration)"
    return (f"model {run.model} ({type(model).__name__}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params), "
            f"method {run.method}{bits}{calib}, eval {','.join(run.eval.eval_ppl) or 'none'} "
            f"(windows {run.eval.ppl_samples or 'all'}), device {run.device}")


def model_top_k(spec, config) -> int | None:
    """Experts per token (the largest, where a family sets it per layer); None for a dense model."""
    if spec.router is None:
        return None
    value = config_value(config, spec.top_k_attr)
    return max(value) if isinstance(value, (list, tuple)) else value


def calibration_data(run: RunConfig, model, spec, tokenizer, device, ext: Extensions, result: dict):
    """(calibration ids or None, expert-only extra ids or None): EBSS or the named set, then EAQuant's
    balancing; nothing is read when no step of the method uses calibration data."""
    d, mq, ea = run.data, run.moequant, run.eaquant
    if not needs_calibration(run.quant, run.duquant, run.gptq, ext):
        return None, None
    if mq.ebss:
        calib, result["ebss"] = ebss_calibration(model, spec, tokenizer, run.model, d.nsamples, d.seqlen,
                                                 mq.ebss_tau, mq.ebss_width, run.seed, device, mq.ebss_cache_dir)
        e = result["ebss"]
        print(f"EBSS calibration ({'cached ' if e['cached'] else ''}{e['cache']}): expert-balance std "
              f"{e['balance_std']:.4f}, mean NLL {e['mean_nll']:.3f}")
    else:
        calib = calibration_segments(d.calib_dataset, tokenizer, d.nsamples, d.seqlen, run.seed)
    if not ea.extra_sequences:
        return calib, None
    cap = d.nsamples if ea.balance_max_extra is None else ea.balance_max_extra
    pool = calibration_segments(ea.balance_dataset, tokenizer, 2 * cap, d.seqlen, run.seed + 1)
    extra, result["calib_balance"] = balance_calibration(
        model, spec, calib, pool, model_top_k(spec, model.config), ea.balance_ratio, cap, device)
    b = result["calib_balance"]
    print(f"calibration balance: {b['starved_before']} starved (layer, expert) pairs under {b['threshold']:.0f} "
          f"tokens -> {b['starved_after']} after adding {b['added_sequences']} sequences"
          + ("" if b["stop"] == "passed" else f" ({b['stop']})"))
    return calib, extra


def quantize_step(run: RunConfig, model, spec, tokenizer, device, ext: Extensions, out_dir: Path, result: dict) -> None:
    """Calibration data, the layer-wise quantization, and what it reports into `result`."""
    timings = result["timings"]
    t = time.time()
    calib, extra = calibration_data(run, model, spec, tokenizer, device, ext, result)
    timings["calibration_data"] = time.time() - t
    profile_layer = plot_layer(run, model) if run.eval.plots else None
    partial = checkpoint_dir(out_dir, run.fingerprint(), run.output.resume)
    report = quantize_model(model, spec, calib, run.quant, run.duquant, ext, device=device, seed=run.seed,
                            route_all=run.data.route_all_tokens, expert_extra_ids=extra, gptq=run.gptq,
                            profile_layer=profile_layer, checkpoint_dir=partial, expert_fill_ratio=run.eaquant.fill_ratio,
                            replay_attention=run.output.replay_attention)
    if report.resumed_from:
        print(f"resumed: layers 0..{report.resumed_from - 1} restored from {partial}")
        result["resumed_from_layer"] = report.resumed_from
    timings["quantize"] = report.timings.pop("total")
    timings.update({f"quantize_{k}": v for k, v in report.timings.items()})
    result["layers"] = report.layers
    result["router"], result["experts"] = summarize(report.layers, model_top_k(spec, model.config))
    profiles = [r.pop("channel_absmax") for r in report.layers if "channel_absmax" in r]
    if profiles:
        result["channel_absmax"] = {"layer": profile_layer, "sites": profiles[0]}
    result["expert_tokens"] = {str(r["layer"]): r["expert_tokens"] for r in report.layers if "expert_tokens" in r}


def save_step(run: RunConfig, model, tokenizer, result: dict) -> None:
    saved_config = result["config"]
    if run.output.save_dir is not None:
        t = time.time()
        saved = save_quantized(model, tokenizer, run.output.save_dir, saved_config)
        result["timings"]["save"] = time.time() - t
        result["saved"] = {"dir": run.output.save_dir, **saved}
        print(f"saved {run.output.save_dir}: quantized linears {saved['quantized_linears_bytes'] / 2**20:.1f} MiB = "
              f"{saved['ratio']:.3f}x their bf16 size; directory {saved['total_bytes'] / 2**20:.1f} MiB")
    if run.output.export is not None:
        result["exported"] = export_model(run, model, tokenizer, saved_config)


def baseline_step(run: RunConfig, model, spec, tokenizer, segments: dict, fp_states, device, result: dict) -> None:
    """--baseline rtn: a copy of the FP model, round-to-nearest at the run's bits (data-free, seconds),
    evaluated on the same windows, so the table shows what the method recovers. It clips weights at
    the fixed ratio as `--recipe rtn` does, whatever clip search the method itself uses."""
    if run.eval.baseline is None or run.quant is None:
        return
    t = time.time()
    rtn = copy.deepcopy(model)
    quantize_model(rtn, spec, None, replace(run.quant, w_clip="minmax"), DuQuantConfig.rtn(), device=device, seed=run.seed)
    result["ppl_rtn"], result["kl_rtn"], _, _ = evaluate(rtn, spec, tokenizer, segments, run, device, "RTN",
                                                         against=fp_states, tasks=False)
    del rtn
    result["timings"]["baseline"] = time.time() - t


def fp_step(run: RunConfig, model, spec, tokenizer, segments: dict, device, result: dict) -> FPStates | None:
    """The FP model's perplexity, tasks and last-layer states, for the comparison with the quantized
    model. With --fp_reference DIR they are kept in DIR under a key of everything that decides them
    (`reference_key`), and a later run with the same key reads them instead of evaluating again."""
    folder = fp_reference_folder(run, model, segments, device)
    if folder is not None and (folder / FP_RESULTS).exists():
        print(f"FP evaluation read from {folder}")
    else:
        if folder is not None:
            folder.parent.mkdir(parents=True, exist_ok=True)
        states = FPStates(segments, parent=folder.parent if folder else None) if segments else None
        result["ppl_fp"], _, result["tasks_fp"], times = evaluate(model, spec, tokenizer, segments, run, device, "FP",
                                                                  keep=states)
        result["timings"].update({f"{k}_fp": v for k, v in times.items()})
        if folder is None:
            return states
        keep_fp_reference(folder, states, {"ppl": result["ppl_fp"], "tasks": result["tasks_fp"]})
        if states is not None:
            states.close()
    kept = json.loads((folder / FP_RESULTS).read_text())
    result["ppl_fp"], result["tasks_fp"], result["fp_reference"] = kept["ppl"], kept["tasks"], str(folder)
    return FPStates.kept(folder) if segments else None


def fp_reference_folder(run: RunConfig, model, segments: dict, device) -> Path | None:
    """DIR/<key> of --fp_reference DIR, or None without it."""
    if run.eval.fp_reference is None:
        return None
    settings = {"tasks": run.eval.tasks, "limit": run.eval.limit, "batch": run.eval.eval_batch_size,
                "dtype": str(next(model.parameters()).dtype), "device": str(device), **versions()}
    return Path(run.eval.fp_reference) / reference_key(model, segments, settings)


def keep_fp_reference(folder: Path, states: FPStates | None, figures: dict) -> None:
    """Move the run's FP states and figures into `folder`, whole or not at all (a folder another run
    finished meanwhile is kept: it holds the same figures)."""
    if (folder / FP_RESULTS).exists():
        return

    def fill(tmp: Path) -> None:
        if states is not None:
            states.keep()
            for f in states.folder.iterdir():
                shutil.move(str(f), tmp / f.name)
        (tmp / FP_RESULTS).write_text(json.dumps(figures, indent=1))

    write_dir_atomically(folder, fill)


def quantize_and_evaluate(run: RunConfig, out_dir: Path) -> dict:
    """Load the model, quantize it (unless --method fp), evaluate, write results.json."""
    seed_everything(run.seed)
    run, model, tokenizer, spec, device, timings = load_for_run(run)
    ext = extensions(run)
    print(describe_run(run, model, ext))
    segments = {name: ppl_segments(name, tokenizer, run.data.seqlen, run.eval.ppl_samples) for name in run.eval.eval_ppl}
    result = {"model": run.model, "method": run.method, "seed": run.seed, "config": asdict(run),
              "ppl": {}, "ppl_fp": {}, "kl_fp": {}, "tasks": {}, "tasks_fp": {}, "timings": timings}
    quantized = run.quant is not None
    fp_states = fp_step(run, model, spec, tokenizer, segments, device, result) if run.eval.compare_fp and quantized else None
    if quantized:
        baseline_step(run, model, spec, tokenizer, segments, fp_states, device, result)
        quantize_step(run, model, spec, tokenizer, device, ext, out_dir, result)
        save_step(run, model, tokenizer, result)
    result["ppl"], result["kl_fp"], result["tasks"], times = evaluate(model, spec, tokenizer, segments, run, device,
                                                                      run.method, against=fp_states)
    if fp_states is not None:
        fp_states.close()
    timings.update(times)
    result["peak_memory_mb"] = peak_memory_mb(device)
    result["versions"] = versions()
    write_json_atomic(out_dir / "results.json", result)
    if run.eval.plots:
        for path in plot_run(result, out_dir):
            print(f"plot: {path}")
    if quantized:
        shutil.rmtree(out_dir / "partial", ignore_errors=True)
    print_summary(result, out_dir)
    return result


def disk_needs(run: RunConfig) -> dict[str, int]:
    """Lower bounds of the bytes the run writes per directory option, from the local checkpoint's
    size (none for a hub id or a tiny model): the packed model (--save_dir, and the layer
    checkpoints in --output_dir with the calibration activations) and the spilled layers (--stream_dir)."""
    try:
        path = Path(resolve_model_name(run.model))
    except ModelLoadError:
        return {}
    files = [f for f in path.iterdir() if f.suffix in (".safetensors", ".bin")] if path.is_dir() else []
    if not files:
        return {}
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    stored = {"bfloat16": 2, "float16": 2}.get(config.get("dtype") or config.get("torch_dtype"), 4)
    weights = sum(f.stat().st_size for f in files) / stored  # at 4 bytes when unknown: the smallest count
    compute = 4 if run.dtype in ("auto", "float32") else 8 if run.dtype == "float64" else 2
    wbits = run.quant.wbits if run.quant is not None else 16
    packed = weights * min(wbits, 16) / 8
    activations = run.data.nsamples * run.data.seqlen * config.get("hidden_size", 0) * compute
    # Decoder layers hold over half of a model's weights; the spill keeps them at the compute dtype.
    return {"save_dir": int(packed), "output_dir": int(packed + activations) if run.quant is not None else 0,
            "stream_dir": int(weights * compute / 2)}


def check_paths(run: RunConfig, out_dir: Path) -> None:
    """Every directory the run writes, checked before any work (models/files.py: check_output_dir);
    temporaries a killed earlier save left next to --save_dir are removed."""
    needs = disk_needs(run)
    check_output_dir(out_dir, "--output_dir", needs.get("output_dir", 0))
    if run.output.save_dir is not None:
        remove_stale_temporaries(Path(run.output.save_dir))
        check_output_dir(Path(run.output.save_dir), "--save_dir", needs.get("save_dir", 0))
    if run.output.stream:
        check_output_dir(Path(run.output.stream_dir or tempfile.gettempdir()), "--stream_dir", needs.get("stream_dir", 0))
    if run.eval.fp_reference is not None:
        check_output_dir(Path(run.eval.fp_reference), "--fp_reference")


class Interrupted(Exception):
    """Ctrl-C during a run; the message says what was kept and how to resume."""


def _layers_done(partial: Path) -> int:
    try:
        return finished_layers(partial)
    except (OSError, ValueError, KeyError):
        return 0


@contextmanager
def cleaned_up_on_failure(out_dir: Path, run: RunConfig):
    """On any failure, remove what the run wrote before its first finished layer: partial/ holding no
    layer, and the output directory if this run created it and left it empty. Ctrl-C becomes
    `Interrupted`, whose message says how to resume from the layers that were kept."""
    created = not out_dir.exists()
    partial = out_dir / "partial"
    try:
        yield
    except BaseException as e:
        done = _layers_done(partial)
        if done == 0:
            shutil.rmtree(partial, ignore_errors=True)
        if created and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        if not isinstance(e, KeyboardInterrupt):
            raise
        if done == 0:
            raise Interrupted("interrupted; nothing to resume from (no layer had been quantized)") from None
        again = "the same command" if run.output.resume else "the same command without --no-resume"
        raise Interrupted(f"interrupted; rerun {again} to resume from {partial} (layers done: {done})") from None


def checkpoint_dir(out_dir: Path, fingerprint: dict, resume: bool) -> Path:
    """<out_dir>/partial, after checking that a partial run found there has the same configuration
    (`RunConfig.fingerprint`: everything but the evaluation and output options)."""
    partial = out_dir / "partial"
    saved = partial / "run.json"
    if partial.exists() and not resume:
        shutil.rmtree(partial)
    try:
        found = json.loads(saved.read_text()) if saved.exists() else None
        check_readable(partial)
    except Exception as e:  # whatever a damaged file raises
        first = (str(e).strip().splitlines() or [""])[0][:120]
        raise ConfigError(f"{partial} holds a damaged checkpoint ({type(e).__name__}: {first}); "
                          "pass --no-resume to discard it and start over") from None
    if found is not None and found != json.loads(json.dumps(fingerprint)):
        raise ConfigError(f"{out_dir} holds a partial run of another configuration; pass --no-resume to discard it, "
                          "or choose another --output_dir")
    partial.mkdir(parents=True, exist_ok=True)
    write_json_atomic(saved, fingerprint)
    return partial


def _table_row(label: str, values: list[str]) -> str:
    return f"| {label} | " + " | ".join(values) + " |"


def print_perplexity(result: dict, label: str) -> None:
    names = list(result["ppl"])
    rows = [("FP", result["ppl_fp"], {}), ("RTN", result.get("ppl_rtn") or {}, result.get("kl_rtn") or {}),
            (label, result["ppl"], result.get("kl_fp") or {})]
    kl_shown = any(kl for _, _, kl in rows)
    print("\n| " + " | ".join(["model", *(f"{n} ppl" for n in names)] + (["KL to FP", "top-1 agreement"] if kl_shown else []))
          + " |\n|---|" + "---|" * (len(names) + 2 * kl_shown))
    for name, ppl, kl in rows:
        if not ppl:
            continue
        cells = [f"{ppl[n]:.2f}" for n in names]
        if kl_shown:
            first = kl.get(names[0])
            cells += [f"{first['mean']:.4f}", f"{100 * first['top1_agreement']:.1f}%"] if first else ["-", "-"]
        print(_table_row(name, cells))
    if kl_shown:
        print(f"(lower is better; KL and top-1 agreement compare each model's next-token distribution with FP's on "
              f"{names[0]}: 0 and 100% mean identical predictions)")


def print_tasks(result: dict, label: str) -> None:
    fp = result.get("tasks_fp") or {}
    print("\n| task | metric | " + ("FP | " if fp else "") + label + " |\n|---|---|" + "---|" * (2 if fp else 1))
    for task, metrics in result["tasks"].items():
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if not filt or metric.endswith("_stderr"):
                continue
            shown = metric + ("" if filt == "none" else f" ({filt})")
            cells = ([fp.get(task, {}).get(key)] if fp else []) + [value]
            print(f"| {task} | {shown} | " + " | ".join(
                "-" if v is None else f"{v:.2f}" if metric == "perplexity" else f"{100 * v:.2f}" for v in cells) + " |")


def print_summary(result: dict, out_dir: Path) -> None:
    quant = result["config"].get("quant")
    label = result["method"] + (f" W{quant['wbits']}A{quant['abits']}" if quant else "")
    if result["ppl"]:
        print_perplexity(result, label)
    if result["tasks"]:
        print_tasks(result, label)
    quant_time = result["timings"].get("quantize")
    if quant_time is not None:
        print(f"quantization took {quant_time:.1f} s")
    print(f"results: {out_dir / 'results.json'}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not argv:
        print("no arguments: running the demo, i.e. python main.py " + " ".join(DEMO_ARGS))
        argv = DEMO_ARGS
    if hasattr(signal, "SIGXFSZ"):  # past the file-size limit a write then fails (WriteError) instead of killing us
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        execute(build_config(argv))
    except (ConfigError, ModelLoadError, DataError, QuantizedLoadError, PathError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a write that failed (models.files.WriteError) or another I/O failure
        print(f"error: {describe(e)}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(e, file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted before the run started; nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
