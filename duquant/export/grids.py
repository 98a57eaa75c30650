"""The toolkit's weight grids on compressed-tensors' grids, and which linears go into which config group.

The grids map exactly. The toolkit's asymmetric codes q in 0..2^b-1 with zero point z decode to
(q - z) * scale; compressed-tensors stores the signed codes q - 2^(b-1) with zero point z - 2^(b-1),
which decode to the same float32 numbers, and the loaded weight is that number cast to the model dtype,
as the toolkit's is. Where transformers does not read zero points (fused experts always; dense linears
on its regular, input-quantizing load path), the asymmetric b-bit grid is written as the symmetric
(b+1)-bit grid with codes q - z and the same scales, which decodes to the same numbers too; an 8-bit
one would need 9 bits (refused for fused experts, written decoded for dense linears).

transformers' dequantizing load path decompresses every dense module with the first dense config
group and every fused expert with the experts group, so each is one scheme (`plan`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..packed import unpack_codes
from ..quantizer import QuantizedWeight
from .errors import ACT_ORDER_REFUSED, ExportError


@dataclass(frozen=True)
class Grid:
    """A weight grid in compressed-tensors' terms: signed codes, one scale (and zero) per row or group."""

    bits: int
    sym: bool
    group_size: int | None  # None: one scale per output channel

    def args(self) -> dict:
        out = {"num_bits": self.bits, "type": "int", "symmetric": self.sym, "dynamic": False,
               "strategy": "channel" if self.group_size is None else "group"}
        if self.group_size is not None:
            out["group_size"] = self.group_size
        return out


@dataclass(frozen=True)
class Scheme:
    """One config group: a weight grid (None: decoded weights) and the inputs' per-token dynamic
    quantization (16: none)."""

    grid: Grid | None
    act_bits: int = 16
    act_sym: bool = False

    def dump(self, targets: list[str], in_features: int | None = None) -> dict:
        """The config group. Inputs are quantized per row over all `in_features` columns: one group
        that wide is per-token quantization for inputs of any rank, where compressed-tensors' "token"
        strategy quantizes a 2-D input [tokens, in] (routed experts, shared experts) as one tensor."""
        acts = None
        if self.act_bits < 16:
            acts = {"num_bits": self.act_bits, "type": "int", "symmetric": self.act_sym, "dynamic": True,
                    "strategy": "group", "group_size": in_features}
        weights = None if self.grid is None else self.grid.args()
        return {"targets": targets, "weights": weights, "input_activations": acts,
                "format": "dense" if self.grid is None else "pack-quantized"}


def _group_size(name: str, e: dict, tensors: dict[str, torch.Tensor]) -> int | None:
    """The group size of a linear's grid; refuses the groups compressed-tensors cannot store."""
    cols, g_idx = e["shape"][1], tensors.get(f"{name}.g_idx")
    if g_idx is None:
        return None
    size = int((g_idx == 0).sum())
    if not torch.equal(g_idx.long(), torch.arange(cols) // size):
        raise ExportError(f"{name}: {ACT_ORDER_REFUSED}")
    if cols % size:
        raise ExportError(f"{name} has {cols} input columns, not a multiple of --group_size {size}; compressed-"
                          "tensors needs whole groups, so quantize again with a group size that divides it")
    return size


@dataclass(frozen=True)
class Linear:
    """One quantized linear as the export sees it: its codes and grid, and where it goes."""

    name: str
    bits: int
    sym: bool
    group_size: int | None
    act_bits: int
    act: dict
    shape: list[int]
    is_linear: bool  # an nn.Linear once transformers loads the model (not a router, not a fused expert)
    fused_expert: bool


WEIGHT_ONLY = {"bits": 16, "sym": False, "clip": 1.0, "with_zero": True}


def read_linears(model: nn.Module, meta: dict, tensors: dict, experts: dict[str, str], online: bool) -> list[Linear]:
    """`online`: the exported modeling file quantizes every input (export/online.py), so the
    checkpoint's config groups are weight-only."""
    out = []
    for name, e in meta["linears"].items():
        fused = name in experts
        quantized = e["bits"] < 16
        is_linear = not fused and isinstance(model.get_submodule(name).inner, nn.Linear)
        act = WEIGHT_ONLY if online else e["act"]
        out.append(Linear(name, e["bits"], e["sym"], _group_size(name, e, tensors) if quantized else None,
                          act["bits"], act, e["shape"], is_linear, fused))
    return out


def target_grid(lin: Linear, keep_zero: bool) -> Grid | None:
    """The grid `lin` is written on; None: written as its decoded weight (9 bits would be needed,
    which compressed-tensors does not pack). `keep_zero`: transformers will read dense zero points."""
    if lin.sym or (keep_zero and not lin.fused_expert):
        return Grid(lin.bits, lin.sym, lin.group_size)
    return Grid(lin.bits + 1, True, lin.group_size) if lin.bits < 8 else None


def check_fused_experts(linears: list[Linear], model_type: str) -> None:
    """Fused experts load only from packed codes: transformers' expert path drops plain weights."""
    bad = next((lin for lin in linears if lin.fused_expert and target_grid(lin, False) is None), None)
    if bad is None:
        return
    why = "are not quantized" if bad.bits >= 16 else "are on an 8-bit asymmetric grid, which would need 9 bits"
    raise ExportError(f"{model_type}'s experts {why} (e.g. {bad.name}), and transformers loads fused experts of a "
                      "compressed-tensors checkpoint only from packed codes without zero points; quantize again "
                      "with --w_sym (or at most 7 bits)")


def _most_common(values: list, weights: list[int]):
    totals: dict = {}
    for v, w in zip(values, weights):
        totals[v] = totals.get(v, 0) + w
    return max(totals, key=totals.get) if totals else None


@dataclass(frozen=True)
class Plan:
    """The dense and the experts config group and the linears in each; all others are written decoded.

    transformers' dequantizing load decompresses every dense module with the first dense group (and
    every fused expert with the experts group), so each group is the scheme covering most weights,
    and `dequantize` says the checkpoint needs that load path (asymmetric dense grids)."""

    dense: Scheme | None
    experts: Grid | None
    dense_names: set[str]
    expert_names: set[str]

    @property
    def dequantize(self) -> bool:
        return self.dense is not None and self.dense.grid is not None and not self.dense.grid.sym


def plan(linears: list[Linear]) -> Plan:
    size = [lin.shape[0] * lin.shape[1] for lin in linears]
    dense = [(lin, n) for lin, n in zip(linears, size) if lin.is_linear and lin.bits < 16]
    act = _most_common([(lin.act_bits, lin.act["sym"]) for lin, _ in dense], [n for _, n in dense]) or (16, False)
    keep_zero = act[0] >= 16
    schemes = {lin.name: Scheme(target_grid(lin, keep_zero), *act) for lin, _ in dense}
    d = _most_common(list(schemes.values()), [n for _, n in dense])
    experts = [(lin, n) for lin, n in zip(linears, size) if lin.fused_expert and lin.bits < 16]
    grids = {lin.name: target_grid(lin, False) for lin, _ in experts}
    x = _most_common([g for g in grids.values() if g is not None], [n for lin, n in experts if grids[lin.name]])
    return Plan(d, x, {n for n, sc in schemes.items() if sc == d and (sc.grid or sc.act_bits < 16)},
                {n for n, g in grids.items() if g is not None and g == x})


def grid_tensors(name: str, e: dict, tensors: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes [out, in], scale [out, G], zero [out, G]) of a saved linear, as the quantizer made them."""
    scale = tensors[f"{name}.scale"]
    codes = unpack_codes(tensors[f"{name}.qweight"], e["bits"], e["sym"], e["shape"][1])
    return codes, scale, tensors[f"{name}.zero"].to(scale.dtype)


def packed_tensors(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, sym: bool,
                   grid: Grid) -> dict[str, torch.Tensor]:
    """compressed-tensors' pack-quantized tensors of one linear whose codes decode to (q - z) * scale:
    the same grid shifted to signed codes, or (for a symmetric `grid` from an asymmetric one) the codes
    q - z with no zero point."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    per_column = zero.repeat_interleave(codes.shape[1] // zero.shape[1], dim=1) if zero.shape[1] > 1 else zero
    q = codes.to(torch.int16)
    if grid.sym and not sym:
        signed = q - per_column.to(torch.int16)
    else:
        signed = q - (0 if sym else 2 ** (bits - 1))
    out = {"weight_packed": pack_to_int32(signed.to(torch.int8), grid.bits),
           "weight_scale": scale.contiguous(), "weight_shape": torch.tensor(list(codes.shape))}
    if not grid.sym:
        zp = (zero.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)
        out["weight_zero_point"] = pack_to_int32(zp, grid.bits, packed_dim=0)
    return out


def decoded_weight(name: str, e: dict, tensors: dict) -> torch.Tensor:
    """The linear's weight exactly as the fake-quantized model holds it."""
    dtype = getattr(torch, e["dtype"])
    if e["bits"] >= 16:
        return tensors[f"{name}.weight"].to(dtype)
    codes, scale, zero = grid_tensors(name, e, tensors)
    return QuantizedWeight.from_codes(codes, scale, zero, e["bits"], e["sym"], dtype, tensors.get(f"{name}.g_idx")).weight
