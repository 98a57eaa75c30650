"""The rotation-search options the speed benchmarks share, with main.py's choices and defaults."""
from __future__ import annotations

import argparse


def add_search_options(p: argparse.ArgumentParser) -> None:
    from duquant.config import CHOICES, DuQuantConfig

    p.add_argument("--fit_order", choices=CHOICES["fit_order"], default=DuQuantConfig.fit_order,
                   help="sites fitted depth by depth on the partly quantized layer (main.py's default), or all on the FP layer")
    p.add_argument("--spreading", choices=CHOICES["spreading"], default=DuQuantConfig.spreading,
                   help="the greedy steps' spreading (reflection: rank-one steps, docs/speed.md)")


def search_options(args) -> dict[str, str]:
    """The DuQuantConfig fields `add_search_options` sets."""
    return {"fit_order": args.fit_order, "spreading": args.spreading}
