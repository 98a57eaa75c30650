"""The calibration activations that flow from layer to layer, and the statistics of one layer.

Each decoder layer calibrates on the outputs of the layers before it (quantized, or FP with
`propagation="fp"`), so the inputs are captured once at layer 0 and then advanced layer by layer
(docs/algorithm.md, section 5).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from models.experts import route_all_tokens
from models.sites import layer_sites
from models.spec import LayerView, ModelSpec

from .attention_replay import AttentionReplay, Handoff
from .config import DuQuantConfig
from .fp_stats import FPLayerStats, fp_site_statistics
from .layerwise import advance, capture_layer_inputs, input_hooks, observe, outputs_skipped
from .outlier_mask import track_ranges
from .qlinear import unwrap
from .stats import (LayerStats, collect, expert_down_inputs, hooked_sites, replace_absmax, routed_expert_inputs,
                    take_rotation_rows)


@dataclass
class Calibration:
    """What flows from layer to layer: the calibration inputs, expert-only extra sequences, and
    (`rotation_data="mean"`) the one mean sequence the rotations are fit on; `fp_stats` holds the
    FP model's per-site statistics when smoothing reads them (`smooth_stats="fp"`)."""

    inps: list[torch.Tensor]
    kwargs: dict
    extra: list[torch.Tensor]
    rot: list[torch.Tensor]
    fp_stats: list[FPLayerStats] | None = None


def mean_sequence(inps: list[torch.Tensor]) -> torch.Tensor:
    """The element-wise mean of the calibration sequences [1, T, C] (the published code's rotation data)."""
    total = sum(x.float() for x in inps)
    return (total / len(inps)).to(inps[0].dtype)


def calibration(model, spec: ModelSpec, calib_ids: torch.Tensor, extra_ids: torch.Tensor | None,
                cfg: DuQuantConfig, device: torch.device, route_all: bool) -> Calibration:
    fp_stats = None
    if cfg.smooth and cfg.smooth_stats == "fp":  # before capturing, so one copy of the activations exists at a time
        fp_stats = fp_site_statistics(model, spec, calib_ids, extra_ids, device, route_all,
                                      down_ranges=cfg.expert_down_smooth == "outlier_mask")
    inps, kwargs = capture_layer_inputs(model, spec, calib_ids, device, batch_size=1)
    extra = capture_layer_inputs(model, spec, extra_ids, device, 1)[0] if extra_ids is not None else []
    rot = [mean_sequence(inps)] if cfg.rotation_data == "mean" and cfg.fits_rotations else []
    return Calibration(inps, kwargs, extra, rot, fp_stats)


def rotation_sequence(data: Calibration, cfg: DuQuantConfig) -> list[torch.Tensor]:
    """The sequence(s) this layer's rotations are fit on: the propagated mean sequence ("mean"), the
    mean of this layer's calibration inputs ("layer_mean", the published EAQuant code), or none."""
    if cfg.rotation_data == "layer_mean" and cfg.fits_rotations:
        return [mean_sequence(data.inps)]
    return data.rot


def fill_expert_rows(layer: nn.Module, view: LayerView, stats: LayerStats, seqs: list[torch.Tensor], kwargs: dict,
                     budget: int) -> None:
    """The published EAQuant code's calibration balance: each routed expert's rotation rows are its own
    rows so far, then the rows `seqs` route to it, in order, up to `budget` rows (its input and its
    down-in sites alike: both see the expert's tokens in the same order)."""
    hooks = [site.hook for site in layer_sites(view) if site.expert is not None and site.hook in stats.inputs]
    kept = {m: [] if stats[m].sample is None else [stats[m].sample] for m in hooks}
    count = {m: sum(r.shape[0] for r in kept[m]) for m in hooks}

    def take(module, x):
        x = x.detach().reshape(-1, x.shape[-1])[: max(budget - count[module], 0)]
        if x.shape[0]:
            kept[module].append(x.to("cpu", torch.promote_types(x.dtype, torch.float32)))
            count[module] += x.shape[0]

    with input_hooks(hooks, take):
        observe(layer, seqs, kwargs)
    for m in hooks:
        if kept[m]:
            stats[m].sample = torch.cat(kept[m])[:budget]
            stats[m].count = stats[m].sample.shape[0]


def _routing(model, spec: ModelSpec, view: LayerView, route_all: bool):
    return route_all_tokens(model, spec, enabled=route_all and view.is_moe, layer=view.index)


def layer_statistics(model, spec: ModelSpec, layer: nn.Module, view: LayerView, data: Calibration,
                     cfg: DuQuantConfig, seed: int, route_all: bool,
                     fill: tuple[list[torch.Tensor], int] | None = None) -> tuple[LayerStats, dict]:
    """Hooked FP pass of one layer over the calibration inputs (and the expert-only extra data);
    then the maxima and rotation rows are swapped in from the FP model / mean sequence if asked, and
    with `fill` = (sequences, budget) the experts' rotation rows are topped up (`fill_expert_rows`)."""
    info: dict = {}

    def routing():
        return _routing(model, spec, view, route_all)

    downs = expert_down_inputs(view) if cfg.expert_down_smooth == "outlier_mask" else []
    with collect(hooked_sites(view), view.router, view.num_experts, cfg.rotation_tokens, seed, view.routing) as stats, \
            track_ranges(downs) as ranges, routing():
        observe(layer, data.inps, data.kwargs)
        if data.extra and view.is_moe:
            stats.frozen = {m for m in stats.inputs if m not in routed_expert_inputs(view)} | {None}
            observe(layer, data.extra, data.kwargs)
    stats.ranges = ranges
    if data.extra and view.is_moe:
        info["expert_tokens_balanced"] = [stats[e.gate_proj].count for e in view.experts]
    if data.fp_stats is not None:
        fp = data.fp_stats[view.index]
        replace_absmax(stats, layer, fp.absmax, fp.ranges)
    rot = rotation_sequence(data, cfg)
    if rot:
        with collect(hooked_sites(view), None, 0, rot[0].shape[1], seed) as rows, routing():
            observe(layer, rot, data.kwargs)
        take_rotation_rows(stats, rows)
    if fill is not None and view.is_moe:
        with routing():
            fill_expert_rows(layer, view, stats, fill[0], data.kwargs, fill[1])
    return stats, info


def unneeded_readers(view: LayerView, hooks: list[nn.Module]) -> list[nn.Module]:
    """The linears (or their QLinears, once wrapped) whose outputs no input of `hooks`' sites
    depends on: the readers of those sites and of deeper ones (models/sites.py `depth`), except the
    router, whose output routes the tokens the experts' sites see."""
    sites = layer_sites(view)
    depth = min(s.depth for s in sites if s.hook in hooks)
    readers = dict.fromkeys(r for s in sites if s.depth >= depth for r in s.readers)
    return [r for r in readers if r is not view.router and type(unwrap(r)) is nn.Linear]


def site_rows(model, spec: ModelSpec, layer: nn.Module, view: LayerView, data: Calibration, cfg: DuQuantConfig,
              seed: int, route_all: bool, hooks: list[nn.Module], fill: tuple | None = None,
              replay: Handoff | None = None) -> LayerStats:
    """The rotation rows of `hooks` in the layer as it is now (`fit_order="sequential"`): drawn as
    `layer_statistics` draws them (the rotation sequence, or a sample of the calibration inputs with
    the expert-only extra data, which only routed experts' sites read), topped up by `fill` the same
    way. The linears no hooked input depends on are skipped (`unneeded_readers`), and attention-only
    hooks stop each batch's forward after the attention. `replay` holds the previous pass's record
    of the attention and gets this pass's: the pass replays the attention where the previous record
    still holds (duquant/attention_replay.py); None: the attention is computed and nothing recorded."""
    rot = rotation_sequence(data, cfg)
    cap = rot[0].shape[1] if rot else cfg.rotation_tokens
    inside_attention = set(view.attn.modules())
    until = view.attn if all(h in inside_attention for h in hooks) else None
    routed = routed_expert_inputs(view) & set(hooks)
    skipped = unneeded_readers(view, hooks)
    attention = _attention_replay(view, hooks, until is not None, replay)
    with collect(hooks, None, 0, cap, seed) as rows, _routing(model, spec, view, route_all), outputs_skipped(skipped):
        with attention.batches("rot" if rot else "inps", len(rot or data.inps)):
            observe(layer, rot or data.inps, data.kwargs, until)
        if not rot and data.extra and routed:
            rows.frozen = set(rows.inputs) - routed
            with attention.batches("extra", len(data.extra)):
                observe(layer, data.extra, data.kwargs)
    if replay is not None:
        replay.record = attention.record
    if fill is not None and routed:
        with _routing(model, spec, view, route_all), outputs_skipped(skipped):
            fill_expert_rows(layer, view, rows, fill[0], data.kwargs, fill[1])
    return rows


def _attention_replay(view: LayerView, hooks: list[nn.Module], attention_only: bool,
                      replay: Handoff | None) -> AttentionReplay:
    """This pass's `AttentionReplay`: the o-in pass records o_proj's inputs, a pass through the MLP
    records the attention's outputs (for the next pass, or the propagation after the last), and the
    readers of `hooks`' sites are the ones wrapped before the next pass reads the record."""
    kind = None
    if replay is not None:
        kind = ("o_in" if view.attn_out in hooks else None) if attention_only else "output"
    sites = layer_sites(view)
    wrapped = frozenset(r for s in sites if s.hook in hooks for r in s.readers)
    previous = replay.record if replay is not None and not attention_only else None  # its hooks need the attention run
    return AttentionReplay(view.attn, view.attn_out, previous, kind, wrapped)


def fp_outputs(layer: nn.Module, data: Calibration, cfg: DuQuantConfig) -> tuple[list, list] | None:
    """With `propagation="fp"` (the published EAQuant code), the next layer calibrates on this
    layer's FP outputs: computed before the layer is quantized, on copies of its inputs."""
    if cfg.propagation != "fp":
        return None
    inps = advance(layer, [x.clone() for x in data.inps], data.kwargs)
    return inps, advance(layer, [x.clone() for x in data.extra], data.kwargs)
