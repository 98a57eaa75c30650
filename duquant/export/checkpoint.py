"""Writing the compressed-tensors checkpoint, and the refusals checked before any work.

    config.json            the FP model's config plus `quantization_config` (compressed-tensors'
                           own writer; format pack-quantized)
    model.safetensors      <module>.weight_packed (the codes, b bits each, packed densely into
                           int32), .weight_scale, .weight_zero_point (asymmetric grids, packed along
                           the rows), .weight_shape; decoded weights for routers; everything else as is
    duquant_export.json    the run's configuration and what the export could not keep
    tokenizer files

`export_losses` lists what a model's export cannot keep: compressed-tensors cannot quantize the inputs
of modules that are not nn.Linear once transformers builds the model (routers, fused experts), has
no activation clip ratio, and transformers applies no transforms when loading (so KV quantization with
its Hadamard cannot be expressed). A model with DuQuant's online transforms is written with a modeling
file of our own that applies them and every input quantizer at load time (export/online.py); its
config groups are weight-only and it loses none of these.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch.nn as nn
from safetensors.torch import save_file

from models.experts import moe_layer_paths
from models.files import write_dir_atomically
from models.spec import ModelSpec, decoder_layers

from ..packed import LINEAR_TENSORS, model_state
from . import online as online_parts
from .errors import ACT_ORDER_REFUSED, ExportError
from .grids import Linear, Plan, Scheme, check_fused_experts, decoded_weight, grid_tensors, packed_tensors, plan, read_linears
from .names import KeyNames, expert_targets, load_time_linears, name_targets


FORMATS = ("compressed-tensors",)
INFO = "duquant_export.json"
WEIGHTS = "model.safetensors"


def export_losses(linears: list[Linear], p: Plan, kv: dict, model_type: str) -> list[str]:
    """One line per part of the fake-quantized model that the exported checkpoint does not reproduce
    (`kv`: the KV-cache quantizers compressed-tensors would have to keep)."""
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
    if kv:
        bits = sorted({e["bits"] for e in kv.values()})
        lost.append(f"KV-cache quantization ({'/'.join(map(str, bits))}-bit Q, K, V with a per-head Hadamard on Q "
                    "and K): transformers applies no compressed-tensors transform, so attention runs in full precision")
    return lost


def _checkpoint_tensors(tensors: dict, meta: dict, linears: list[Linear], p: Plan, names: KeyNames) -> dict:
    own = {f"{n}.{leaf}" for n in meta["linears"] for leaf in LINEAR_TENSORS}  # written below, packed
    out = {names.key(k): v for k, v in tensors.items() if k not in own and not k.startswith("transforms.")}
    for lin in linears:
        e, target = meta["linears"][lin.name], names.module(lin.name)
        grid = p.dense.grid if lin.name in p.dense_names else p.experts if lin.name in p.expert_names else None
        if grid is None:
            out[f"{target}.weight"] = decoded_weight(lin.name, e, tensors)
        else:
            codes, scale, zero = grid_tensors(lin.name, e, tensors)
            packed = packed_tensors(codes, scale, zero, lin.bits, lin.sym, grid)
            out.update({f"{target}.{k}": v for k, v in packed.items()})
        if f"{lin.name}.bias" in tensors:
            out[f"{target}.bias"] = tensors[f"{lin.name}.bias"]
    return out


def quantization_config(model: nn.Module, p: Plan, linears: list[Linear], names: KeyNames) -> dict:
    """config.json's `quantization_config`: the dense linears (one group per input width when their
    inputs are quantized, see `Scheme.dump`), and a group whose targets name the per-expert checkpoint
    modules of fused experts. Every other linear transformers builds is listed in `ignore`."""
    load_time = load_time_linears(model, names.experts)
    groups = {}
    if p.dense is not None and p.dense.act_bits >= 16:
        groups["dense"] = p.dense.dump(["Linear"])
    elif p.dense is not None:
        widths = sorted({lin.shape[1] for lin in linears if lin.name in p.dense_names})
        for w in widths:
            members = {lin.name for lin in linears if lin.name in p.dense_names and lin.shape[1] == w}
            groups[f"dense_in{w}"] = p.dense.dump(name_targets(members, [n for n in load_time if n not in members]), w)
    if p.experts is not None:
        groups["experts"] = Scheme(p.experts).dump(expert_targets(model.config.model_type))
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


def transforms_online(cfg) -> bool:
    """Whether a run with DuQuantConfig `cfg` leaves transforms online on every model (o_proj
    smoothing folded into v_proj stays online on grouped-query attention only, known after quantizing)."""
    return cfg is not None and (cfg.rotate or cfg.permute or (cfg.smooth and cfg.o_smooth == "online"))


def check_configs(quantizes: bool, cfg, gptq) -> None:
    """Refuse before quantizing what `export_compressed_tensors` would refuse after it (`cfg` a
    DuQuantConfig, `gptq` a GPTQConfig or None)."""
    if not quantizes:
        raise ExportError("--export writes a quantized model; --method fp has none (the checkpoint is the FP model)")
    if gptq is not None and gptq.act_order and gptq.group_size is not None:
        raise ExportError(ACT_ORDER_REFUSED)


def check_model(model: nn.Module, spec: ModelSpec, wbits: int, w_sym: bool, cfg=None) -> None:
    """Refuse, once the (still fused) model is loaded, expert grids `check_fused_experts` would refuse,
    and families the online-transform modeling file does not cover when `cfg` leaves transforms online."""
    if transforms_online(cfg):
        online_parts.check_family(model, spec)
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
    online = online_parts.needs_online(meta)
    if online:
        online_parts.check_family(model, spec)
    linears = read_linears(model, meta, tensors, names.experts, online)
    if not any(lin.bits < 16 for lin in linears):
        raise ExportError("nothing in the model is quantized; --export writes quantized models (use --method rtn or another)")
    check_fused_experts(linears, model.config.model_type)
    p = plan(linears)
    ckpt = _checkpoint_tensors(tensors, meta, linears, p, names)
    qconfig = quantization_config(model, p, linears, names)
    parts = online_parts.collect(model, spec, meta) if online else None
    lost = export_losses(linears, p, {} if online else meta["kv"], model.config.model_type)
    decoded = [lin.name for lin in linears if lin.bits < 16 and lin.name not in p.dense_names | p.expert_names]
    info = {"format": FORMATS[0], "run": run, "lost": lost, "decoded_linears": decoded,
            "kept_online": online_parts.kept(parts) if online else []}

    def fill(tmp: Path) -> None:
        save_file(ckpt, str(tmp / WEIGHTS), metadata={"format": "pt"})
        _write_config(tmp, model, qconfig, p.dequantize)
        if online:
            online_parts.write(tmp, model, parts)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / INFO).write_text(json.dumps(info, indent=1))

    write_dir_atomically(out, fill)
    return {"lost": lost, "decoded_linears": len(decoded), "online": online, "total_bytes": sum(f.stat().st_size for f in out.iterdir())}
