"""Declarative descriptions of decoder layers, and their resolution into module handles.

An adapter says *where* things are (attribute paths relative to a decoder layer); it never says
what to do with them. Algorithms consume the resolved `LayerView` and never look at names, so a
new architecture is one `ModelSpec(...)` literal.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch.nn as nn

from .routing import RoutingBuilder, RoutingFunction, softmax_topk


def always_moe(config, layer_idx: int) -> bool:
    return True


def never_moe(config, layer_idx: int) -> bool:
    return False


@dataclass(frozen=True)
class ModelSpec:
    """Where the parts of one decoder layer live. Paths are dotted, relative to the layer
    (`mlp`-relative for router, experts and shared experts)."""

    name: str
    layers: str = "model.layers"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    attn_norm: str = "input_layernorm"
    attn_in: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    attn_out: str = "self_attn.o_proj"
    # The projection whose output rows are attn_out's input channels (per head), or None.
    attn_value: str | None = "self_attn.v_proj"
    attn: str = "self_attn"
    # Norms inside attention and the projections reading each (MLA: q_a_layernorm -> q_b_proj), in
    # forward order: (norm path, reader paths), relative to the layer.
    inner_norms: tuple[tuple[str, tuple[str, ...]], ...] = ()
    mlp_norm: str = "post_attention_layernorm"
    mlp: str = "mlp"
    router: str | None = "gate"
    experts: str | None = "experts"
    # Names inside one expert / dense MLP / shared expert (all SwiGLU).
    mlp_in: tuple[str, ...] = ("gate_proj", "up_proj")
    mlp_out: str = "down_proj"
    shared_experts: str | None = None
    # shared_experts is relative to the layer, beside the MoE block (Granite MoE shared's shared_mlp).
    shared_in_layer: bool = False
    # A shared MLP whose gate and up are one [gate; up] linear: (that linear, its down projection,
    # its activation attribute); models/experts.py splits it while unfused (Granite MoE shared).
    shared_fused: tuple[str, str, str] | None = None
    shared_expert_gate: str | None = None
    is_moe_layer: Callable = always_moe
    # Config attribute names (dotted paths) for the expert count and top-k, which differ between
    # families (a list value is read per layer: HunYuan).
    num_experts_attr: str = "num_local_experts"
    top_k_attr: str = "num_experts_per_tok"
    # How an unfused expert computes (models/experts.py): "swiglu" down(act(gate) * up), or gpt-oss's
    # "clamped_swiglu" with biases.
    expert_kind: str = "swiglu"
    # (config, MoE block, router, top_k) -> the layer's routing function (models/routing.py).
    routing: RoutingBuilder = softmax_topk
    # Hybrid models (Qwen3-Next): (config, layer index) -> the ModelSpec fields that differ in that layer
    # (its attention paths), or None where every layer is laid out alike.
    layer_overrides: Callable | None = None
    # Norms computing x_hat * (offset + weight) (Qwen3-Next: 1); models/experts.py rewrites a layer's
    # attention and MLP norms as plain x_hat * gamma norms, which smoothing can divide.
    norm_weight_offset: float = 0.0
    # Why --kv_bits < 16 cannot be honoured for this family (None: duquant/kvquant.py applies), e.g.
    # MLA caches a latent rather than per-head K/V; the CLI refuses with this reason.
    kv_quant_unsupported: str | None = None


@dataclass
class MLPView:
    """One SwiGLU MLP (an expert, a shared expert, or a dense MLP): the module and the names of
    its gate, up and down projections. Properties read the module, so they follow replacements."""

    module: nn.Module
    names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")

    @property
    def gate_proj(self) -> nn.Module:
        return getattr(self.module, self.names[0])

    @property
    def up_proj(self) -> nn.Module:
        return getattr(self.module, self.names[1])

    @property
    def down_proj(self) -> nn.Module:
        return getattr(self.module, self.names[2])

    @property
    def in_projs(self) -> list[nn.Module]:
        return [self.gate_proj, self.up_proj]

    @property
    def down_input_foldable(self) -> bool:
        """Whether down's input is linear in up's rows (models/experts.py; plain SwiGLU MLPs are)."""
        return getattr(self.module, "down_input_foldable", True)


@dataclass
class LayerView:
    """Typed handles to one decoder layer's parts; what every algorithm works on."""

    index: int
    layer: nn.Module
    attn: nn.Module
    attn_norm: nn.Module
    attn_in: list[nn.Linear]
    attn_out: nn.Linear
    mlp_norm: nn.Module
    mlp: nn.Module
    is_moe: bool
    router: nn.Module | None = None
    experts_module: nn.Module | None = None
    experts: list[MLPView] = field(default_factory=list)
    shared: list[MLPView] = field(default_factory=list)
    shared_gate: nn.Linear | None = None
    dense: MLPView | None = None
    top_k: int = 0
    routing: RoutingFunction | None = None
    attn_value: nn.Linear | None = None
    inner_norms: list[tuple[nn.Module, list[nn.Linear]]] = field(default_factory=list)

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def moe_in_readers(self) -> list[nn.Module]:
        """Every module that reads the MLP-norm output (the moe-in transform site)."""
        mlps = self.experts + self.shared + ([self.dense] if self.dense else [])
        readers = [p for m in mlps for p in m.in_projs]
        if self.router is not None:
            readers.append(self.router)
        if self.shared_gate is not None:
            readers.append(self.shared_gate)
        return readers


def get_module(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


def moe_routers(model: nn.Module, spec: ModelSpec) -> list[nn.Module]:
    """The router of every MoE layer, in layer order (dense layers have none)."""
    return [get_module(layer, f"{spec.mlp}.{spec.router}") for i, layer in enumerate(decoder_layers(model, spec))
            if spec.is_moe_layer(model.config, i)]


def config_value(config, path: str):
    """A config attribute by dotted path (DBRX keeps its MoE settings in `ffn_config`)."""
    for name in path.split("."):
        config = getattr(config, name)
    return config


def top_k_of(spec: ModelSpec, config, index: int) -> int:
    value = config_value(config, spec.top_k_attr)
    return value[index] if isinstance(value, (list, tuple)) else value


def layer_routing(spec: ModelSpec, config, layer: nn.Module, index: int) -> RoutingFunction:
    """The routing function of MoE layer `index` (needs no unfused experts)."""
    mlp = get_module(layer, spec.mlp)
    return spec.routing(config, mlp, get_module(mlp, spec.router), top_k_of(spec, config, index))


def moe_routings(model: nn.Module, spec: ModelSpec) -> list[tuple[nn.Module, RoutingFunction]]:
    """(router, routing function) of every MoE layer, in layer order."""
    return [(get_module(layer, f"{spec.mlp}.{spec.router}"), layer_routing(spec, model.config, layer, i))
            for i, layer in enumerate(decoder_layers(model, spec)) if spec.is_moe_layer(model.config, i)]


def owner(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    """The module holding `path` (a submodule, parameter or buffer) and its attribute name there."""
    parent, _, name = path.rpartition(".")
    return (root.get_submodule(parent) if parent else root), name


def set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    setattr(*owner(root, path), new)


def shared_path(spec: ModelSpec) -> str | None:
    """The shared experts' path relative to the decoder layer."""
    if spec.shared_experts is None:
        return None
    return spec.shared_experts if spec.shared_in_layer else f"{spec.mlp}.{spec.shared_experts}"


def shared_module(spec: ModelSpec, layer: nn.Module) -> nn.Module | None:
    """The layer's shared experts, or None (also where the config turns them off: the attribute is None)."""
    path = shared_path(spec)
    if path is None:
        return None
    parent, name = owner(layer, path)
    return getattr(parent, name)


def _mlp_view(spec: ModelSpec, mlp: nn.Module) -> MLPView:
    return MLPView(mlp, (*spec.mlp_in, spec.mlp_out))


def decoder_layers(model: nn.Module, spec: ModelSpec) -> nn.ModuleList:
    return get_module(model, spec.layers)


def layer_spec(spec: ModelSpec, config, index: int) -> ModelSpec:
    """The adapter as it applies to layer `index` (a hybrid model's linear-attention layers differ)."""
    return spec if spec.layer_overrides is None else replace(spec, **spec.layer_overrides(config, index))


def resolve(spec: ModelSpec, layer: nn.Module, config, index: int) -> LayerView:
    """Resolve one decoder layer. Fused 3-D experts must be unfused first (models/experts.py)."""
    spec = layer_spec(spec, config, index)
    mlp = get_module(layer, spec.mlp)
    view = LayerView(
        index=index,
        layer=layer,
        attn=get_module(layer, spec.attn),
        attn_norm=get_module(layer, spec.attn_norm),
        attn_in=[get_module(layer, p) for p in spec.attn_in],
        attn_out=get_module(layer, spec.attn_out),
        attn_value=get_module(layer, spec.attn_value) if spec.attn_value is not None else None,
        inner_norms=[(get_module(layer, n), [get_module(layer, r) for r in rs]) for n, rs in spec.inner_norms],
        mlp_norm=get_module(layer, spec.mlp_norm),
        mlp=mlp,
        is_moe=spec.is_moe_layer(config, index),
    )
    if not view.is_moe:
        view.dense = _mlp_view(spec, mlp)
        return view
    view.router = get_module(mlp, spec.router)
    view.top_k = top_k_of(spec, config, index)
    view.routing = layer_routing(spec, config, layer, index)
    view.experts_module = get_module(mlp, spec.experts)
    if not isinstance(view.experts_module, nn.ModuleList):
        raise TypeError(
            f"layer {index}: experts are still fused ({type(view.experts_module).__name__}); "
            "call models.experts.unfuse_experts(model, spec) before resolving"
        )
    view.experts = [MLPView(e) for e in view.experts_module]
    shared = shared_module(spec, layer)
    if shared is not None:
        view.shared = [_mlp_view(spec, shared)]
    if spec.shared_expert_gate is not None:
        view.shared_gate = get_module(mlp, spec.shared_expert_gate)
    return view
