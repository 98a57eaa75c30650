"""The published EAQuant code's down-in smoothing of routed experts: scale only the outlier channels.

DuQuant smooths every channel of an expert's down_proj input by max|x|^a / max|W|^(1-a). The
published EAQuant code instead leaves ordinary channels alone and divides only the outliers, found
on each channel's signed range (its running maximum and minimum over calibration sequences):
1. candidates: channels whose maximum lies above Q(q) + 1.5 IQR of all channels' maxima (Tukey's
   fence at the q and 1 - q quantiles), and likewise minima below Q(1 - q) - 1.5 IQR;
2. if more than one candidate, an Otsu-style split of the sorted candidates refines the fence: the
   gap that best separates them, less the spread of the group kept as ordinary;
3. an outlier channel's scale is (its maximum / the largest ordinary maximum)^p (minima likewise),
   the larger of the two sides; every other channel keeps 1.
The scale folds into up_proj's rows like DuQuant's (docs/algorithm.md, section 2). It is chosen by
`expert_down_smooth="outlier_mask"` (docs/fidelity.md); q = 0.65 and p = 0.7 are the published
defaults.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn

from .layerwise import input_hooks

QUANTILE = 0.65
POWER = 0.7
FENCE = 1.5  # Tukey's fence, in IQRs
MOMENTUM = 0.9  # weight of the running value when one more calibration sequence arrives


@dataclass
class ChannelRange:
    """Per-channel maximum and minimum of a module's input, each a running average over forward calls
    (one calibration sequence each) with weight MOMENTUM on the past, as the published code keeps them."""

    high: torch.Tensor | None = None
    low: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if x.shape[0] == 0:
            return
        high, low = x.amax(0).cpu(), x.amin(0).cpu()
        if self.high is None:
            self.high, self.low = high, low
        else:
            self.high = MOMENTUM * self.high + (1 - MOMENTUM) * high
            self.low = MOMENTUM * self.low + (1 - MOMENTUM) * low


@contextmanager
def track_ranges(modules: list[nn.Module]):
    """{module: ChannelRange} of the inputs of `modules` while the block runs; hooks removed on exit."""
    ranges = {m: ChannelRange() for m in modules}
    with input_hooks(modules, lambda mod, x: ranges[mod].update(x)):
        yield ranges


def _variance(v: torch.Tensor) -> torch.Tensor:
    return v.var() if v.numel() > 1 else v.new_zeros(())


def otsu_split(values: torch.Tensor, high_side: bool) -> float:
    """The fence between outliers and ordinary values among `values` (>= 2 candidates of one side).

    Sorted in descending order, each split k scores its gap v[k-1] - v[k] less the variance of the
    ordinary group (the lower part on the high side, the upper part on the low side); the first best
    split wins. Returns the ordinary value nearest the outliers: outliers lie strictly beyond it."""
    v = values.sort(descending=True).values
    best, fence = None, None
    for k in range(1, v.numel()):
        ordinary = v[k:] if high_side else v[:k]
        score = (v[k - 1] - v[k]).abs() - _variance(ordinary)
        if best is None or score > best:
            best, fence = score, (v[k] if high_side else v[k - 1])
    return float(fence)


def _fence(values: torch.Tensor, high_side: bool) -> float:
    q_lo, q_hi = torch.quantile(values, 1 - QUANTILE), torch.quantile(values, QUANTILE)
    iqr = q_hi - q_lo
    fence = float(q_hi + FENCE * iqr) if high_side else float(q_lo - FENCE * iqr)
    beyond = values[values > fence] if high_side else values[values < fence]
    return otsu_split(beyond, high_side) if beyond.numel() > 1 else fence


def _side_scale(values: torch.Tensor, high_side: bool) -> torch.Tensor:
    """(value / the most extreme ordinary value)^p on this side's outliers, 1 elsewhere (and 1 everywhere
    when that ordinary value is 0, as the published code skips that side then)."""
    fence = _fence(values, high_side)
    outlier = values > fence if high_side else values < fence
    scale = torch.ones_like(values)
    if outlier.all() or not outlier.any():
        return scale
    ordinary = values[~outlier]
    extreme = ordinary.max() if high_side else ordinary.min()
    if extreme == 0:
        return scale
    ratio = values[outlier] / extreme
    scale[outlier] = torch.where(ratio > 0, ratio, torch.ones_like(ratio)).pow(POWER)
    return scale


def outlier_mask(r: ChannelRange) -> torch.Tensor:
    """The smoothing vector s [C] (down input / s) of one routed expert's down-in site."""
    return torch.maximum(_side_scale(r.high.float(), True), _side_scale(r.low.float(), False))
