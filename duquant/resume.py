"""Layer checkpoints: a quantization run killed at any layer continues from the last finished one.

After every layer, `save_layer` writes that layer's quantized state (the packed format of
`duquant.packed`), its report entry, and the calibration activations entering the next layer;
`progress.json` is replaced last, so it only ever names layers whose files are complete. A
resumed run restores the finished layers and their outputs and goes on with the same seeds, so
it ends with the same model and report as an uninterrupted run.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from models.files import write_file_atomically

from .packed import apply_state, module_state

PROGRESS = "progress.json"


def finished_layers(ckpt_dir: Path | None) -> int:
    if ckpt_dir is None or not (ckpt_dir / PROGRESS).exists():
        return 0
    return json.loads((ckpt_dir / PROGRESS).read_text())["done"]


def save_layer(ckpt_dir: Path, index: int, layer: nn.Module, info: dict,
               inps: list[torch.Tensor], extra: list[torch.Tensor], rot: list[torch.Tensor]) -> None:
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tensors, meta = module_state(layer)
    write_file_atomically(ckpt_dir / f"layer{index}.safetensors", lambda p: save_file(tensors, str(p)))
    write_file_atomically(ckpt_dir / f"layer{index}.json",
                          lambda p: p.write_text(json.dumps({"state": meta, "info": info})))
    write_file_atomically(ckpt_dir / "inputs.pt", lambda p: torch.save({"inps": inps, "extra": extra, "rot": rot}, p))
    write_file_atomically(ckpt_dir / PROGRESS, lambda p: p.write_text(json.dumps({"done": index + 1})))


def restore_layer(ckpt_dir: Path, index: int, layer: nn.Module) -> dict:
    """Quantize `layer` (still FP, experts unfused) from its checkpoint; returns its report entry."""
    saved = json.loads((ckpt_dir / f"layer{index}.json").read_text())
    apply_state(layer, load_file(str(ckpt_dir / f"layer{index}.safetensors")), saved["state"])
    return saved["info"]


def load_inputs(ckpt_dir: Path) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """The calibration inputs, expert-only extra inputs and mean rotation sequence entering the next layer."""
    saved = torch.load(ckpt_dir / "inputs.pt", weights_only=True)
    return saved["inps"], saved["extra"], saved["rot"]


def check_readable(ckpt_dir: Path) -> None:
    """Open every file a resume would read (headers only, nothing is loaded), so that a damaged
    checkpoint is refused before the quantization starts rather than failing at its layer;
    raises what the damaged file raises."""
    done = finished_layers(ckpt_dir)
    for i in range(done):
        if "state" not in json.loads((ckpt_dir / f"layer{i}.json").read_text()):
            raise KeyError(f"layer{i}.json has no state")
        with safe_open(str(ckpt_dir / f"layer{i}.safetensors"), "pt"):
            pass
    if done:
        torch.load(ckpt_dir / "inputs.pt", mmap=True, weights_only=True)
