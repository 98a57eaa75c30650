"""Fake quantization of the attention matmul inputs (Q, K after RoPE, and V), as DuQuant's W4A4 does.

Q and K are multiplied by a per-head Hadamard matrix H first: (QH)(KH)^T = QK^T, so the scores are
unchanged in full precision while outlier dimensions are spread before per-token, per-head
quantization. Implemented as a registered attention function so no modeling code is patched;
layers without a `kv_quant` attribute run plain SDPA.
"""
from __future__ import annotations

import math

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from .quantizer import fake_quant

IMPLEMENTATION = "duquant_kv_sdpa"


def hadamard(n: int, dtype=torch.float32) -> torch.Tensor:
    """Normalized Sylvester Hadamard matrix; head dims that are not powers of two get none (identity)."""
    if n & (n - 1):
        return torch.eye(n, dtype=dtype)
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(n)).to(dtype)


class KVQuant(torch.nn.Module):
    """Per-layer settings, attached to the attention module as `kv_quant`. `clip` applies to Q and K
    (the published code clips them by lac); V is never clipped."""

    def __init__(self, bits: int, head_dim: int, sym: bool = False, clip: float = 1.0, with_zero: bool = True):
        super().__init__()
        self.bits, self.sym, self.clip, self.with_zero = bits, sym, clip, with_zero
        self.register_buffer("hadamard", hadamard(head_dim))

    def forward(self, query, key, value):
        h = self.hadamard.to(query.dtype)
        q, k = (fake_quant(t @ h, self.bits, self.sym, self.clip, self.with_zero) for t in (query, key))
        return q, k, fake_quant(value, self.bits, self.sym, 1.0, self.with_zero)


def kv_quant_attention(module, query, key, value, attention_mask, **kwargs):
    kvq = getattr(module, "kv_quant", None)
    if kvq is not None:
        query, key, value = kvq(query, key, value)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def enable(model) -> None:
    """Route every attention call of `model` through `kv_quant_attention` (SDPA masks and kernels)."""
    AttentionInterface.register(IMPLEMENTATION, kv_quant_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, sdpa_mask)
    model.set_attn_implementation(IMPLEMENTATION)
