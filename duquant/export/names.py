"""Checkpoint names: what transformers' own save_pretrained would call each tensor of the model.

transformers 5 keeps most MoE experts fused (3-D `gate_up_proj` / `down_proj`) and converts the hub's
per-expert tensors on load with the conversions it declares per architecture
(`transformers.conversion_mapping`); the export writes per-expert names by running those conversions
backwards, which is also where compressed-tensors' per-module tensors (weight_packed, ...) must be.
"""
from __future__ import annotations

import re

import torch.nn as nn

from models.experts import moe_layer_paths
from models.spec import ModelSpec, decoder_layers

from ..qlinear import QLinear
from .errors import ExportError


def _renamings(model_type: str) -> list[tuple[str, str]]:
    """transformers' load-time renames of `model_type` as (checkpoint spelling, model spelling)."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    pairs = []
    for conv in get_checkpoint_conversion_mapping(model_type) or []:
        if type(conv).__name__ == "WeightRenaming":
            pairs += list(zip(conv.source_patterns, conv.target_patterns))
    return pairs


def _expert_converters(model_type: str) -> dict[str, list[str]]:
    """Fused parameter name (`.experts.gate_up_proj`) -> its per-expert checkpoint sources, in
    concatenation order; only the stack-then-concatenate conversions `models.experts` undoes."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    out = {}
    for conv in get_checkpoint_conversion_mapping(model_type) or []:
        if type(conv).__name__ != "WeightConverter":
            continue
        ops = [(type(op).__name__, getattr(op, "dim", None)) for op in conv.operations]
        if ops not in ([("MergeModulelist", 0)], [("MergeModulelist", 0), ("Concatenate", 1)]):
            raise ExportError(f"{model_type}'s experts are stored with a checkpoint conversion {ops} that the "
                              "export cannot reproduce; keep the model in the toolkit's format (--save_dir)")
        out[conv.target_patterns[0]] = list(conv.source_patterns)
    return out


def fused_expert_names(model: nn.Module, spec: ModelSpec) -> dict[str, str]:
    """Our per-expert linear name -> its per-expert checkpoint module name, for every MoE layer whose
    experts transformers keeps fused (`models.experts` unfused them, keeping the original module)."""
    layers, prefix = decoder_layers(model, spec), spec.layers
    fused = [p for p in moe_layer_paths(model, spec)
             if getattr(layers.get_submodule(p), "_fused_shell", None) is not None]
    if not fused:
        return {}
    converters = _expert_converters(model.config.model_type)
    gate, up = spec.mlp_in
    roles = {".gate_up_proj": [gate, up], ".down_proj": [spec.mlp_out]}
    names = {}
    for path in fused:
        shell = layers.get_submodule(path)._fused_shell
        if getattr(shell, "is_transposed", False) or not getattr(shell, "is_concatenated", True):
            raise ExportError(f"{type(shell).__name__} stores its experts transposed or interleaved, which the "
                              "export does not write; keep the model in the toolkit's format (--save_dir)")
        full = f"{prefix}.{path}"
        for param, ours in roles.items():
            target = next((t for t in converters if (full + param).endswith(t)), None)
            if target is None:
                raise ExportError(f"transformers declares no per-expert checkpoint layout for {full}{param}; "
                                  "keep the model in the toolkit's format (--save_dir)")
            head = (full + param)[: -len(target)]
            for e in range(len(layers.get_submodule(path))):
                for role, source in zip(ours, converters[target]):
                    names[f"{full}.{e}.{role}"] = head + source.replace("*", str(e)).removesuffix(".weight")
    return names


def expert_targets(model_type: str) -> list[str]:
    """compressed-tensors targets naming every per-expert checkpoint module; transformers picks the
    experts' config group as the one whose `re:` targets mention experts."""
    sources = [s for group in _expert_converters(model_type).values() for s in group]
    return ["re:.*" + re.escape(s.removesuffix(".weight")).replace(r"\*", r"\d+") + "$" for s in sources]


class KeyNames:
    """Model parameter names -> checkpoint names: per-expert names for fused experts, then transformers'
    renames run backwards (as its save_pretrained writes them)."""

    def __init__(self, model: nn.Module, spec: ModelSpec):
        self.experts = fused_expert_names(model, spec)
        self.renames = _renamings(model.config.model_type)

    def module(self, name: str) -> str:
        name = self.experts.get(name, name)
        for ckpt, ours in self.renames:
            name = name.replace(ours, ckpt)
        return name

    def key(self, key: str) -> str:
        module, _, leaf = key.rpartition(".")
        return f"{self.module(module)}.{leaf}" if module else key


def load_time_linears(model: nn.Module, experts: dict[str, str]) -> list[str]:
    """Names of the nn.Linear modules transformers builds for the model (fused experts are none)."""
    inners = {f"{n}.inner" for n, m in model.named_modules() if isinstance(m, QLinear)}
    out = []
    for name, m in model.named_modules():
        inner = m.inner if isinstance(m, QLinear) else m
        if isinstance(inner, nn.Linear) and name not in experts and name not in inners:
            out.append(name)
    return out


def name_targets(names: set[str], others: list[str]) -> list[str]:
    """compressed-tensors targets for exactly `names`: one regex per name pattern (layer and expert
    numbers as digits) where it matches none of `others`, the names themselves otherwise."""
    patterns: dict[str, set[str]] = {}
    for name in names:
        patterns.setdefault(re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", re.escape(name)), set()).add(name)
    out = []
    for pattern, members in sorted(patterns.items()):
        if any(re.fullmatch(pattern, o) for o in others):
            out += sorted(members)
        else:
            out.append(f"re:^{pattern}$")
    return out
