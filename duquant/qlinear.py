"""A fake-quantized reader of one activation: y = inner(Q_a(T.act(x))) with inner.weight = Q_w(T.weight(W)).

`inner` is an `nn.Linear` or anything that applies `F.linear(x, self.weight)` first, such as a
transformers 5 router (which then returns its (logits, weights, indices) triple unchanged). The
transform T is applied online by the site's `SiteInput`, which the linears that read the same
activation share, so T(x) is computed once for all of them.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .quantizer import ActQuantizer, QuantizedWeight, WeightQuantizer
from .transforms import act_matrix


class SiteInput(nn.Module):
    """The input of one quantization site, transformed once for every linear that reads it.

    A site is one activation and the linears that read it through one transform T (q/k/v; an
    expert's gate and up; the router and shared experts). The code that builds the site creates
    one SiteInput and passes it to each reader's QLinear; QLinear registers itself as a reader.

    The model calls the readers one after another on the same tensor (transformers' attention
    calls q_proj(x), k_proj(x), v_proj(x)), and nothing in that call says "same input as the last
    reader". So the first reader of a round computes T(x) and each quantizer setting's Q_a(T(x)),
    and the following readers reuse them while they are handed the same tensor object, unmodified
    (its in-place version counter unchanged); any other input starts a new round. Once every
    reader has had its turn the round is dropped, so no activation outlives its block.

    T is applied as one dense matrix where that is cheaper than its steps (`act_matrix`). The
    matrix is derived from T's buffers, so it is a non-persistent buffer: it moves and casts with
    the module but is never saved; `refresh()` rebuilds it after T's buffers are replaced.
    """

    def __init__(self, transform: nn.Module, channels: int):
        super().__init__()
        self.transform, self.channels, self.readers = transform, channels, 0
        self.register_buffer("matrix", None, persistent=False)
        self.refresh()
        self._end_round()

    def refresh(self) -> None:
        self.matrix = act_matrix(self.transform, self.channels)

    def act(self, x: torch.Tensor) -> torch.Tensor:
        """T.act(x), as one matmul when the site has a dense matrix."""
        if self.matrix is None:
            return self.transform.act(x)
        dtype = torch.promote_types(x.dtype, self.matrix.dtype)
        return (x.to(dtype) @ self.matrix.to(x.device, dtype)).to(x.dtype)

    def quantized(self, x: torch.Tensor, act_quant: ActQuantizer) -> torch.Tensor:
        """Q_a(T(x)) for one reader, computed at most once per round and quantizer setting."""
        r = self._round
        if r.x is not x or r.version != x._version:
            self._end_round()
            r = self._round
            r.x, r.version, r.transformed = x, x._version, self.act(x)
        key = (act_quant.bits, act_quant.sym, act_quant.clip_ratio, act_quant.with_zero)
        if key not in r.quantized:
            r.quantized[key] = act_quant(r.transformed)
        out = r.quantized[key]
        r.uses += 1
        if r.uses >= self.readers:
            self._end_round()
        return out

    def _end_round(self) -> None:
        """A fresh round, kept in a plain object: nn.Module's attribute setter costs more than the
        rest of a small reader's bookkeeping."""
        self._round = _Round()


class _Round:
    """One round of a `SiteInput`: the input tensor object and its version, T(x), Q_a(T(x)) per
    quantizer setting, and how many readers have taken theirs."""

    def __init__(self):
        self.x, self.version, self.transformed, self.quantized, self.uses = None, -1, None, {}, 0


class QLinear(nn.Module):
    GRID = ("scale", "zero", "g_idx")  # buffers of the weight's quantization grid

    def __init__(self, inner: nn.Module, site: SiteInput | nn.Module | None, act_quant: ActQuantizer,
                 weight_quant: WeightQuantizer | None = None, quantized: QuantizedWeight | None = None):
        """`site` is the SiteInput this linear reads (shared with the site's other readers), or a
        bare transform, which then gets a site of its own (correct, but its T(x) is computed per
        reader), or None (no transform). Either `weight_quant` quantizes the transformed weight, or
        `quantized` is the already quantized transformed weight (router alignment and GPTQ choose
        their own grids; a saved model is loaded this way). The grid is kept (not a second weight)
        for packing."""
        super().__init__()
        if site is not None and not isinstance(site, SiteInput):
            site = SiteInput(site, inner.weight.shape[1])
        if site is not None:
            site.to(inner.weight.device)  # smoothing is fit on the CPU, rotations on the layer's device
            site.readers += 1
        self.inner, self.site, self.act_quant = inner, site, act_quant
        if quantized is None:
            w = inner.weight.data
            w = w.to(torch.promote_types(w.dtype, torch.float32))
            w = site.transform.weight(w) if site is not None else w
            quantized = weight_quant.quantize(w)
        self.set_quantized(quantized)

    @property
    def transform(self) -> nn.Module | None:
        """The site's transform T (one object for all readers of the site)."""
        return None if self.site is None else self.site.transform

    def set_quantized(self, quantized: QuantizedWeight) -> None:
        """The grid (scale, zero, g_idx) is kept as buffers so it moves, spills and is released
        with the layer; it can be computed on another device than the one the layer ends on.

        The weight is written into the existing storage: a fresh tensor per linear, with the old
        one freed only after it, grew the heap by about one layer per quantized layer."""
        device = self.inner.weight.device
        self.inner.weight.data.copy_(quantized.weight)
        self.bits, self.sym = quantized.bits, quantized.sym
        for name in self.GRID:
            value = getattr(quantized, name)
            self.register_buffer(name, None if value is None else value.to(device))

    def _apply(self, fn, recurse=True):
        """Module casts (`.to(torch.bfloat16)`) move the grid but keep its dtype: the integer codes
        are defined by the grid in the precision it was computed in."""
        grid = {n: b for n, b in self._buffers.items() if n in self.GRID and b is not None}
        super()._apply(fn, recurse)
        for name, old in grid.items():
            if self._buffers[name].dtype != old.dtype:
                self._buffers[name] = old.to(self._buffers[name].device)
        return self

    def quantized_weight(self) -> QuantizedWeight:
        """The stored weight with its grid (codes() of it are the integers a packed save writes)."""
        return QuantizedWeight(self.inner.weight.data, self.bits, self.sym, self.scale, self.zero, self.g_idx)

    @property
    def weight(self) -> torch.Tensor:
        return self.inner.weight

    def forward(self, x: torch.Tensor, *args, **kwargs):
        return self.inner(self.quantized_input(x), *args, **kwargs)

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        """Q_a(T.act(x)), shared with the site's other readers (`SiteInput`)."""
        return self.act_quant(x) if self.site is None else self.site.quantized(x, self.act_quant)


def end_rounds(module: nn.Module) -> None:
    """Drop every pending `SiteInput` round in `module`: a pass that skipped some readers of a site
    (duquant/layerwise.py `outputs_skipped`) leaves its last round open, holding that batch."""
    for m in module.modules():
        if isinstance(m, SiteInput):
            m._end_round()


def unwrap(m: nn.Module) -> nn.Module:
    """The plain linear of a module that may already be wrapped in a QLinear."""
    return m.inner if isinstance(m, QLinear) else m
