"""A fake-quantized reader of one activation: y = inner(Q_a(T.act(x))) with inner.weight = Q_w(T.weight(W)).

`inner` is an `nn.Linear` or anything that applies `F.linear(x, self.weight)` first, such as a
transformers 5 router (which then returns its (logits, weights, indices) triple unchanged). The
transform T is applied online, and linears that read the same activation share one T object.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from .quantizer import ActQuantizer, QuantizedWeight, WeightQuantizer


class QLinear(nn.Module):
    def __init__(self, inner: nn.Module, transform: nn.Module | None, act_quant: ActQuantizer,
                 weight_quant: WeightQuantizer | None = None, quantized: QuantizedWeight | None = None):
        """Either `weight_quant` quantizes the transformed weight, or `quantized` is the already
        quantized transformed weight (router alignment and GPTQ choose their own grids; a saved
        model is loaded this way). `self.quantized` keeps the grid (not the weight) for packing."""
        super().__init__()
        if transform is not None:
            transform.to(inner.weight.device)  # fit from statistics kept on the CPU; runs where W lives
        self.inner, self.transform, self.act_quant = inner, transform, act_quant
        if quantized is None:
            w = inner.weight.data
            w = w.to(torch.promote_types(w.dtype, torch.float32))
            w = transform.weight(w) if transform is not None else w
            quantized = weight_quant.quantize(w)
        self.set_quantized(quantized)

    def set_quantized(self, quantized: QuantizedWeight) -> None:
        self.inner.weight.data = quantized.weight.to(self.inner.weight.device, self.inner.weight.dtype)
        self.quantized = dataclasses.replace(quantized, weight=None)

    def quantized_weight(self) -> QuantizedWeight:
        """The stored weight with its grid (codes() of it are the integers a packed save writes)."""
        return dataclasses.replace(self.quantized, weight=self.inner.weight.data)

    @property
    def weight(self) -> torch.Tensor:
        return self.inner.weight

    def forward(self, x: torch.Tensor, *args, **kwargs):
        if self.transform is not None:
            x = self.transform.act(x)
        return self.inner(self.act_quant(x), *args, **kwargs)


def unwrap(m: nn.Module) -> nn.Module:
    """The plain linear of a module that may already be wrapped in a QLinear."""
    return m.inner if isinstance(m, QLinear) else m
