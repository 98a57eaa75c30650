"""Fitting and applying DuQuant to one decoder layer, site by site (models/sites.py).

Three steps over the layer's declared sites:
1. smooth: every site's smoothing vector, folded into its norm / up / value projection (or kept for
   the online transform); the smoothed calibration rows are what the rotations are fit on;
2. rotate: R1 . P . R2 per site (docs/algorithm.md, section 3), same-width expert sites searched jointly;
3. wrap: every reader becomes a `QLinear` with the site's transform and its quantizers.
Smoothing comes first for all sites because folding changes weights that wrapping quantizes
(o-in folds into v_proj, an attn-in reader). Steps 2 and 3 then run depth by depth (the default
`fit_order="sequential"`): each depth's rows are observed again with the earlier depths wrapped, so
o-in's rotation fits what quantized q/k/v produce, as the model will run; `"layer"` fits every site on
the FP layer's rows at once. A site whose readers stay at 16 bits is left alone.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from itertools import groupby

import torch
import torch.nn as nn

from models.sites import Site, layer_sites
from models.spec import LayerView

from .config import DuQuantConfig, QuantConfig
from .qlinear import QLinear, SiteInput
from .quantizer import ActQuantizer, QuantizedWeight, WeightQuantizer
from .smoothing import (fold_into_norm, fold_into_up, fold_into_v, foldable_into_v, site_smoothing,
                        smoothing_readers)
from .outlier_mask import outlier_mask
from .stats import LayerStats
from .transforms import Compose, Smooth, fit_rotations

log = logging.getLogger(__name__)

# Calibration rows x width of the sites whose rotations are fitted in one joint search. The fit
# holds about 20 bytes per entry on the layer's device (float32 rows, float64 rows, float32 search
# input and its spare), so this caps it near 0.3 GB: all experts of a zoo model at once, one
# Mixtral-8x7B expert at a time.
FIT_BATCH_ENTRIES = 2**24
KEEP_FP = WeightQuantizer(16)  # a GPTQ-deferred QLinear holds its transformed FP weight until GPTQ rounds it


def sites_per_search(entries_per_site: int) -> int:
    """How many sites of `entries_per_site` calibration entries (rows x width) one joint rotation
    search takes (at least one)."""
    return max(1, FIT_BATCH_ENTRIES // entries_per_site)


def default_moe_smoothing(view: LayerView, stats: LayerStats, cfg: DuQuantConfig) -> torch.Tensor:
    """DuQuant baseline: one vector from the MoE input's max and ALL readers' weights together (the
    published DuQuant code has no MoE input, so the "one_reader" rule has nothing to follow here)."""
    moe_in = next(s for s in layer_sites(view) if s.hook is view.router)
    return site_smoothing(stats[view.router].absmax, moe_in.smoothing_readers, cfg)


@dataclass
class SiteFit:
    """One site's fitted transform: online smoothing (where it cannot be folded), then rotations,
    and the smoothed rows they were fit on (`x`); `raw` keeps the unsmoothed rows for --plots."""

    site: Site
    x: torch.Tensor | None
    online: nn.Module | None = None
    rotation: nn.Module | None = None
    raw: torch.Tensor | None = None

    @property
    def transform(self) -> nn.Module | None:
        parts = [t for t in (self.online, self.rotation) if t is not None]
        return None if not parts else parts[0] if len(parts) == 1 else Compose(parts)


@dataclass
class MoEInput:
    """The MoE input's smoothing vector and smoothed rows, which its routed experts start from."""

    s: torch.Tensor
    x: torch.Tensor
    fallbacks: list[int] = field(default_factory=list)  # experts with too few tokens of their own


class LayerQuantizer:
    """Fits and applies DuQuant to one resolved decoder layer."""

    def __init__(self, quant: QuantConfig, cfg: DuQuantConfig, ext, seed: int, defer: bool = False,
                 profile: bool = False, device: torch.device | str = "cpu"):
        self.q, self.cfg, self.ext, self.seed = quant, cfg, ext, seed
        # Statistics are kept on the host, but the rotation searches (steps x rows x b^2 matmuls,
        # about 40 TFLOP per Mixtral-8x7B layer: most of a minute on a 16-core host, about a second
        # on a GPU) run where the layer runs.
        self.device = torch.device(device)
        self.profile = profile  # record per-channel max |x| before/after the transforms (plots)
        self.sites_fitted = 0  # rotation sites fitted so far in this layer (numbers the redrawn seeds)
        # defer=True (GPTQ): QLinears keep their transformed FP weight; (QLinear, quantizer) pairs
        # are listed here and rounded by `duquant.gptq_layer` once their Hessians are known.
        self.deferred: list[tuple[QLinear, WeightQuantizer]] | None = [] if defer else None

    def weight_quantizer(self, bits: int) -> WeightQuantizer:
        q = self.q
        return WeightQuantizer(bits, q.w_sym, q.swc, q.w_clip, q.weight_with_zero, q.mse_grid)

    def act_quant(self, bits: int) -> ActQuantizer:
        return ActQuantizer(bits, self.q.a_sym, self.q.lac, self.q.act_with_zero)

    def reader_bits(self, view: LayerView, reader: nn.Module) -> tuple[int, int]:
        """(weight bits, activation bits): the router and the shared-expert gate have their own."""
        if reader is view.router or reader is view.shared_gate:
            return self.q.router_wbits, self.q.router_abits
        return self.q.wbits, self.q.abits

    def quantizes(self, view: LayerView, site: Site) -> bool:
        """Whether the site is fitted and wrapped: some reader below 16 bits (or `fit_at_16_bits`)."""
        return self.cfg.fit_at_16_bits or any(b < 16 for r in site.smoothing_readers for b in self.reader_bits(view, r))

    def spreading_seeds(self, count: int, rotation: int) -> list[int]:
        """Seeds of the spreading matrices of the next `count` sites' `rotation`-th fit (R1, R2, then
        R1, R2 again with --permutation_times 2): the layer's seed for all ("fixed"), or a new one per
        site and fit ("redraw", as the published code draws a fresh random matrix per call)."""
        if self.cfg.rotation_seed == "fixed":
            return [self.seed] * count
        first = self.sites_fitted
        return [(self.seed * 1_000_003 + (first + k) * 64 + rotation) % 2**62 for k in range(count)]

    def rotations_many(self, xs: list[torch.Tensor]) -> list[nn.Module | None]:
        """R1 . P . R2 (repeated `permutation_times`) for several sites, in as few joint searches as
        `FIT_BATCH_ENTRIES` allows (each site's result is the same either way)."""
        if not xs or not self.cfg.fits_rotations:
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

    def wrap(self, owner: tuple[nn.Module, str], site: SiteInput | None, wbits: int, abits: int,
             quantized: QuantizedWeight | None = None) -> None:
        parent, name = owner
        inner = getattr(parent, name)
        w_quant = self.weight_quantizer(wbits)
        if self.deferred is not None and quantized is None and wbits < 16:
            qlinear = QLinear(inner, site, self.act_quant(abits), KEEP_FP)
            self.deferred.append((qlinear, w_quant))
        else:
            qlinear = QLinear(inner, site, self.act_quant(abits), w_quant, quantized)
        setattr(parent, name, qlinear)


# ---- step 1: smoothing, one rule per fold kind (models/sites.py) ----

def _smoothing_vector(site: Site, st, stats: LayerStats, cfg: DuQuantConfig) -> torch.Tensor:
    """DuQuant's smoothing of a site; a routed expert's down-in under `expert_down_smooth="outlier_mask"`
    scales its outlier channels only (duquant/outlier_mask.py; an expert no calibration token reached
    keeps 1, as in the published code)."""
    if site.expert is not None and cfg.expert_down_smooth == "outlier_mask":
        r = stats.ranges.get(site.hook)
        return torch.ones(site.hook.weight.shape[1]) if r is None or r.high is None else outlier_mask(r)
    return site_smoothing(st.absmax, smoothing_readers(cfg, site.readers, site.smooth_reader), cfg)


def _smooth_online(site: Site, st, stats: LayerStats, cfg: DuQuantConfig) -> SiteFit:
    """Smoothing that cannot be folded joins the online transform."""
    if not cfg.smooth:
        return SiteFit(site, st.sample)
    sm = Smooth(_smoothing_vector(site, st, stats, cfg))
    return SiteFit(site, sm.act(st.sample), online=sm)


def _smooth_norm(site: Site, view: LayerView, stats: LayerStats, lq: LayerQuantizer, moe: list) -> SiteFit:
    cfg, st = lq.cfg, stats[site.hook]
    x = st.sample
    is_moe_in = site.hook is view.router
    if cfg.smooth:
        if is_moe_in:
            s = (lq.ext.moe_smoothing or default_moe_smoothing)(view, stats, cfg)
        else:
            s = site_smoothing(st.absmax, smoothing_readers(cfg, site.readers, site.smooth_reader), cfg)
        fold_into_norm(site.target, site.smoothing_readers, s)
        x = x / s
    if is_moe_in:
        moe.append(MoEInput(s if cfg.smooth else torch.ones_like(st.absmax), x))
    return SiteFit(site, x)


def _smooth_value(site: Site, view: LayerView, stats: LayerStats, cfg: DuQuantConfig) -> SiteFit:
    """o-in: folded into v_proj's rows where each o_proj input channel is one v_proj output channel
    (`o_smooth="fold_v"` or `"fold_v_or_none"`, multi-head attention), else applied online
    (`"online"`, `"fold_v"`) or not at all (`"fold_v_or_none"`, the published EAQuant code)."""
    st = stats[site.hook]
    fold = cfg.o_smooth != "online" and foldable_into_v(view)
    if not (cfg.smooth and fold):
        return SiteFit(site, st.sample) if cfg.o_smooth == "fold_v_or_none" else _smooth_online(site, st, stats, cfg)
    s = site_smoothing(st.absmax, site.readers, cfg)
    fold_into_v(site.target, view.attn_out, s)
    return SiteFit(site, st.sample / s)


def expert_down_stats(site: Site, moe: list, down_stats):
    """The down-in statistics of `site`, recomputed from all MoE-input rows when its expert saw too
    few routed tokens (the rows are already smoothed, and the expert's weights carry the folded scale)."""
    if site.expert is None or site.expert not in moe[0].fallbacks:
        return down_stats
    h = site.mlp.module.down_input(moe[0].x)
    fb = copy.copy(down_stats)
    fb.sample, fb.absmax, fb.count = h, h.abs().amax(0), h.shape[0]
    return fb


def _smooth_up_rows(site: Site, stats: LayerStats, cfg: DuQuantConfig, moe: list) -> SiteFit:
    """down-in: folded into up_proj's rows; an expert that fell back to all MoE-input rows gets its
    down-in rows recomputed from them."""
    st = expert_down_stats(site, moe, stats[site.hook])
    x = st.take()
    if cfg.smooth:
        s = _smoothing_vector(site, st, stats, cfg)
        fold_into_up(site.mlp, s)
        x = x / s
    return SiteFit(site, x)


def _smooth_expert_in(site: Site, stats: LayerStats, cfg: DuQuantConfig, moe: list) -> SiteFit:
    """A routed expert's input carries the MoE input's smoothing; its rotation is fit on its own
    routed tokens, or on all MoE-input tokens when it saw fewer than `min_expert_tokens`."""
    st = stats[site.hook]
    if st.count >= cfg.min_expert_tokens:
        return SiteFit(site, st.take() / moe[0].s)
    moe[0].fallbacks.append(site.expert)
    return SiteFit(site, moe[0].x)


def smooth_sites(view: LayerView, sites: list[Site], stats: LayerStats, lq: LayerQuantizer) -> tuple[list[SiteFit], list]:
    fits, moe = [], []
    for site in sites:
        raw = stats[site.hook].sample if lq.profile and site.fold == "norm" else None
        if site.fold == "norm":
            fit = _smooth_norm(site, view, stats, lq, moe)
        elif site.fold == "v_rows":
            fit = _smooth_value(site, view, stats, lq.cfg)
        elif site.fold == "up_rows":
            fit = _smooth_up_rows(site, stats, lq.cfg, moe)
        elif site.fold == "moe_in":
            fit = _smooth_expert_in(site, stats, lq.cfg, moe)
        else:
            fit = _smooth_online(site, expert_down_stats(site, moe, stats[site.hook]), stats, lq.cfg)
        fit.raw = raw
        fits.append(fit)
    return fits, moe


# ---- step 2: rotations ----

def rotate_sites(fits: list[SiteFit], lq: LayerQuantizer) -> None:
    """Consecutive sites of one kind and width (all routed experts' inputs, all their down-ins) are
    searched together; the order of the fits is the sites' order, which numbers the redrawn seeds."""
    for _, run in groupby(fits, key=lambda f: (f.site.expert is not None, f.site.fold, f.x.shape[-1])):
        run = list(run)
        for f, rotation in zip(run, lq.rotations_many([f.x for f in run])):
            f.rotation = rotation


# ---- step 3: wrapping every reader ----

def _owners(root: nn.Module) -> dict[nn.Module, tuple[nn.Module, str]]:
    """(parent, attribute) of every submodule, to replace it by its QLinear."""
    out = {}
    for name, m in root.named_modules():
        if name:
            parent, _, attr = name.rpartition(".")
            out.setdefault(m, (root.get_submodule(parent) if parent else root, attr))
    return out


def wrap_router(view: LayerView, fit: SiteFit, lq: LayerQuantizer, owner, site: SiteInput | None, info: dict) -> None:
    """The router is quantized on its own bits, by the router-quantizer extension if one is given
    (it sees the transformed FP weight and a sample of transformed router inputs)."""
    q, t = lq.q, fit.transform
    if lq.ext.quantize_router is None or q.router_wbits >= 16:
        lq.wrap(owner, site, q.router_wbits, q.router_abits)
        return
    router_w = view.router.weight.detach().float().cpu()  # alignment runs beside its CPU statistics
    router_w_t = t.weight(router_w) if t is not None else router_w
    x_t = t.act(fit.x) if t is not None else fit.x
    quantized, info["router_align"] = lq.ext.quantize_router(view, router_w_t, x_t, q)
    lq.wrap(owner, site, q.router_wbits, q.router_abits, quantized=quantized)


def wrap_sites(view: LayerView, fits: list[SiteFit], lq: LayerQuantizer, info: dict) -> None:
    """Every reader of a site gets the site's one `SiteInput`, so T(x) is computed once per input."""
    owners = _owners(view.layer)
    for fit in fits:
        t = fit.transform
        site = SiteInput(t, fit.site.hook.weight.shape[1]) if t is not None else None
        for reader in fit.site.readers:
            if reader is view.router:
                wrap_router(view, fit, lq, owners[reader], site, info)
            else:
                lq.wrap(owners[reader], site, *lq.reader_bits(view, reader))


def channel_profile(fit: SiteFit) -> dict:
    """Per-channel max |x| of a site's calibration rows as the quantizer would see them without
    and with the transforms."""
    after = fit.rotation.act(fit.x) if fit.rotation is not None else fit.x
    return {"before": fit.raw.abs().amax(0).tolist(), "after": after.abs().amax(0).tolist()}


def refresh_rows(fits: list[SiteFit], rows: LayerStats, min_tokens: int) -> None:
    """Rows observed again with the earlier sites quantized replace each fit's rows. They are already
    smoothed where smoothing was folded; online smoothing is applied to them. An expert that now sees
    fewer than `min_tokens` rows keeps the rows it was given before."""
    for f in fits:
        st = rows[f.site.hook]
        if st.sample is None or (f.site.expert is not None and st.count < min_tokens):
            continue
        f.x = f.online.act(st.sample) if f.online is not None else st.sample


def fit_and_wrap(view: LayerView, fits: list[SiteFit], lq: LayerQuantizer, info: dict, refresh) -> None:
    """Steps 2 and 3: all sites at once on the FP layer's rows, or (`refresh` given, the published
    code's order) depth by depth (models/sites.py), each depth's rows observed with the earlier
    depths already wrapped. Under GPTQ those earlier weights are still their transformed FP weights
    then (GPTQ rounds them after fitting), so only their input quantization is seen."""
    if refresh is None:
        rotate_sites(fits, lq)
        wrap_sites(view, fits, lq, info)
        return
    for depth, group in groupby(sorted(fits, key=lambda f: f.site.depth), key=lambda f: f.site.depth):
        group = list(group)
        if depth > 0:
            refresh_rows(group, refresh([f.site for f in group]), lq.cfg.min_expert_tokens)
        rotate_sites(group, lq)
        wrap_sites(view, group, lq, info)


def quantize_layer(view: LayerView, stats: LayerStats | None, lq: LayerQuantizer,
                   refresh=None) -> tuple[dict, nn.Module | None]:
    """Fit and apply every quantized site of one layer; returns its report and, for MoE layers, the
    FP router as the quantized router will see its input (for routing diagnostics). Without
    statistics (round-to-nearest, GPTQ alone) the readers are wrapped untransformed. `refresh`
    (sites -> LayerStats of their rows in the layer as it is then) selects sequential fitting."""
    info: dict = {}
    sites = [s for s in layer_sites(view) if lq.quantizes(view, s)]
    if stats is None:
        fits, moe = [SiteFit(s, None) for s in sites], []
    else:
        fits, moe = smooth_sites(view, sites, stats, lq)
    fp_router = copy.deepcopy(view.router) if view.is_moe else None  # smoothing folded, nothing quantized
    if stats is None:
        wrap_sites(view, fits, lq, info)
    else:
        fit_and_wrap(view, fits, lq, info, refresh)
    if lq.profile:
        info["channel_absmax"] = {f.site.name: channel_profile(f) for f in fits if f.raw is not None}
    if moe and moe[0].fallbacks:
        log.warning("layer %d: experts %s got fewer than %d calibration tokens; fit on all MoE-input tokens",
                    view.index, moe[0].fallbacks, lq.cfg.min_expert_tokens)
    if view.is_moe:
        info["fallback_experts"] = moe[0].fallbacks if moe else []
    return info, fp_router
