"""Expert-aware smoothing aggregation (EAQuant eq. 6).

The MoE input has one RMSNorm but many readers (router, every expert's gate/up, shared experts),
each with its own SmoothQuant requirement s_i = max|x|^a / max|W_i|^(1-a). One vector must serve
them all because it is folded into that norm. DuQuant pools every reader's weights into a single
max; EAQuant combines the per-reader requirements instead:
- maximum: channel-wise max over experts (and the router, and shared experts), so no reader's
  outliers are under-smoothed;
- expert_frequency / router_logits: experts' vectors averaged with weights from routed-token
  counts / mean routing probabilities, then maxed with the router's and shared experts' vectors.
"""
from __future__ import annotations

from functools import partial

import torch

from duquant.config import DuQuantConfig
from duquant.pipeline import site_smoothing, smoothing_readers
from duquant.stats import LayerStats
from models.spec import LayerView


def requirement(act_absmax: torch.Tensor, readers: list, cfg: DuQuantConfig) -> torch.Tensor:
    return site_smoothing(act_absmax, readers, cfg).double()


def expert_requirements(view: LayerView, act_absmax: torch.Tensor, cfg: DuQuantConfig) -> torch.Tensor:
    """[n_experts, C]: each expert's own smoothing vector for the shared MoE input."""
    return torch.stack([requirement(act_absmax, smoothing_readers(cfg, e.in_projs, e.up_proj), cfg)
                        for e in view.experts])


def aggregate(view: LayerView, stats: LayerStats, cfg: DuQuantConfig, rule: str, include_router: bool) -> torch.Tensor:
    x = stats[view.router].absmax
    per_expert = expert_requirements(view, x, cfg)
    if rule == "maximum":
        s = per_expert.amax(0)
    else:
        r = stats.router
        weights = r.counts.double() if rule == "expert_frequency" else r.prob_sum / max(r.tokens, 1)
        weights = weights / weights.sum().clamp_min(1e-12)
        s = (weights[:, None] * per_expert).sum(0)
    others = [requirement(x, smoothing_readers(cfg, sh.in_projs, sh.up_proj), cfg) for sh in view.shared]
    if view.shared_gate is not None:
        others.append(requirement(x, [view.shared_gate], cfg))
    if include_router:
        others.append(requirement(x, [view.router], cfg))
    for o in others:
        s = torch.maximum(s, o)
    return s.float()


def moe_smoothing(rule: str, include_router: bool):
    """The `Extensions.moe_smoothing` hook, (view, stats, cfg) -> s, for one aggregation rule."""
    return partial(aggregate, rule=rule, include_router=include_router)
