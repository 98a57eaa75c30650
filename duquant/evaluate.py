"""Perplexity computed in-repo, as every PTQ paper does: exp(mean token NLL) over seqlen windows."""
from __future__ import annotations

import math

import torch
from tqdm import tqdm

from models.spec import ModelSpec, decoder_layers

from .layerwise import advance, capture_layer_inputs, head_nll, layer_on


@torch.no_grad()
def perplexity(model, spec: ModelSpec, segments: torch.Tensor, device="cpu", batch_size: int = 4, desc: str = "ppl") -> float:
    """Layer by layer, so only one decoder layer at a time needs the accelerator."""
    device = torch.device(device)
    hidden, kwargs = capture_layer_inputs(model, spec, segments, device, batch_size)
    for i in tqdm(range(len(decoder_layers(model, spec))), desc=desc, leave=False):
        with layer_on(model, spec, i, device) as layer:
            hidden = advance(layer, hidden, kwargs)
    nll = head_nll(model, spec, hidden, segments, device)
    return math.exp(nll.mean().item())
