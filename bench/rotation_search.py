"""The rotation fit of several same-width sites with each spreading kind, side by side.

    python bench/rotation_search.py                        # eight 512 x 256 sites (the demo's experts)
    python bench/rotation_search.py --sites 8 --width 2048 --rows 2048   # an OLMoE-1B-7B layer's expert inputs

`fit_rotations` (R1, zigzag permutation, R2; 256 greedy steps, blocks of 128) on the same random rows
with heavy-tailed channels, once per spreading kind, alternating, best of `--rounds`. Printed: the
seconds, the ratio to the default kind and the mean over sites of the largest |x| after the
transform (what the search minimises; the rows before it in the last column), so a faster kind that
spreads worse shows it.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from duquant.config import CHOICES  # noqa: E402
from duquant.transforms import fit_rotations  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sites", type=int, default=8)
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--steps", type=int, default=256)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(args.rows, args.width, generator=g).double() * (1 + 20 * torch.rand(args.width, generator=g) ** 8)
          for _ in range(args.sites)]
    kinds = CHOICES["spreading"]
    best = {k: float("inf") for k in kinds}
    peak = {}
    for _ in range(args.rounds):
        for kind in kinds:
            t = time.perf_counter()
            fits = fit_rotations(xs, 128, args.steps, seed=0, spreading=kind)
            best[kind] = min(best[kind], time.perf_counter() - t)
            peak[kind] = sum(f.act(x).abs().amax().item() for f, x in zip(fits, xs)) / len(xs)
    raw = sum(x.abs().amax().item() for x in xs) / len(xs)
    print(f"{args.sites} sites of {args.rows} x {args.width}, {args.steps} steps, {torch.get_num_threads()} threads\n"
          f"| spreading | seconds | / {kinds[0]} | mean peak after (before {raw:.1f}) |\n|---|---|---|---|")
    for kind in kinds:
        print(f"| {kind} | {best[kind]:.2f} | {best[kind] / best[kinds[0]]:.2f} | {peak[kind]:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
