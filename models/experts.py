"""Experts as one `nn.Linear` per projection, so each can be hooked, transformed and quantized.

transformers 5 stores experts fused as 3-D tensors (`gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`),
which no per-linear algorithm can see. `unfuse_experts` swaps every experts module for
`LinearExperts` with the same `forward(hidden, top_k_index, top_k_weights)` contract, and
`fuse_experts` restores the original layout for saving a plain HF checkpoint.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn

from .spec import ModelSpec, decoder_layers, get_module, set_module


class ExpertMLP(nn.Module):
    """One SwiGLU expert: down(act(gate(x)) * up(x))."""

    def __init__(self, gate_proj: nn.Linear, up_proj: nn.Linear, down_proj: nn.Linear, act_fn):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = gate_proj, up_proj, down_proj, act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class LinearExperts(nn.ModuleList):
    """Per-expert linears behind the fused-experts call signature.

    `route_all` (calibration only) runs every expert on every token, in chunks of `chunk` tokens to
    bound memory, but sums only the routed outputs (weight 0 otherwise), so the block output is
    unchanged while every expert's hooks see all tokens.
    """

    def __init__(self, experts: list[ExpertMLP]):
        super().__init__(experts)
        self.route_all = False
        self.chunk = 4096
        # The emptied original module, kept unregistered (out of state_dict) for `fuse_experts`.
        self.__dict__["_fused_shell"] = None

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        out = torch.zeros_like(hidden_states)
        if self.route_all:
            dense = torch.zeros(hidden_states.shape[0], len(self), dtype=top_k_weights.dtype, device=out.device)
            dense.scatter_(1, top_k_index, top_k_weights)
            for e, expert in enumerate(self):
                for s in range(0, hidden_states.shape[0], self.chunk):
                    y = expert(hidden_states[s : s + self.chunk]) * dense[s : s + self.chunk, e : e + 1]
                    out[s : s + self.chunk] += y.to(out.dtype)
            return out
        for e in top_k_index.unique().tolist():
            token_idx, slot = torch.where(top_k_index == e)
            y = self[e](hidden_states[token_idx]) * top_k_weights[token_idx, slot, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


def _split_fused(fused: nn.Module) -> list[ExpertMLP]:
    if getattr(fused, "has_bias", False):
        raise NotImplementedError(f"{type(fused).__name__}: fused experts with biases are not supported")
    gate_up, down = fused.gate_up_proj.data, fused.down_proj.data
    if getattr(fused, "is_transposed", False):
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    n_exp, two_i, hidden = gate_up.shape
    inter = two_i // 2
    if getattr(fused, "is_concatenated", True):
        gates, ups = gate_up[:, :inter], gate_up[:, inter:]
    else:
        gates, ups = gate_up[:, 0::2], gate_up[:, 1::2]
    experts = []
    for e in range(n_exp):
        lin = [nn.Linear(hidden, inter, bias=False), nn.Linear(hidden, inter, bias=False), nn.Linear(inter, hidden, bias=False)]
        for layer, w in zip(lin, (gates[e], ups[e], down[e])):
            layer.weight = nn.Parameter(w.clone(), requires_grad=False)
        experts.append(ExpertMLP(*lin, act_fn=fused.act_fn))
    return experts


def _as_linear_experts(module: nn.Module, spec: ModelSpec) -> LinearExperts:
    if isinstance(module, LinearExperts):
        return module
    if hasattr(module, "gate_up_proj"):
        linear = LinearExperts(_split_fused(module))
        module.gate_up_proj = nn.Parameter(torch.empty(0), requires_grad=False)
        module.down_proj = nn.Parameter(torch.empty(0), requires_grad=False)
        linear.__dict__["_fused_shell"] = module
        return linear
    gate, up = spec.mlp_in
    return LinearExperts(
        [ExpertMLP(getattr(m, gate), getattr(m, up), getattr(m, spec.mlp_out), m.act_fn) for m in module]
    )


def moe_layer_paths(model: nn.Module, spec: ModelSpec) -> list[str]:
    """Paths (from the decoder layer) of each MoE layer's experts module, keyed by layer index."""
    return [
        f"{i}.{spec.mlp}.{spec.experts}"
        for i in range(len(decoder_layers(model, spec)))
        if spec.is_moe_layer(model.config, i)
    ]


def _experts_paths(model: nn.Module, spec: ModelSpec, layer: int | None) -> list[str]:
    return [p for p in moe_layer_paths(model, spec) if layer is None or p.split(".")[0] == str(layer)]


def unfuse_experts(model: nn.Module, spec: ModelSpec, layer: int | None = None) -> None:
    """Replace every MoE layer's experts (or only decoder layer `layer`'s) by `LinearExperts`
    (idempotent, exact). One layer at a time lets a streamed layer be unfused once it is read."""
    layers = decoder_layers(model, spec)
    for path in _experts_paths(model, spec, layer):
        set_module(layers, path, _as_linear_experts(get_module(layers, path), spec))


def fuse_experts(model: nn.Module, spec: ModelSpec) -> None:
    """Write unfused experts back into their original 3-D layout (for a plain HF checkpoint)."""
    layers = decoder_layers(model, spec)
    for path in moe_layer_paths(model, spec):
        linear = get_module(layers, path)
        shell = getattr(linear, "_fused_shell", None)
        if shell is None:
            continue
        gates = torch.stack([e.gate_proj.weight.data for e in linear])
        ups = torch.stack([e.up_proj.weight.data for e in linear])
        down = torch.stack([e.down_proj.weight.data for e in linear])
        if getattr(shell, "is_concatenated", True):
            gate_up = torch.cat([gates, ups], dim=1)
        else:
            gate_up = torch.stack([gates, ups], dim=2).flatten(1, 2)
        if getattr(shell, "is_transposed", False):
            gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
        shell.gate_up_proj = nn.Parameter(gate_up.contiguous(), requires_grad=False)
        shell.down_proj = nn.Parameter(down.contiguous(), requires_grad=False)
        set_module(layers, path, shell)


@contextmanager
def route_all_tokens(model: nn.Module, spec: ModelSpec, enabled: bool = True, chunk: int = 4096,
                     layer: int | None = None):
    """Calibration mode in which every expert (of every MoE layer, or of decoder layer `layer`) sees
    every token (see `LinearExperts`)."""
    layers = decoder_layers(model, spec)
    experts = [get_module(layers, p) for p in _experts_paths(model, spec, layer)]
    if enabled and not all(isinstance(e, LinearExperts) for e in experts):
        raise RuntimeError("route_all_tokens needs unfused experts: call unfuse_experts(model, spec) first")
    for e in experts:
        e.route_all, e.chunk = enabled, chunk
    try:
        yield
    finally:
        for e in experts:
            e.route_all = False
