"""The GPTQ step (`--gptq`): Hessians of what each QLinear's weight multiplies, then GPTQ rounding.

Runs after the transforms are fitted: the QLinears hold their transformed FP weights (`KEEP_FP`),
one calibration pass through the layer builds each input group's Hessian from the rows the weights
really multiply (transformed and activation-quantized), and duquant/gptq.py rounds them.
"""
from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from itertools import groupby
from typing import Callable

import torch
import torch.nn as nn

from models.sites import layer_sites
from models.spec import LayerView

from .config import GPTQConfig
from .fitting import LayerQuantizer
from .gptq import Hessian, gptq_quantize, output_cosine
from .qlinear import QLinear, unwrap
from .quantizer import QuantizedWeight

log = logging.getLogger(__name__)

GPTQ_BATCH_BYTES = 2**32  # cap on the float32 Hessians stacked into one batched GPTQ call


def gptq_groups(view: LayerView, deferred: list, bits) -> list[list]:
    """Deferred (QLinear, quantizer) pairs grouped by the input their weights multiply, so each
    input's Hessian is built once: the readers of one site (models/sites.py) at one activation
    precision (`bits(view, reader)` -> (weight bits, activation bits); the router reads the MoE input
    at its own)."""
    by_inner = {q.inner: (q, wq) for q, wq in deferred}
    groups: list[list] = []
    for site in layer_sites(view):
        members = [by_inner[unwrap(m)] for m in site.readers if unwrap(m) in by_inner]
        for _, same in groupby(sorted(members, key=lambda p: bits(view, p[0].inner)[1]),
                               key=lambda p: bits(view, p[0].inner)[1]):
            groups.append(list(same))
    if sum(map(len, groups)) != len(deferred):
        raise RuntimeError("a GPTQ-deferred linear belongs to no input group")
    return groups


class GroupHessians:
    """Forward pre-hook on a group's first reader: the input rows are what the weights multiply
    (transformed and activation-quantized). One Hessian per distinct row weighting in the group."""

    def __init__(self, members: list, token_weights):
        self.members, self.token_weights = members, token_weights
        self.hessians: dict[bool, Hessian] = {}
        self.key_of: dict[QLinear, bool] = {}
        self.active = True

    def __call__(self, module, args) -> None:
        if not self.active:
            return
        x = args[0].reshape(-1, args[0].shape[-1])
        if x.shape[0] == 0:
            return
        added = set()
        for q, _ in self.members:  # every member is asked, so per-module row offsets stay in step
            w = self.token_weights.weights(q.inner, x.shape[0]) if self.token_weights is not None else None
            key = self.key_of.setdefault(q, w is not None)
            if key in added:
                continue  # an earlier member with the same weighting already added these rows
            if key not in self.hessians:
                self.hessians[key] = Hessian(x.shape[-1], x.device)
            self.hessians[key].add(x, w)
            added.add(key)

    def hessian(self, q: QLinear) -> Hessian | None:
        return self.hessians.get(self.key_of.get(q))


def collect_hessians(view: LayerView, groups: list[GroupHessians], hessian_weights, run: Callable[[bool], None]):
    """One pass over the calibration inputs (`run(False)`), then one over the expert-only extra data
    (`run(True)`) for the routed experts' groups alone; returns the token weighting's report or None."""
    routed = {unwrap(p) for e in view.experts for p in (e.gate_proj, e.up_proj, e.down_proj)}
    weighting = hessian_weights(view) if hessian_weights is not None and view.is_moe else nullcontext()
    with weighting as token_weights:
        handles = []
        try:
            for g in groups:
                g.token_weights = token_weights
                handles.append(g.members[0][0].inner.register_forward_pre_hook(g))
            run(False)
            for g in groups:
                g.active = g.members[0][0].inner in routed
            run(True)
        finally:
            for h in handles:
                h.remove()
    return token_weights.report() if token_weights is not None else None


def plan_rounding(layer: nn.Module, groups: list[GroupHessians], min_tokens: int, info: dict) -> dict[tuple, list]:
    """Matrices batched by (shape, grid) for GPTQ; those whose Hessian saw fewer than `min_tokens`
    rows (dead experts) are rounded to nearest right away and listed in info["fallback"]."""
    names = {m: n for n, m in layer.named_modules()}
    jobs: dict[tuple, list] = {}
    for g in groups:
        for q, wq in g.members:
            h = g.hessian(q)
            if h is None or h.tokens < min_tokens:
                info["fallback"].append(names.get(q, "?"))
                q.set_quantized(wq.quantize(q.inner.weight.data.float()))
                continue
            key = (tuple(q.inner.weight.shape), wq.bits, wq.sym, wq.clip_ratio, wq.clip)
            jobs.setdefault(key, []).append((q, wq, h))
    return jobs


def round_batches(view: LayerView, jobs: dict[tuple, list], cfg: GPTQConfig, info: dict) -> None:
    """GPTQ on each batch of same-shape matrices; the router's and the experts' gate_proj output
    cosine (FP vs quantized, under their Hessians) is reported, as AGQ's diagnostics read it."""
    gate_ins = {unwrap(e.gate_proj) for e in view.experts}
    cos: dict[str, list[float]] = {"router": [], "expert_gate_proj": []}
    for (shape, *_), items in jobs.items():
        per_batch = max(1, GPTQ_BATCH_BYTES // (4 * shape[-1] ** 2))
        for s in range(0, len(items), per_batch):
            chunk = items[s : s + per_batch]
            w = torch.stack([q.inner.weight.data for q, _, _ in chunk])
            hs = torch.stack([h.matrix() for _, _, h in chunk])
            res = gptq_quantize(w, hs, chunk[0][1], cfg.blocksize, cfg.percdamp, cfg.act_order, cfg.group_size)
            info["loss"] += res.loss.sum().item()
            for b, ((q, wq, _), w_fp, h) in enumerate(zip(chunk, w, hs)):
                w_q = res.weight[b]
                if q.inner is view.router or q.inner in gate_ins:
                    cos["router" if q.inner is view.router else "expert_gate_proj"].append(output_cosine(w_fp, w_q, h))
                q.set_quantized(QuantizedWeight(w_q, wq.bits, wq.sym, res.scale[b], res.zero[b],
                                                None if res.g_idx is None else res.g_idx[b]))
    for k, v in cos.items():
        if v:
            info[f"{k}_out_cos"] = sum(v) / len(v)


@torch.no_grad()
def gptq_layer(layer: nn.Module, view: LayerView, lq: LayerQuantizer, cfg: GPTQConfig, hessian_weights,
               run: Callable[[bool], None]) -> dict:
    """Collect the Hessians of every deferred QLinear and replace each weight by its GPTQ rounding.
    Matrices of one shape and grid (the experts of a layer) go through one batched column loop."""
    t0 = time.time()
    if not lq.deferred:  # nothing below 16 bits in this layer
        return {"fallback": [], "loss": 0.0, "seconds": 0.0}
    groups = [GroupHessians(g, None) for g in gptq_groups(view, lq.deferred, lq.reader_bits)]
    agq = collect_hessians(view, groups, hessian_weights, run)
    info: dict = {"fallback": [], "loss": 0.0, **({"agq": agq} if agq is not None else {})}
    jobs = plan_rounding(layer, groups, cfg.min_tokens, info)
    if info["fallback"]:
        log.warning("layer %d: GPTQ fell back to round-to-nearest for %d matrices with fewer than %d calibration "
                    "rows: %s", view.index, len(info["fallback"]), cfg.min_tokens, ", ".join(info["fallback"]))
    round_batches(view, jobs, cfg, info)
    info["seconds"] = time.time() - t0
    return info
