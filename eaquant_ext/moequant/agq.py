"""MoEQuant's affinity-guided quantization (AGQ), as the pipeline's `Extensions.hessian_weights` hook.

An MoE layer outputs sum_i c_i E_i(x), where c_i is the router's score (affinity) of token x for
expert i, the weight that multiplies the expert's output (MoEQuant Eq. 1, 15). It is read where the
block hands it to its experts, so it is the family's own routing weight (models/routing.py):
renormalised softmax for Mixtral, sigmoid scores times routed_scaling_factor for DeepSeek-V3. A token that barely
uses an expert should barely shape that expert's quantization, so the layer-wise GPTQ loss of a
linear inside expert i becomes (Eq. 18, 19)
    L(Q) = sum_t c_t || W x_t - Q x_t ||^2,      H = 2 X^T diag(c) X,
summed over the tokens routed to the expert. For up_proj and down_proj this is exact: c_t passes
linearly through the expert (Eq. 17, first two lines). For gate_proj (the paper's "gate layer")
c_t has to cross the activation, c f(x W_gate) ~ f(c x W_gate) (Eq. 17, third line), which is
only approximately true for SiLU; `gate=False` leaves gate_proj unweighted (R5 toggles it).
R4 measures that approximation: the cosine similarity between f(c g) and c f(g) on the gate
layer's outputs g, for constant c from 0.1 to 0.9 (0.909 -> 0.9996 on DeepSeek-MoE-16B).
`report()` gives it per layer for the configured constants and for the tokens' own affinities.

Shared experts (weight 1, or Qwen2-MoE's sigmoid gate) and the router keep plain GPTQ Hessians.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from duquant.config import ConfigError
from duquant.qlinear import unwrap
from models.spec import LayerView

KINDS = ("gate", "up", "down")
EXPERTS_ARGS = ("hidden_states", "top_k_index", "top_k_weights")


def gate_approximation(g: torch.Tensor, c: float | torch.Tensor, act=F.silu) -> tuple[torch.Tensor, torch.Tensor]:
    """(f(c g), c f(g)): Eq. 17's approximation of the affinity-scaled gate-layer output, and the truth.
    `c` is a constant or one affinity per row of g."""
    c = torch.as_tensor(c, dtype=g.dtype, device=g.device)
    if c.dim() == 1:
        c = c[:, None]
    return act(c * g), c * act(g)


class _Cosine:
    """Running cosine similarity of two flattened tensors."""

    def __init__(self):
        self.ab = self.aa = self.bb = 0.0

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = a.double(), b.double()
        self.ab += (a * b).sum().item()
        self.aa += (a * a).sum().item()
        self.bb += (b * b).sum().item()

    def value(self) -> float | None:
        return self.ab / (self.aa * self.bb) ** 0.5 if self.aa > 0 and self.bb > 0 else None


class AffinityWeighting:
    """Within one GPTQ calibration pass: each routed expert's per-token affinities, handed out in the
    order the expert's linears see their rows (the order `LinearExperts` dispatches tokens in)."""

    def __init__(self, view: LayerView, gate: bool = True, c_values: tuple[float, ...] = ()):
        if getattr(view.experts_module, "weights_scale_input", False):
            raise ConfigError("AGQ weighs each expert's Hessian by the routing weight that scales its output; in this "
                             "model the routing weight scales the experts' input (models/experts.py "
                             "InputWeightedExperts), so it is already inside their statistics: run without --agq")
        self.view, self.gate = view, gate
        self.where: dict[nn.Module, tuple[int, str]] = {}
        self.act: dict[int, object] = {}
        for e, mlp in enumerate(view.experts):
            self.act[e] = getattr(mlp.module, "act_fn", F.silu)
            for kind, name in zip(KINDS, mlp.names):
                self.where[unwrap(getattr(mlp.module, name))] = (e, kind)
        self.current: dict[int, torch.Tensor] = {}
        self.offset: dict[tuple, int] = {}
        self.cos = {c: _Cosine() for c in c_values}
        self.cos_affinity = _Cosine()
        self.affinity_sum, self.tokens = 0.0, 0
        self.handles: list = []

    def __enter__(self) -> "AffinityWeighting":
        self.handles.append(self.view.experts_module.register_forward_pre_hook(self._dispatch, with_kwargs=True))
        for module, (_, kind) in self.where.items():
            if kind == "gate":
                self.handles.append(module.register_forward_hook(self._gate_output))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _dispatch(self, module, args, kwargs) -> None:
        """Before the experts run: the affinity vector of every expert for this forward."""
        _, index, weights = (list(args) + [kwargs[k] for k in EXPERTS_ARGS[len(args):]])[:3]
        weights = weights.detach()
        self.offset.clear()
        if getattr(module, "route_all", False):  # every expert sees every token, unrouted ones with weight 0
            dense = torch.zeros(index.shape[0], len(self.view.experts), dtype=weights.dtype, device=weights.device)
            dense.scatter_(1, index, weights)
            self.current = {e: dense[:, e] for e in range(dense.shape[1])}
        else:
            self.current = {}
            for e in range(len(self.view.experts)):
                token_idx, slot = torch.where(index == e)
                self.current[e] = weights[token_idx, slot]
        routed = weights[weights > 0]
        self.affinity_sum += routed.double().sum().item()
        self.tokens += routed.numel()

    def _rows(self, module: nn.Module, rows: int, tag: str) -> torch.Tensor:
        e, _ = self.where[module]
        start = self.offset.get((tag, module), 0)
        self.offset[(tag, module)] = start + rows
        w = self.current[e][start : start + rows]
        if w.shape[0] != rows:
            raise RuntimeError(f"expert {e}: {rows} input rows but {w.shape[0]} affinities left")
        return w

    def weights(self, module: nn.Module, rows: int) -> torch.Tensor | None:
        """Per-row Hessian weights of `module`'s next `rows` input rows; None = unweighted."""
        if module not in self.where:
            return None
        w = self._rows(module, rows, "hessian")
        return None if self.where[module][1] == "gate" and not self.gate else w

    def _gate_output(self, module, args, out) -> None:
        """R4 diagnostic on the gate layer's output g: f(c g) against c f(g)."""
        e, _ = self.where[module]
        c = self._rows(module, out.shape[0], "cosine")
        g = out.reshape(-1, out.shape[-1])[c > 0].detach()
        c = c[c > 0]
        if g.shape[0] == 0:
            return
        act = self.act[e]
        for const, acc in self.cos.items():
            acc.add(*gate_approximation(g, const, act))
        self.cos_affinity.add(*gate_approximation(g, c.to(g.dtype), act))

    def report(self) -> dict:
        return {
            "gate_weighted": self.gate,
            "mean_affinity": self.affinity_sum / self.tokens if self.tokens else None,
            "gate_approx_cos": {f"{c:g}": acc.value() for c, acc in self.cos.items()},
            "gate_approx_cos_affinity": self.cos_affinity.value(),
        }


def affinity_weights(gate: bool = True, c_values: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)):
    """The `Extensions.hessian_weights` hook: view -> AffinityWeighting context."""
    def hook(view: LayerView) -> AffinityWeighting:
        return AffinityWeighting(view, gate, tuple(c_values))
    return hook
