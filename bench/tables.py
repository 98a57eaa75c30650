"""Collect run_experiments.sh results into one markdown table per paper table (EAQuant 1-7, MoEQuant R1-R5).

    python bench/tables.py results/experiments [--minutes M]

Run directories are named KEY-wWaA-sSEED (fp and rtn have no seed); rows average a KEY over its
seeds (mean ± std when there are several). Every row carries its difference to the reference row
of its table, pure DuQuant at the same bits unless the table says otherwise. Accuracy is lm-eval's
`acc` per task; Avg is their mean in percent, as the papers print it. KL and top-1 are each set's mean
token KL(p_fp || p_quant) and top-1 agreement with FP (results.json `kl_fp`, docs/evaluation.md);
runs without them (--no-compare_fp, older results) show '-'.

After the tables, one verdict table per model says for each claim (a method against what it should
beat) whether the difference holds beyond the seed spread: "lower" or "higher" when the two rows' seed
ranges [min, max] do not overlap (a single run is a point: RTN and FP do not depend on the seed), "within"
when they do; two single runs have no spread to compare with.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Table:
    title: str
    rows: list[tuple[str, str]]  # (label, run key without the seed)
    base: str  # the run key every Δ is taken against
    note: str = ""


def _main_rows(bits: str) -> list[tuple[str, str]]:
    return [("FP", "fp"), ("RTN", f"rtn-{bits}"), ("DuQuant", f"duquant-{bits}"), ("EAQuant", f"eaquant-{bits}")]


def _components(bits: str) -> list[tuple[str, str]]:
    return [("none (DuQuant)", f"duquant-{bits}"), ("smooth_aggregate", f"sa-{bits}"), ("router_align", f"ra-{bits}"),
            ("calib_balance", f"cb-{bits}"), ("all three (EAQuant)", f"eaquant-{bits}")]


TABLES = [
    Table("Table 1: W4A4, router W8A8", _main_rows("w4a4"), "duquant-w4a4"),
    Table("Table 2: W3A4, router W8A8", _main_rows("w3a4"), "duquant-w3a4"),
    Table("Table 3: W3A4 component ablation", _components("w3a4"), "duquant-w3a4"),
    Table("Table 3 at W4A4 (not in the paper)", _components("w4a4"), "duquant-w4a4"),
    Table("Table 4: W4A4 smoothing aggregation rule",
          [("DuQuant", "duquant-w4a4"), ("maximum", "sa-w4a4"), ("expert_frequency", "saf-w4a4"),
           ("router_logits", "sal-w4a4")], "duquant-w4a4"),
    Table("Table 5: router precision x router_align (weights W3A4 unless named)",
          [("router W3A4", "r3-w3a4"), ("router W3A4 + align", "r3ra-w3a4"),
           ("router W4A4", "r4-w3a4"), ("router W4A4 + align", "r4ra-w3a4"),
           ("router W8A8", "duquant-w3a4"), ("router W8A8 + align", "ra-w3a4"),
           ("W4A4, router W8A8", "duquant-w4a4"), ("W4A4, router W8A8 + align", "ra-w4a4")], "duquant-w3a4"),
    Table("Table 6: W4A4 KL span of router_align (kl_top R)",
          [("DuQuant", "duquant-w4a4"), ("R = 0 (top-k)", "ra-w4a4"), ("R = 25", "kl25-w4a4"),
           ("R = 50", "kl50-w4a4"), ("R = 75", "kl75-w4a4"), ("R = 100", "kl100-w4a4")], "duquant-w4a4"),
    Table("Table 7: W4A4 calib_balance ratio r",
          [("r = 0 (DuQuant)", "duquant-w4a4"), ("r = 1", "cb1-w4a4"), ("r = 2", "cb-w4a4"),
           ("r = 4", "cb4-w4a4"), ("r = 8", "cb8-w4a4")], "duquant-w4a4"),
    Table("R1/R5: W4A16 weight-only, calibration set and AGQ",
          [("RTN", "rtn-w4a16"), ("GPTQ (c4)", "gptq-w4a16"), ("GPTQ + AGQ (c4)", "agq-c4-w4a16"),
           ("GPTQ + AGQ (gutenberg)", "agq-gutenberg-w4a16"), ("MoEQuant: EBSS + AGQ, gate AGQ off (R5)", "moequant-nogate-w4a16"),
           ("MoEQuant: EBSS + AGQ", "moequant-w4a16")], "gptq-w4a16",
          "MoEQuant is weight-only, so its rows are diffed against plain GPTQ W4A16 on the same run, not DuQuant."),
]
# (claim, run key, reference run key); every pair present in a model's runs gets a verdict row.
CLAIMS = [(f"{name} {bits.upper()}", f"{key}-{bits}", f"{ref}-{bits}") for bits in ("w4a4", "w3a4")
          for name, key, ref in (("DuQuant vs RTN", "duquant", "rtn"), ("EAQuant vs DuQuant", "eaquant", "duquant"),
                                 ("smooth_aggregate vs DuQuant", "sa", "duquant"),
                                 ("router_align vs DuQuant", "ra", "duquant"),
                                 ("calib_balance vs DuQuant", "cb", "duquant"))] + [
    ("expert_frequency vs maximum aggregation W4A4", "saf-w4a4", "sa-w4a4"),
    ("router_logits vs maximum aggregation W4A4", "sal-w4a4", "sa-w4a4"),
    ("router W3A4: align vs none", "r3ra-w3a4", "r3-w3a4"),
    ("router W4A4: align vs none", "r4ra-w3a4", "r4-w3a4"),
] + [(f"kl_top {k} vs top-k only W4A4", f"kl{k}-w4a4", "ra-w4a4") for k in (25, 50, 75, 100)] + [
    (f"calib_balance r = {r} vs r = 2 W4A4", f"cb{r}-w4a4", "cb-w4a4") for r in (1, 4, 8)] + [
    ("GPTQ + AGQ vs GPTQ W4A16", "agq-c4-w4a16", "gptq-w4a16"),
    ("MoEQuant vs GPTQ W4A16", "moequant-w4a16", "gptq-w4a16"),
]
SEEDED = re.compile(r"^(?P<key>.+)-s(?P<seed>\d+)$")


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: list[float], digits: int = 2) -> str:
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}" if len(values) > 1 else f"{m:.{digits}f}"


def accuracies(res: dict) -> dict[str, float]:
    tasks = res.get("tasks") or res.get("tasks_fp") or {}
    return {t: 100 * m["acc,none"] for t, m in sorted(tasks.items()) if "acc,none" in m}


def avg_acc(res: dict) -> float | None:
    acc = accuracies(res)
    return statistics.fmean(acc.values()) if acc else None


def agreement(res: dict) -> float | None:
    return (res.get("router") or {}).get("mean_topk_agreement")


def eval_sets(groups: list[list[dict]]) -> list[str]:
    """The perplexity sets of the first run of each group, in the papers' order."""
    return sorted({s for rs in groups for s in rs[0]["ppl"]}, key=["wikitext2", "c4", "gutenberg"].index)


def kl_values(rs: list[dict], dataset: str, key: str) -> list[float]:
    """A `kl_fp` figure of each run that measured it (older runs and --no-compare_fp have none)."""
    return [r["kl_fp"][dataset][key] for r in rs if dataset in (r.get("kl_fp") or {})]


def fp_divergence(rs: list[dict], dataset: str, key: str, scale: float, digits: int) -> str:
    """A `kl_fp` figure over the runs that measured it; '(n of N)' when only some did."""
    values = [scale * v for v in kl_values(rs, dataset, key)]
    if not values:
        return "-"
    return fmt(values, digits) + ("" if len(values) == len(rs) else f" ({len(values)} of {len(rs)})")


def load_runs(model_dir: Path) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = defaultdict(list)
    for f in sorted(model_dir.glob("*/results.json")):
        m = SEEDED.match(f.parent.name)
        res = json.loads(f.read_text())
        if f.parent.name == "fp":
            res = {**res, "ppl": res.get("ppl") or res.get("ppl_fp")}
        runs[m["key"] if m else f.parent.name].append(res)
    return runs


def ppl_table(table: Table, runs: dict[str, list[dict]]) -> list[str]:
    present = [(label, runs[key]) for label, key in table.rows if key in runs]
    if not present:
        return []
    sets = eval_sets([rs for _, rs in present])
    tasks = sorted({t for _, rs in present for t in accuracies(rs[0])})
    base = runs.get(table.base)
    cols = sets + [f"KL {s}" for s in sets] + [f"top-1 {s} (%)" for s in sets] + tasks + (["Avg"] if tasks else [])
    head = ["method", "seeds"] + cols + ["router top-k agreement", "Δ vs " + ("reference" if table.base.split("-")[0] != "duquant" else "DuQuant")
                                         + " (" + " / ".join(sets + (["Avg"] if tasks else [])) + ")", "quantize s"]
    out = [f"#### {table.title}", ""] + ([table.note, ""] if table.note else [])
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, rs in present:
        cells = [label, str(len(rs))]
        cells += [fmt([r["ppl"][s] for r in rs]) for s in sets]
        cells += [fp_divergence(rs, s, "mean", 1, 4) for s in sets]
        cells += [fp_divergence(rs, s, "top1_agreement", 100, 2) for s in sets]
        cells += [fmt([accuracies(r).get(t, float("nan")) for r in rs], 1) for t in tasks]
        avgs = [a for a in map(avg_acc, rs) if a is not None]
        if tasks:
            cells.append(fmt(avgs, 1) if avgs else "-")
        agr = [a for a in map(agreement, rs) if a is not None]
        cells.append(fmt(agr, 3) if agr else "-")
        delta = ""
        if base and rs is not base:
            diffs = [f"{mean_std([r['ppl'][s] for r in rs])[0] - mean_std([r['ppl'][s] for r in base])[0]:+.2f}" for s in sets]
            base_avgs = [a for a in map(avg_acc, base) if a is not None]
            if tasks and avgs and base_avgs:
                diffs.append(f"{mean_std(avgs)[0] - mean_std(base_avgs)[0]:+.1f}")
            delta = " / ".join(diffs)
        cells.append(delta)
        times = [r["timings"]["quantize"] for r in rs if "quantize" in r.get("timings", {})]
        cells.append(fmt(times, 0) if times else "-")
        out.append("| " + " | ".join(cells) + " |")
    return out + [""]


def ebss_tables(model_dir: Path) -> list[str]:
    """R1-R3 from bench/ebss_balance.py: balance std and likelihood of each calibration set."""
    path = model_dir / "ebss_balance.json"
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    out = ["#### R1-R3: calibration sets, expert-balance std (lower = more balanced) and perplexity under the FP model",
           "", f"{data['nsamples']} x {data['seqlen']} tokens per set, seed {data['seed']}. R2 varies tau, R3 the width w.", "",
           "| calibration set | expert-balance std | set perplexity |", "|---|---|---|"]
    out += [f"| {r['set']} | {r['balance_std']:.4f} | {r['ppl']:.2f} |" for r in data["rows"]]
    return out + [""]


def agq_cosine_table(runs: dict[str, list[dict]]) -> list[str]:
    """R4: cosine of the gate-layer approximation at constant affinity c, mean over MoE layers."""
    rs = runs.get("moequant-w4a16")
    if not rs:
        return []
    per_c: dict[str, list[float]] = defaultdict(list)
    for r in rs:
        for layer in r.get("layers", []):
            for c, cos in ((layer.get("gptq") or {}).get("agq") or {}).get("gate_approx_cos", {}).items():
                per_c[c].append(cos)
    if not per_c:
        return []
    cs = sorted(per_c, key=float)
    return ["#### R4: gate-layer approximation, cosine similarity to the exact gate output vs c", "",
            "| c | " + " | ".join(cs) + " |", "|" + "---|" * (len(cs) + 1),
            "| cosine | " + " | ".join(f"{statistics.fmean(per_c[c]):.4f}" for c in cs) + " |", ""]


def verdict(values: list[float], reference: list[float], digits: int) -> str:
    """Difference of means, and whether the two seed ranges are apart ("lower"/"higher") or overlap."""
    delta = statistics.fmean(values) - statistics.fmean(reference)
    if len(values) == len(reference) == 1:
        side = "(one run each)"
    else:
        side = "lower" if max(values) < min(reference) else "higher" if min(values) > max(reference) else "within"
    return f"{delta:+.{digits}f} {side}"


def claims_table(runs: dict[str, list[dict]]) -> list[str]:
    present = [(claim, runs[key], runs[ref]) for claim, key, ref in CLAIMS if key in runs and ref in runs]
    if not present:
        return []
    sets = eval_sets([rs for _, rs, _ in present])
    head = ["claim", "seeds"] + [f"KL {s}" for s in sets] + [f"ppl {s}" for s in sets]
    out = ["#### Claims: difference of means, and whether the seed ranges are apart", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for claim, rs, base in present:
        cells = [claim, f"{len(rs)} vs {len(base)}"]
        for s in sets:
            kl, kl_base = kl_values(rs, s, "mean"), kl_values(base, s, "mean")
            cells.append(verdict(kl, kl_base, 4) if len(kl) == len(rs) and len(kl_base) == len(base) else "-")
        cells += [verdict([r["ppl"][s] for r in rs], [r["ppl"][s] for r in base], 2) for s in sets]
        out.append("| " + " | ".join(cells) + " |")
    return out + [""]


def model_section(model_dir: Path) -> str:
    runs = load_runs(model_dir)
    out, shown = [f"### {model_dir.name}", ""], set()
    for table in TABLES:  # a table whose runs all stand in earlier tables adds nothing (a partial sweep)
        keys = {key for _, key in table.rows if key in runs}
        if keys - shown:
            out += ppl_table(table, runs)
        shown |= keys
    out += ebss_tables(model_dir) + agq_cosine_table(runs) + claims_table(runs)
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=Path, nargs="?", default=Path("results/experiments"))
    p.add_argument("--minutes", type=int, default=None, help="sweep wall time to print in the header")
    args = p.parse_args(argv)
    models = sorted(d for d in args.root.iterdir() if d.is_dir())
    head = ["# Results", "", f"From `{args.root}`" + (f", sweep time {args.minutes} min" if args.minutes is not None else "")
            + ". Perplexity and KL to FP: lower is better; top-1 agreement with FP and accuracy (%): higher is better; "
            "Δ: this row minus the reference row.", ""]
    print("\n".join(head + [model_section(m) for m in models]))


if __name__ == "__main__":
    main()
