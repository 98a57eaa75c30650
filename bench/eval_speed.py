"""Fake-quant evaluation throughput against FP, with each site's transform as its steps and as one matrix.

    python main.py --nsamples 8 --seqlen 256 --rotation_tokens 256 --eval_ppl "" --save_dir q/demo-w4a4
    python bench/eval_speed.py --load q/demo-w4a4                 # 40 wikitext2 windows of 512, 4 rounds

The FP model, the saved quantized model with its transforms applied step by step (smoothing,
block rotation, permutation, block rotation: the arithmetic before `act_matrix`), and the same
model with one dense matrix per site where that is cheaper are evaluated in turn, round after
round in one process, so a shared machine's drift hits all three alike; each uses its shortest
round. Perplexities are printed too: the one-matrix form changes the transformed activations
only by float rounding, which can still flip a 4-bit code at a rounding tie. The default of 40
windows is bench/benchmark.py's: the FP model's throughput grows with the window count (5,250
tokens/s over 8 windows, 6,670 over 40 on the demo) while the quantized model's stays at about
4,450, so a few windows flatter the ratio (0.85 over 8 against 0.67 over 40).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed(work) -> tuple[float, float]:
    t = time.time()
    value = work()
    return time.time() - t, value


def main() -> None:
    from duquant.data import ppl_segments
    from duquant.evaluate import perplexity
    from duquant.packed import load_quantized
    from duquant.qlinear import SiteInput
    from models import get_spec, load_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="a model saved with main.py --save_dir")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args()
    quant, _, meta = load_quantized(args.load)
    fp, tok = load_model(meta["run"]["model"])
    spec = get_spec(fp)
    evalset = ppl_segments("wikitext2", tok, args.seqlen, args.windows)
    sites = {m: m.matrix for m in quant.modules() if isinstance(m, SiteInput)}

    def quantized(dense: bool):
        for site, matrix in sites.items():
            site.matrix = matrix if dense else None
        return perplexity(quant, spec, evalset, desc="fake-quant")

    runs = {"FP": lambda: perplexity(fp, spec, evalset, desc="FP"), "steps": lambda: quantized(False),
            "one matrix": lambda: quantized(True)}
    best, ppl = {k: float("inf") for k in runs}, {}
    for _ in range(args.rounds):
        for name, work in runs.items():
            seconds, ppl[name] = timed(work)
            best[name] = min(best[name], seconds)
    print(f"{sum(m is not None for m in sites.values())} of {len(sites)} sites as one matrix; "
          f"{args.windows} x {args.seqlen} wikitext2 tokens, {torch.get_num_threads()} threads\n"
          "| | best pass (s) | throughput / FP | perplexity |\n|---|---|---|---|")
    for name in runs:
        print(f"| {name} | {best[name]:.2f} | {best['FP'] / best[name]:.2f} | {ppl[name]:.3f} |")


if __name__ == "__main__":
    main()
