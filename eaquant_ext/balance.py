"""Expert-level calibration balance (EAQuant §3).

Routers are skewed, so on a fixed calibration set some experts see few tokens and their
quantization statistics are noise. Count routed tokens per expert on the base set (N tokens);
every expert under r * k * N / n tokens gets extra sequences from a second text source, chosen
greedily from a candidate pool by how much of the remaining per-expert deficit each covers,
until every expert passes or the cap on added sequences is hit. The extra sequences calibrate
the routed experts only (`quantize_model(expert_extra_ids=...)`).
"""
from __future__ import annotations

import logging

import torch
from tqdm import tqdm

from duquant.layerwise import advance, capture_layer_inputs, layer_on
from models.spec import ModelSpec, decoder_layers, get_module, layer_routing

log = logging.getLogger(__name__)


@torch.no_grad()
def routing_counts(model, spec: ModelSpec, ids: torch.Tensor, device="cpu") -> torch.Tensor:
    """Routed tokens per (sequence, MoE layer, expert) under the FP model: [S, L_moe, E], as the
    family's routing function chooses them (`models/routing.py`)."""
    device = torch.device(device)
    hidden, kwargs = capture_layer_inputs(model, spec, ids, device, batch_size=1)
    per_layer = []
    for i in tqdm(range(len(decoder_layers(model, spec))), desc="routing counts", leave=False):
        with layer_on(model, spec, i, device) as layer:
            if spec.is_moe_layer(model.config, i):
                router = get_module(layer, f"{spec.mlp}.{spec.router}")
                routing = layer_routing(spec, model.config, layer, i)
                seen: list[torch.Tensor] = []
                handle = router.register_forward_hook(lambda m, a, out, routing=routing: seen.append(
                    routing.expert_counts(routing.from_output(out).index)))
                hidden = advance(layer, hidden, kwargs)
                handle.remove()
                per_layer.append(torch.stack(seen))
            else:
                hidden = advance(layer, hidden, kwargs)
    return torch.stack(per_layer, dim=1)


def threshold(top_k: int, n_tokens: int, n_experts: int, ratio: float) -> float:
    return ratio * top_k * n_tokens / n_experts


def select_extra(base_counts: torch.Tensor, pool_counts: torch.Tensor, thresh: float, cap: int) -> tuple[list[int], bool]:
    """Greedy choice of pool sequences; returns (indices, whether every expert passed)."""
    current = base_counts.sum(0).double()
    chosen: list[int] = []
    available = torch.ones(pool_counts.shape[0], dtype=torch.bool)
    pool = pool_counts.double()
    while len(chosen) < cap:
        deficit = (thresh - current).clamp_min(0)
        if deficit.sum() == 0:
            return chosen, True
        gain = torch.minimum(pool, deficit).sum((1, 2)).masked_fill(~available, -1)
        best = int(gain.argmax())
        if gain[best] <= 0:
            break
        chosen.append(best)
        available[best] = False
        current += pool[best]
    return chosen, bool(((thresh - current) <= 0).all())


def balance_calibration(model, spec: ModelSpec, base_ids: torch.Tensor, pool_ids: torch.Tensor,
                        top_k: int, ratio: float, cap: int, device="cpu") -> tuple[torch.Tensor | None, dict]:
    """Extra sequences for starved experts, and a report of counts before and after."""
    base = routing_counts(model, spec, base_ids, device)
    n_experts = base.shape[-1]
    thresh = threshold(top_k, base_ids.numel(), n_experts, ratio)
    before = base.sum(0)
    starved = int((before < thresh).sum())
    report = {"threshold": thresh, "ratio": ratio, "starved_before": starved, "counts_before": before.tolist()}
    if starved == 0 or cap == 0:
        report.update(added_sequences=0, cap_hit=False, counts_after=before.tolist(), starved_after=starved,
                      stop="passed" if starved == 0 else "cap")
        return None, report
    pool = routing_counts(model, spec, pool_ids, device)
    chosen, passed = select_extra(base, pool, thresh, cap)
    after = before + pool[chosen].sum(0) if chosen else before
    cap_hit = not passed and len(chosen) >= cap
    report.update(added_sequences=len(chosen), cap_hit=cap_hit, counts_after=after.tolist(),
                  starved_after=int((after < thresh).sum()),
                  stop="passed" if passed else "cap" if cap_hit else "pool exhausted")
    if not passed:
        log.warning("calibration balance: %d (layer, expert) pairs still under %.0f tokens after adding %d sequences (%s)",
                    report["starved_after"], thresh, len(chosen), report["stop"])
    return (pool_ids[chosen] if chosen else None), report
