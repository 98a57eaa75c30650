"""Models larger than RAM: decoder layers read from the safetensors checkpoint one at a time.

`load_model(..., stream=True)` builds the model with its decoder-layer weights on the meta
device and attaches a `LayerStream`. A layer is materialized from the checkpoint (safetensors
memory-maps the file, so only that layer's tensors are read) when it is needed and released
afterwards; a layer that was changed (quantized) is spilled to a scratch directory first, and
later reads come from there. Layer-wise work (calibration, perplexity) holds one layer at a time
through `hold`; any other forward of the whole model (zero-shot tasks, FP reference logits)
materializes each layer for the duration of its own forward, so it works too, only slower.

Checkpoints may store experts per expert (hub Mixtral, OLMoE, Qwen-MoE) while transformers 5
keeps them fused; the renames and merges transformers declares for the architecture
(`transformers.conversion_mapping`) are applied when a fused tensor is read.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open

from .errors import ModelLoadError
from .files import write_file_atomically
from .spec import owner


@functools.cache
def _malloc_trim():
    libc = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None


def return_freed_memory() -> None:
    """Hand memory freed by a released layer back to the OS.

    glibc keeps freed blocks of a few MB for reuse, so without this the resident size grows by
    about one layer per layer read, and streaming would save little. A no-op without glibc.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def set_tensor(root: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace parameter or persistent buffer `name` of `root` by `value` (any device, meta included)."""
    module, leaf = owner(root, name)
    if isinstance(getattr(module, leaf), nn.Parameter):
        setattr(module, leaf, nn.Parameter(value, requires_grad=False))
    else:
        module.register_buffer(leaf, value, persistent=True)


def _weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if isinstance(weight_map, dict) and all(isinstance(f, str) for f in weight_map.values()):
            return weight_map
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        pass
    raise ModelLoadError(f"{index} is corrupt (no readable weight_map); re-download or re-export the checkpoint")


@contextmanager
def _opened(file: Path):
    """A safetensors file opened for reading; a missing, empty or truncated one is one clear line."""
    try:
        handle = safe_open(str(file), "pt")
    except (SafetensorError, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelLoadError(f"checkpoint file {file} is missing, empty or truncated ({first[:120]}); "
                             "re-download or re-export the checkpoint") from None
    with handle as f:
        yield f


def _unescaped(pattern: str) -> str:
    """A regular expression's literal text (`a\\.b` -> `a.b`)."""
    return re.sub(r"\\(.)", r"\1", pattern)


class LazyCheckpoint:
    """The tensors of a safetensors checkpoint directory, read on demand by model parameter name."""

    def __init__(self, path: str | Path, model_type: str):
        path = Path(path)
        index = path / "model.safetensors.index.json"
        if index.exists():
            self.files = {k: path / f for k, f in _weight_map(index).items()}
            for file in sorted(set(self.files.values())):
                with _opened(file):  # a missing or truncated shard is reported now, not layers later
                    pass
        elif (path / "model.safetensors").exists():
            with _opened(path / "model.safetensors") as f:
                self.files = dict.fromkeys(f.keys(), path / "model.safetensors")
        else:
            raise ModelLoadError(f"--stream needs a safetensors checkpoint and {path} has none "
                              "(no model.safetensors or model.safetensors.index.json); convert it or load without --stream")
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping

        self.conversions = get_checkpoint_conversion_mapping(model_type) or []

    def _read(self, name: str) -> torch.Tensor:
        # Opened per read: a handle kept open keeps every page it ever read mapped into the
        # process, so resident memory would grow to the whole checkpoint after one pass.
        with _opened(self.files[name]) as f:
            return f.get_tensor(name)

    def _renamings(self, name: str) -> list[str]:
        """`name` and its spellings in older checkpoints (transformers' renames, run backwards; their
        patterns are regular expressions, of which only the escaped literal ones occur here)."""
        out = [name]
        for conv in self.conversions:
            if type(conv).__name__ == "WeightRenaming":
                for src, dst in zip(conv.source_patterns, conv.target_patterns):
                    src, dst = _unescaped(src), _unescaped(dst)
                    out += [n.replace(dst, src) for n in out if dst in n]
        return out

    def _experts(self, pattern: str) -> list[torch.Tensor]:
        """The tensors `pattern` names with * = 0, 1, ... (in whichever spelling the checkpoint uses)."""
        for spelling in self._renamings(pattern):
            head, tail = spelling.split("*")
            if f"{head}0{tail}" in self.files:
                count = 0
                while f"{head}{count}{tail}" in self.files:
                    count += 1
                return [self._read(f"{head}{e}{tail}") for e in range(count)]
        return []

    def _merged(self, name: str) -> torch.Tensor | None:
        """A fused expert tensor rebuilt from per-expert tensors (MergeModulelist, then Concatenate)."""
        for conv in self.conversions:
            if type(conv).__name__ != "WeightConverter" or not name.endswith(conv.target_patterns[0]):
                continue
            ops = [(type(op).__name__, getattr(op, "dim", None)) for op in conv.operations]
            if ops not in ([("MergeModulelist", 0)], [("MergeModulelist", 0), ("Concatenate", 1)]):
                raise ModelLoadError(f"cannot stream {name}: its checkpoint conversion {ops} is not supported; "
                                  "re-save the model with transformers>=5 (save_pretrained) or load without --stream")
            prefix = name[: -len(conv.target_patterns[0])]
            groups = [self._experts(prefix + pattern) for pattern in conv.source_patterns]
            if all(groups):
                return torch.cat([torch.stack(g) for g in groups], dim=1)
        return None

    def tensor(self, name: str) -> torch.Tensor:
        value = next((self._read(c) for c in self._renamings(name) if c in self.files), None)
        if value is None:
            value = self._merged(name)
        if value is None:
            raise ModelLoadError(f"tensor {name} is not in the checkpoint; is it a checkpoint of this architecture?")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ModelLoadError(f"checkpoint has NaN or Inf values in {name}; its weights are corrupt, "
                                 "re-download or re-export it")
        return value

    def materialize(self, module: nn.Module, prefix: str) -> None:
        """Read every meta tensor of `module` (named `prefix` + its own name) from the checkpoint,
        in the dtype the model was built with."""
        for name, current in module.state_dict(keep_vars=True).items():
            if current.device.type == "meta":
                value = self.tensor(prefix + name)
                if value.shape != current.shape:
                    raise ModelLoadError(f"{prefix + name} has shape {tuple(value.shape)} in the checkpoint but "
                                         f"{tuple(current.shape)} in the model; is the config from another checkpoint?")
                set_tensor(module, name, value.to(current.dtype if current.is_floating_point() else value.dtype))


class LayerStream:
    """Decoder layers that live on disk; at most the held ones (and one in a forward) in memory."""

    def __init__(self, layers: nn.ModuleList, prefix: str, checkpoint: LazyCheckpoint, spill_dir: str | Path | None = None):
        self.layers, self.prefix, self.checkpoint = layers, prefix, checkpoint
        self._tmp = None if spill_dir else tempfile.TemporaryDirectory(prefix="duquant-stream-")
        self.spill_dir = Path(spill_dir or self._tmp.name)
        self.spilled: set[int] = set()
        self.resident: set[int] = set()
        self.peak_resident = 0
        for i, layer in enumerate(layers):
            layer.register_forward_pre_hook(lambda m, args, i=i: self._enter_forward(i))
            layer.register_forward_hook(lambda m, args, out, i=i: self._exit_forward(i))
        self._forward_fetched: set[int] = set()

    def fetch(self, i: int) -> None:
        layer = self.layers[i]
        if i in self.spilled:
            state = torch.load(self.spill_dir / f"layer{i}.pt", weights_only=True)
            for name in layer.state_dict(keep_vars=True):
                set_tensor(layer, name, state[name])
        else:
            self.checkpoint.materialize(layer, f"{self.prefix}.{i}.")
        self.resident.add(i)
        self.peak_resident = max(self.peak_resident, len(self.resident))

    def release(self, i: int, changed: bool = False) -> None:
        """Drop layer i's tensors (to meta); a changed layer is first written to the spill directory."""
        layer = self.layers[i]
        if changed:
            state = {k: v.detach().cpu() for k, v in layer.state_dict().items()}
            write_file_atomically(self.spill_dir / f"layer{i}.pt", lambda tmp: torch.save(state, tmp))
            self.spilled.add(i)
        for name, current in layer.state_dict(keep_vars=True).items():
            set_tensor(layer, name, torch.empty_like(current, device="meta"))
        self.resident.discard(i)

    @contextmanager
    def hold(self, i: int, changed: bool = False):
        """Layer i in memory for the block (across many forwards); released after, and spilled if
        changed, unless the block failed (a half-changed layer is never kept)."""
        if i not in self.resident:
            self.fetch(i)
        try:
            yield self.layers[i]
        except BaseException:
            self.release(i)
            raise
        self.release(i, changed)

    def _enter_forward(self, i: int) -> None:
        if i not in self.resident:
            self.fetch(i)
            self._forward_fetched.add(i)

    def _exit_forward(self, i: int) -> None:
        if i in self._forward_fetched:
            self._forward_fetched.discard(i)
            self.release(i)
            return_freed_memory()
