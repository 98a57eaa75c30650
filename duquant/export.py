"""The quantized model as a compressed-tensors checkpoint, which plain transformers loads.

`export_compressed_tensors` writes a directory that `AutoModelForCausalLM.from_pretrained(DIR)`
loads with only transformers and compressed-tensors installed (docs/export.md: which schemes
export, which engines load them, what each export loses):

    config.json            the FP model's config plus `quantization_config` (compressed-tensors,
                           format pack-quantized, one config group per weight grid)
    model.safetensors      <module>.weight_packed (the integer codes, b bits each, packed densely
                           into int32), .weight_scale, .weight_zero_point (asymmetric grids, packed
                           along the rows), .weight_shape; plain weights for everything else; names
                           as transformers' own save_pretrained writes them (per expert)
    duquant_export.json    the run's configuration and what the export could not express
    tokenizer files

The grids map exactly. Our asymmetric codes q in 0..2^b-1 with zero point z decode to (q - z) * scale;
compressed-tensors stores the signed codes q - 2^(b-1) with zero point z - 2^(b-1), which decode to
the same float32 numbers, and the loaded weight is that number cast to the model dtype, as ours is.

Experts that transformers 5 keeps fused (3-D `gate_up_proj` / `down_proj`) are decompressed while
loading by transformers' CompressedTensorsDequantize, which reads only weight_packed, weight_scale and
weight_shape: a zero point is never read. So an asymmetric b-bit expert grid is written as the
symmetric (b+1)-bit grid with codes q - z and the same scales (both decode to (q - z) * scale), and an
8-bit one, which would need 9 bits, as the plain decoded weight. Fused experts are not nn.Linear
modules, so compressed-tensors cannot quantize their inputs, nor a router's (not nn.Linear either);
and transformers applies no compressed-tensors transforms when loading. `export_losses` lists what
a model's export therefore cannot keep; the online transforms are refused outright.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from models.experts import moe_layer_paths
from models.files import write_dir_atomically
from models.spec import ModelSpec, decoder_layers

from .config import ConfigError
from .packed import model_state, unpack_codes
from .qlinear import QLinear
from .quantizer import QuantizedWeight

FORMATS = ("compressed-tensors",)
INFO = "duquant_export.json"
WEIGHTS = "model.safetensors"


class ExportError(ConfigError):
    """A model or directory that cannot be exported; the message is one line that names the fix."""


TRANSFORMS_REFUSED = ("transformers applies no compressed-tensors transforms when loading, so a linear that reads its "
                      "input through DuQuant's online transform (rotations, permutation, or o_proj smoothing) cannot "
                      "be exported: quantize with --method rtn (optionally --gptq), or keep the model in the "
                      "toolkit's format (--save_dir)")
ACT_ORDER_REFUSED = ("GPTQ --act_order groups columns in quantization order, which compressed-tensors no longer "
                     "stores; quantize again without --act_order (or without --group_size)")


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


# ----------------------------------------------------------------------------- names


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


def _expert_targets(model_type: str) -> list[str]:
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


# ----------------------------------------------------------------------------- grids and codes


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


@dataclass
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


def _linears(model: nn.Module, meta: dict, tensors: dict, experts: dict[str, str]) -> list[Linear]:
    out = []
    for name, e in meta["linears"].items():
        if "transform" in e:
            raise ExportError(f"{name}: {TRANSFORMS_REFUSED}")
        fused = name in experts
        quantized = e["bits"] < 16
        is_linear = not fused and isinstance(model.get_submodule(name).inner, nn.Linear)
        out.append(Linear(name, e["bits"], e["sym"], _group_size(name, e, tensors) if quantized else None,
                          e["act"]["bits"], e["act"], e["shape"], is_linear, fused))
    return out


def target_grid(lin: Linear, keep_zero: bool) -> Grid | None:
    """The grid `lin` is written on; None: written as its decoded weight.

    transformers reads asymmetric zero points only on its dequantizing load path, and never for fused
    experts (module docstring). Where they are not read, an asymmetric b-bit grid becomes the symmetric
    (b+1)-bit grid with codes q - z, which decodes to the same numbers; 8-bit needs 9 bits, which
    compressed-tensors does not pack."""
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


@dataclass
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


def _grid_tensors(name: str, e: dict, tensors: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
    codes, scale, zero = _grid_tensors(name, e, tensors)
    return QuantizedWeight.from_codes(codes, scale, zero, e["bits"], e["sym"], dtype, tensors.get(f"{name}.g_idx")).weight


# ----------------------------------------------------------------------------- what cannot be kept


def export_losses(linears: list[Linear], p: Plan, meta: dict, model_type: str) -> list[str]:
    """One line per part of the fake-quantized model that the exported checkpoint does not reproduce."""
    lost = []
    fused = [lin for lin in linears if lin.fused_expert and lin.act_bits < 16]
    if fused:
        lost.append(f"input quantization of the {len(fused)} expert linears ({fused[0].act_bits}-bit): transformers "
                    f"keeps {model_type} experts fused (3-D tensors, not nn.Linear), so compressed-tensors cannot "
                    "quantize their inputs and they run on full-precision inputs")
    kept = p.dense_names | p.expert_names
    decoded = [lin for lin in linears if not lin.fused_expert and lin.act_bits < 16 and lin.name not in kept]
    if decoded:
        bits = "/".join(map(str, sorted({lin.act_bits for lin in decoded})))
        lost.append(f"the {bits}-bit input quantization of {len(decoded)} routers and other linears written as "
                    f"decoded weights (not nn.Linear in transformers, or off the main grid; e.g. {decoded[0].name}): "
                    "they run on full-precision inputs")
    acts = [lin.act for lin in linears if lin.name in p.dense_names and lin.act_bits < 16]
    clips = sorted({a["clip"] for a in acts if a["clip"] != 1.0})
    if clips:
        lost.append(f"the activation clip ratio (--lac {', '.join(map(str, clips))}): compressed-tensors quantizes "
                    "each token over its whole range")
    if any(not a.get("with_zero", True) for a in acts):
        lost.append("--act_range minmax: compressed-tensors always widens a token's range to include 0")
    if any(a["sym"] for a in acts):
        lost.append("the symmetric activation grid: compressed-tensors divides max |x| by 2^(b-1), "
                    "the toolkit by 2^(b-1) - 1")
    if meta["kv"]:
        bits = sorted({e["bits"] for e in meta["kv"].values()})
        lost.append(f"KV-cache quantization ({'/'.join(map(str, bits))}-bit Q, K, V with a per-head Hadamard on Q "
                    "and K): transformers applies no compressed-tensors transform, so attention runs in full precision")
    return lost


# ----------------------------------------------------------------------------- writing


def _checkpoint_tensors(tensors: dict, meta: dict, linears: list[Linear], p: Plan, names: KeyNames) -> dict:
    out = {names.key(k): v for k, v in tensors.items()
           if k.rpartition(".")[0] not in meta["linears"] and not k.startswith("transforms.")}
    for lin in linears:
        e, target = meta["linears"][lin.name], names.module(lin.name)
        grid = p.dense.grid if lin.name in p.dense_names else p.experts if lin.name in p.expert_names else None
        if grid is None:
            out[f"{target}.weight"] = decoded_weight(lin.name, e, tensors)
        else:
            codes, scale, zero = _grid_tensors(lin.name, e, tensors)
            packed = packed_tensors(codes, scale, zero, lin.bits, lin.sym, grid)
            out.update({f"{target}.{k}": v for k, v in packed.items()})
        if f"{lin.name}.bias" in tensors:
            out[f"{target}.bias"] = tensors[f"{lin.name}.bias"]
    return out


def _load_time_linears(model: nn.Module, experts: dict[str, str]) -> list[str]:
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


def quantization_config(model: nn.Module, p: Plan, linears: list[Linear], names: KeyNames) -> dict:
    """config.json's `quantization_config`: the dense linears (one group per input width when their
    inputs are quantized, see `Scheme.dump`), and a group whose targets name the per-expert checkpoint
    modules of fused experts. Every other linear transformers builds is listed in `ignore`."""
    load_time = _load_time_linears(model, names.experts)
    groups = {}
    if p.dense is not None and p.dense.act_bits >= 16:
        groups["dense"] = p.dense.dump(["Linear"])
    elif p.dense is not None:
        widths = sorted({lin.shape[1] for lin in linears if lin.name in p.dense_names})
        for w in widths:
            members = {lin.name for lin in linears if lin.name in p.dense_names and lin.shape[1] == w}
            groups[f"dense_in{w}"] = p.dense.dump(name_targets(members, [n for n in load_time if n not in members]), w)
    if p.experts is not None:
        groups["experts"] = Scheme(p.experts).dump(_expert_targets(model.config.model_type))
    ignore = [n for n in load_time if n not in p.dense_names]
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": groups, "ignore": ignore, "kv_cache_scheme": None}


def _write_config(tmp: Path, model: nn.Module, qconfig: dict, dequantize: bool) -> None:
    """config.json through compressed-tensors' own writer. `dequantize` (a transformers loading option,
    read from config.json) selects the load path that reads asymmetric zero points: the other one
    builds unpacked zero-point parameters and then fails to unpack them (compressed-tensors 0.20.1)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig

    model.config.save_pretrained(tmp)
    ModelCompressor(quantization_config=QuantizationConfig.model_validate(qconfig)).update_config(str(tmp))
    if dequantize:
        path = tmp / "config.json"
        config = json.loads(path.read_text())
        config["quantization_config"]["dequantize"] = True
        path.write_text(json.dumps(config, indent=2, sort_keys=True))


def check_export_dir(out: Path) -> None:
    """An export may only replace an earlier export, never another directory."""
    if out.exists() and not (out / INFO).exists():
        raise ExportError(f"--export directory {out} exists and is not an earlier export; choose a new directory")


def check_request(fmt: str, out: Path) -> None:
    """--export FORMAT DIR, checked before any work."""
    if fmt not in FORMATS:
        raise ExportError(f"--export format {fmt!r} is unknown; choose from {', '.join(FORMATS)}")
    check_export_dir(out)


def check_configs(quantizes: bool, cfg, gptq) -> None:
    """Refuse before quantizing what `export_compressed_tensors` would refuse after it (`cfg` a
    DuQuantConfig, `gptq` a GPTQConfig or None); o_proj smoothing folded into v_proj passes here,
    and is refused after quantizing where the model's shapes left it online."""
    if not quantizes:
        raise ExportError("--export writes a quantized model; --method fp has none (the checkpoint is the FP model)")
    if cfg.rotate or cfg.permute or (cfg.smooth and cfg.o_smooth == "online"):
        raise ExportError(TRANSFORMS_REFUSED)
    if gptq is not None and gptq.act_order and gptq.group_size is not None:
        raise ExportError(ACT_ORDER_REFUSED)


def check_model(model: nn.Module, spec: ModelSpec, wbits: int, w_sym: bool) -> None:
    """Refuse, once the (still fused) model is loaded, expert grids `check_fused_experts` would refuse."""
    layers = decoder_layers(model, spec)
    fused = any(hasattr(layers.get_submodule(p), "gate_up_proj") for p in moe_layer_paths(model, spec))
    if fused and wbits == 8 and not w_sym:
        raise ExportError(f"{model.config.model_type}'s experts would be on an 8-bit asymmetric grid, and transformers "
                          "loads fused experts of a compressed-tensors checkpoint only from packed codes without zero "
                          "points (9 bits here); add --w_sym")
    if fused and wbits >= 16:
        raise ExportError(f"{model.config.model_type}'s experts would stay in full precision, which transformers "
                          "cannot load from a compressed-tensors checkpoint of fused experts; quantize the weights")


def export_compressed_tensors(model: nn.Module, tokenizer, out_dir: str | Path, run: dict) -> dict:
    """Write `model` (fake-quantized by the pipeline, or loaded with `load_quantized`) to `out_dir`;
    returns the lines of what could not be kept and the directory's size."""
    from models import get_spec

    out = Path(out_dir)
    check_export_dir(out)
    spec = get_spec(model)
    tensors, meta = model_state(model, spec)
    names = KeyNames(model, spec)
    linears = _linears(model, meta, tensors, names.experts)
    if not any(lin.bits < 16 for lin in linears):
        raise ExportError("nothing in the model is quantized; --export writes quantized models (use --method rtn or another)")
    check_fused_experts(linears, model.config.model_type)
    p = plan(linears)
    ckpt = _checkpoint_tensors(tensors, meta, linears, p, names)
    qconfig = quantization_config(model, p, linears, names)
    lost = export_losses(linears, p, meta, model.config.model_type)
    decoded = [lin.name for lin in linears if lin.bits < 16 and lin.name not in p.dense_names | p.expert_names]
    info = {"format": FORMATS[0], "run": run, "lost": lost, "decoded_linears": decoded}

    def fill(tmp: Path) -> None:
        save_file(ckpt, str(tmp / WEIGHTS), metadata={"format": "pt"})
        _write_config(tmp, model, qconfig, p.dequantize)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / INFO).write_text(json.dumps(info, indent=1))

    write_dir_atomically(out, fill)
    return {"lost": lost, "decoded_linears": len(decoded), "total_bytes": sum(f.stat().st_size for f in out.iterdir())}
