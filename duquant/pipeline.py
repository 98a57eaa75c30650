"""DuQuant's layer-wise pipeline: collect statistics, fit transforms, quantize, propagate.

Per decoder layer, on the inputs produced by the already quantized layers before it:
1. one FP pass with hooks gathers every site's statistics (DUQUANT.md §1, §5);
2. smoothing is folded into the norm and readers (attn-in, moe-in/mlp-in) or into up_proj rows
   (down-in); rotations and permutations are fit per site and applied online by `QLinear`;
3. the calibration inputs run through the quantized layer to become the next layer's inputs.

Extensions (EAQuant, MoEQuant) plug in through `Extensions`: they replace one step's rule
and never fork the loop.
"""
from __future__ import annotations

import copy
import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from tqdm import tqdm

from models.experts import route_all_tokens, unfuse_experts
from models.spec import LayerView, MLPView, ModelSpec, decoder_layers, resolve

from . import kvquant, resume
from .config import DuQuantConfig, GPTQConfig, QuantConfig
from .gptq import Hessian, gptq_quantize, output_cosine
from .layerwise import advance, capture_layer_inputs, layer_on, observe
from .qlinear import QLinear, unwrap
from .quantizer import ActQuantizer, QuantizedWeight, WeightQuantizer
from .fp_stats import fp_site_absmax
from .stats import LayerStats, collect, hooked_sites, replace_absmax, routed_expert_inputs, take_rotation_rows
from .transforms import Compose, Smooth, fit_rotations, fit_smooth

log = logging.getLogger(__name__)


# Calibration rows x width of the sites whose rotations are fitted in one joint search. The fit
# holds about 20 bytes per entry on the layer's device (float32 rows, float64 rows, float32 search
# input and its spare), so this caps it near 0.3 GB: all experts of a zoo model at once, one
# Mixtral-8x7B expert at a time.
FIT_BATCH_ENTRIES = 2**24


def sites_per_search(entries_per_site: int) -> int:
    """How many sites of `entries_per_site` calibration entries (rows x width) one joint rotation
    search takes (at least one)."""
    return max(1, FIT_BATCH_ENTRIES // entries_per_site)


@dataclass
class Extensions:
    """Replaceable steps. Each receives the layer view and its statistics.

    moe_smoothing(view, stats, cfg) -> s [C]: the one smoothing vector of the MoE input.
    quantize_router(view, weight_t, x_t, quant) -> (QuantizedWeight of the router, info dict), given
        the transformed FP router weight and a sample of transformed router inputs.
    hessian_weights(view) -> context manager yielding an object with `weights(module, rows)` (a
        weight per input row of `module`, or None for unweighted) and `report()` (dict): per-token
        weighting of the GPTQ Hessians of an MoE layer (MoEQuant's AGQ); used only with `--gptq`.
    """

    moe_smoothing: Callable | None = None
    quantize_router: Callable | None = None
    hessian_weights: Callable | None = None


@dataclass
class Report:
    layers: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    resumed_from: int = 0  # layers restored from a checkpoint rather than quantized in this process


def weight_absmax(linears: list[nn.Module]) -> torch.Tensor:
    """Per input channel max |W| over the rows of every reader (SmoothQuant's rule for shared inputs)."""
    return torch.stack([m.weight.detach().abs().amax(0).float().cpu() for m in linears]).amax(0)


def smoothing_readers(cfg: DuQuantConfig, readers: list[nn.Module], named: nn.Module) -> list[nn.Module]:
    """The linears whose max |W| enters a site's smoothing: all readers (SmoothQuant's rule for a
    shared input), or only `named` (the published code: q_proj for q/k/v, up_proj for gate/up)."""
    return [named] if cfg.smooth_weight == "one_reader" else readers


def site_smoothing(x_absmax: torch.Tensor, readers: list[nn.Module], cfg: DuQuantConfig) -> torch.Tensor:
    """The smoothing vector s of one site from its activation max and its readers' weights."""
    return fit_smooth(x_absmax, weight_absmax(readers), cfg.alpha, cfg.act_absmax_floor, cfg.smooth_scale_floor).scale


def default_moe_smoothing(view: LayerView, stats: LayerStats, cfg: DuQuantConfig) -> torch.Tensor:
    """DuQuant baseline: one vector from the MoE input's max and ALL readers' weights together (the
    published DuQuant code has no MoE input, so the "one_reader" rule has nothing to follow here)."""
    return site_smoothing(stats[view.router].absmax, view.moe_in_readers(), cfg)


def _scaled(w: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """w * factor computed in at least float32, returned in w's dtype."""
    dtype = torch.promote_types(w.dtype, torch.float32)
    return (w.to(dtype) * factor.to(w.device, dtype)).to(w.dtype)


def fold_into_norm(norm: nn.Module, readers: list[nn.Module], s: torch.Tensor) -> None:
    """x/s is produced by the norm (gamma/s) and undone in every reader (W diag(s)): exact in FP."""
    norm.weight.data = _scaled(norm.weight.data, 1.0 / s.double())
    for r in readers:
        r.weight.data = _scaled(r.weight.data, s)


def fold_into_up(mlp: MLPView, s: torch.Tensor) -> None:
    """down-in = act(gate x) * (up x) is linear in up's rows, so up/s and down*s is exact."""
    mlp.up_proj.weight.data = _scaled(mlp.up_proj.weight.data, 1.0 / s.double()[:, None])
    mlp.down_proj.weight.data = _scaled(mlp.down_proj.weight.data, s)


class LayerQuantizer:
    """Fits and applies DuQuant to one resolved decoder layer."""

    def __init__(self, quant: QuantConfig, cfg: DuQuantConfig, ext: Extensions, seed: int, defer: bool = False,
                 profile: bool = False, device: torch.device | str = "cpu"):
        self.q, self.cfg, self.ext, self.seed = quant, cfg, ext, seed
        # Statistics are kept on the host, but the rotation searches (steps x rows x b^2 matmuls,
        # about 40 TFLOP per Mixtral-8x7B layer: most of a minute on a 16-core host, about a second
        # on a GPU) run where the layer runs.
        self.device = torch.device(device)
        self.profile = profile  # record per-channel max |x| before/after the transforms (plots)
        self.w_quant = self.weight_quantizer(quant.wbits)
        self.sites_fitted = 0  # rotation sites fitted so far in this layer (numbers the redrawn seeds)
        # defer=True (GPTQ): QLinears keep their transformed FP weight; (QLinear, quantizer) pairs
        # are listed here and rounded by `gptq_layer` once their Hessians are known.
        self.deferred: list[tuple[QLinear, WeightQuantizer]] | None = [] if defer else None

    def weight_quantizer(self, bits: int) -> WeightQuantizer:
        q = self.q
        return WeightQuantizer(bits, q.w_sym, q.swc, q.w_clip, q.weight_with_zero, q.mse_grid)

    def act_quant(self, bits: int | None = None) -> ActQuantizer:
        return ActQuantizer(self.q.abits if bits is None else bits, self.q.a_sym, self.q.lac, self.q.act_with_zero)

    def spreading_seeds(self, count: int, rotation: int) -> list[int]:
        """Seeds of the spreading matrices of the next `count` sites' `rotation`-th fit (R1, R2, then
        R1, R2 again with --permutation_times 2): the layer's seed for all ("fixed"), or a new one per
        site and fit ("redraw", as the published code draws a fresh random matrix per call)."""
        if self.cfg.rotation_seed == "fixed":
            return [self.seed] * count
        first = self.sites_fitted
        return [(self.seed * 1_000_003 + (first + k) * 64 + rotation) % 2**62 for k in range(count)]

    def rotations(self, x: torch.Tensor | None) -> nn.Module | None:
        """R1 . P . R2 (repeated `permutation_times`) fit on smoothed calibration rows."""
        return self.rotations_many([x])[0] if x is not None else None

    def rotations_many(self, xs: list[torch.Tensor]) -> list[nn.Module | None]:
        """`rotations` for several sites with the same width (all experts of a layer), as few joint
        searches as `FIT_BATCH_ENTRIES` allows (each site's result is the same either way)."""
        if not xs or not (self.cfg.rotate or self.cfg.permute):
            return [None] * len(xs)
        per = sites_per_search(max(x.numel() for x in xs))
        out = []
        for s in range(0, len(xs), per):
            out += self._joint_rotations([x.to(self.device) for x in xs[s : s + per]])
            self.sites_fitted += len(xs[s : s + per])
        return out

    def _joint_rotations(self, xs: list[torch.Tensor]) -> list[nn.Module]:
        c = self.cfg
        steps: list[list[nn.Module]] = [[] for _ in xs]
        for round_ in range(c.permutation_times):
            ts = fit_rotations(xs, c.block_size, c.max_rotation_step, c.permute, c.rotate,
                               self.spreading_seeds(len(xs), 2 * round_), c.rotation == "shared",
                               c.rotation_stop, self.spreading_seeds(len(xs), 2 * round_ + 1), c.spreading)
            for st, t in zip(steps, ts):
                st.append(t)
            xs = [t.act(x) for t, x in zip(ts, xs)]
        return [st[0] if len(st) == 1 else Compose(st) for st in steps]

    def online_site(self, reader: nn.Module, x_stats) -> nn.Module | None:
        """o-in style site: smoothing cannot be folded, so it joins the online transform."""
        parts = []
        x = x_stats.sample
        if self.cfg.smooth:
            sm = Smooth(site_smoothing(x_stats.absmax, [reader], self.cfg))
            parts.append(sm)
            x = sm.act(x)
        rot = self.rotations(x)
        if rot is not None:
            parts.append(rot)
        return Compose(parts) if parts else None

    def wrap(self, parent: nn.Module, name: str, transform, bits: int | None = None, w_quant=None,
             quantized: QuantizedWeight | None = None):
        inner = getattr(parent, name)
        w_quant = w_quant or self.w_quant
        if self.deferred is not None and quantized is None and w_quant.bits < 16:
            qlinear = QLinear(inner, transform, self.act_quant(bits), KEEP_FP)
            self.deferred.append((qlinear, w_quant))
        else:
            qlinear = QLinear(inner, transform, self.act_quant(bits), w_quant, quantized)
        setattr(parent, name, qlinear)

    def norm_site(self, norm: nn.Module, readers: list[nn.Module], x_stats,
                  smooth_reader: nn.Module) -> tuple[nn.Module | None, torch.Tensor]:
        """attn-in / mlp-in: fold smoothing into the norm, fit rotations on the smoothed rows.
        `smooth_reader` is the one reader whose weight the "one_reader" rule uses."""
        x = x_stats.sample
        if self.cfg.smooth:
            s = site_smoothing(x_stats.absmax, smoothing_readers(self.cfg, readers, smooth_reader), self.cfg)
            fold_into_norm(norm, readers, s)
            x = x / s
        return self.rotations(x), x

    def down_site(self, mlp: MLPView, down_stats) -> torch.Tensor:
        """Fold down-in smoothing into up_proj; returns the smoothed down-in rows to fit rotations on."""
        x = down_stats.take()
        if self.cfg.smooth:
            s = site_smoothing(down_stats.absmax, [mlp.down_proj], self.cfg)
            fold_into_up(mlp, s)
            x = x / s
        return x

    def wrap_mlp(self, mlp: MLPView, t_in: nn.Module | None, t_down: nn.Module | None) -> None:
        gate, up, down = mlp.names
        self.wrap(mlp.module, gate, t_in)
        self.wrap(mlp.module, up, t_in)
        self.wrap(mlp.module, down, t_down)

    def o_site(self, view: LayerView, o_stats) -> nn.Module | None:
        """o-in: smoothing folded into v_proj's rows where each o_proj input channel is one v_proj
        output channel (`o_smooth="fold_v"` or `"fold_v_or_none"`, multi-head attention), else applied
        online (`"online"`, `"fold_v"`) or not at all (`"fold_v_or_none"`, the published EAQuant code)."""
        fold = self.cfg.o_smooth != "online" and foldable_into_v(view)
        if not (self.cfg.smooth and fold):
            if self.cfg.o_smooth == "fold_v_or_none":
                return self.rotations(o_stats.sample)
            return self.online_site(view.attn_out, o_stats)
        s = site_smoothing(o_stats.absmax, [view.attn_out], self.cfg)
        fold_into_v(view.attn_value, view.attn_out, s)
        return self.rotations(o_stats.sample / s)

    def mlp(self, mlp: MLPView, t_in: nn.Module | None, down_stats) -> None:
        """A shared expert / dense MLP whose input site transform is `t_in`."""
        self.wrap_mlp(mlp, t_in, self.rotations(self.down_site(mlp, down_stats)))


def foldable_into_v(view: LayerView) -> bool:
    """o-in channel j is v_proj output channel j only when there are as many value heads as query
    heads (no grouped-query sharing) and the adapter names the value projection."""
    v = view.attn_value
    return v is not None and v.weight.shape[0] == view.attn_out.weight.shape[1]


def fold_into_v(v_proj: nn.Module, o_proj: nn.Module, s: torch.Tensor) -> None:
    """Attention output is a per-channel mix of V over tokens, so V rows / s and o_proj columns * s
    leave the layer unchanged in FP (and KV quantization then sees V / s, as in the published code)."""
    v_proj.weight.data = _scaled(v_proj.weight.data, 1.0 / s.double()[:, None])
    if v_proj.bias is not None:
        v_proj.bias.data = _scaled(v_proj.bias.data, 1.0 / s.double())
    o_proj.weight.data = _scaled(o_proj.weight.data, s)


def expert_down_stats(expert: nn.Module, x: torch.Tensor, down_stats):
    """down-in rows of an expert that saw too few tokens, recomputed from all MoE-input rows `x`
    (already smoothed, and the expert's weights already carry the folded scale)."""
    gate, up = (p.weight.detach().to("cpu", x.dtype) for p in (expert.gate_proj, expert.up_proj))
    h = expert.act_fn(x @ gate.T) * (x @ up.T)
    fb = copy.copy(down_stats)
    fb.sample, fb.absmax, fb.count = h, h.abs().amax(0), h.shape[0]
    return fb


def quantize_layer(view: LayerView, stats: LayerStats, lq: LayerQuantizer) -> tuple[dict, nn.Module | None]:
    """Fit and apply every site of one layer; returns its report and, for MoE layers, the FP router
    as the quantized router will see its input (for routing diagnostics)."""
    q, cfg = lq.q, lq.cfg
    info: dict = {}
    attn_in = view.attn_in
    t_attn, x_attn = lq.norm_site(view.attn_norm, attn_in, stats[attn_in[0]], attn_in[0])
    if lq.profile:
        info["channel_absmax"] = {"attn_in": channel_profile(stats[attn_in[0]].sample, t_attn, x_attn)}
    t_out = lq.o_site(view, stats[view.attn_out])  # may fold into v_proj, so before v_proj is wrapped
    for lin in attn_in:
        parent, name = _parent_of(view.attn, lin)
        lq.wrap(parent, name, t_attn)
    parent, name = _parent_of(view.attn, view.attn_out)
    lq.wrap(parent, name, t_out)

    if not view.is_moe:
        t_in, x_in = lq.norm_site(view.mlp_norm, view.dense.in_projs, stats[view.dense.gate_proj], view.dense.up_proj)
        if lq.profile:
            info["channel_absmax"]["mlp_in"] = channel_profile(stats[view.dense.gate_proj].sample, t_in, x_in)
        lq.mlp(view.dense, t_in, stats[view.dense.down_proj])
        return info, None

    moe_in = stats[view.router]
    rule = lq.ext.moe_smoothing or default_moe_smoothing
    x_all = moe_in.sample
    if cfg.smooth:
        s = rule(view, stats, cfg)
        fold_into_norm(view.mlp_norm, view.moe_in_readers(), s)
        x_all = x_all / s
    else:
        s = torch.ones_like(moe_in.absmax)
    t_shared = lq.rotations(x_all)
    if lq.profile:
        info["channel_absmax"]["moe_in"] = channel_profile(moe_in.sample, t_shared, x_all)

    fp_router = copy.deepcopy(view.router)  # smoothing folded, nothing quantized: the FP reference
    router_w = view.router.weight.detach().float().cpu()  # alignment runs beside its CPU statistics
    router_w_t = t_shared.weight(router_w) if t_shared is not None else router_w
    router_wq = lq.weight_quantizer(q.router_wbits)
    if lq.ext.quantize_router is not None and q.router_wbits < 16:
        x_t = t_shared.act(x_all) if t_shared is not None else x_all
        quantized, info["router_align"] = lq.ext.quantize_router(view, router_w_t, x_t, q)
        lq.wrap(view.mlp, _last(view, view.router), t_shared, bits=q.router_abits, quantized=quantized)
    else:
        lq.wrap(view.mlp, _last(view, view.router), t_shared, bits=q.router_abits, w_quant=router_wq)
    if view.shared_gate is not None:
        lq.wrap(view.mlp, _last(view, view.shared_gate), t_shared, bits=q.router_abits, w_quant=router_wq)
    for sh in view.shared:
        lq.mlp(sh, t_shared, stats[sh.down_proj])

    fallbacks, x_in, x_down = [], [], []
    for e, expert in enumerate(view.experts):
        gate_stats, down_stats = stats[expert.gate_proj], stats[expert.down_proj]
        if gate_stats.count >= cfg.min_expert_tokens:
            x_in.append(gate_stats.take() / s)
        else:
            fallbacks.append(e)
            x_in.append(x_all)
            down_stats = expert_down_stats(expert.module, x_all, down_stats)
        x_down.append(lq.down_site(expert, down_stats))
    for expert, t_in, t_down in zip(view.experts, lq.rotations_many(x_in), lq.rotations_many(x_down)):
        lq.wrap_mlp(expert, t_in, t_down)
    if fallbacks:
        log.warning("layer %d: experts %s got fewer than %d calibration tokens; fit on all MoE-input tokens",
                    view.index, fallbacks, cfg.min_expert_tokens)
    info["fallback_experts"] = fallbacks
    return info, fp_router


def channel_profile(raw: torch.Tensor, rotation: nn.Module | None, smoothed: torch.Tensor) -> dict:
    """Per-channel max |x| of a site's calibration rows as the quantizer would see them without
    and with the transforms (smoothing already applied to `smoothed`)."""
    after = rotation.act(smoothed) if rotation is not None else smoothed
    return {"before": raw.abs().amax(0).tolist(), "after": after.abs().amax(0).tolist()}


def _parent_of(root: nn.Module, child: nn.Module) -> tuple[nn.Module, str]:
    for name, m in root.named_modules():
        if m is child:
            parent, _, attr = name.rpartition(".")
            return root.get_submodule(parent) if parent else root, attr
    raise KeyError("module not found under root")


def _last(view: LayerView, module: nn.Module) -> str:
    return _parent_of(view.mlp, module)[1]


class RoutingAgreement:
    """Compares the quantized router with the FP router on the same (quantized-model) inputs."""

    def __init__(self, fp_router: nn.Module, top_k: int):
        self.fp_router, self.top_k = fp_router, top_k
        self.same = self.kl = 0.0
        self.tokens = 0

    def __call__(self, module, args, out) -> None:
        fp_logits, _, fp_idx = self.fp_router(args[0])
        q_logits, _, q_idx = out
        self.same += (fp_idx.sort(-1).values == q_idx.sort(-1).values).all(-1).sum().item()
        logp, logq = fp_logits.float().log_softmax(-1), q_logits.float().log_softmax(-1)
        self.kl += (logp.exp() * (logp - logq)).sum(-1).sum().item()
        self.tokens += fp_logits.shape[0]

    def summary(self) -> dict:
        n = max(self.tokens, 1)
        return {"topk_agreement": self.same / n, "router_kl": self.kl / n}


# ---- GPTQ step (--gptq): Hessians of what each QLinear's weight multiplies, then GPTQ rounding ----

KEEP_FP = WeightQuantizer(16)  # a deferred QLinear holds its transformed FP weight until GPTQ rounds it
GPTQ_BATCH_BYTES = 2**32  # cap on the float32 Hessians stacked into one batched GPTQ call


def gptq_groups(view: LayerView, deferred: list) -> list[list]:
    """Deferred (QLinear, quantizer) pairs grouped by shared input, so each input's Hessian is built
    once: q/k/v; each MLP's gate/up; router + shared-expert gate; o_proj and every down_proj alone."""
    by_inner = {q.inner: (q, wq) for q, wq in deferred}
    sites = [list(view.attn_in), [view.attn_out]]
    for mlp in [view.dense] if view.dense is not None else view.shared + view.experts:
        sites += [mlp.in_projs, [mlp.down_proj]]
    if view.is_moe:
        sites.append([view.router] + ([view.shared_gate] if view.shared_gate is not None else []))
    groups = [[by_inner[unwrap(m)] for m in site if unwrap(m) in by_inner] for site in sites]
    groups = [g for g in groups if g]
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


@torch.no_grad()
def gptq_layer(layer: nn.Module, view: LayerView, deferred: list, cfg: GPTQConfig, ext: Extensions,
               run: Callable[[bool], None]) -> dict:
    """Collect the Hessians of every deferred QLinear with one calibration pass (`run(False)`; and
    `run(True)` for expert-only extra data) and replace each weight by its GPTQ rounding.

    Matrices with fewer than `cfg.min_tokens` calibration rows (dead experts) are rounded to nearest.
    Matrices of one shape and grid (the experts of a layer) go through one batched column loop.
    """
    t0 = time.time()
    if not deferred:  # nothing below 16 bits in this layer
        return {"fallback": [], "loss": 0.0, "seconds": 0.0}
    groups = [GroupHessians(g, None) for g in gptq_groups(view, deferred)]
    routed = {unwrap(p) for e in view.experts for p in (e.gate_proj, e.up_proj, e.down_proj)}
    weighting = ext.hessian_weights(view) if ext.hessian_weights is not None and view.is_moe else nullcontext()
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
    names = {m: n for n, m in layer.named_modules()}
    info: dict = {"fallback": [], "loss": 0.0}
    if token_weights is not None:
        info["agq"] = token_weights.report()
    jobs: dict[tuple, list] = {}
    for g in groups:
        for q, wq in g.members:
            h = g.hessian(q)
            if h is None or h.tokens < cfg.min_tokens:
                info["fallback"].append(names.get(q, "?"))
                q.set_quantized(wq.quantize(q.inner.weight.data.float()))
                continue
            key = (tuple(q.inner.weight.shape), wq.bits, wq.sym, wq.clip_ratio, wq.clip)
            jobs.setdefault(key, []).append((q, wq, h))
    if info["fallback"]:
        log.warning("layer %d: GPTQ fell back to round-to-nearest for %d matrices with fewer than %d calibration "
                    "rows: %s", view.index, len(info["fallback"]), cfg.min_tokens, ", ".join(info["fallback"]))
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
    info["seconds"] = time.time() - t0
    return info


@dataclass
class Calibration:
    """What flows from layer to layer: the calibration inputs, expert-only extra sequences, and
    (`rotation_data="mean"`) the one mean sequence the rotations are fit on; `fp_absmax` holds the
    FP model's per-site maxima when smoothing reads them (`smooth_stats="fp"`)."""

    inps: list[torch.Tensor]
    kwargs: dict
    extra: list[torch.Tensor]
    rot: list[torch.Tensor]
    fp_absmax: list[dict[str, torch.Tensor]] | None = None


def mean_sequence(inps: list[torch.Tensor]) -> torch.Tensor:
    """The element-wise mean of the calibration sequences [1, T, C] (the published code's rotation data)."""
    total = sum(x.float() for x in inps)
    return (total / len(inps)).to(inps[0].dtype)


def calibration(model, spec: ModelSpec, calib_ids: torch.Tensor, extra_ids: torch.Tensor | None,
                cfg: DuQuantConfig, device: torch.device, route_all: bool) -> Calibration:
    fp_absmax = None
    if cfg.smooth and cfg.smooth_stats == "fp":  # before capturing, so one copy of the activations exists at a time
        fp_absmax = fp_site_absmax(model, spec, calib_ids, extra_ids, device, route_all)
    inps, kwargs = capture_layer_inputs(model, spec, calib_ids, device, batch_size=1)
    extra = capture_layer_inputs(model, spec, extra_ids, device, 1)[0] if extra_ids is not None else []
    rot = [mean_sequence(inps)] if cfg.rotation_data == "mean" and (cfg.rotate or cfg.permute) else []
    return Calibration(inps, kwargs, extra, rot, fp_absmax)


def rotation_sequence(data: Calibration, cfg: DuQuantConfig) -> list[torch.Tensor]:
    """The sequence(s) this layer's rotations are fit on: the propagated mean sequence ("mean"), the
    mean of this layer's calibration inputs ("layer_mean", the published EAQuant code), or none."""
    if cfg.rotation_data == "layer_mean" and (cfg.rotate or cfg.permute):
        return [mean_sequence(data.inps)]
    return data.rot


def layer_statistics(model, spec: ModelSpec, layer: nn.Module, view: LayerView, data: Calibration,
                     cfg: DuQuantConfig, seed: int, route_all: bool) -> tuple[LayerStats, dict]:
    """Hooked FP pass of one layer over the calibration inputs (and the expert-only extra data);
    then the maxima and rotation rows are swapped in from the FP model / mean sequence if asked."""
    info: dict = {}

    def routing():
        return route_all_tokens(model, spec, enabled=route_all and view.is_moe, layer=view.index)

    with collect(hooked_sites(view), view.router, view.num_experts, cfg.rotation_tokens, seed) as stats, routing():
        observe(layer, data.inps, data.kwargs)
        if data.extra and view.is_moe:
            stats.frozen = {m for m in stats.inputs if m not in routed_expert_inputs(view)} | {None}
            observe(layer, data.extra, data.kwargs)
    if data.extra and view.is_moe:
        info["expert_tokens_balanced"] = [stats[e.gate_proj].count for e in view.experts]
    if data.fp_absmax is not None:
        replace_absmax(stats, layer, data.fp_absmax[view.index])
    rot = rotation_sequence(data, cfg)
    if rot:
        with collect(hooked_sites(view), None, 0, rot[0].shape[1], seed) as rows, routing():
            observe(layer, rot, data.kwargs)
        take_rotation_rows(stats, rows)
    return stats, info


def fp_outputs(layer: nn.Module, data: Calibration, cfg: DuQuantConfig) -> tuple[list, list] | None:
    """With `propagation="fp"` (the published EAQuant code), the next layer calibrates on this
    layer's FP outputs: computed before the layer is quantized, on copies of its inputs."""
    if cfg.propagation != "fp":
        return None
    inps = advance(layer, [x.clone() for x in data.inps], data.kwargs)
    return inps, advance(layer, [x.clone() for x in data.extra], data.kwargs)


@torch.no_grad()
def quantize_model(model, spec: ModelSpec, calib_ids: torch.Tensor, quant: QuantConfig, cfg: DuQuantConfig,
                   ext: Extensions | None = None, device="cpu", seed: int = 0, route_all: bool = False,
                   expert_extra_ids: torch.Tensor | None = None, gptq: GPTQConfig | None = None,
                   profile_layer: int | None = None, checkpoint_dir: Path | None = None) -> Report:
    """Quantize `model` in place, one decoder layer at a time on `device`.

    `expert_extra_ids` are extra sequences whose activations calibrate the routed experts only
    (attention, router and shared experts see the base set alone).
    `gptq` replaces round-to-nearest of the weights by GPTQ, after the transforms are fitted.
    Layer `profile_layer` reports its sites' per-channel max |x| before and after the transforms.
    With `checkpoint_dir`, every finished layer is checkpointed there and a rerun resumes after
    the last one (see `duquant.resume`).
    """
    ext = ext or Extensions()
    device = torch.device(device)
    report = Report()
    t0 = time.time()
    if quant.kv_bits < 16:
        kvquant.enable(model)
    data = calibration(model, spec, calib_ids, expert_extra_ids, cfg, device, route_all)
    report.timings["capture"] = time.time() - t0
    fit_time = stats_time = gptq_time = ckpt_time = 0.0
    report.resumed_from = resume.finished_layers(checkpoint_dir)
    for i in tqdm(range(len(decoder_layers(model, spec))), desc=f"quantize {quant.tag}"):
        with layer_on(model, spec, i, device, changed=True) as layer:
            unfuse_experts(model, spec, i)
            if i < report.resumed_from:
                t = time.time()
                report.layers.append(resume.restore_layer(checkpoint_dir, i, layer))
                if i == report.resumed_from - 1:
                    data.inps, data.extra, data.rot = resume.load_inputs(checkpoint_dir)
                ckpt_time += time.time() - t
                continue
            view = resolve(spec, layer, model.config, i)
            t = time.time()
            stats, info = layer_statistics(model, spec, layer, view, data, cfg, seed + i, route_all)
            info = {"layer": i, "moe": view.is_moe, **info}
            fp_next = fp_outputs(layer, data, cfg)
            stats_time += time.time() - t
            t = time.time()
            lq = LayerQuantizer(quant, cfg, ext, seed + i, defer=gptq is not None, profile=i == profile_layer,
                                device=device)
            layer_info, fp_router = quantize_layer(view, stats, lq)
            info.update(layer_info)
            if quant.kv_bits < 16:
                qk_clip = quant.lac if quant.qk_clip == "lac" else 1.0
                view.attn.kv_quant = kvquant.KVQuant(quant.kv_bits, view.attn.head_dim, quant.a_sym, qk_clip,
                                                   quant.act_with_zero).to(device)
            fit_time += time.time() - t
            if gptq is not None:
                def run(extra_pass: bool, layer=layer, view=view) -> None:
                    if extra_pass and not (data.extra and view.is_moe):
                        return
                    with route_all_tokens(model, spec, enabled=route_all and view.is_moe, layer=i):
                        observe(layer, data.extra if extra_pass else data.inps, data.kwargs)
                info["gptq"] = gptq_layer(layer, view, lq.deferred, gptq, ext, run)
                gptq_time += info["gptq"]["seconds"]
            if view.is_moe:
                info["expert_tokens"] = stats.router.counts.tolist()
                agreement = RoutingAgreement(fp_router, view.top_k)
                handle = view.mlp.get_submodule(spec.router).register_forward_hook(agreement)
            t = time.time()
            if fp_next is None:
                data.inps = advance(layer, data.inps, data.kwargs)
                data.extra = advance(layer, data.extra, data.kwargs)
            else:
                if view.is_moe:
                    observe(layer, data.inps, data.kwargs)  # the routing agreement's pass
                data.inps, data.extra = fp_next
            if view.is_moe:
                handle.remove()
                info.update(agreement.summary())
            data.rot = advance(layer, data.rot, data.kwargs)
            stats_time += time.time() - t
            report.layers.append(info)
            if checkpoint_dir is not None:
                t = time.time()
                resume.save_layer(checkpoint_dir, i, layer, info, data.inps, data.extra, data.rot)
                ckpt_time += time.time() - t
    report.timings.update(statistics_and_propagation=stats_time, fitting=fit_time, total=time.time() - t0)
    if checkpoint_dir is not None:
        report.timings["checkpoints"] = ckpt_time
    if gptq is not None:
        report.timings["gptq"] = gptq_time
    return report
