"""Perplexity computed in-repo, as every PTQ paper does: exp(mean token NLL) over seqlen windows;
and how far the quantized model's next-token distribution moved from the FP model's on the same
windows (token-level KL(p_fp || p_quant), its 99th percentile, top-1 agreement).

The comparison needs the FP model's whole distribution at every token the quantized pass scores,
but the two passes are apart in time (the model is quantized in place between them). Keeping FP
logits would cost vocab floats per token (670 MB for 40 x 512 tokens of an 8192 vocabulary, more
per window than the rest of an evaluation). Instead the FP pass writes its last decoder layer's
outputs, hidden floats per token (vocab / hidden times smaller: 32x for the zoo, 8x for
Mixtral-8x7B), to a temporary file on disk, and the quantized pass reads them back one window at a
time and recomputes the FP logits with the final norm and LM head. Quantization never changes those
two (a digest checks it), and the recomputation repeats the FP pass's own arithmetic on the same
stored bits, so the figures are exact, not approximated from a top-k. Memory holds one window's two
sets of logits plus one float per token, whatever the number of windows.
"""
from __future__ import annotations

import hashlib
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from models.spec import ModelSpec, decoder_layers, get_module

from .layerwise import advance, capture_layer_inputs, head_nll, head_on, layer_on, windows


class FinalStates:
    """One evaluation set's FP last-layer states in a file, window after window, and a digest of the
    final norm and head that turn them into logits."""

    def __init__(self, path: Path):
        self.path = path
        self.head_digest: str | None = None
        self.count = 0  # windows written

    def write(self, model, spec: ModelSpec, hidden: list[torch.Tensor]) -> None:
        self.head_digest = head_digest(model, spec)
        with open(self.path, "wb") as f:
            for w in windows(hidden):
                _as_bytes(w).tofile(f)
                self.count += 1

    def check(self, model, spec: ModelSpec, like: torch.Tensor, n_windows: int) -> None:
        """Before a comparison: the same set (size) and the same head, or the figures would be wrong."""
        expected = n_windows * like.numel() * like.element_size()
        if self.head_digest is None or self.path.stat().st_size != expected or self.count != n_windows:
            raise RuntimeError(f"{self.path} does not hold this set's FP states ({n_windows} windows of {tuple(like.shape)})")
        if head_digest(model, spec) != self.head_digest:
            raise RuntimeError("the final norm or LM head changed since the FP pass; KL to FP cannot be recomputed from "
                               "stored states")

    def window(self, k: int, like: torch.Tensor) -> torch.Tensor:
        """Window k, shaped, typed and placed like `like` (a window of the quantized pass)."""
        nbytes = like.numel() * like.element_size()
        data = np.fromfile(self.path, dtype=np.uint8, count=nbytes, offset=k * nbytes)
        return torch.from_numpy(data).view(like.dtype).view(like.shape).to(like.device)


class FPStates:
    """Every evaluation set's FinalStates, in a temporary folder under `parent` (default: the system's
    temporary directory, $TMPDIR, as for --stream's spilled layers); `close()` removes it, as does the
    object's collection or the interpreter's exit after a failure. `kept(folder)` reopens states
    that `keep()` wrote to a folder of their own (`--fp_reference`), which `close()` leaves alone."""

    META = "states.json"

    def __init__(self, names, parent: Path | None = None, folder: Path | None = None):
        self._folder = None if folder is not None else tempfile.TemporaryDirectory(dir=parent, prefix="fp-states-")
        self.folder = Path(folder) if folder is not None else Path(self._folder.name)
        self.sets = {name: FinalStates(self.folder / f"{name}.bin") for name in names}

    @classmethod
    def kept(cls, folder: Path) -> "FPStates":
        meta = json.loads((Path(folder) / cls.META).read_text())
        states = cls(meta, folder=folder)
        for name, m in meta.items():
            states.sets[name].head_digest, states.sets[name].count = m["head_digest"], m["count"]
        return states

    def keep(self) -> None:
        """Record what each set's file holds, so `kept` can reopen the folder in another run."""
        meta = {name: {"head_digest": s.head_digest, "count": s.count} for name, s in self.sets.items()}
        (self.folder / self.META).write_text(json.dumps(meta))

    def close(self) -> None:
        if self._folder is not None:
            self._folder.cleanup()


def reference_key(model, segments: dict[str, torch.Tensor], settings: dict) -> str:
    """sha256 of everything that decides the FP model's evaluation: every parameter and buffer, the
    windows' token ids, and `settings` (tasks, batch size, dtype, device, library versions, threads)."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(_as_bytes(t).data)
    for name, seg in sorted(segments.items()):
        digest.update(name.encode())
        digest.update(_as_bytes(seg).data)
    return digest.hexdigest()[:20]


def head_digest(model, spec: ModelSpec) -> str:
    """sha256 over the final norm's and head's parameters and buffers."""
    digest = hashlib.sha256()
    for module in (get_module(model, spec.final_norm), get_module(model, spec.lm_head)):
        for t in list(module.parameters()) + list(module.buffers()):
            digest.update(_as_bytes(t).data)
    return digest.hexdigest()


def _as_bytes(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()


@torch.no_grad()
def _last_layer_states(model, spec: ModelSpec, segments: torch.Tensor, device, batch_size: int, desc: str) -> list:
    """Layer by layer, so only one decoder layer at a time needs the accelerator."""
    hidden, kwargs = capture_layer_inputs(model, spec, segments, device, batch_size)
    for i in tqdm(range(len(decoder_layers(model, spec))), desc=desc, leave=False):
        with layer_on(model, spec, i, device) as layer:
            hidden = advance(layer, hidden, kwargs)
    return hidden


def perplexity(model, spec: ModelSpec, segments: torch.Tensor, device="cpu", batch_size: int = 4, desc: str = "ppl",
               keep: FinalStates | None = None) -> float:
    """With `keep`, the last layer's outputs also go to that file, for a later `divergence_from_fp`."""
    device = torch.device(device)
    hidden = _last_layer_states(model, spec, segments, device, batch_size, desc)
    if keep is not None:
        keep.write(model, spec, hidden)
    return math.exp(head_nll(model, spec, hidden, segments, device).mean().item())


@torch.no_grad()
def divergence_from_fp(model, spec: ModelSpec, segments: torch.Tensor, fp: FinalStates, device="cpu",
                       batch_size: int = 4, desc: str = "ppl") -> tuple[float, dict]:
    """Perplexity (exactly as `perplexity` computes it) and the comparison with the FP states in `fp`,
    over the same next-token predictions: window k's tokens 1..seqlen-1."""
    device = torch.device(device)
    hidden = _last_layer_states(model, spec, segments, device, batch_size, desc)
    n, seqlen = segments.shape
    fp.check(model, spec, hidden[0][0], n)
    nll, kl = torch.empty(n), torch.empty(n, seqlen - 1)
    agree = torch.empty(n, seqlen - 1, dtype=torch.bool)
    with head_on(model, spec, device) as logits_of:
        for k, (h, ids) in enumerate(zip(windows(hidden), segments)):
            quant = logits_of(h)[:-1]
            nll[k] = F.cross_entropy(quant, ids[1:].to(device))
            kl[k], agree[k] = _token_divergence(quant, logits_of(fp.window(k, h))[:-1])
    return math.exp(nll.mean().item()), {
        "mean": kl.double().mean().item(),
        "p99": float(np.percentile(kl.numpy(), 99)),
        "top1_agreement": agree.double().mean().item(),
        "tokens": kl.numel(),
    }


def _token_divergence(quant: torch.Tensor, fp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: KL(p_fp || p_quant) = sum_v p_fp (log p_fp - log p_quant), and whether the argmax agrees."""
    agree = quant.argmax(-1) == fp.argmax(-1)
    kl = F.kl_div(quant.log_softmax(-1), fp.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    return kl.cpu(), agree.cpu()
