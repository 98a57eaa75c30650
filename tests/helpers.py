"""Shared test fixtures: tiny models with planted outlier channels, so rotations are non-trivial."""
import torch

from duquant.data import calibration_segments, ppl_segments
from models.tiny import tiny_model


def outlier_model(arch: str, dtype=torch.float32, seed: int = 0):
    """A tiny model whose norms plant a few outlier channels, like real LLMs' activations."""
    model, tok = tiny_model(arch, seed=seed, dtype=dtype)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[[3, 17, 40]] *= 25
            layer.post_attention_layernorm.weight[[5, 33]] *= 25
    return model, tok


def tiny_data(tok, nsamples=2, seqlen=64, windows=2):
    return calibration_segments("c4", tok, nsamples, seqlen, 0), ppl_segments("wikitext2", tok, seqlen, windows)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).abs().max() / ref.abs().max()).item()


def gen(seed: int = 0) -> torch.Generator:
    """A seeded CPU generator, so each test's random data is fixed."""
    return torch.Generator().manual_seed(seed)
