"""Speed and memory of the pipeline as ratios that transfer across machines.

    python bench/benchmark.py                   # demo-mixtral, main.py's defaults: 128 x 2048 calibration, about 8 min
    python bench/benchmark.py --nsamples 32 --seqlen 512 --rotation_tokens 512 [--stream] [--max_rotation_step 64] [--spreading reflection]

- quantization wall time / one FP forward pass over the same calibration set (target <= 5x),
- fake-quant evaluation throughput / FP throughput (target >= 0.8x),
- the quantization's ratio again against one FP pass timed after it on a freshly loaded model: a
  machine whose speed drifts (shared cores) shows it as two different ratios,
- peak RSS while quantizing and evaluating the quantized model, above the interpreter's own (torch
  and libraries loaded, no model) / model size (target <= 1.5x; the interpreter's ~0.4 GB would
  dwarf a 78 MB model otherwise). The FP reference passes run first and their peak is reported
  apart (`peak_rss_with_fp_passes_mb`).
Each phase runs in a fresh process so peak RSS is its own. --stream reads the decoder layers from
disk one at a time (main.py --stream), so the model itself no longer has to fit in memory.

Beside it: bench/real_width.py times one decoder layer at the widths of OLMoE-1B-7B and
Qwen3-30B-A3B, bench/rotation_search.py the rotation fit with each spreading kind, and bench/peer.py
our GPTQ W4A16 against llm-compressor's on the same windows.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from search_options import add_search_options, search_options  # noqa: E402  (bench/, beside this script)


def best_time(work, repeats: int = 2) -> float:
    """The shortest of `repeats` timings: passes of a few seconds vary by 20-40% on a shared
    machine, and the first one also pays for warm-up. The quantization itself runs once (it
    changes the model), so its ratio to the best FP pass errs on the slow side."""
    times = []
    for _ in range(repeats):
        t = time.time()
        work()
        times.append(time.time() - t)
    return min(times)


def phase(args) -> dict:
    from duquant.config import DuQuantConfig, QuantConfig
    from duquant.data import calibration_segments, ppl_segments
    from duquant.evaluate import perplexity
    from duquant.pipeline import quantize_model
    from duquant.recipes import default_weight_clip
    from memory import reset_peak_rss  # bench/memory.py, beside this script
    from models import get_spec, load_model

    rss_base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    model, tok = load_model(args.model, stream=args.stream)
    spec = get_spec(model)
    size_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    calib = calibration_segments("c4", tok, args.nsamples, args.seqlen, 0)
    evalset = ppl_segments("wikitext2", tok, args.seqlen, args.eval_windows)
    out = {"model_mb": size_mb, "rss_before_load_mb": rss_base,
           "rss_after_load_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    out["fp_pass_s"] = best_time(lambda: perplexity(model, spec, calib, batch_size=1, desc="FP calibration pass"))
    out["fp_eval_tok_s"] = evalset.numel() / best_time(lambda: perplexity(model, spec, evalset, desc="FP eval"))
    out["peak_rss_with_fp_passes_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    reset_peak_rss()  # the peak reported below is the quantization's and its evaluation's
    if args.phase == "quantize":
        t = time.time()
        method = DuQuantConfig(rotation_tokens=args.rotation_tokens, max_rotation_step=args.max_rotation_step,
                               **search_options(args))
        report = quantize_model(model, spec, calib, QuantConfig(4, 4, **default_weight_clip(4)), method, seed=0)
        out["quantize_s"] = time.time() - t
        out["quantize_steps_s"] = report.timings  # statistics, fitting (the rotation searches), propagation
        out["quant_eval_tok_s"] = evalset.numel() / best_time(lambda: perplexity(model, spec, evalset, desc="W4A4 eval"))
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.phase == "quantize":  # the machine's speed after the quantization, on a fresh FP model
        del model
        fresh, _ = load_model(args.model, stream=args.stream)
        out["fp_pass_after_s"] = best_time(lambda: perplexity(fresh, get_spec(fresh), calib, batch_size=1,
                                                              desc="FP pass after"), 1)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo-mixtral")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--eval_windows", type=int, default=40)
    p.add_argument("--rotation_tokens", type=int, default=2048, help="rows per site for the rotation search")
    p.add_argument("--max_rotation_step", type=int, default=256, help="greedy rotation steps (DuQuant's default 256)")
    add_search_options(p)
    p.add_argument("--stream", action="store_true", help="decoder layers read from disk one at a time")
    p.add_argument("--phase", choices=["quantize"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.phase:
        print(json.dumps(phase(args)))
        return
    cmd = [sys.executable, __file__, "--model", args.model, "--nsamples", str(args.nsamples),
           "--seqlen", str(args.seqlen), "--eval_windows", str(args.eval_windows),
           "--rotation_tokens", str(args.rotation_tokens), "--max_rotation_step", str(args.max_rotation_step),
           "--fit_order", args.fit_order, "--spreading", args.spreading, "--phase", "quantize"] + ["--stream"] * args.stream
    r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    ratios = {
        "quantization / FP pass": r["quantize_s"] / r["fp_pass_s"],
        "the same against the FP pass after the quantization": r["quantize_s"] / r["fp_pass_after_s"],
        "fake-quant eval / FP throughput": r["quant_eval_tok_s"] / r["fp_eval_tok_s"],
        "(peak RSS - interpreter RSS) / model size": (r["peak_rss_mb"] - r["rss_before_load_mb"]) / r["model_mb"],
    }
    print(json.dumps(r, indent=2))
    print(f"\n| {args.model}{' (streamed)' if args.stream else ''}, {args.nsamples} x {args.seqlen} calibration, "
          f"{args.max_rotation_step} rotation steps, --fit_order {args.fit_order}, --spreading {args.spreading}, torch {torch.__version__} | ratio |\n|---|---|")
    for k, v in ratios.items():
        print(f"| {k} | {v:.2f} |")


if __name__ == "__main__":
    main()
