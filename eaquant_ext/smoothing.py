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
from duquant.smoothing import site_smoothing, smoothing_readers
from duquant.stats import LayerStats
from models.spec import LayerView


def requirement(act_absmax: torch.Tensor, readers: list, cfg: DuQuantConfig) -> torch.Tensor:
    return site_smoothing(act_absmax, readers, cfg).double()


def expert_requirements(view: LayerView, act_absmax: list[torch.Tensor], cfg: DuQuantConfig) -> torch.Tensor:
    """[n_experts, C]: each expert's own smoothing vector for the shared MoE input, from its act max."""
    return torch.stack([requirement(x, smoothing_readers(cfg, e.in_projs, e.up_proj), cfg)
                        for e, x in zip(view.experts, act_absmax)])


def expert_act_absmax(view: LayerView, stats: LayerStats, expert_act: str) -> list[torch.Tensor]:
    """Per expert, the act max its requirement uses: the MoE input's over all tokens ("moe_in"), or
    over the tokens routed to it ("routed"; an expert no token reached falls back to "moe_in",
    where the published code stops with a missing-key error)."""
    x = stats[view.router].absmax
    if expert_act == "moe_in":
        return [x] * len(view.experts)
    return [x if stats[e.gate_proj].absmax is None else stats[e.gate_proj].absmax for e in view.experts]


def aggregate(view: LayerView, stats: LayerStats, cfg: DuQuantConfig, rule: str, include_router: bool,
              expert_act: str = "moe_in") -> torch.Tensor:
    x = stats[view.router].absmax
    per_expert = expert_requirements(view, expert_act_absmax(view, stats, expert_act), cfg)
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


def moe_smoothing(rule: str, include_router: bool, expert_act: str = "moe_in"):
    """The `Extensions.moe_smoothing` hook, (view, stats, cfg) -> s, for one aggregation rule."""
    return partial(aggregate, rule=rule, include_router=include_router, expert_act=expert_act)
