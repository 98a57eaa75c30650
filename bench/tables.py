"""Collect run_experiments.sh results into markdown tables (mean ± std over seeds, diff to DuQuant).

    python bench/tables.py results/experiments
"""
from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

ROWS = [("rtn", "RTN"), ("duquant", "DuQuant"), ("sa", "+ smooth_aggregate (maximum)"),
        ("ra", "+ router_align"), ("cb", "+ calib_balance"), ("eaquant", "EAQuant (all three)")]


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: list[float], digits: int = 2) -> str:
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}" if len(values) > 1 else f"{m:.{digits}f}"


def agreement(res: dict) -> float | None:
    vals = [layer["topk_agreement"] for layer in res.get("layers", []) if "topk_agreement" in layer]
    return statistics.fmean(vals) if vals else None


def model_table(model_dir: Path) -> str:
    runs: dict[tuple[str, str], list[dict]] = defaultdict(list)
    fp = None
    for f in sorted(model_dir.glob("*/results.json")):
        res = json.loads(f.read_text())
        name = f.parent.name
        if name == "fp":
            fp = res
            continue
        method, bits = name.split("-")[0], name.split("-")[1]
        runs[(bits, method)].append(res)
    sets = list(fp["ppl"]) if fp else ["wikitext2", "c4", "gutenberg"]
    out = [f"### {model_dir.name}", ""]
    header = "| bits | method | seeds | " + " | ".join(sets) + " | top-k agreement | Δ vs DuQuant (" + " / ".join(sets) + ") | quantization s |"
    out += [header, "|" + "---|" * (header.count("|") - 1)]
    if fp:
        out.append("| 16/16 | FP | - | " + " | ".join(f"{fp['ppl'][s]:.2f}" for s in sets) + " | 1.000 | | |")
    for bits in sorted({b for b, _ in runs}, reverse=True):
        base = runs.get((bits, "duquant"), [])
        base_mean = {s: mean_std([r["ppl"][s] for r in base])[0] for s in sets} if base else None
        for key, label in ROWS:
            rs = runs.get((bits, key))
            if not rs:
                continue
            ppl = [fmt([r["ppl"][s] for r in rs]) for s in sets]
            agr = [a for a in map(agreement, rs) if a is not None]
            delta = ""
            if base_mean is not None and key != "duquant":
                delta = " / ".join(f"{mean_std([r['ppl'][s] for r in rs])[0] - base_mean[s]:+.2f}" for s in sets)
            out.append(f"| {bits.upper()} | {label} | {len(rs)} | " + " | ".join(ppl)
                       + f" | {fmt(agr, 3) if agr else '-'} | {delta} | {fmt([r['timings']['quantize'] for r in rs], 0)} |")
    return "\n".join(out) + "\n"


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "results/experiments")
    models = sorted(p for p in root.iterdir() if p.is_dir())
    print("\n".join(model_table(m) for m in models))


if __name__ == "__main__":
    main()
