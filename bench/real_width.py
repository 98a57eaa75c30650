"""One decoder layer at the real widths of fine-grained MoEs: quantization time over one FP pass.

    python bench/real_width.py                          # OLMoE-1B-7B and Qwen3-30B-A3B, 8 x 256 calibration
    python bench/real_width.py --model qwen3 --nsamples 16 --seqlen 512 --profile 25
    python bench/real_width.py --spreading reflection --fit_order layer     # what --recipe fast sets

The demo is 8 experts of width 384 at hidden 256; OLMoE-1B-7B has 64 experts of width 1024 and
Qwen3-30B-A3B 128 of width 768, both at hidden 2048 with 8 experts per token, so the per-expert
rotation searches, statistics and loops are many times the demo's. One layer with those
dimensions and random weights (built from transformers' own config classes, a small vocabulary)
times what the full models would pay per layer: the ratio of quantization time to one FP pass of
the same calibration through the layer transfers across machines. Random weights and random
tokens time the work, not its quality. `--profile N` prints the N most expensive functions of the
quantization (cProfile, cumulative time), which is how the dominating step is found.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from search_options import add_search_options, search_options  # noqa: E402  (bench/, beside this script)

# Dimensions from the models' published config.json files; one layer, a small vocabulary.
SHAPES = {
    "olmoe": dict(model_type="olmoe", hidden_size=2048, intermediate_size=1024, num_experts=64, num_experts_per_tok=8,
                  num_attention_heads=16, num_key_value_heads=16),
    "qwen3": dict(model_type="qwen3_moe", hidden_size=2048, moe_intermediate_size=768, intermediate_size=6144,
                  num_experts=128, num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                  decoder_sparse_step=1, mlp_only_layers=[]),
}
NAMES = {"olmoe": "OLMoE-1B-7B", "qwen3": "Qwen3-30B-A3B"}


def one_layer_model(name: str, vocab: int, seed: int = 0):
    """A randomly initialised one-layer model with `name`'s real widths (float32, CPU)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = dict(SHAPES[name])
    config = AutoConfig.for_model(shape.pop("model_type"), num_hidden_layers=1, vocab_size=vocab,
                                  max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=0,
                                  eos_token_id=1, pad_token_id=2, **shape)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def fp_pass_s(model, spec, calib: torch.Tensor, repeats: int) -> float:
    """The shortest of `repeats` FP passes of the calibration set (the first also pays warm-up)."""
    from duquant.evaluate import perplexity

    times = []
    for _ in range(repeats):
        t = time.time()
        perplexity(model, spec, calib, batch_size=1, desc="FP pass")
        times.append(time.time() - t)
    return min(times)


def quantize_s(model, spec, calib: torch.Tensor, args) -> tuple[float, dict, str]:
    """Wall time of quantize_model on the layer, its own per-phase timings, and the profile text."""
    from duquant.config import DuQuantConfig, QuantConfig
    from duquant.pipeline import quantize_model
    from duquant.recipes import default_weight_clip

    method = DuQuantConfig(rotation_tokens=args.rotation_tokens, max_rotation_step=args.max_rotation_step,
                           **search_options(args))
    prof = cProfile.Profile() if args.profile else None
    t = time.time()
    if prof:
        prof.enable()
    quant = QuantConfig(args.wbits, args.abits, **default_weight_clip(args.wbits))  # main.py's DuQuant defaults
    report = quantize_model(model, spec, calib, quant, method, seed=0)
    if prof:
        prof.disable()
    elapsed = time.time() - t
    text = ""
    if prof:
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(args.profile)
        text = out.getvalue()
    return elapsed, dict(report.timings), text


def measure(name: str, args) -> dict:
    from models import get_spec

    model = one_layer_model(name, args.vocab)
    spec = get_spec(model)
    calib = torch.randint(3, args.vocab, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0))
    fp = fp_pass_s(model, spec, calib, args.repeats)
    q, timings, profile = quantize_s(model, spec, calib, args)
    if profile:
        print(profile, file=sys.stderr)
    return {"model": NAMES[name], "fp_pass_s": fp, "quantize_s": q, "ratio": q / fp, "timings_s": timings}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=[*SHAPES, "all"], default="all")
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--rotation_tokens", type=int, default=2048, help="rows per site for the rotation search")
    p.add_argument("--max_rotation_step", type=int, default=256)
    add_search_options(p)
    p.add_argument("--wbits", type=int, default=4)
    p.add_argument("--abits", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=2, help="FP passes; the shortest counts")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="print the N costliest functions (stderr)")
    args = p.parse_args()
    rows = [measure(name, args) for name in (SHAPES if args.model == "all" else [args.model])]
    print(json.dumps(rows, indent=2))
    print(f"\n| one decoder layer, {args.nsamples} x {args.seqlen} calibration, W{args.wbits}A{args.abits}, "
          f"{args.max_rotation_step} rotation steps, --spreading {args.spreading}, --fit_order {args.fit_order}, torch {torch.__version__} | FP pass (s) | quantization (s) | ratio |"
          "\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['fp_pass_s']:.2f} | {r['quantize_s']:.1f} | {r['ratio']:.1f} |")


if __name__ == "__main__":
    main()
