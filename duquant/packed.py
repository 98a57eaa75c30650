"""The quantized model as a file: packed integer weights, their grids, the transforms, the rest.

A saved directory holds
    config.json, tokenizer files   the FP model's config (the skeleton is rebuilt from it) and tokenizer
    quant_config.json              the run's method and options, and per quantized linear: bits, grid
                                   shape, activation quantizer and transform id; transform structures;
                                   KV-cache quantizers
    manifest.json                  every tensor's name, shape, dtype and sha256, and the sha256 of every
                                   other file; `load_quantized` refuses a directory that differs from it
                                   (an edited quant_config.json would otherwise load under a wrong label)
    model.safetensors              <linear>.qweight (codes, two 4-bit or 3-bit values per byte, four
                                   2-bit values, one byte from 5 bits up), <linear>.scale / .zero
                                   (/ .g_idx with groups); FP weights of unquantized linears;
                                   transforms.<id>.* buffers; every other parameter under its own name

`load_quantized` decodes the same grids the quantizer used, so the rebuilt model's logits equal
the in-memory fake-quantized model's bit for bit. The same per-module state (`module_state`,
`apply_state`) checkpoints single decoder layers, which is how an interrupted run resumes.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from models.errors import ModelLoadError
from models.files import write_dir_atomically
from models.spec import ModelSpec, decoder_layers, set_module

from . import kvquant
from .layerwise import layer_on
from .qlinear import QLinear, SiteInput
from .quantizer import ActQuantizer, QuantizedWeight
from .transforms import BlockRotation, Compose, Permutation, Smooth

FORMAT = 2  # 2: manifest.json
QUANT_CONFIG = "quant_config.json"
WEIGHTS = "model.safetensors"
MANIFEST = "manifest.json"


class QuantizedLoadError(RuntimeError):
    """A saved model that cannot be written or read; the message is one line that names the fix."""


# ----------------------------------------------------------------------------- integer packing


def _width(bits: int) -> int:
    return 2 if bits <= 2 else 4 if bits <= 4 else 8


def pack_codes(q: torch.Tensor, bits: int, sym: bool) -> torch.Tensor:
    """Codes [rows, cols] -> uint8 [rows, ceil(cols / per_byte)], low bits first."""
    u = (q.to(torch.int16) + (2 ** (bits - 1) if sym else 0)).to(torch.uint8)
    width = _width(bits)
    per = 8 // width
    pad = (-u.shape[-1]) % per
    u = torch.nn.functional.pad(u, (0, pad)).reshape(*u.shape[:-1], -1, per)
    shifts = torch.arange(per, dtype=torch.uint8, device=u.device) * width
    return (u << shifts).sum(-1, dtype=torch.uint8) if per > 1 else u[..., 0]


def unpack_codes(packed: torch.Tensor, bits: int, sym: bool, cols: int) -> torch.Tensor:
    width = _width(bits)
    per = 8 // width
    shifts = torch.arange(per, dtype=torch.uint8, device=packed.device) * width
    u = ((packed[..., None] >> shifts) & (2**width - 1)).reshape(*packed.shape[:-1], -1)[..., :cols]
    return (u.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8) if sym else u


# ----------------------------------------------------------------------------- transforms


def _transform_spec(t: nn.Module) -> dict:
    if isinstance(t, Compose):
        return {"type": "compose", "parts": [_transform_spec(p) for p in t.transforms]}
    kinds = {Smooth: "smooth", Permutation: "permutation", BlockRotation: "block_rotation"}
    if type(t) not in kinds:
        raise QuantizedLoadError(f"cannot save transform {type(t).__name__}: only {', '.join(kinds.values())} and compose")
    return {"type": kinds[type(t)]}


def _build_transform(spec: dict, tensors: dict[str, torch.Tensor], prefix: str) -> nn.Module:
    kind = spec["type"]
    if kind == "compose":
        return Compose([_build_transform(p, tensors, f"{prefix}.transforms.{i}") for i, p in enumerate(spec["parts"])])
    if kind == "smooth":
        return Smooth(tensors[f"{prefix}.scale"])
    if kind == "permutation":
        return Permutation(tensors[f"{prefix}.perm"])
    return BlockRotation(tensors[f"{prefix}.blocks"], tensors[f"{prefix}.tail"])


# ----------------------------------------------------------------------------- module state


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous()


def _small_ints(zero: torch.Tensor) -> torch.Tensor:
    """Zero points are integers in 0..2^b-1 held in floats; one byte each stores them exactly."""
    as_bytes = zero.to(torch.uint8)
    return as_bytes if torch.equal(as_bytes.to(zero.dtype), zero) else zero


# What a saved linear stores of its own; its inner module's other state (a router's buffers) is
# saved and loaded under its own name like any other parameter.
LINEAR_TENSORS = ("weight", "bias", "qweight", "scale", "zero", "g_idx")


def module_state(root: nn.Module, skip: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Everything needed to rebuild the quantized `root` from its unquantized skeleton (leaving out
    the submodules whose names start with `skip`)."""
    tensors: dict[str, torch.Tensor] = {}
    linears, transforms, kv = {}, {}, {}
    ids: dict[int, str] = {}
    owned: list[str] = []
    for name, m in root.named_modules():
        if skip is not None and name.startswith(skip):
            continue
        if isinstance(m, QLinear):
            owned.append(name + ".")
            a = m.act_quant
            entry = {"act": {"bits": a.bits, "sym": a.sym, "clip": a.clip_ratio, "with_zero": a.with_zero}}
            if m.transform is not None:
                if id(m.transform) not in ids:
                    tid = ids[id(m.transform)] = f"t{len(ids)}"
                    transforms[tid] = _transform_spec(m.transform)
                    tensors.update({f"transforms.{tid}.{k}": _cpu(v) for k, v in m.transform.state_dict().items()})
                entry["transform"] = ids[id(m.transform)]
            qw = m.quantized_weight()
            entry.update(bits=qw.bits, sym=qw.sym, shape=list(qw.weight.shape), dtype=str(qw.weight.dtype).removeprefix("torch."))
            if qw.bits >= 16:
                tensors[f"{name}.weight"] = _cpu(qw.weight)
            else:
                tensors[f"{name}.qweight"] = pack_codes(_cpu(qw.codes()), qw.bits, qw.sym)
                tensors[f"{name}.scale"], tensors[f"{name}.zero"] = _cpu(qw.scale), _small_ints(_cpu(qw.zero))
                if qw.g_idx is not None:
                    tensors[f"{name}.g_idx"] = _cpu(qw.g_idx)
            if getattr(m.inner, "bias", None) is not None:
                tensors[f"{name}.bias"] = _cpu(m.inner.bias)
            for key, value in m.inner.state_dict().items():  # e.g. a router's score-correction bias
                if key not in ("weight", "bias"):
                    tensors[f"{name}.{key}"] = _cpu(value)
            linears[name] = entry
        elif isinstance(m, kvquant.KVQuant):
            owned.append(name + ".")
            kv[name] = {"bits": m.bits, "sym": m.sym, "clip": m.clip, "with_zero": m.with_zero,
                        "head_dim": m.hadamard.shape[0]}
    seen: dict[int, str] = {}
    for key, value in root.state_dict().items():
        if any(key.startswith(p) for p in owned) or (skip is not None and key.startswith(skip)):
            continue
        # Tied parameters (embeddings = lm_head) are one storage; safetensors wants each once.
        ptr = value.data_ptr()
        tensors[key] = _cpu(value).clone() if ptr in seen else _cpu(value)
        seen[ptr] = key
    return tensors, {"linears": linears, "transforms": transforms, "kv": kv}


def model_state(model: nn.Module, spec: ModelSpec) -> tuple[dict[str, torch.Tensor], dict]:
    """`module_state` of a whole model, gathered one decoder layer at a time, so a streamed model
    (`--stream`) only ever has one layer in memory; each layer's transforms get ids under its name."""
    tensors, meta = module_state(model, skip=spec.layers + ".")
    for i, layer in enumerate(decoder_layers(model, spec)):
        with layer_on(model, spec, i, torch.device("cpu")):
            part, part_meta = module_state(layer)
        prefix = f"{spec.layers}.{i}."
        for key, value in part.items():
            tensors[f"transforms.{prefix}{key.removeprefix('transforms.')}" if key.startswith("transforms.")
                    else prefix + key] = value
        meta["transforms"].update({prefix + tid: t for tid, t in part_meta["transforms"].items()})
        meta["kv"].update({prefix + name: e for name, e in part_meta["kv"].items()})
        for name, entry in part_meta["linears"].items():
            if "transform" in entry:
                entry = {**entry, "transform": prefix + entry["transform"]}
            meta["linears"][prefix + name] = entry
    return tensors, meta


def apply_state(root: nn.Module, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Turn the unquantized skeleton `root` into the saved quantized module (the inverse of `module_state`)."""
    linears = meta["linears"]
    own = {f"{n}.{leaf}" for n in linears for leaf in LINEAR_TENSORS}
    rest = {k: v for k, v in tensors.items() if not k.startswith("transforms.") and k not in own}
    expected = {k for k in root.state_dict() if not any(k == f"{n}.weight" or k == f"{n}.bias" for n in linears)}
    missing, unexpected = expected - set(rest), set(rest) - expected
    if missing or unexpected:
        raise QuantizedLoadError(f"saved state does not match the model: missing {sorted(missing)[:3]}, "
                                 f"unexpected {sorted(unexpected)[:3]}; was it saved from another model?")
    root.load_state_dict(rest, strict=False)
    built = {tid: _build_transform(spec, tensors, f"transforms.{tid}") for tid, spec in meta["transforms"].items()}
    sites: dict[str, SiteInput] = {}  # one per transform: its readers share T(x), as when quantized
    for name, e in linears.items():
        inner = root.get_submodule(name)
        tid = e.get("transform")
        dtype = getattr(torch, e["dtype"])
        if e["bits"] >= 16:
            qw = QuantizedWeight(tensors[f"{name}.weight"].to(dtype))
        else:
            codes = unpack_codes(tensors[f"{name}.qweight"], e["bits"], e["sym"], e["shape"][-1])
            _check_codes(name, codes, e)
            scale = tensors[f"{name}.scale"]
            qw = QuantizedWeight.from_codes(codes, scale, tensors[f"{name}.zero"].to(scale.dtype), e["bits"],
                                            e["sym"], dtype, tensors.get(f"{name}.g_idx"))
        if tid is not None and tid not in sites:  # after the codes' check: a site's width is the record's
            sites[tid] = SiteInput(built[tid], e["shape"][-1])
        if f"{name}.bias" in tensors:
            inner.bias.data = tensors[f"{name}.bias"].to(inner.bias.dtype)
        # Models saved before the activation range became an option all forced 0 into the range.
        act = ActQuantizer(e["act"]["bits"], e["act"]["sym"], e["act"]["clip"], e["act"].get("with_zero", True))
        set_module(root, name, QLinear(inner, sites.get(tid), act, quantized=qw))
    for name, e in meta["kv"].items():
        set_module(root, name, kvquant.KVQuant(e["bits"], e["head_dim"], e["sym"], e["clip"], e.get("with_zero", True)))


def _check_codes(name: str, codes: torch.Tensor, entry: dict) -> None:
    """Codes that do not fit the recorded shape and bit width mean the record is not the codes'."""
    bits, sym = entry["bits"], entry["sym"]
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if sym else (0, 2**bits - 1)
    if list(codes.shape) != list(entry["shape"]):
        raise QuantizedLoadError(f"{name}: the saved codes are {list(codes.shape)} but the config says "
                                 f"{entry['shape']}; the saved model is inconsistent, save it again")
    if codes.numel() and (codes.min() < lo or codes.max() > hi):
        raise QuantizedLoadError(f"{name}: the saved codes span {codes.min()}..{codes.max()}, outside the "
                                 f"{bits}-bit range {lo}..{hi} the config records; save the model again")


def packed_size(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """Bytes of the quantized linears as saved (codes + grids) against the same linears in bf16."""
    saved = bf16 = 0
    for name, e in meta["linears"].items():
        if e["bits"] >= 16:
            continue
        parts = (tensors.get(f"{name}.{k}") for k in ("qweight", "scale", "zero", "g_idx"))
        saved += sum(t.numel() * t.element_size() for t in parts if t is not None)
        bf16 += 2 * e["shape"][0] * e["shape"][1]
    return {"quantized_linears_bytes": saved, "bf16_bytes": bf16, "ratio": saved / bf16 if bf16 else None}


def check_save_dir(out: Path) -> None:
    """A save may only replace a saved model, never another directory."""
    if out.exists() and not (out / QUANT_CONFIG).exists():
        raise QuantizedLoadError(f"--save_dir {out} exists and is not a saved quantized model; choose a new directory")


def save_quantized(model: nn.Module, tokenizer, out_dir: str | Path, run_config: dict) -> dict:
    """Write the quantized model to `out_dir` (replacing a saved model there, never anything else)."""
    out = Path(out_dir)
    check_save_dir(out)
    from models import get_spec

    tensors, meta = model_state(model, get_spec(model))
    size = packed_size(tensors, meta)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")

    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        doc = {"format": FORMAT, "dtype": dtype, "run": run_config, "size": size, **meta}
        (tmp / QUANT_CONFIG).write_text(json.dumps(doc, indent=1))
        (tmp / MANIFEST).write_text(json.dumps(manifest(tmp, tensors), indent=1))

    write_dir_atomically(out, fill)
    return {**size, "total_bytes": sum(f.stat().st_size for f in out.iterdir())}


# ----------------------------------------------------------------------------- manifest


def _sha256(data) -> str:
    return hashlib.sha256(data).hexdigest()


def _tensor_entry(t: torch.Tensor) -> dict:
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    return {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."), "sha256": _sha256(raw)}


def manifest(directory: Path, tensors: dict[str, torch.Tensor]) -> dict:
    """What `directory` holds: every tensor of the weights file and the checksum of every other file."""
    files = sorted(f for f in directory.iterdir() if f.is_file() and f.name not in (WEIGHTS, MANIFEST))
    return {"tensors": {name: _tensor_entry(t) for name, t in sorted(tensors.items())},
            "files": {f.name: _sha256(f.read_bytes()) for f in files}}


def _read_manifest(path: Path) -> dict:
    try:
        doc = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise QuantizedLoadError(f"{path} has no {MANIFEST} (saved by an older version, or damaged); "
                                 "save the model again") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QuantizedLoadError(f"{path / MANIFEST} is corrupt ({e}); save the model again") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("tensors"), dict) or not isinstance(doc.get("files"), dict):
        raise QuantizedLoadError(f"{path / MANIFEST} lacks its tensors or files list; save the model again")
    return doc


def _check_files(path: Path, listed: dict) -> None:
    for name, digest in listed.items():
        f = path / name
        if not f.is_file():
            raise QuantizedLoadError(f"{f} is missing (the manifest lists it); save the model again")
        if _sha256(f.read_bytes()) != digest:
            raise QuantizedLoadError(f"{f} was changed after saving (its checksum differs from {MANIFEST}'s); "
                                     "restore it or save the model again")


def _check_tensors(path: Path, tensors: dict[str, torch.Tensor], listed: dict) -> None:
    missing, unexpected = sorted(set(listed) - set(tensors)), sorted(set(tensors) - set(listed))
    if missing or unexpected:
        raise QuantizedLoadError(f"{path / WEIGHTS} does not hold the tensors of {MANIFEST} (missing {missing[:3]}, "
                                 f"unexpected {unexpected[:3]}); save the model again")
    for name, t in tensors.items():
        found, want = _tensor_entry(t), listed[name]
        for key in ("shape", "dtype", "sha256"):
            if found[key] != want.get(key):
                raise QuantizedLoadError(f"{path / WEIGHTS}: tensor {name} has {key} {found[key]} but {MANIFEST} "
                                         f"says {want.get(key)}; the file was changed or damaged, save the model again")


def read_saved(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """quant_config.json and the tensors of a saved model, checked against its manifest, with
    one-line errors for broken or edited directories."""
    path = Path(path)
    if not (path / QUANT_CONFIG).is_file():
        raise QuantizedLoadError(f"{path} is not a saved quantized model (no {QUANT_CONFIG}); save one with --save_dir")
    try:
        meta = json.loads((path / QUANT_CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QuantizedLoadError(f"{path / QUANT_CONFIG} is corrupt ({e}); save the model again") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise QuantizedLoadError(f"{path} has format {found}, this version reads {FORMAT}; save it again")
    listed = _read_manifest(path)
    _check_files(path, listed["files"])
    try:
        tensors = load_file(str(path / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise QuantizedLoadError(f"{path / WEIGHTS} is missing or corrupt ({first[:120]}); "
                                 "save the model again") from None
    _check_tensors(path, tensors, listed["tensors"])
    return meta, tensors


def load_quantized(path: str | Path):
    """(model, tokenizer, quant_config) of a directory written by `save_quantized`, on the CPU."""
    path = Path(path)
    meta, tensors = read_saved(path)
    try:
        return _rebuild(path, meta, tensors)
    except (QuantizedLoadError, ModelLoadError):
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as e:
        # The files match their manifest, so quant_config.json was written by a version that
        # describes the model differently (or the manifest was rewritten along with an edit).
        first = (str(e).strip().splitlines() or [""])[0][:120]
        raise QuantizedLoadError(f"{path / QUANT_CONFIG} does not describe the saved tensors "
                                 f"({type(e).__name__}: {first}); save the model again") from None


def _rebuild(path: Path, meta: dict, tensors: dict[str, torch.Tensor]):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from models import get_spec
    from models.experts import unfuse_experts

    dtype = getattr(torch, meta["dtype"])
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype {meta['dtype']!r} is not a torch dtype")
    config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    spec = get_spec(model)
    unfuse_experts(model, spec)
    apply_state(model, tensors, meta)
    if meta["kv"]:
        kvquant.enable(model)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").exists() else None
    return model, tokenizer, meta
