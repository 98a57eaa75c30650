"""Expert balance of calibration sets (MoEQuant R1's shape): EBSS against text corpora.

    python bench/ebss_balance.py --model demo-mixtral
    python bench/ebss_balance.py --model demo-mixtral --nsamples 16 --seqlen 256 --tau 1.2,0.3,0.1 --json out.json

For every set: the expert-balance std (MoEQuant Eq. 3-4, `duquant.diagnostics.expert_balance_std`,
routing of the FP model) and the set's perplexity under the model (EBSS aims at both: balanced
AND likely). Text sets are seeded random `seqlen` windows: C4 train and Gutenberg train as
`--calib_dataset` draws them, and WikiText-2 *test* (train is not bundled). EBSS sets come
from the same cache as `main.py --ebss`.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def wikitext2_windows(tokenizer, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    from duquant.data import ppl_segments

    windows = ppl_segments("wikitext2", tokenizer, seqlen)
    pick = random.Random(seed).sample(range(windows.shape[0]), k=min(nsamples, windows.shape[0]))
    return windows[pick]


def main(argv: list[str] | None = None) -> dict:
    from duquant.data import calibration_segments
    from duquant.evaluate import perplexity
    from duquant.diagnostics import expert_balance_std
    from eaquant_ext.balance import routing_counts
    from eaquant_ext.moequant.ebss import ebss_calibration
    from models import get_spec, load_model
    from models.spec import config_value

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo-mixtral")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--tau", default="1.2", help="comma list of EBSS temperatures")
    p.add_argument("--width", default="4", help="comma list of EBSS widths")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--cache_dir", default=None, help="EBSS cache (default results/ebss_cache)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = p.parse_args(argv)

    model, tok = load_model(args.model, torch.float32)
    spec = get_spec(model)
    if spec.router is None:
        sys.exit(f"error: {args.model} has no MoE layers")
    top_k = config_value(model.config, spec.top_k_attr)
    sets = {
        "wikitext2 (test windows)": wikitext2_windows(tok, args.nsamples, args.seqlen, args.seed),
        "c4": calibration_segments("c4", tok, args.nsamples, args.seqlen, args.seed),
        "gutenberg": calibration_segments("gutenberg", tok, args.nsamples, args.seqlen, args.seed),
    }
    seconds = {}
    for tau in (float(t) for t in args.tau.split(",")):
        for width in (int(w) for w in args.width.split(",")):
            t0 = time.time()
            ids, info = ebss_calibration(model, spec, tok, args.model, args.nsamples, args.seqlen, tau, width,
                                         args.seed, args.device, args.cache_dir)
            name = f"EBSS tau={tau:g} w={width}"
            sets[name] = ids
            seconds[name] = "cached" if info["cached"] else f"{time.time() - t0:.0f} s"
    rows = []
    print(f"\n{args.model}: {args.nsamples} x {args.seqlen} tokens per set, top-{top_k} of "
          f"{getattr(model.config, spec.num_experts_attr)} experts, seed {args.seed}\n")
    print("| calibration set | expert-balance std | perplexity | generation |\n|---|---|---|---|")
    for name, ids in sets.items():
        std = expert_balance_std(routing_counts(model, spec, ids, args.device), top_k)
        ppl = perplexity(model, spec, ids, args.device, 4, desc=name)
        rows.append({"set": name, "balance_std": std, "ppl": ppl})
        print(f"| {name} | {std:.4f} | {ppl:.2f} | {seconds.get(name, '')} |")
    out = {"model": args.model, "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
