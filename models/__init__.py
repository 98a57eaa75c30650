"""Model descriptions (one declarative adapter per architecture) and the one loading path.

Real checkpoints, the bundled zoo and the tiny random test models all go through `load_model`,
so what is tested here is what runs on Mixtral-8x7B.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from . import deepseek_moe  # noqa: F401  (registers DeepSeek-MoE v1 with the Auto classes)
from .errors import ModelLoadError
from .lazy import LayerStream, LazyCheckpoint, return_freed_memory, set_tensor
from .registry import SPECS, get_spec
from .spec import LayerView, MLPView, ModelSpec, decoder_layers, resolve

ZOO_DIR = Path(__file__).resolve().parent / "zoo"
ZOO = {"demo-mixtral": "demo-mixtral", "demo-olmoe": "demo-olmoe", "demo-deepseek": "demo-deepseek",
       "demo-llama-s": "demo-llama-s", "demo-llama-m": "demo-llama-m"}
PAPER_CHECKPOINTS = {
    "mixtral": "mistralai/Mixtral-8x7B-v0.1",
    "olmoe": "allenai/OLMoE-1B-7B-0924",
    "deepseek-moe": "deepseek-ai/deepseek-moe-16b-base",
    "qwen-moe": "Qwen/Qwen1.5-MoE-A2.7B",
}
DEFAULT_MODEL = "demo-mixtral"

__all__ = [
    "SPECS", "ZOO", "PAPER_CHECKPOINTS", "DEFAULT_MODEL", "LayerView", "MLPView", "ModelSpec",
    "ModelLoadError", "decoder_layers", "get_spec", "load_model", "resolve", "resolve_model_name",
]


def _demo_list() -> str:
    return ", ".join(sorted(ZOO)) + ", tiny-<arch> (random, for smoke tests)"


def resolve_model_name(name: str) -> str:
    """Map an alias to a local path or hub id; local paths and hub ids pass through."""
    if name in ZOO:
        path = ZOO_DIR / ZOO[name]
        if not (path / "config.json").exists():
            raise ModelLoadError(
                f"bundled model {name} is not in this checkout ({path}); train it with "
                f"`python -m models.zoo.train --arch {name.removeprefix('demo-')}` or use another model"
            )
        return str(path)
    return PAPER_CHECKPOINTS.get(name, name)


def _lazy_model(path: str, dtype: torch.dtype, stream: bool, spill_dir: str | None):
    """The model built on the meta device with everything outside the decoder layers (embeddings,
    final norm, head) read from the safetensors checkpoint; then either every decoder layer is read
    too, one at a time, or (`stream`) they stay on disk behind a `LayerStream`.

    Reading tensor by tensor keeps the peak at about the model's size; transformers' own load keeps
    the memory-mapped file alive next to the weights it converted (2x for a per-expert checkpoint).
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if type(model).__name__ not in SPECS:
        raise ModelLoadError(f"unsupported model class {type(model).__name__}; supported: {', '.join(sorted(SPECS))}")
    spec = get_spec(model)
    tied = spec.lm_head + ".weight" if getattr(config, "tie_word_embeddings", False) else None
    checkpoint = LazyCheckpoint(path, config.model_type)
    for name, t in model.state_dict(keep_vars=True).items():
        if not name.startswith(spec.layers + ".") and name != tied:
            set_tensor(model, name, checkpoint.tensor(name).to(t.dtype))
    if tied:
        model.tie_weights()
    layers = decoder_layers(model, spec)
    if stream:
        model.layer_stream = LayerStream(layers, spec.layers, checkpoint, spill_dir)
    else:
        for i, layer in enumerate(layers):
            checkpoint.materialize(layer, f"{spec.layers}.{i}.")
            return_freed_memory()  # the checkpoint-dtype copies just converted
    return model


def _has_safetensors(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in ("model.safetensors", "model.safetensors.index.json"))


def _is_mxfp4(target: str) -> bool:
    """Whether the checkpoint's experts are MXFP4 (gpt-oss on the hub): `*_blocks` / `*_scales` tensors
    that only transformers' quantizer can turn into weights."""
    from transformers import AutoConfig

    quant = getattr(AutoConfig.from_pretrained(target), "quantization_config", None) or {}
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    return str(method) == "mxfp4"


def _dequantizing(mxfp4: bool) -> dict:
    """from_pretrained arguments that dequantize MXFP4 experts to `dtype` on load (transformers'
    Mxfp4Config(dequantize=True)); our fake quantization starts from those weights."""
    if not mxfp4:
        return {}
    from transformers import Mxfp4Config

    return {"quantization_config": Mxfp4Config(dequantize=True)}


def load_model(name: str, dtype: torch.dtype = torch.float32, stream: bool = False, spill_dir: str | None = None):
    """Load (model, tokenizer) on the CPU; the pipeline moves one decoder layer at a time to the device.

    A local safetensors checkpoint is read tensor by tensor (`models.lazy`); with `stream`, its
    decoder layers are read one at a time when needed instead, for models larger than RAM (changed
    layers are spilled to `spill_dir`, default a temporary directory). Hub ids and other formats go
    through transformers' `from_pretrained`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name.startswith("tiny-"):
        if stream:
            raise ModelLoadError(f"--stream reads a checkpoint from disk and {name} is built in memory; "
                                 "save it with save_pretrained and pass its directory")
        from .tiny import tiny_model

        return tiny_model(name.removeprefix("tiny-"), dtype=dtype)
    target = resolve_model_name(name)
    looks_local = os.path.isabs(target) or target.startswith(".") or os.path.exists(target)
    if looks_local and not os.path.isdir(target):
        raise ModelLoadError(f"model path {target} does not exist; give a checkpoint directory, a hub id, or one of: {_demo_list()}")
    if stream and not os.path.isdir(target):
        raise ModelLoadError(f"--stream reads a local checkpoint directory and {target} is not one; download it first")
    try:
        tokenizer = AutoTokenizer.from_pretrained(target)
        mxfp4 = _is_mxfp4(target)
        if mxfp4 and stream:
            raise ModelLoadError(f"--stream reads plain tensors and {name!r} stores MXFP4 experts; load it without "
                                 "--stream (it is dequantized on load) or save a dequantized copy first")
        if not mxfp4 and (stream or _has_safetensors(target)):
            model = _lazy_model(target, dtype, stream, spill_dir)
            model.eval()
            return model, tokenizer
        model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype, device_map="cpu", **_dequantizing(mxfp4))
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(
            f"cannot load {name!r} ({first[:160]}); without network access use a local checkpoint or a bundled model: {_demo_list()}"
        ) from None
    if type(model).__name__ not in SPECS:
        raise ModelLoadError(f"unsupported model class {type(model).__name__}; supported: {', '.join(sorted(SPECS))}")
    bad = next((n for n, p in model.named_parameters() if not torch.isfinite(p).all()), None)
    if bad is not None:
        raise ModelLoadError(f"checkpoint {name!r} has NaN or Inf values in {bad}; its weights are corrupt, "
                             "re-download or re-export it")
    model.eval()
    return model, tokenizer
