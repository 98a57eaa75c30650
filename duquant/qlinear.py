"""A fake-quantized reader of one activation: y = inner(Q_a(T.act(x))) with inner.weight = Q_w(T.weight(W)).

`inner` is an `nn.Linear` or anything that applies `F.linear(x, self.weight)` first, such as a
transformers 5 router (which then returns its (logits, weights, indices) triple unchanged). The
transform T is applied online, and linears that read the same activation share one T object.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .quantizer import ActQuantizer, QuantizedWeight, WeightQuantizer


class SharedInput:
    """The last input of one transform's readers, transformed, and each activation quantizer's result.

    Readers of one activation (q/k/v; an expert's gate and up; the router and shared experts)
    share one transform, so the first reader computes T.act(x) and the others reuse it while they
    see the same, unmodified tensor. It is dropped once every reader has had its turn, so no
    activation is held past the block that uses it.
    """

    def __init__(self):
        self.readers = 0
        self.clear()

    def clear(self) -> None:
        self.x, self.version, self.transformed, self.quantized, self.uses = None, -1, None, {}, 0


class QLinear(nn.Module):
    GRID = ("scale", "zero", "g_idx")  # buffers of the weight's quantization grid

    def __init__(self, inner: nn.Module, transform: nn.Module | None, act_quant: ActQuantizer,
                 weight_quant: WeightQuantizer | None = None, quantized: QuantizedWeight | None = None):
        """Either `weight_quant` quantizes the transformed weight, or `quantized` is the already
        quantized transformed weight (router alignment and GPTQ choose their own grids; a saved
        model is loaded this way). The grid is kept (not a second weight) for packing."""
        super().__init__()
        if transform is not None:
            transform.to(inner.weight.device)  # smoothing is fit on the CPU, rotations on the layer's device
            if getattr(transform, "shared_input", None) is None:
                transform.shared_input = SharedInput()
            transform.shared_input.readers += 1
        self.inner, self.transform, self.act_quant = inner, transform, act_quant
        if quantized is None:
            w = inner.weight.data
            w = w.to(torch.promote_types(w.dtype, torch.float32))
            w = transform.weight(w) if transform is not None else w
            quantized = weight_quant.quantize(w)
        self.set_quantized(quantized)

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
        """Q_a(T.act(x)), computed once per input tensor for all readers of the transform."""
        if self.transform is None:
            return self.act_quant(x)
        memo = self.transform.shared_input
        if memo.x is not x or memo.version != x._version:
            memo.clear()
            memo.x, memo.version, memo.transformed = x, x._version, self.transform.act(x)
        q = self.act_quant
        key = (q.bits, q.sym, q.clip_ratio, q.with_zero)
        if key not in memo.quantized:
            memo.quantized[key] = q(memo.transformed)
        out = memo.quantized[key]
        memo.uses += 1
        if memo.uses >= memo.readers:
            memo.clear()
        return out


def unwrap(m: nn.Module) -> nn.Module:
    """The plain linear of a module that may already be wrapped in a QLinear."""
    return m.inner if isinstance(m, QLinear) else m
