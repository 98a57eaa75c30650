"""Activation statistics of the full-precision model, for smoothing from FP statistics (`smooth_stats="fp"`).

The published DuQuant code computes its smoothing scales from one pass of the unquantized model
over the calibration set, before any layer is quantized; our default reads the inputs that the
already quantized layers produce. This pass provides the former: per decoder layer, the
per-channel max |x| of every hooked site (and, for the published EAQuant down-in smoothing, the
routed experts' signed down-in ranges), keyed by the module's path in the layer (a streamed layer is
rebuilt between passes, so module objects do not survive).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from models.experts import route_all_tokens, unfuse_experts
from models.spec import ModelSpec, decoder_layers, resolve

from .layerwise import advance, capture_layer_inputs, layer_on
from .outlier_mask import ChannelRange, track_ranges
from .stats import collect, expert_down_inputs, hooked_sites, routed_expert_inputs


@dataclass
class FPLayerStats:
    absmax: dict[str, torch.Tensor]  # module path -> max |x| per channel
    ranges: dict[str, ChannelRange]  # routed expert down_proj path -> its input's channel range (if asked)


@torch.no_grad()
def fp_site_statistics(model, spec: ModelSpec, calib_ids: torch.Tensor, extra_ids: torch.Tensor | None, device,
                       route_all: bool = False, down_ranges: bool = False) -> list[FPLayerStats]:
    """Per layer, the FP model's statistics on the calibration set; `extra_ids` (expert-only extra
    sequences) count for the routed experts alone, as in the quantization pass."""
    device = torch.device(device)
    inps, kwargs = capture_layer_inputs(model, spec, calib_ids, device, batch_size=1)
    extra = capture_layer_inputs(model, spec, extra_ids, device, 1)[0] if extra_ids is not None else []
    maxima = []
    for i in range(len(decoder_layers(model, spec))):
        with layer_on(model, spec, i, device) as layer:
            unfuse_experts(model, spec, i)
            view = resolve(spec, layer, model.config, i)
            downs = expert_down_inputs(view) if down_ranges else []
            with collect(hooked_sites(view), None, 0, 0, 0) as stats, track_ranges(downs) as ranges, \
                    route_all_tokens(model, spec, enabled=route_all and view.is_moe, layer=i):
                inps = advance(layer, inps, kwargs)
                stats.frozen = set(stats.inputs) - (routed_expert_inputs(view) if view.is_moe else set())
                extra = advance(layer, extra, kwargs)
            names = {m: n for n, m in layer.named_modules()}
            maxima.append(FPLayerStats({names[m]: st.absmax for m, st in stats.inputs.items()},
                                       {names[m]: r for m, r in ranges.items()}))
    return maxima
