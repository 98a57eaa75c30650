"""What a quantized MoE's routing looks like next to the FP model's: summaries and plots.

The per-layer numbers come from the pipeline's report (`quantize_model`); this module only
condenses them into results.json's "router" and "experts" sections and draws them, so every
method (RTN, DuQuant, EAQuant, MoEQuant) is diagnosed the same way.
"""
from __future__ import annotations

from pathlib import Path

import torch

from models.files import write_file_atomically


def expert_balance_std(counts, top_k: int) -> float:
    """MoEQuant's expert-balance metric (its Eq. 3-4, "expert balance std" of R1).

    `counts` [..., L, E] are routed tokens per (MoE layer, expert); leading dimensions are summed.
    Per layer the usage frequency of expert e is u_e = count_e / tokens (the u_e of a layer sum to
    top_k); sigma_l is the unbiased std of u over experts; the metric is the mean of sigma_l over
    layers. 0 means perfectly balanced.
    """
    c = torch.as_tensor(counts).double()
    c = c.reshape(-1, *c.shape[-2:]).sum(0)
    tokens = (c.sum(-1, keepdim=True) / top_k).clamp_min(1e-12)
    return (c / tokens).std(-1, unbiased=True).mean().item()


def summarize(layers: list[dict], top_k: int | None) -> tuple[dict, dict]:
    """results.json "router" and "experts" sections from the pipeline's per-layer report (empty for a
    data-free run, which routes no calibration tokens)."""
    moe = [r for r in layers if r.get("moe") and "expert_tokens" in r]
    router = {
        "per_layer": [{"layer": r["layer"], "topk_agreement": r["topk_agreement"], "router_kl": r["router_kl"]}
                      for r in moe if "topk_agreement" in r],
    }
    if router["per_layer"]:
        n = len(router["per_layer"])
        router["mean_topk_agreement"] = sum(r["topk_agreement"] for r in router["per_layer"]) / n
        router["mean_router_kl"] = sum(r["router_kl"] for r in router["per_layer"]) / n
    experts = {"per_layer": []}
    for r in moe:
        entry = {"layer": r["layer"], "calibration_tokens": r["expert_tokens"],
                 "fallback_experts": r.get("fallback_experts", [])}
        if "expert_tokens_balanced" in r:
            entry["calibration_tokens_balanced"] = r["expert_tokens_balanced"]
        experts["per_layer"].append(entry)
    if moe and top_k:
        experts["balance_std"] = expert_balance_std([r["expert_tokens"] for r in moe], top_k)
        if all("expert_tokens_balanced" in r for r in moe):
            experts["balance_std_balanced"] = expert_balance_std([r["expert_tokens_balanced"] for r in moe], top_k)
    return router, experts


def _save(fig, path: Path) -> None:
    """PNG written atomically, like every other artefact of a run."""
    write_file_atomically(path, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight"))


def plot_run(result: dict, out_dir: Path) -> list[Path]:
    """Expert load, routing agreement and channel absmax (before/after the transforms) PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    q = result["config"]["quant"]
    title = f"{Path(str(result['model'])).name} {result['method']} W{q['wbits']}A{q['abits']}"
    experts = result.get("experts", {}).get("per_layer", [])
    if experts:
        counts = torch.tensor([e["calibration_tokens"] for e in experts], dtype=torch.float64)
        share = counts / counts.sum(1, keepdim=True).clamp_min(1)
        fig, ax = plt.subplots(figsize=(1 + 0.3 * share.shape[1], 1 + 0.4 * share.shape[0]))
        im = ax.imshow(share.numpy(), aspect="auto", cmap="viridis")
        ax.set(xlabel="expert", ylabel="MoE layer", yticks=range(len(experts)),
               yticklabels=[e["layer"] for e in experts], title=f"calibration token share per expert\n{title}")
        fig.colorbar(im, ax=ax)
        written.append(out_dir / "expert_load.png")
        _save(fig, written[-1])
        plt.close(fig)
    routing = result.get("router", {}).get("per_layer", [])
    if routing:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        layers = [r["layer"] for r in routing]
        ax.plot(layers, [r["topk_agreement"] for r in routing], "o-", label="top-k agreement")
        ax.set(xlabel="layer", ylabel="top-k agreement with FP", ylim=(0, 1.02), title=f"routing\n{title}")
        ax2 = ax.twinx()
        ax2.plot(layers, [r["router_kl"] for r in routing], "s--", color="tab:red", label="KL(p_fp || p_q)")
        ax2.set_ylabel("mean KL", color="tab:red")
        fig.legend(loc="lower left")
        written.append(out_dir / "routing_agreement.png")
        _save(fig, written[-1])
        plt.close(fig)
    profiles = result.get("channel_absmax")
    if profiles:
        sites = list(profiles["sites"])
        fig, axes = plt.subplots(len(sites), 1, figsize=(8, 2.6 * len(sites)), squeeze=False)
        for ax, site in zip(axes[:, 0], sites):
            p = profiles["sites"][site]
            ax.plot(p["before"], lw=0.8, label="before")
            ax.plot(p["after"], lw=0.8, label="after transforms")
            ax.set(yscale="log", ylabel="max |x|", title=f"layer {profiles['layer']} {site}")
            ax.legend(loc="upper right")
        axes[-1, 0].set_xlabel("channel")
        fig.suptitle(title)
        fig.tight_layout()
        written.append(out_dir / "channel_absmax.png")
        _save(fig, written[-1])
        plt.close(fig)
    return written
