"""Smoothing vectors and their exact folds into the model (docs/algorithm.md, section 2).

A site's vector s divides its activation and multiplies its readers' weight columns; where the
activation is produced by a norm, an up projection or a value projection, the division is folded
into that producer, so no online work remains (models/sites.py names each site's fold).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from models.spec import LayerView, MLPView

from .config import DuQuantConfig
from .transforms import fit_smooth


def weight_absmax(linears) -> torch.Tensor:
    """Per input channel max |W| over the rows of every reader (SmoothQuant's rule for shared inputs)."""
    return torch.stack([m.weight.detach().abs().amax(0).float().cpu() for m in linears]).amax(0)


def smoothing_readers(cfg: DuQuantConfig, readers, named: nn.Module | None) -> list[nn.Module]:
    """The linears whose max |W| enters a site's smoothing: all readers (SmoothQuant's rule for a
    shared input), or only `named` (the published code: q_proj for q/k/v, up_proj for gate/up)."""
    return [named] if cfg.smooth_weight == "one_reader" and named is not None else list(readers)


def site_smoothing(x_absmax: torch.Tensor, readers, cfg: DuQuantConfig) -> torch.Tensor:
    """The smoothing vector s of one site from its activation max and its readers' weights."""
    return fit_smooth(x_absmax, weight_absmax(readers), cfg.alpha, cfg.act_absmax_floor, cfg.smooth_scale_floor).scale


def _scaled(w: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """w * factor computed in at least float32, returned in w's dtype."""
    dtype = torch.promote_types(w.dtype, torch.float32)
    return (w.to(dtype) * factor.to(w.device, dtype)).to(w.dtype)


def fold_into_norm(norm: nn.Module, readers, s: torch.Tensor) -> None:
    """x/s is produced by the norm (gamma/s, and beta/s for a LayerNorm with a bias) and undone in
    every reader (W diag(s)): exact in FP."""
    norm.weight.data = _scaled(norm.weight.data, 1.0 / s.double())
    if getattr(norm, "bias", None) is not None:
        norm.bias.data = _scaled(norm.bias.data, 1.0 / s.double())
    for r in readers:
        r.weight.data = _scaled(r.weight.data, s)


def fold_into_up(mlp: MLPView, s: torch.Tensor) -> None:
    """down-in = act(gate x) * (up x) is linear in up's rows, so up/s and down*s is exact."""
    mlp.up_proj.weight.data = _scaled(mlp.up_proj.weight.data, 1.0 / s.double()[:, None])
    if getattr(mlp.up_proj, "bias", None) is not None:
        mlp.up_proj.bias.data = _scaled(mlp.up_proj.bias.data, 1.0 / s.double())
    mlp.down_proj.weight.data = _scaled(mlp.down_proj.weight.data, s)


def foldable_into_v(view: LayerView) -> bool:
    """o-in channel j is v_proj output channel j only when there are as many value heads as query
    heads (no grouped-query sharing) and the adapter names the value projection."""
    v = view.attn_value
    return v is not None and v.weight.shape[0] == view.attn_out.weight.shape[1]


def fold_into_v(v_proj: nn.Module, o_proj: nn.Module, s: torch.Tensor) -> None:
    """Attention output is a per-channel mix of V over tokens, so V rows / s and o_proj columns * s
    leave the layer unchanged in FP (and KV quantization then sees V / s, as in the published code)."""
    v_proj.weight.data = _scaled(v_proj.weight.data, 1.0 / s.double()[:, None])
    if v_proj.bias is not None:
        v_proj.bias.data = _scaled(v_proj.bias.data, 1.0 / s.double())
    o_proj.weight.data = _scaled(o_proj.weight.data, s)
