"""Uniform fake quantization with one scale and zero point per row of the last dimension.

Reducing over the last dimension gives per-output-channel quantization for a weight
[out, in] and per-token quantization for an activation [..., C], the two granularities
DuQuant uses (docs/algorithm.md section 4). Quantizers hold no transform state: rotations,
permutations and smoothing live in `duquant.transforms` and are applied before these.

`fake_quant` computes exactly `dequantize(quantize(x, *quant_params(x)))`, so simulated
accuracy and a later packed-integer export agree bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .config import check_bits

# Keeps the scale of an all-zero (or constant) row finite, so no row ever divides by zero.
MIN_SCALE = 1e-8


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    """At least float32: bf16/fp16 cannot represent the scales and codes of a row exactly."""
    return torch.promote_types(x.dtype, torch.float32)


def _levels(bits: int, sym: bool) -> tuple[int, int]:
    if sym:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def quant_params(
    x: torch.Tensor, bits: int, sym: bool = False, clip: float | torch.Tensor = 1.0, with_zero: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of each row, shaped [..., 1].

    `clip` (a float, or a tensor broadcastable to [..., 1] for per-row ratios) shrinks the
    range before the scale is chosen: DuQuant's swc for weights and lac for activations.
    The zero point is a float holding an integer (0 in symmetric mode), so `dequantize`
    is the same formula in both modes. `with_zero=False` takes the row's own [min, max]
    even when it does not contain 0, as the published DuQuant code does for activations.
    """
    check_bits("bits", bits)
    if bits >= 16:
        raise ValueError("bits >= 16 means no quantization: there are no quantization parameters")
    return _params_from_range(_row_range(x.to(_work_dtype(x)), sym, with_zero), bits, sym, clip)


def _row_range(x: torch.Tensor, sym: bool, with_zero: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each row's (min, max), or (max |x|, None) in symmetric mode, [..., 1] in x's dtype."""
    if sym:
        return x.abs().amax(-1, keepdim=True), None
    # Including 0 in the range keeps exact zeros (padding, dead channels) exact.
    xmin, xmax = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    if with_zero:
        xmin, xmax = xmin.clamp(max=0), xmax.clamp(min=0)
    return xmin, xmax


def _params_from_range(row_range: tuple[torch.Tensor, torch.Tensor | None], bits: int, sym: bool,
                       clip: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if sym:
        scale = (row_range[0] * clip / (2 ** (bits - 1) - 1)).clamp(min=MIN_SCALE)
        return scale, torch.zeros_like(scale)
    xmin, xmax = row_range[0] * clip, row_range[1] * clip
    scale = ((xmax - xmin) / (2**bits - 1)).clamp(min=MIN_SCALE)
    zero = torch.round(-xmin / scale)
    return scale, zero


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, sym: bool = False) -> torch.Tensor:
    """Integer codes: uint8 in 0..2^b-1 (asymmetric) or int8 in -2^(b-1)..2^(b-1)-1 (symmetric)."""
    check_bits("bits", bits)
    lo, hi = _levels(bits, sym)
    q = (torch.round(x.to(scale.dtype) / scale) + zero).clamp(lo, hi)
    return q.to(torch.int8 if sym else torch.uint8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (q.to(scale.dtype) - zero) * scale


def fake_quant(x: torch.Tensor, bits: int, sym: bool = False, clip: float | torch.Tensor = 1.0,
               with_zero: bool = True) -> torch.Tensor:
    """Quantize-dequantize each row of the last dimension; returns x itself when bits >= 16.

    Every activation a quantized model reads passes through here, so the steps of `quantize` and
    `dequantize` run in place on one buffer instead of allocating a tensor each: the same
    operations in the same order and dtype, hence the same bits (for finite x; tested). The round
    trip through the integer dtype is left out because a clamped rounded code is an integer within
    that dtype's range, which the cast back returns unchanged.
    """
    check_bits("bits", bits)
    if bits >= 16:
        return x
    scale, zero = quant_params(x, bits, sym, clip, with_zero)
    lo, hi = _levels(bits, sym)
    q = x.to(scale.dtype) / scale
    return q.round_().add_(zero).clamp_(lo, hi).sub_(zero).mul_(scale).to(x.dtype)


def mse_clip_search(
    w: torch.Tensor, bits: int, sym: bool = False, grid: int = 20, min_ratio: float = 0.35, with_zero: bool = True,
    ascending: bool = False,
) -> torch.Tensor:
    """Per-row clip ratio in [min_ratio, 1] with the smallest squared reconstruction error, [..., 1].

    Errors are measured on `fake_quant`'s own output (in w's dtype), so the chosen ratio is
    optimal for the arithmetic that is actually applied. The grid starts at 1.0 and only a
    strict improvement replaces the incumbent, so no row ends up worse than plain min/max;
    `ascending` scans from min_ratio up instead (the published EAQuant code: ties keep the
    smaller ratio).
    """
    check_bits("bits", bits)
    if bits >= 16:
        return torch.ones(*w.shape[:-1], 1, dtype=_work_dtype(w), device=w.device)
    ratios = torch.linspace(min_ratio, 1.0, grid).tolist() if ascending else torch.linspace(1.0, min_ratio, grid).tolist()
    rows = w.reshape(-1, w.shape[-1])
    chunk = rows.shape[0] if w.is_cuda else max(1, SEARCH_CHUNK_ENTRIES // max(1, rows.shape[-1]))
    best = [_search_rows(rows[i : i + chunk], bits, sym, ratios, with_zero) for i in range(0, rows.shape[0], chunk)]
    return torch.cat(best).reshape(*w.shape[:-1], 1)


# Rows per block of the clip search on a CPU, as entries (2 MB of float32): a block and its scratch
# copy stay in cache through all the ratios, where the whole matrix would be read from memory once
# per ratio. A GPU takes the whole matrix at once (blocks would only multiply its kernel launches).
SEARCH_CHUNK_ENTRIES = 2**19


def _search_rows(w: torch.Tensor, bits: int, sym: bool, ratios: list[float], with_zero: bool) -> torch.Tensor:
    """`mse_clip_search` on a block of rows [n, in]: `fake_quant`'s operations in its order, on one
    scratch buffer, with each row's range measured once."""
    work = _work_dtype(w)
    w_ref = w.to(work)
    row_range = _row_range(w_ref, sym, with_zero)
    lo, hi = _levels(bits, sym)
    buf = torch.empty_like(w_ref)
    best_err = torch.full((w.shape[0], 1), float("inf"), dtype=work, device=w.device)
    best_ratio = torch.ones_like(best_err)
    for ratio in ratios:
        scale, zero = _params_from_range(row_range, bits, sym, ratio)
        torch.div(w_ref, scale, out=buf)
        q = buf.round_().add_(zero).clamp_(lo, hi).sub_(zero).mul_(scale)
        if w.dtype != work:
            q = q.to(w.dtype).to(work)
        err = q.sub_(w_ref).pow_(2).sum(-1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, torch.full_like(best_ratio, ratio), best_ratio)
    return best_ratio


@dataclass
class QuantizedWeight:
    """A fake-quantized weight with the grid it lies on, so it can be stored as integer codes.

    `scale` and `zero` are [out, G] in the dtype the codes were computed in; with G > 1 groups,
    input column j uses group `g_idx[j]`. `weight` is exactly `dequantize(codes, scale, zero)`
    cast to the model dtype, which is what makes a packed save reproduce the logits bit for bit.
    """

    weight: torch.Tensor
    bits: int = 16
    sym: bool = False
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    g_idx: torch.Tensor | None = None

    def _grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.g_idx is None:
            return self.scale, self.zero
        idx = self.g_idx.to(self.scale.device)
        return self.scale[:, idx], self.zero[:, idx]

    def codes(self) -> torch.Tensor:
        """Integer codes that decode to exactly `weight`; raises if the weight is off its grid.

        A bf16 weight can sit up to half a step from its grid point at 8 bits, so the rounded
        code's neighbours are tried too: any code that decodes to the stored value is right.
        """
        scale, zero = self._grid()
        lo, hi = _levels(self.bits, self.sym)
        q0 = torch.round(self.weight.to(scale.dtype) / scale) + zero
        codes, found = torch.zeros_like(q0), torch.zeros(q0.shape, dtype=torch.bool, device=q0.device)
        for delta in (0, -1, 1):
            cand = (q0 + delta).clamp(lo, hi)
            hit = ~found & (dequantize(cand, scale, zero).to(self.weight.dtype) == self.weight)
            codes, found = torch.where(hit, cand, codes), found | hit
        if not found.all():
            raise ValueError("weight is not on its recorded quantization grid; cannot store it as integers")
        return codes.to(torch.int8 if self.sym else torch.uint8)

    @classmethod
    def from_codes(cls, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, sym: bool,
                   dtype: torch.dtype, g_idx: torch.Tensor | None = None) -> "QuantizedWeight":
        qw = cls(torch.empty(0), bits, sym, scale, zero, g_idx)
        s, z = qw._grid()
        qw.weight = dequantize(q, s, z).to(dtype)
        return qw


def quantize_with_grid(w: torch.Tensor, bits: int, sym: bool, clip: float | torch.Tensor,
                       with_zero: bool = True) -> QuantizedWeight:
    """Quantize-dequantize each row of the last dimension, keeping the grid (`fake_quant` is its weight)."""
    check_bits("bits", bits)
    if bits >= 16:
        return QuantizedWeight(w)
    scale, zero = quant_params(w, bits, sym, clip, with_zero)
    weight = dequantize(quantize(w, scale, zero, bits, sym), scale, zero).to(w.dtype)
    return QuantizedWeight(weight, bits, sym, scale, zero)


@dataclass
class WeightQuantizer:
    """Static per-output-channel quantizer for a weight [out, in] (after its transform).

    clip="minmax" scales each row's range by `clip_ratio` (DuQuant's swc); clip="mse"
    ignores `clip_ratio` and uses the per-row ratio from `mse_clip_search`. `with_zero` forces 0
    into each row's range (see `quant_params`).
    """

    bits: int = 4
    sym: bool = False
    clip_ratio: float = 1.0
    clip: str = "minmax"
    with_zero: bool = True
    mse_grid: str = "coarse"  # "coarse": 20 ratios from 1.0 down; "official": 101 ratios from 0.35 up

    def __post_init__(self):
        check_bits("bits", self.bits)
        if self.clip not in ("minmax", "mse"):
            raise ValueError(f"clip must be 'minmax' or 'mse', got {self.clip!r}")

    def _ratio(self, w: torch.Tensor) -> float | torch.Tensor:
        if self.clip == "mse":
            fine = self.mse_grid == "official"
            return mse_clip_search(w, self.bits, self.sym, 101 if fine else 20, with_zero=self.with_zero, ascending=fine)
        return self.clip_ratio

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        return self.quantize(w).weight

    def quantize(self, w: torch.Tensor) -> QuantizedWeight:
        return quantize_with_grid(w, self.bits, self.sym, self._ratio(w) if self.bits < 16 else 1.0, self.with_zero)

    def params(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return quant_params(w, self.bits, self.sym, self._ratio(w), self.with_zero)


class ActQuantizer(nn.Module):
    """Dynamic per-token quantizer: the range of every token is measured at run time.

    `clip_ratio` is DuQuant's lac; `with_zero` forces 0 into each token's range (see
    `quant_params`). An nn.Module so it sits in the model tree next to the linear it feeds and
    shows up in print(model).
    """

    def __init__(self, bits: int = 4, sym: bool = False, clip_ratio: float = 1.0, with_zero: bool = True):
        super().__init__()
        check_bits("bits", bits)
        self.bits, self.sym, self.clip_ratio, self.with_zero = bits, sym, clip_ratio, with_zero

    @property
    def enabled(self) -> bool:
        return self.bits < 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quant(x, self.bits, self.sym, self.clip_ratio, self.with_zero)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, sym={self.sym}, clip_ratio={self.clip_ratio}, with_zero={self.with_zero}"
