"""DuQuant's layer-wise pipeline: one decoder layer at a time, a fixed sequence of small steps.

Per layer, on the inputs produced by the already quantized layers before it (docs/algorithm.md,
section 5):
1. observe: one hooked FP pass gathers the statistics of the sites that fit transforms;
2. smooth, rotate, wrap (duquant/fitting.py): transforms fitted per declared site, readers wrapped;
3. quantize weights: round-to-nearest at wrapping, or GPTQ on a pass that builds Hessians
   (duquant/gptq_layer.py);
4. propagate: the calibration inputs run through the quantized layer to become the next layer's.
Progress, timing and checkpoints wrap the loop (`Clock`, `duquant.resume`); they are not steps.
Each run does only the passes it needs: plain round-to-nearest, and any run that quantizes nothing,
reads no calibration data at all (`needs_calibration`).

Extensions (EAQuant, MoEQuant) replace one step's rule through `Extensions` and never fork the loop.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import ContextManager, Protocol

import torch
import torch.nn as nn
from tqdm import tqdm

from models.experts import route_all_tokens, unfuse_experts
from models.sites import layer_sites
from models.spec import LayerView, ModelSpec, decoder_layers, resolve

from . import kvquant, resume
from .agreement import RoutingAgreement
from .attention_replay import AttentionReplay, Handoff
from .calibration import Calibration, calibration, fp_outputs, layer_statistics, site_rows, unneeded_readers
from .config import DuQuantConfig, GPTQConfig, QuantConfig
from .fitting import LayerQuantizer, quantize_layer
from .gptq_layer import gptq_layer
from .layerwise import advance, layer_on, observe, outputs_skipped
from .qlinear import end_rounds
from .quantizer import QuantizedWeight
from .stats import LayerStats


class MoESmoothing(Protocol):
    def __call__(self, view: LayerView, stats: LayerStats, cfg: DuQuantConfig) -> torch.Tensor:
        """The one smoothing vector s [C] of the MoE input, folded into the MLP norm."""


class RouterQuantizer(Protocol):
    def __call__(self, view: LayerView, weight_t: torch.Tensor, x_t: torch.Tensor,
                 quant: QuantConfig) -> tuple[QuantizedWeight, dict]:
        """The router's quantized weight (and a report) from its transformed FP weight and a sample
        of its transformed inputs."""


class HessianWeighting(Protocol):
    def __call__(self, view: LayerView) -> ContextManager:
        """A context yielding an object with `weights(module, rows)` (one weight per input row of
        `module`, or None for unweighted) and `report()` (dict), for the GPTQ Hessians of an MoE layer."""


@dataclass(frozen=True)
class Extensions:
    """Replaceable rules: each is None (DuQuant's own rule) or a callable with the contract above.
    moe_smoothing is EAQuant's aggregation, quantize_router its router alignment, hessian_weights
    MoEQuant's affinity-guided GPTQ (used only with GPTQ)."""

    moe_smoothing: MoESmoothing | None = None
    quantize_router: RouterQuantizer | None = None
    hessian_weights: HessianWeighting | None = None


@dataclass
class Report:
    layers: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    resumed_from: int = 0  # layers restored from a checkpoint rather than quantized in this process


class Clock:
    """Seconds per step name, summed over layers."""

    def __init__(self, timings: dict[str, float]):
        self.timings = timings

    @contextmanager
    def __call__(self, name: str):
        t = time.time()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.time() - t


def quantizes_anything(quant: QuantConfig) -> bool:
    return min(quant.wbits, quant.abits, quant.kv_bits, quant.router_wbits, quant.router_abits) < 16


def needs_statistics(cfg: DuQuantConfig, ext: Extensions) -> bool:
    """Whether fitting reads a layer's calibration statistics: transforms, or an aligned router."""
    return cfg.fits_transforms or ext.quantize_router is not None


def needs_calibration(quant: QuantConfig, cfg: DuQuantConfig, gptq: GPTQConfig | None,
                      ext: Extensions | None = None) -> bool:
    """Whether any step reads calibration data. Round-to-nearest of weights, and dynamic per-token
    activation quantization, need none: such runs are data-free (and report no routing agreement)."""
    data_steps = needs_statistics(cfg, ext or Extensions()) or gptq is not None
    return (quantizes_anything(quant) or cfg.fit_at_16_bits) and data_steps


@dataclass(frozen=True)
class LayerJob:
    """What every layer's steps share (the run's settings)."""

    model: nn.Module
    spec: ModelSpec
    quant: QuantConfig
    cfg: DuQuantConfig
    ext: Extensions
    gptq: GPTQConfig | None
    device: torch.device
    seed: int
    route_all: bool
    profile_layer: int | None
    expert_fill_ratio: float = 0.0
    replay_attention: bool = True

    def routing_all(self, view: LayerView):
        return route_all_tokens(self.model, self.spec, enabled=self.route_all and view.is_moe, layer=view.index)

    def quantizer(self, view: LayerView) -> LayerQuantizer:
        return LayerQuantizer(self.quant, self.cfg, self.ext, self.seed + view.index, defer=self.gptq is not None,
                              profile=view.index == self.profile_layer, device=self.device)


def attach_kv_quant(job: LayerJob, view: LayerView) -> None:
    q = job.quant
    if q.kv_bits < 16:
        clip = q.lac if q.qk_clip == "lac" else 1.0
        view.attn.kv_quant = kvquant.KVQuant(q.kv_bits, view.attn.head_dim, q.a_sym, clip, q.act_with_zero).to(job.device)


def quantize_data_free(job: LayerJob, view: LayerView) -> dict:
    """Round-to-nearest of every quantized reader, no transform, no data."""
    lq = job.quantizer(view)
    info, _ = quantize_layer(view, None, lq)
    attach_kv_quant(job, view)
    return {"layer": view.index, "moe": view.is_moe, **info}


def expert_fill(job: LayerJob, layer: nn.Module, view: LayerView, data: Calibration, fp_next) -> tuple | None:
    """(sequences, budget) that top up the routed experts' rotation rows under the published EAQuant
    calibration balance: this layer's FP outputs (what that code's shared-storage copy of its inputs
    holds by then), up to int(k / n x seqlen x r) rows per expert."""
    if not (job.expert_fill_ratio and view.is_moe):
        return None
    seqs = fp_next[0] if fp_next is not None else advance(layer, [x.clone() for x in data.inps], data.kwargs)
    return seqs, int(view.top_k / view.num_experts * data.inps[0].shape[1] * job.expert_fill_ratio)


def observe_layer(job: LayerJob, layer: nn.Module, view: LayerView, data: Calibration,
                  lq: LayerQuantizer, fill) -> tuple[LayerStats | None, dict]:
    """Step 1: statistics, only when some quantized site fits a transform (or the router is aligned)."""
    if not (needs_statistics(job.cfg, job.ext) and any(lq.quantizes(view, s) for s in layer_sites(view))):
        return None, {}
    return layer_statistics(job.model, job.spec, layer, view, data, job.cfg, job.seed + view.index, job.route_all,
                            fill)


def row_refresh(job: LayerJob, layer: nn.Module, view: LayerView, data: Calibration, fill, replay: Handoff | None):
    """With `fit_order="sequential"`, what step 2 calls before each depth of sites: their rows in the
    layer with the earlier sites already quantized (None: every site fits on the FP layer's rows).
    Each pass leaves its record of the attention in `replay` for the next (duquant/attention_replay.py;
    None: every pass computes it)."""
    if job.cfg.fit_order != "sequential":
        return None
    return lambda sites: site_rows(job.model, job.spec, layer, view, data, job.cfg, job.seed + view.index,
                                   job.route_all, [s.hook for s in sites], fill, replay)


def gptq_step(job: LayerJob, layer: nn.Module, view: LayerView, data: Calibration, lq: LayerQuantizer) -> dict:
    """Step 3 with GPTQ: one pass over the calibration inputs (and one over the expert-only extra
    data) builds the Hessians, then every deferred weight is rounded."""
    def run(extra_pass: bool) -> None:
        if extra_pass and not (data.extra and view.is_moe):
            return
        with job.routing_all(view):
            observe(layer, data.extra if extra_pass else data.inps, data.kwargs)

    return gptq_layer(layer, view, lq, job.gptq, job.ext.hessian_weights, run)


def propagate(job: LayerJob, layer: nn.Module, view: LayerView, data: Calibration, fp_next,
              fp_router: nn.Module | None, last: bool, replay: Handoff | None) -> dict:
    """Step 4: the next layer's inputs (this layer's quantized outputs, or its FP outputs computed
    before quantizing), with the routing agreement of the quantized router measured on the way.
    After the `last` layer no layer reads them, so its inputs stay as they are; a pass that is only
    for the agreement (that one, or with FP propagation) computes no expert (`unneeded_readers`).
    The attention is replayed from the last refresh pass's record where it still holds (`replay`;
    None without one, or where GPTQ has rounded the attention's weights since)."""
    info: dict = {}
    handle = agreement = None
    attention = AttentionReplay(view.attn, view.attn_out, None if replay is None else replay.record, None, frozenset())
    if view.is_moe and fp_router is not None:
        agreement = RoutingAgreement(fp_router, view.routing)
        handle = view.mlp.get_submodule(job.spec.router).register_forward_hook(agreement)
    try:
        if fp_next is None and not last:
            with attention.batches("inps", len(data.inps)):
                data.inps = advance(layer, data.inps, data.kwargs)
            with attention.batches("extra", len(data.extra)):
                data.extra = advance(layer, data.extra, data.kwargs)
        else:
            if agreement is not None:  # the routing agreement's pass
                with outputs_skipped(unneeded_readers(view, [view.router])), attention.batches("inps", len(data.inps)):
                    observe(layer, data.inps, data.kwargs)
                end_rounds(layer)
            if fp_next is not None:
                data.inps, data.extra = fp_next
    finally:
        if handle is not None:
            handle.remove()
    if not last:
        with attention.batches("rot", len(data.rot)):
            data.rot = advance(layer, data.rot, data.kwargs)
    if agreement is not None:
        info.update(agreement.summary(), expert_tokens=agreement.counts.tolist())
    return info


def quantize_calibrated(job: LayerJob, layer: nn.Module, view: LayerView, data: Calibration, clock: Clock) -> dict:
    """The four steps of one layer that has calibration data."""
    info: dict = {"layer": view.index, "moe": view.is_moe}
    lq = job.quantizer(view)
    with clock("statistics"):
        fp_next = fp_outputs(layer, data, job.cfg)
        fill = expert_fill(job, layer, view, data, fp_next)
        stats, observed = observe_layer(job, layer, view, data, lq, fill)
        info.update(observed)
    replay = Handoff() if job.replay_attention else None  # the refresh passes' record of the attention
    with clock("fitting"):
        attach_kv_quant(job, view)  # before fitting: sequential fitting sees attention KV-quantized
        layer_info, fp_router = quantize_layer(view, stats, lq, row_refresh(job, layer, view, data, fill, replay))
        info.update(layer_info)
    if job.gptq is not None:
        replay = None  # GPTQ rounds the attention's weights: its record no longer holds
        with clock("gptq"):
            info["gptq"] = gptq_step(job, layer, view, data, lq)
    with clock("propagation"):
        last = view.index == len(decoder_layers(job.model, job.spec)) - 1
        routed = propagate(job, layer, view, data, fp_next, fp_router, last, replay)
    if stats is not None and view.is_moe:
        routed["expert_tokens"] = stats.router.counts.tolist()  # the FP layer's own routing, as observed
    info.update(routed)
    return info


@torch.no_grad()
def quantize_model(model, spec: ModelSpec, calib_ids: torch.Tensor | None, quant: QuantConfig, cfg: DuQuantConfig,
                   ext: Extensions | None = None, device="cpu", seed: int = 0, route_all: bool = False,
                   expert_extra_ids: torch.Tensor | None = None, gptq: GPTQConfig | None = None,
                   profile_layer: int | None = None, checkpoint_dir: Path | None = None,
                   expert_fill_ratio: float = 0.0, replay_attention: bool = True) -> Report:
    """Quantize `model` in place, one decoder layer at a time on `device`.

    `calib_ids` may be None for a data-free run (`needs_calibration` is False).
    `expert_extra_ids` are extra sequences whose activations calibrate the routed experts only
    (attention, router and shared experts see the base set alone).
    `gptq` replaces round-to-nearest of the weights by GPTQ, after the transforms are fitted.
    Layer `profile_layer` reports its sites' per-channel max |x| before and after the transforms.
    With `checkpoint_dir`, every finished layer is checkpointed there and a rerun resumes after
    the last one (see `duquant.resume`). `expert_fill_ratio` r > 0 tops up the routed experts'
    rotation rows as the published EAQuant code's calibration balance does (`expert_fill`).
    `replay_attention` lets sequential fitting's later passes replay the attention instead of
    computing it (duquant/attention_replay.py): the same results, for one more copy of the
    calibration activations while a layer is fitted.
    """
    job = LayerJob(model, spec, quant, cfg, ext or Extensions(), gptq, torch.device(device), seed, route_all,
                   profile_layer, expert_fill_ratio, replay_attention)
    report = Report()
    clock = Clock(report.timings)
    t0 = time.time()
    if quant.kv_bits < 16:
        kvquant.enable(model)
    data = None
    if needs_calibration(quant, cfg, gptq, job.ext):
        if calib_ids is None:
            raise ValueError("this run fits transforms or runs GPTQ: it needs calibration inputs")
        with clock("capture"):
            data = calibration(model, spec, calib_ids, expert_extra_ids, cfg, job.device, route_all)
    report.resumed_from = resume.finished_layers(checkpoint_dir)
    for i in tqdm(range(len(decoder_layers(model, spec))), desc=f"quantize {quant.tag}"):
        with layer_on(model, spec, i, job.device, changed=True) as layer:
            unfuse_experts(model, spec, i)
            if i < report.resumed_from:
                with clock("checkpoints"):
                    report.layers.append(resume.restore_layer(checkpoint_dir, i, layer))
                    if i == report.resumed_from - 1 and data is not None:
                        data.inps, data.extra, data.rot = resume.load_inputs(checkpoint_dir)
                continue
            view = resolve(spec, layer, model.config, i)
            info = quantize_data_free(job, view) if data is None else quantize_calibrated(job, layer, view, data, clock)
            report.layers.append(info)
            if checkpoint_dir is not None:
                with clock("checkpoints"):
                    resume.save_layer(checkpoint_dir, i, layer, info, *(
                        (data.inps, data.extra, data.rot) if data is not None else ([], [], [])))
    report.timings["total"] = time.time() - t0
    return report
