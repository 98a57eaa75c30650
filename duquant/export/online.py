"""DuQuant's online parts for the compressed-tensors export: what `online_template.py` applies at load time.

transformers applies no compressed-tensors `transform_config` (and compressed-tensors' transforms reach
nn.Linear modules only, not fused experts), so a model whose linears read their inputs through online
transforms is exported with a modeling file of our own (`online_template.py`, written as
`modeling_duquant.py`): transformers builds the architecture's own class and decompresses the weights
(which already carry W T), then that file applies, per reader, the site transform T and the per-token
activation quantizer exactly as the toolkit does. The sites and their readers are read from
models/sites.py (`layer_sites`); each site's T is written as the dense matrix the toolkit multiplies by
(`SiteInput.matrix`), or else as the steps it applies one after another.

config.json gets its own model_type (`duquant_<model_type>`) and `auto_map`, so that loading without
`trust_remote_code=True` fails instead of silently running the rotated weights on unrotated inputs.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from models.spec import ModelSpec, decoder_layers, resolve
from models.sites import layer_sites

from ..layerwise import layer_on
from ..qlinear import QLinear, SiteInput
from ..transforms import BlockRotation, Compose, Permutation, Smooth
from .errors import ExportError

TEMPLATE = Path(__file__).with_name("online_template.py")
MODELING = "modeling_duquant.py"
TENSORS = "duquant_online.safetensors"
ROLES = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


def needs_online(meta: dict) -> bool:
    """Whether some linear reads its input through an online transform (saved with a transform id)."""
    return any("transform" in e for e in meta["linears"].values())


def check_family(model: nn.Module, spec: ModelSpec) -> None:
    """The template runs transformers' own modeling code with fused experts in the standard layout
    (gate_up_proj [E, 2I, H] with gate rows first, down_proj [E, H, I], SwiGLU, no biases)."""
    import transformers

    name = type(model).__name__
    fix = "; keep the model in the toolkit's format (--save_dir), or quantize with --method rtn"
    if getattr(transformers, name, None) is not type(model):
        raise ExportError(f"{name} is not a transformers class, and the export of DuQuant's online transforms "
                          f"builds on transformers' own modeling code{fix}")
    if spec.shared_fused is not None or spec.norm_weight_offset or spec.expert_kind != "swiglu":
        raise ExportError(f"{name}'s experts or norms are rewritten for quantization (fused shared MLP, offset "
                          f"norms or a non-SwiGLU expert), which the online-transform export does not cover{fix}")
    for path in _fused_paths(model, spec):
        shell = decoder_layers(model, spec).get_submodule(path)
        shell = getattr(shell, "_fused_shell", shell)
        if getattr(shell, "is_transposed", False) or not getattr(shell, "is_concatenated", True) \
                or getattr(shell, "has_bias", False):
            raise ExportError(f"{type(shell).__name__} stores its experts transposed, interleaved or with biases, "
                              f"which the online-transform export does not cover{fix}")


def _fused_paths(model: nn.Module, spec: ModelSpec) -> list[str]:
    from models.experts import moe_layer_paths

    layers = decoder_layers(model, spec)
    return [p for p in moe_layer_paths(model, spec)
            if hasattr(layers.get_submodule(p), "gate_up_proj")
            or getattr(layers.get_submodule(p), "_fused_shell", None) is not None]


def _steps(site: SiteInput) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """T as the toolkit applies it: its dense matrix, or its steps in order."""
    if site.matrix is not None:
        return [("matrix", {"matrix": site.matrix})]

    def flat(t: nn.Module) -> list[tuple[str, dict]]:
        if isinstance(t, Compose):
            return [s for part in t.transforms for s in flat(part)]
        if isinstance(t, Smooth):
            return [("smooth", {"scale": t.scale})]
        if isinstance(t, Permutation):
            return [("permutation", {"perm": t.perm})]
        if isinstance(t, BlockRotation):
            return [("rotation", {"blocks": t.blocks, "tail": t.tail})]
        raise ExportError(f"transform {type(t).__name__} cannot be exported; keep the model in --save_dir")
    return flat(site.transform)


def _act(q: QLinear) -> dict:
    a = q.act_quant
    return {"bits": a.bits, "sym": a.sym, "clip": a.clip_ratio, "with_zero": a.with_zero}


class Online:
    """The `duquant_online` section of config.json and the tensors of duquant_online.safetensors."""

    def __init__(self):
        self.sites: dict[str, list[str]] = {}
        self.readers: dict[str, dict] = {}
        self.experts: dict[str, list[dict]] = {}
        self.kv: dict[str, dict] = {}
        self.tensors: dict[str, torch.Tensor] = {}

    def add_site(self, key: str, site: SiteInput | None) -> str | None:
        """The site's steps and tensors under `key`; returns the key its readers name (None: no transform)."""
        if site is None:
            return None
        steps = _steps(site)
        self.sites[key] = [kind for kind, _ in steps]
        for i, (_, tensors) in enumerate(steps):
            self.tensors.update({f"{key}.{i}.{k}": v.detach().cpu().contiguous() for k, v in tensors.items()})
        return key

    def add_layer(self, prefix: str, view, fused: set[str]) -> None:
        """Every QLinear of the layer, found through the layer's declared sites."""
        names = {m: n for n, m in view.layer.named_modules() if isinstance(m, QLinear)}
        seen = set()
        for site in layer_sites(view):
            readers = [r for r in site.readers if isinstance(r, QLinear)]
            if len({id(r.site) for r in readers}) > 1:
                raise ExportError(f"{prefix}{site.name}: its readers do not share one transform; save with --save_dir")
            key = self.add_site(f"{prefix}{site.name}", readers[0].site) if readers else None
            for r in readers:
                self.add_reader(prefix + names[r], key, r, fused)
                seen.add(r)
        missed = [n for m, n in names.items() if m not in seen]
        if missed:
            raise ExportError(f"{prefix}{missed[0]} reads no site declared in models/sites.py, so the export cannot "
                              "tell its transform; keep the model in the toolkit's format (--save_dir)")

    def add_reader(self, name: str, site: str | None, q: QLinear, fused: set[str]) -> None:
        """A reader inside a fused-experts module goes to that module's expert slot (gate, up or down);
        any other one gets a pre-hook, unless it has neither a transform nor a quantized input."""
        spec = {"site": site, "act": _act(q)}
        parent, _, role = name.rpartition(".")
        experts, _, index = parent.rpartition(".")
        if experts in fused:
            slots = self.experts.setdefault(experts, [])
            slots.extend({} for _ in range(int(index) + 1 - len(slots)))
            slots[int(index)][ROLES[role]] = spec
        elif site is not None or q.act_quant.bits < 16:
            self.readers[name] = spec

    def config(self) -> dict:
        return {"sites": self.sites, "readers": self.readers, "experts": self.experts, "kv": self.kv}


def collect(model: nn.Module, spec: ModelSpec, meta: dict) -> Online:
    """The online parts of every layer (one layer in memory at a time for a streamed model)."""
    out = Online()
    for name, m in model.named_modules():
        if isinstance(m, QLinear) and not name.startswith(spec.layers + "."):
            if m.site is not None:
                raise ExportError(f"{name} reads a transform outside the decoder layers; save with --save_dir")
            out.add_reader(name, None, m, set())
    fused = {f"{spec.layers}.{p}" for p in _fused_paths(model, spec)}
    for i in range(len(decoder_layers(model, spec))):
        with layer_on(model, spec, i, torch.device("cpu")) as layer:
            out.add_layer(f"{spec.layers}.{i}.", resolve(spec, layer, model.config, i), fused)
    out.kv = {name.removesuffix(".kv_quant"): {**e, "with_zero": e.get("with_zero", True)}
              for name, e in meta["kv"].items()}
    return out


def kept(online: Online) -> list[str]:
    """What the modeling file keeps, one line each, for duquant_export.json."""
    lines = [f"the online input transforms of {len(online.sites)} sites (as dense matrices or their steps, "
             "as the toolkit applies them) and the per-token input quantization of "
             f"{len(online.readers)} linears and routers, by forward pre-hooks"]
    if online.experts:
        lines.append(f"the fused experts of {len(online.experts)} MoE layers, each expert's gate, up and down on "
                     "its own transforms and input quantizers")
    if online.kv:
        lines.append(f"KV-cache quantization of {len(online.kv)} attention layers (per-head Hadamard on Q and K)")
    return lines + ["loading needs trust_remote_code=True (modeling_duquant.py, which imports only torch, "
                    "safetensors and transformers); without it transformers refuses the model type"]


def write(tmp: Path, model: nn.Module, online: Online) -> None:
    """modeling_duquant.py, duquant_online.safetensors, and the model type and auto_map in config.json."""
    model_type, cls = model.config.model_type, type(model).__name__
    text = TEMPLATE.read_text()
    for old, new in (('BASE_MODEL_TYPE = "llama"', f'BASE_MODEL_TYPE = "{model_type}"'),
                     ('BASE_CLASS = "LlamaForCausalLM"', f'BASE_CLASS = "{cls}"')):
        text = text.replace(old, new, 1)
    (tmp / MODELING).write_text(text)
    save_file(online.tensors, str(tmp / TENSORS), metadata={"format": "pt"})
    path = tmp / "config.json"
    config = json.loads(path.read_text())
    config.update(model_type=f"duquant_{model_type}", architectures=["DuQuantForCausalLM"],
                  auto_map={"AutoConfig": "modeling_duquant.DuQuantConfig",
                            "AutoModelForCausalLM": "modeling_duquant.DuQuantForCausalLM"},
                  duquant_online=online.config())
    path.write_text(json.dumps(config, indent=2, sort_keys=True))
