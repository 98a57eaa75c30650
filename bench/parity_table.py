"""Print the fidelity comparison of bench/parity.sh: per model, bits and configuration, the mean and
[min, max] over seeds of WikiText-2 and Gutenberg perplexity and KL to FP, and the share of RTN's
damage that the configuration removes, by perplexity (RTN's gap to FP) and by KL (RTN's KL).
On these small models RTN's perplexity gap is small and noisy (on WikiText-2 it can be negative),
so the KL share is the reliable one.

    python bench/parity_table.py results/parity
"""
from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path

SETS = ("wikitext2", "gutenberg")


def load(root: Path) -> dict:
    """{(model, config, bits): [results.json, ...]} with the seed suffix dropped from the run name."""
    groups = defaultdict(list)
    for path in sorted(root.glob("*/*/results.json")):
        model, run = path.parent.parent.name, path.parent.name
        config, bits = re.fullmatch(r"(.+)-(w\d+a\d+)(?:-s\d+)?", run).groups()
        groups[(model, config, bits)].append(json.loads(path.read_text()))
    return groups


def spread(values: list[float], digits: int) -> str:
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{min(values):.{digits}f}, {max(values):.{digits}f}]"


def gap_closed(ppl: float, fp: float, rtn: float) -> str:
    return f"{100 * (rtn - ppl) / (rtn - fp):.0f}%" if rtn != fp else "-"


def main(root: str) -> None:
    groups = load(Path(root))
    print("| model | bits | config | seeds | " + " | ".join(f"{s} ppl | gap closed | KL | KL removed" for s in SETS) + " |")
    print("|---|---|---|---|" + "---|---|---|---|" * len(SETS))
    for (model, config, bits), runs in sorted(groups.items()):
        rtn = groups.get((model, "rtn", bits))
        cells = []
        for s in SETS:
            ppl = [r["ppl"][s] for r in runs]
            fp, rtn_ppl = runs[0]["ppl_fp"][s], rtn[0]["ppl"][s] if rtn else None
            gap = gap_closed(sum(ppl) / len(ppl), fp, rtn_ppl) if rtn_ppl is not None else "-"
            kl = [r["kl_fp"][s]["mean"] for r in runs if r.get("kl_fp")]
            kl_rtn = rtn[0]["kl_fp"][s]["mean"] if rtn and rtn[0].get("kl_fp") else None
            removed = f"{100 * (1 - sum(kl) / len(kl) / kl_rtn):.0f}%" if kl and kl_rtn else "-"
            cells += [spread(ppl, 1), gap, spread(kl, 4) if kl else "-", removed]
        print(f"| {model} | {bits} | {config} | {len(runs)} | " + " | ".join(cells) + " |")
    fps = {m: r[0]["ppl_fp"] for (m, _, _), r in groups.items()}
    for model, fp in sorted(fps.items()):
        print(f"\nFP {model}: " + ", ".join(f"{s} {fp[s]:.1f}" for s in SETS))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "results/parity")
