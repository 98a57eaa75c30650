"""What the per-row weight clip search costs next to the fixed clip ratio, on one matrix.

    python bench/clip_search.py                          # an OLMoE-1B-7B expert's up_proj: 1024 x 2048
    python bench/clip_search.py --rows 14336 --cols 4096 --device cuda   # a Mixtral-8x7B expert's up_proj

DuQuant and EAQuant runs at 4-bit weights and up search each row's ratio over the published EAQuant
grid (101 ratios, `--w_clip mse --mse_grid official`); RTN, GPTQ and 3-bit runs quantize once at the
fixed ratio (`--w_clip minmax`). Both are timed on the same random matrix, alternating, best of
`--rounds`; multiply by the number of weight matrices for a model's total.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from duquant.quantizer import WeightQuantizer  # noqa: E402


def seconds(work, device: torch.device) -> float:
    t = time.perf_counter()
    work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--cols", type=int, default=2048)
    p.add_argument("--wbits", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    w = torch.randn(args.rows, args.cols, generator=torch.Generator().manual_seed(0)).to(device)
    fixed = WeightQuantizer(args.wbits, clip_ratio=0.8, clip="minmax")
    search = WeightQuantizer(args.wbits, clip="mse", mse_grid="official")
    rounds = [(seconds(lambda: fixed(w), device), seconds(lambda: search(w), device)) for _ in range(args.rounds)]
    t_fixed, t_search = min(r[0] for r in rounds), min(r[1] for r in rounds)
    print(f"{args.rows} x {args.cols} on {device}, {torch.get_num_threads()} threads: fixed ratio {t_fixed:.4f} s, "
          f"clip search {t_search:.4f} s ({t_search / t_fixed:.0f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
