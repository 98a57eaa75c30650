"""GPTQ (Frantar et al., 2022): round a weight column by column, pushing each column's rounding
error onto the columns not yet rounded, in proportion to the inverse Hessian of the layer's inputs.

For y = x W^T with calibration inputs X [n, in], the layer-wise loss ||X W^T - X Q^T||^2 has the
Hessian H = 2 X^T X, the same for every output row. Rounding column j to q_j costs
(w_j - q_j)^2 / [H^-1]_jj, and the optimal correction of the columns after j is
    W[:, j+1:] -= (w_j - q_j) / [H^-1]_jj * [H^-1]_{j, j+1:}          (optimal brain surgeon)
GPTQ's three changes make this fast and stable on large layers:
- every row uses the same column order (natural, or descending diag(H) with `act_order`);
- the rows of H^-1 that the successive eliminations need are the rows of the upper Cholesky
  factor of H^-1, computed once after dampening H by `percdamp` x mean(diag H);
- updates are applied inside blocks of `blocksize` columns, and to the columns after a block
  once per block (lazy batch updates), as one matrix product.

Nothing here knows about models. `Hessian` accumulates H from input rows, optionally weighting
each row (MoEQuant's affinity-guided quantization weights a token by its router score).
`gptq_quantize` takes weights and Hessians batched over a leading dimension (the experts of one
MoE layer go through one column loop together). The grid is the caller's `WeightQuantizer`
(per-output-channel scale and zero point, clip ratio): GPTQ only changes the rounding, so with
H = I it returns exactly the quantizer's round-to-nearest result.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .quantizer import WeightQuantizer, dequantize, quantize


class GPTQResult(NamedTuple):
    """Quantized weights [B, out, in] with their grid: scale/zero [B, out, G] in the working dtype
    and, with groups, g_idx [B, in] (the group of every input column, act_order included)."""

    weight: torch.Tensor
    loss: torch.Tensor
    scale: torch.Tensor | None
    zero: torch.Tensor | None
    g_idx: torch.Tensor | None


class Hessian:
    """Running sum of (weighted) x x^T over input rows; `matrix()` is 2 sum(c x x^T) / sum(c).

    The normalization makes a constant weight irrelevant, so affinity-weighted statistics with
    equal affinities are plain GPTQ statistics.
    """

    def __init__(self, dim: int, device, dtype: torch.dtype = torch.float32):
        self.sum = torch.zeros(dim, dim, device=device, dtype=dtype)
        self.weight = 0.0  # total row weight
        self.tokens = 0  # rows with non-zero weight

    def add(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(self.sum.dtype)
        if weight is None:
            self.sum.addmm_(x.T, x)
            self.weight += x.shape[0]
            self.tokens += x.shape[0]
            return
        w = weight.detach().reshape(-1).to(x)
        self.sum.addmm_(x.T, x * w[:, None])
        self.weight += w.sum().item()
        self.tokens += int((w != 0).sum())

    def matrix(self) -> torch.Tensor:
        if self.weight <= 0:
            raise ValueError("no calibration rows reached this layer")
        return self.sum * (2.0 / self.weight)


def _batched(t: torch.Tensor, perm: torch.Tensor, dim: int) -> torch.Tensor:
    """t[b] with its `dim` axis reordered by perm[b], for every b."""
    shape = [1] * t.dim()
    shape[0], shape[dim] = perm.shape[0], perm.shape[1]
    return t.gather(dim, perm.view(shape).expand_as(t))


def _inverse_cholesky(h: torch.Tensor, percdamp: float, tries: int = 6) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp I)^-1, batched; damp grows tenfold where H is not PD."""
    eye = torch.eye(h.shape[-1], dtype=h.dtype, device=h.device)
    damp = percdamp * h.diagonal(dim1=-2, dim2=-1).mean(-1)
    for _ in range(tries):
        chol, info = torch.linalg.cholesky_ex(h + damp[:, None, None] * eye)
        if not info.any():
            break
        damp = torch.where(info > 0, damp * 10, damp)
    else:
        raise torch.linalg.LinAlgError("Hessian is not positive definite even after dampening")
    return torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)


def _fake_quant_col(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, q: WeightQuantizer) -> torch.Tensor:
    """One column [B, rows] on the grid of scale/zero [B, rows, 1]: elementwise what fake_quant does."""
    s, z = scale[..., 0], zero[..., 0]
    return dequantize(quantize(w, s, z, q.bits, q.sym), s, z)


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, quantizer: WeightQuantizer, blocksize: int = 128,
                  percdamp: float = 0.01, act_order: bool = False, group_size: int | None = None
                  ) -> GPTQResult:
    """Quantize `weight` [out, in] (or [B, out, in]) against `hessian` [in, in] (or [B, in, in]).

    Returns the fake-quantized weight (same shape and dtype), the GPTQ loss per matrix (sum over
    rows of (w - q)^2 / [H^-1]_jj / 2, the objective's estimate of the output error) and the grid.
    Without a batch dimension the grid has none either.
    `group_size` gives every `group_size` consecutive columns (in quantization order) their own
    scale and zero point, computed from the already-updated weights when the group starts.
    The column loop is kept in one function, as in the reference GPTQ code, so the error feedback
    reads in one place (about 70 lines).
    """
    if quantizer.bits >= 16:
        return GPTQResult(weight, torch.zeros(weight.shape[:-2] or (1,)), None, None, None)
    single = weight.dim() == 2
    if single:
        weight, hessian = weight[None], hessian[None]
    work = torch.promote_types(weight.dtype, torch.float32)
    W = weight.to(work).clone()
    H = hessian.to(device=W.device, dtype=work).clone()
    n_mat, rows, cols = W.shape

    # Input channels no calibration row ever touched: the weight there cannot matter.
    dead = H.diagonal(dim1=-2, dim2=-1) == 0
    H.diagonal(dim1=-2, dim2=-1).masked_fill_(dead, 1.0)
    W.masked_fill_(dead[:, None, :], 0.0)

    perm = None
    if act_order:
        perm = torch.argsort(H.diagonal(dim1=-2, dim2=-1), dim=-1, descending=True)
        W = _batched(W, perm, 2)
        H = _batched(_batched(H, perm, 1), perm, 2)

    U = _inverse_cholesky(H, percdamp)
    scale = zero = None
    scales, zeros = [], []
    if group_size is None:
        scale, zero = quantizer.params(W)
        scales, zeros = [scale], [zero]
    Q = torch.zeros_like(W)
    losses = torch.zeros(n_mat, dtype=work, device=W.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[..., i1:i2].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            if group_size is not None and (i1 + i) % group_size == 0:
                scale, zero = quantizer.params(_group(W, W1, E1, U, i1, i2, i, group_size))
                scales.append(scale)
                zeros.append(zero)
            w = W1[..., i]
            d = U1[:, i, i][:, None]
            q = _fake_quant_col(w, scale, zero, quantizer)
            Q[..., i1 + i] = q
            losses += ((w - q) ** 2 / d**2).sum(-1) / 2
            err = (w - q) / d
            W1[..., i:] -= err[..., None] * U1[:, i, i:][:, None, :]
            E1[..., i] = err
        W[..., i2:] -= E1 @ U[:, i1:i2, i2:]
    g_idx = None
    if group_size is not None:
        position = torch.arange(cols, device=W.device).expand(n_mat, cols)
        g_idx = (position if perm is None else torch.argsort(perm, dim=-1)) // group_size
    if perm is not None:
        Q = _batched(Q, torch.argsort(perm, dim=-1), 2)
    res = GPTQResult(Q.to(weight.dtype), losses, torch.cat(scales, -1), torch.cat(zeros, -1), g_idx)
    if single:
        return GPTQResult(res.weight[0], losses, res.scale[0], res.zero[0], None if g_idx is None else g_idx[0])
    return res


def _group(W, W1, E1, U, i1, i2, i, group_size):
    """The current (error-updated) values of the group starting at column i1 + i.

    Columns inside the block are up to date in W1; columns past the block still lack this block's
    pending corrections, which are added here so the group's range is the true one.
    """
    end = i1 + i + group_size
    inside = W1[..., i : min(i2 - i1, i + group_size)]
    if end <= i2:
        return inside
    beyond = W[..., i2:end] - E1[..., :i] @ U[:, i1 : i1 + i, i2:end]
    return torch.cat([inside, beyond], dim=-1)


def output_cosine(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """cos(X W^T, X Q^T) over the calibration rows, from H = 2 X^T X alone: tr(W H Q^T) / norms."""
    w, q, h = weight.double(), quantized.double(), hessian.to(weight.device).double()
    wh, qh = w @ h, q @ h
    num = (wh * q).sum()
    den = ((wh * w).sum() * (qh * q).sum()).clamp_min(1e-300).sqrt()
    return (num / den).item()
