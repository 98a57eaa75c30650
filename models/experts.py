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
import torch.nn.functional as F

from .spec import ModelSpec, decoder_layers, get_module, layer_spec, set_module, shared_module, shared_path

# The 3-D tensors of a fused experts module, emptied once unfused (the shell keeps only its config).
FUSED_TENSORS = ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias")


def _apply(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`linear(x)` with its weight and bias cast to x's device and dtype (its own stay where they are)."""
    bias = None if linear.bias is None else linear.bias.detach().to(x.device, x.dtype)
    return F.linear(x, linear.weight.detach().to(x.device, x.dtype), bias)


class ExpertMLP(nn.Module):
    """One SwiGLU expert: down(act(gate(x)) * up(x)). Its down input is linear in up's rows, so
    down-in smoothing folds into them (models/sites.py "up_rows")."""

    down_input_foldable = True

    def __init__(self, gate_proj: nn.Linear, up_proj: nn.Linear, down_proj: nn.Linear, act_fn):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = gate_proj, up_proj, down_proj, act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    def down_input(self, x: torch.Tensor) -> torch.Tensor:
        """What down_proj reads for the rows `x`, in x's dtype on x's device: the calibration fallback
        of an expert that saw too few routed tokens recomputes its down-in rows with it."""
        return self.act_fn(_apply(self.gate_proj, x)) * _apply(self.up_proj, x)


class ClampedSwiGLUExpert(nn.Module):
    """gpt-oss's expert: down((clamp(up, +-limit) + 1) * g sigmoid(alpha g)), g = min(gate, limit),
    with biases on every projection. The clamp and the +1 make the down input non-linear in up's
    rows, so down-in smoothing cannot be folded there (it is applied online)."""

    down_input_foldable = False

    def __init__(self, gate_proj: nn.Linear, up_proj: nn.Linear, down_proj: nn.Linear, alpha: float, limit: float):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.alpha, self.limit = alpha, limit

    def act_fn(self, gate: torch.Tensor) -> torch.Tensor:
        """The gate's activation, which MoEQuant's AGQ diagnostic reads as the expert's `act_fn`."""
        gate = gate.clamp(max=self.limit)
        return gate * torch.sigmoid(gate * self.alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self._down_input(x, self.gate_proj, self.up_proj))

    def down_input(self, x: torch.Tensor) -> torch.Tensor:
        """As `ExpertMLP.down_input`."""
        return self._down_input(x, lambda t: _apply(self.gate_proj, t), lambda t: _apply(self.up_proj, t))

    def _down_input(self, x: torch.Tensor, gate, up) -> torch.Tensor:
        return (up(x).clamp(min=-self.limit, max=self.limit) + 1) * self.act_fn(gate(x))


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
        """Tokens may come with leading dimensions (DBRX passes [B, S, H]); the output has the input's shape."""
        if hidden_states.dim() > 2:
            flat = self(hidden_states.reshape(-1, hidden_states.shape[-1]), top_k_index, top_k_weights)
            return flat.view(hidden_states.shape)
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


class GammaRMSNorm(nn.Module):
    """An RMSNorm computing x_hat * (offset + w) (Qwen3-Next's norms, offset 1) rewritten as
    x_hat * gamma with gamma = offset + w in float32, the same numbers: smoothing divides gamma
    (models/sites.py "norm"), which it could not do to w. `restore` writes w back."""

    def __init__(self, norm: nn.Module, offset: float):
        super().__init__()
        self.eps, self.offset = norm.eps, offset
        self.weight = nn.Parameter(offset + norm.weight.detach().float(), requires_grad=False)
        self.__dict__["_original"] = norm  # unregistered: out of state_dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * self.weight.float()).type_as(x)

    def restore(self) -> nn.Module:
        norm = self._original
        norm.weight.data = (self.weight.data - self.offset).to(norm.weight.dtype)
        return norm


def _split_shared(fused: nn.Module, spec: ModelSpec) -> ExpertMLP:
    """A [gate; up]-fused shared MLP as an `ExpertMLP` with separate gate and up linears (exact: each
    output row is the same dot product); the original is kept unregistered for `fuse_experts`."""
    gate_up, down, act = spec.shared_fused
    fused_lin = getattr(fused, gate_up)
    gate_w, up_w = fused_lin.weight.data.chunk(2, dim=0)
    bias = fused_lin.bias.data.chunk(2) if fused_lin.bias is not None else (None, None)
    mlp = ExpertMLP(_linear(gate_w, bias[0]), _linear(up_w, bias[1]), getattr(fused, down), getattr(fused, act))
    mlp.__dict__["_fused_shell"] = fused
    return mlp


def _join_shared(mlp: ExpertMLP, spec: ModelSpec) -> nn.Module:
    shell = mlp._fused_shell
    fused_lin = getattr(shell, spec.shared_fused[0])
    fused_lin.weight.data = torch.cat([mlp.gate_proj.weight.data, mlp.up_proj.weight.data])
    if fused_lin.bias is not None:
        fused_lin.bias.data = torch.cat([mlp.gate_proj.bias.data, mlp.up_proj.bias.data])
    setattr(shell, spec.shared_fused[1], mlp.down_proj)
    return shell


def _rewrite_shared(model: nn.Module, spec: ModelSpec, layer: int | None) -> None:
    if spec.shared_fused is None:
        return
    layers = decoder_layers(model, spec)
    for i in range(len(layers)) if layer is None else [layer]:
        shared = shared_module(spec, layers[i]) if spec.is_moe_layer(model.config, i) else None
        if shared is not None and not isinstance(shared, ExpertMLP):
            set_module(layers[i], shared_path(spec), _split_shared(shared, spec))


def _restore_shared(model: nn.Module, spec: ModelSpec) -> None:
    if spec.shared_fused is None:
        return
    for i, layer in enumerate(decoder_layers(model, spec)):
        shared = shared_module(spec, layer) if spec.is_moe_layer(model.config, i) else None
        if isinstance(shared, ExpertMLP):
            set_module(layer, shared_path(spec), _join_shared(shared, spec))


def _norm_paths(spec: ModelSpec, config, index: int) -> list[str]:
    s = layer_spec(spec, config, index)
    return [s.attn_norm, s.mlp_norm] + [n for n, _ in s.inner_norms]


def _rewrite_norms(model: nn.Module, spec: ModelSpec, layer: int | None) -> None:
    if not spec.norm_weight_offset:
        return
    layers = decoder_layers(model, spec)
    for i in range(len(layers)) if layer is None else [layer]:
        for path in _norm_paths(spec, model.config, i):
            norm = get_module(layers[i], path)
            if not isinstance(norm, GammaRMSNorm):
                set_module(layers[i], path, GammaRMSNorm(norm, spec.norm_weight_offset))


def _restore_norms(model: nn.Module, spec: ModelSpec) -> None:
    layers = decoder_layers(model, spec)
    for i, layer in enumerate(layers):
        for path in _norm_paths(spec, model.config, i):
            norm = get_module(layer, path)
            if isinstance(norm, GammaRMSNorm):
                set_module(layer, path, norm.restore())


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A linear holding copies of `weight` and `bias`. Built on the meta device: its own random
    initialisation would be thrown away, and at real widths it cost as much as the copies."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight.clone(), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.clone(), requires_grad=False)
    return lin


def _split_gate_up(fused: nn.Module, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate and up halves along dim 1: [gate; up] (concatenated) or gate0, up0, gate1, ... (gpt-oss)."""
    if getattr(fused, "is_concatenated", True):
        return t.chunk(2, dim=1)
    return t[:, 0::2], t[:, 1::2]


def _expert(fused: nn.Module, kind: str, lins: list[nn.Linear]) -> nn.Module:
    if kind == "clamped_swiglu":
        return ClampedSwiGLUExpert(*lins, alpha=fused.alpha, limit=fused.limit)
    return ExpertMLP(*lins, act_fn=fused.act_fn)


class InputWeightedExperts(LinearExperts):
    """Llama 4's experts as per-expert linears: the block scales each token by its routing weight
    before the experts (zero for experts it does not use) and calls them on [E * T, H] rows,
    expert e's tokens in block e. Each expert runs on its nonzero rows only (a zero row's output is
    zero: the experts have no biases), so its hooks see the routed tokens, scaled as it reads them.
    Every expert seeing every token (`route_all`) needs the unscaled input, which this call does not
    carry."""

    weights_scale_input = True

    def forward(self, routed_in: torch.Tensor) -> torch.Tensor:
        if self.route_all:
            raise RuntimeError("route_all_tokens: these experts receive routing-weighted inputs (zero for unrouted "
                               "tokens), so they cannot be calibrated on every token; run without --route_all_tokens")
        rows = routed_in.view(len(self), -1, routed_in.shape[-1])
        out = torch.zeros_like(rows)
        for e, expert in enumerate(self):
            used = rows[e].ne(0).any(-1).nonzero().squeeze(-1)
            if used.numel():
                out[e, used] = expert(rows[e, used]).to(out.dtype)
        return out.view(-1, routed_in.shape[-1])


def _split_dbrx(experts: nn.Module) -> list[nn.Module]:
    """DBRX's experts: w1 (gate), v1 (up) and w2 (down, transposed) stacked as [E * I, H] in `experts.mlp`."""
    glu = experts.mlp
    n = experts.num_experts
    w1, v1, w2 = (t.data.view(n, -1, t.shape[-1]) for t in (glu.w1, glu.v1, glu.w2))
    return [ExpertMLP(_linear(w1[e], None), _linear(v1[e], None), _linear(w2[e].T, None), glu.activation_fn)
            for e in range(n)]


def _join_dbrx(shell: nn.Module, experts: "LinearExperts") -> None:
    glu = shell.mlp
    glu.w1 = nn.Parameter(_stacked(experts, "gate_proj", "weight").flatten(0, 1), requires_grad=False)
    glu.v1 = nn.Parameter(_stacked(experts, "up_proj", "weight").flatten(0, 1), requires_grad=False)
    glu.w2 = nn.Parameter(_stacked(experts, "down_proj", "weight").transpose(1, 2).flatten(0, 1).contiguous(),
                          requires_grad=False)


# Per expert kind: the expert module, whether fused tensors are [E, in, out] when the experts module
# does not say (`is_transposed`, set by transformers' experts decorator), and the container.
KINDS = {"swiglu": False, "clamped_swiglu": False, "input_weighted_swiglu": True, "dbrx_glu": False}


def _split_fused(fused: nn.Module, kind: str) -> list[nn.Module]:
    """Per-expert linears from 3-D experts (`[E, out, in]`, or `[E, in, out]` when `is_transposed`),
    with their biases (`gate_up_proj_bias [E, 2I]`, `down_proj_bias [E, H]`) when `has_bias`."""
    gate_up, down = fused.gate_up_proj.data, fused.down_proj.data
    if getattr(fused, "is_transposed", KINDS[kind]):
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    gates, ups = _split_gate_up(fused, gate_up)
    has_bias = getattr(fused, "has_bias", False)
    n_exp = gate_up.shape[0]
    gate_b, up_b = _split_gate_up(fused, fused.gate_up_proj_bias.data) if has_bias else ([None] * n_exp,) * 2
    down_b = fused.down_proj_bias.data if has_bias else [None] * n_exp
    return [_expert(fused, kind, [_linear(gates[e], gate_b[e]), _linear(ups[e], up_b[e]), _linear(down[e], down_b[e])])
            for e in range(n_exp)]


def _as_linear_experts(module: nn.Module, spec: ModelSpec) -> LinearExperts:
    if isinstance(module, LinearExperts):
        return module
    if spec.expert_kind == "dbrx_glu":
        linear = LinearExperts(_split_dbrx(module))
        module.mlp.w1 = module.mlp.v1 = module.mlp.w2 = nn.Parameter(torch.empty(0), requires_grad=False)
        linear.__dict__["_fused_shell"] = module
        return linear
    if hasattr(module, "gate_up_proj"):
        container = InputWeightedExperts if spec.expert_kind == "input_weighted_swiglu" else LinearExperts
        linear = container(_split_fused(module, spec.expert_kind))
        for name in FUSED_TENSORS:
            if hasattr(module, name):
                setattr(module, name, nn.Parameter(torch.empty(0), requires_grad=False))
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
    """Replace every MoE layer's experts (or only decoder layer `layer`'s) by `LinearExperts`, offset
    norms by `GammaRMSNorm` and [gate; up]-fused shared MLPs by `ExpertMLP` (idempotent, exact). One layer at a time lets a streamed layer be
    unfused once it is read."""
    _rewrite_norms(model, spec, layer)
    _rewrite_shared(model, spec, layer)
    layers = decoder_layers(model, spec)
    for path in _experts_paths(model, spec, layer):
        set_module(layers, path, _as_linear_experts(get_module(layers, path), spec))


def fuse_experts(model: nn.Module, spec: ModelSpec) -> None:
    """Write unfused experts back into their original 3-D layout, and offset norms and fused shared
    MLPs back into their original form (for a plain HF checkpoint)."""
    _restore_norms(model, spec)
    _restore_shared(model, spec)
    layers = decoder_layers(model, spec)
    for path in moe_layer_paths(model, spec):
        linear = get_module(layers, path)
        shell = getattr(linear, "_fused_shell", None)
        if shell is None:
            continue
        if spec.expert_kind == "dbrx_glu":
            _join_dbrx(shell, linear)
            set_module(layers, path, shell)
            continue
        gate_up = _join_gate_up(shell, _stacked(linear, "gate_proj", "weight"), _stacked(linear, "up_proj", "weight"))
        down = _stacked(linear, "down_proj", "weight")
        if getattr(shell, "is_transposed", KINDS[spec.expert_kind]):
            gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
        tensors = {"gate_up_proj": gate_up, "down_proj": down}
        if getattr(shell, "has_bias", False):
            tensors["gate_up_proj_bias"] = _join_gate_up(shell, _stacked(linear, "gate_proj", "bias"),
                                                         _stacked(linear, "up_proj", "bias"))
            tensors["down_proj_bias"] = _stacked(linear, "down_proj", "bias")
        for name, t in tensors.items():
            setattr(shell, name, nn.Parameter(t.contiguous(), requires_grad=False))
        set_module(layers, path, shell)


def _stacked(experts: LinearExperts, proj: str, tensor: str) -> torch.Tensor:
    return torch.stack([getattr(getattr(e, proj), tensor).data for e in experts])


def _join_gate_up(shell: nn.Module, gates: torch.Tensor, ups: torch.Tensor) -> torch.Tensor:
    if getattr(shell, "is_concatenated", True):
        return torch.cat([gates, ups], dim=1)
    return torch.stack([gates, ups], dim=2).flatten(1, 2)


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
