"""A fake-quantized reader of one activation: y = inner(Q_a(T.act(x))) with inner.weight = Q_w(T.weight(W)).

`inner` is an `nn.Linear` or anything that applies `F.linear(x, self.weight)` first, such as a
transformers 5 router (which then returns its (logits, weights, indices) triple unchanged). The
transform T is applied online, and linears that read the same activation share one T object.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .quantizer import ActQuantizer, WeightQuantizer


class QLinear(nn.Module):
    def __init__(self, inner: nn.Module, transform: nn.Module | None, act_quant: ActQuantizer,
                 weight_quant: WeightQuantizer | None = None, weight: torch.Tensor | None = None):
        """Either `weight_quant` quantizes the transformed weight, or `weight` is the already
        quantized transformed weight (router alignment chooses its own quantization parameters)."""
        super().__init__()
        self.inner, self.transform, self.act_quant = inner, transform, act_quant
        if weight is None:
            w = inner.weight.data
            w = w.to(torch.promote_types(w.dtype, torch.float32))
            w = transform.weight(w) if transform is not None else w
            weight = weight_quant(w)
        inner.weight.data = weight.to(inner.weight.dtype)

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
