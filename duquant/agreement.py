"""Routing agreement: the quantized router against the FP router, on the same calibration inputs.

Both are read through the layer's routing function (models/routing.py), so top-k agreement, KL and
the FP router's per-expert token counts mean the same for softmax and sigmoid routers.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from models.routing import RoutingFunction


class RoutingAgreement:
    """A forward hook on the quantized router; runs the FP router on the router's input."""

    def __init__(self, fp_router: nn.Module, routing: RoutingFunction):
        self.fp_router, self.routing = fp_router, routing
        self.same = self.kl = 0.0
        self.tokens = 0
        self.counts = torch.zeros(routing.num_experts, dtype=torch.long)

    def __call__(self, module, args, out) -> None:
        fp = self.routing.from_output(self.fp_router(*args))  # some routers take more than the input
        q = self.routing.from_output(out)
        self.same += self.routing.same_experts(fp.index, q.index).sum().item()
        self.kl += self.routing.kl(fp.logits, q.logits).sum().item()
        self.tokens += fp.logits.shape[0]
        self.counts += self.routing.expert_counts(fp.index)

    def summary(self) -> dict:
        n = max(self.tokens, 1)
        return {"topk_agreement": self.same / n, "router_kl": self.kl / n}
