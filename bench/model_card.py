"""Measure a zoo checkpoint as a quantizer sees it and write its model card (README.md).

    python bench/model_card.py models/zoo/demo-mixtral

Reports size, training budget, held-out perplexity (Gutenberg validation books, WikiText-2 test,
C4 validation), per-layer expert load (min/max share of routed tokens) and per-layer activation
outlier ratio (max channel absmax / median channel absmax) at the attention and MoE inputs.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from duquant.data import calibration_segments, ppl_segments  # noqa: E402
from duquant.evaluate import perplexity  # noqa: E402
from duquant.stats import collect  # noqa: E402
from eaquant_ext.balance import routing_counts  # noqa: E402
from models import get_spec, load_model, resolve  # noqa: E402
from models.experts import unfuse_experts  # noqa: E402
from models.spec import decoder_layers  # noqa: E402

REAL_LLM_OUTLIERS = "20-100x"


@torch.no_grad()
def outlier_ratios(model, spec, ids: torch.Tensor) -> list[dict]:
    """max/median of per-channel max |x| at each layer's attention input and MLP/MoE input."""
    unfuse_experts(model, spec)
    views = [resolve(spec, layer, model.config, i) for i, layer in enumerate(decoder_layers(model, spec))]
    sites = [(v.attn_in[0], v.router if v.is_moe else v.dense.gate_proj) for v in views]
    with collect([m for pair in sites for m in pair], None, 0, cap=1, seed=0) as stats:
        for s in range(0, ids.shape[0], 4):
            model(ids[s : s + 4])

    def ratio(m):
        a = stats[m].absmax
        return (a.max() / a.median()).item()

    return [{"layer": v.index, "attn_in": ratio(a), "mlp_in": ratio(b), "moe": v.is_moe} for v, (a, b) in zip(views, sites)]


def measure(path: str, seqlen: int, calib_samples: int) -> dict:
    model, tok = load_model(path)
    spec = get_spec(model)
    cfg = model.config
    meta = json.loads((Path(path) / "training.json").read_text()) if (Path(path) / "training.json").exists() else {}
    out = {"class": type(model).__name__, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
           "size_mb": sum(f.stat().st_size for f in Path(path).glob("*.safetensors")) / 2**20,
           "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "seqlen": seqlen, "training": meta}
    out["ppl"] = {name: perplexity(model, spec, ppl_segments(name, tok, seqlen), desc=name)
                  for name in ("gutenberg", "wikitext2", "c4")}
    calib = calibration_segments("c4", tok, calib_samples, seqlen, seed=0)
    counts = routing_counts(model, spec, calib).sum(0).double()
    share = counts / counts.sum(-1, keepdim=True)
    out["expert_share"] = [{"min": a.min().item(), "max": a.max().item()} for a in share]
    out["uniform_share"] = 1.0 / counts.shape[-1]
    out["outliers"] = outlier_ratios(model, spec, calib)
    return out


def training_time(meta: dict) -> str:
    """Wall time and where it was spent (models trained before `hardware` was recorded ran on the
    project's shared 2-core CPU); steps before a warm start may lack a record."""
    args = meta.get("args", {})
    text = (f"{meta.get('train_seconds', 0) / 60:.0f} min wall time on {meta.get('hardware', '2 shared CPU cores')}, "
            f"batch {args.get('batch', 8)} x {args.get('seqlen', 512)} tokens")
    lost = [h["step"] for h in meta.get("history", []) if "warm_start" in h and h.get("prior_train_seconds") is None]
    if lost:
        text += f" (plus the first {lost[0]} steps, whose time was not recorded)"
    return text


def card(name: str, m: dict) -> str:
    t = m["training"]
    hist = [h for h in t.get("history", []) if "val_ppl" in h]
    o = m["outliers"]
    worst = max(max(r["attn_in"], r["mlp_in"]) for r in o)
    lines = [
        f"# {name}",
        "",
        f"A small {m['class']} trained from scratch on the bundled Gutenberg corpus by "
        "`python -m models.zoo.train`, shipped so the toolkit has a real, trained MoE to quantize "
        "(no pretrained MoE can be downloaded here). Loaded through the same code path as a hub checkpoint.",
        "",
        "| property | value |",
        "|---|---|",
        f"| parameters | {m['params_m']:.2f}M ({m['layers']} layers, hidden {m['hidden']}) |",
        f"| checkpoint | {m['size_mb']:.1f} MB (bf16 safetensors) |",
        f"| training | {t.get('steps', '?')} steps, {t.get('tokens', 0) / 1e6:.1f}M tokens, {training_time(t)} |",
        "| tokenizer | byte-level BPE, 8192 tokens, BOS prepended to every sequence |",
    ]
    if hist:
        lines.append(f"| training-time held-out ppl (24 windows) | {hist[-1]['val_ppl']:.1f} at step {hist[-1]['step']} |")
    lines += [f"| {k} perplexity (seqlen {m['seqlen']}) | {v:.2f} |" for k, v in m["ppl"].items()]
    lines += ["", "`gutenberg` = the held-out validation books (The Time Machine, A Christmas Carol, "
              "The Hound of the Baskervilles). WikiText-2 and C4 are out of domain for a model trained on 19th-century books.",
              "", "## Expert load (share of routed tokens, C4 calibration text)", "",
              f"Uniform share is {m['uniform_share']:.3f}.", "", "| layer | min share | max share |", "|---|---|---|"]
    moe_layers = [r["layer"] for r in o if r["moe"]]
    lines += [f"| {i} | {s['min']:.3f} | {s['max']:.3f} |" for i, s in zip(moe_layers, m["expert_share"])]
    lines += ["", "## Activation outliers (max channel absmax / median channel absmax)", "",
              "| layer | attention input | MLP / MoE input |", "|---|---|---|"]
    lines += [f"| {r['layer']} | {r['attn_in']:.1f} | {r['mlp_in']:.1f} |" for r in o]
    verdict = ("milder than" if worst < 20 else "comparable to")
    lines += ["", f"The largest ratio is {worst:.1f}x, {verdict} a real LLM's {REAL_LLM_OUTLIERS}. "
              "No outliers were planted: what a quantizer sees here is what training produced."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--calib_samples", type=int, default=32)
    p.add_argument("--render_only", action="store_true",
                   help="rewrite README.md from the saved card.json and the current training.json (no measuring)")
    args = p.parse_args()
    if args.render_only:
        m = json.loads((Path(args.path) / "card.json").read_text())
        m["training"] = json.loads((Path(args.path) / "training.json").read_text())
    else:
        m = measure(args.path, args.seqlen, args.calib_samples)
    (Path(args.path) / "README.md").write_text(card(Path(args.path).name, m))
    (Path(args.path) / "card.json").write_text(json.dumps(m, indent=2))
    print(card(Path(args.path).name, m))


if __name__ == "__main__":
    main()
