"""Router logits distribution alignment (EAQuant §2).

A few flipped top-k decisions send tokens to the wrong experts, which no later layer can undo, so
the router's weight quantization is chosen for the routing it produces rather than for weight
error: per output row (one expert's logit) a clip ratio minimizing
    E_x || x W^T - Q_a(x) Q_w(W)^T ||^2  +  E_x KL(p_fp || p_q),
the KL over the top m = k + int((n - k) R / 100) experts of each token (R = `kl_top`).
Coordinate descent over rows starts from the default quantizer and only accepts improvements,
so the result is never worse than the default on this objective.

Probabilities, the experts a token ranks first, the top-k choice and the router bias are the
family's (`models/routing.py`): a softmax over the logits for Mixtral-like routers, normalised
sigmoid scores with their correction bias for DeepSeek-V3-like ones. Without a routing function
the router is taken to be softmax top-k without bias.
"""
from __future__ import annotations

import torch

from duquant.config import QuantConfig
from duquant.quantizer import QuantizedWeight, fake_quant, quantize_with_grid
from models.routing import RoutingFunction
from models.spec import LayerView


def experts_in_kl(top_k: int, num_experts: int, kl_top: int) -> int:
    return top_k + int((num_experts - top_k) * kl_top / 100)


def objective(fp_logits: torch.Tensor, q_logits: torch.Tensor, m: int,
              routing: RoutingFunction | None = None) -> torch.Tensor:
    """Logit MSE (summed over experts, mean over tokens) + mean KL over each token's FP top-m experts
    (ranked and weighed by `routing`'s energies; the logits themselves for a softmax router).

    `q_logits` [..., T, n] may carry leading dimensions (one per candidate); the result has them.
    """
    mse = (fp_logits - q_logits).pow(2).sum(-1).mean(-1)
    rank, energy = (fp_logits, lambda t: t) if routing is None else (routing.ranking(fp_logits), routing.energy)
    top = rank.topk(m, dim=-1).indices
    logp = energy(fp_logits).gather(-1, top).log_softmax(-1)
    logq = energy(q_logits).gather(-1, top.expand(*q_logits.shape[:-1], m)).log_softmax(-1)
    return mse + (logp.exp() * (logp - logq)).sum(-1).mean(-1)


def routing_metrics(fp_logits: torch.Tensor, q_logits: torch.Tensor, top_k: int,
                    routing: RoutingFunction | None = None) -> dict:
    """Top-k agreement (same set of chosen experts) and mean KL of the routing probabilities."""
    if routing is None:
        same = fp_logits.topk(top_k, -1).indices.sort(-1).values == q_logits.topk(top_k, -1).indices.sort(-1).values
        logp, logq = fp_logits.log_softmax(-1), q_logits.log_softmax(-1)
        return {"topk_agreement": same.all(-1).double().mean().item(),
                "kl": (logp.exp() * (logp - logq)).sum(-1).mean().item()}
    fp, q = routing.from_logits(fp_logits), routing.from_logits(q_logits)
    return {"topk_agreement": routing.same_experts(fp.index, q.index).double().mean().item(),
            "kl": routing.kl(fp_logits, q_logits).mean().item()}


def _logits(routing: RoutingFunction | None, x: torch.Tensor, w: torch.Tensor, expert: int | None = None):
    return x @ w.T if routing is None else routing.logits_of_weight(x, w, expert)


def align_router(weight: torch.Tensor, x: torch.Tensor, quant: QuantConfig, top_k: int, kl_top: int,
                 grid: int = 20, rounds: int = 2,
                 routing: RoutingFunction | None = None) -> tuple[QuantizedWeight, torch.Tensor, dict]:
    """Per-row clip ratios for the (transformed) router weight [n, H] on transformed inputs x [T, H].

    Returns the quantized weight (on the grid of the chosen ratios), the ratios, and routing
    metrics with and without alignment.
    """
    w, x = weight.double(), x.double()
    n = w.shape[0]
    m = experts_in_kl(top_k, n, kl_top)
    x_q = fake_quant(x, quant.router_abits, quant.a_sym, quant.lac, quant.act_with_zero)
    fp_logits = _logits(routing, x, w)
    ratios = torch.full((n, 1), quant.swc, dtype=w.dtype)
    w_q = fake_quant(w, quant.router_wbits, quant.w_sym, ratios, quant.weight_with_zero)
    q_logits = _logits(routing, x_q, w_q)
    default = routing_metrics(fp_logits, q_logits, top_k, routing)
    default["objective"] = best = objective(fp_logits, q_logits, m, routing).item()
    candidates = torch.linspace(1.0, 0.5, grid, dtype=w.dtype)
    for _ in range(rounds):
        for e in range(n):
            rows = fake_quant(w[e].expand(grid, -1), quant.router_wbits, quant.w_sym, candidates[:, None],
                              quant.weight_with_zero)
            trials = q_logits.expand(grid, -1, -1).clone()
            trials[:, :, e] = _logits(routing, x_q, rows, e).T
            scores = objective(fp_logits, trials, m, routing)
            j = int(scores.argmin())  # the first best candidate, as a scan in order would keep
            if scores[j].item() < best:
                best, q_logits, ratios[e], w_q[e] = scores[j].item(), trials[j], candidates[j], rows[j]
    aligned = routing_metrics(fp_logits, q_logits, top_k, routing)
    aligned["objective"] = best
    quantized = quantize_with_grid(w, quant.router_wbits, quant.w_sym, ratios, quant.weight_with_zero)  # = w_q, row by row
    quantized.weight = quantized.weight.to(weight.dtype)
    return quantized, ratios.squeeze(1), {"default": default, "aligned": aligned, "kl_experts": m}


def align_router_official(weight: torch.Tensor, x: torch.Tensor, quant: QuantConfig, top_k: int, kl_top: int,
                          routing: RoutingFunction | None = None) -> tuple[QuantizedWeight, torch.Tensor, dict]:
    """The published EAQuant rule: one clip ratio for every row, the first of 101 ratios 0.35 -> 1.0
    with the least KL between the full-softmax probabilities of the FP-weight logits at their top m
    experts (not renormalised) and the quantized-weight log-probabilities there, both logits computed
    from the quantized activation. Same return values as `align_router`."""
    w, x = weight.double(), x.double()
    m = experts_in_kl(top_k, w.shape[0], kl_top)
    x_q = fake_quant(x, quant.router_abits, quant.a_sym, quant.lac, quant.act_with_zero)
    ref_logits = _logits(routing, x_q, w)
    rank, energy = (ref_logits, lambda t: t) if routing is None else (routing.ranking(ref_logits), routing.energy)
    top = rank.topk(m, dim=-1).indices
    ref = energy(ref_logits).softmax(-1).gather(-1, top)
    best, best_ratio = float("inf"), 1.0
    for ratio in (0.35 + i * 0.65 / 100 for i in range(101)):
        w_q = fake_quant(w, quant.router_wbits, quant.w_sym, ratio, quant.weight_with_zero)
        log_q = energy(_logits(routing, x_q, w_q)).log_softmax(-1).gather(-1, top)
        score = (torch.xlogy(ref, ref) - ref * log_q).sum(-1).mean().item()
        if score < best:
            best, best_ratio = score, ratio
    ratios = torch.full((w.shape[0], 1), best_ratio, dtype=w.dtype)
    fp_logits = _logits(routing, x, w)
    w_default = fake_quant(w, quant.router_wbits, quant.w_sym, quant.swc, quant.weight_with_zero)
    default = routing_metrics(fp_logits, _logits(routing, x_q, w_default), top_k, routing)
    quantized = quantize_with_grid(w, quant.router_wbits, quant.w_sym, ratios, quant.weight_with_zero)
    aligned = {**routing_metrics(fp_logits, _logits(routing, x_q, quantized.weight), top_k, routing),
               "objective": best}
    quantized.weight = quantized.weight.to(weight.dtype)
    return quantized, ratios.squeeze(1), {"default": default, "aligned": aligned, "kl_experts": m}


def router_quantizer(kl_top: int, grid: int, rounds: int, rule: str = "ours"):
    """The `Extensions.quantize_router` hook: (view, weight_t, x_t, quant) -> (QuantizedWeight, info);
    `rule` "ours" (`align_router`) or "official" (`align_router_official`)."""
    def hook(view: LayerView, weight_t: torch.Tensor, x_t: torch.Tensor, quant: QuantConfig):
        if rule == "official":
            quantized, ratios, info = align_router_official(weight_t, x_t, quant, view.top_k, kl_top, view.routing)
        else:
            quantized, ratios, info = align_router(weight_t, x_t, quant, view.top_k, kl_top, grid, rounds,
                                                   view.routing)
        info["clip_ratios"] = ratios.tolist()
        return quantized, info
    return hook
