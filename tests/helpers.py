"""Shared test fixtures: tiny models with planted outlier channels, so rotations are non-trivial, and
one-site fits of DuQuant's transforms (the pipeline fits them site by site, duquant/fitting.py)."""
import torch
import torch.nn as nn

from duquant.transforms import Compose, fit_rotations, fit_smooth

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


def fit_block_rotation(x, block_size: int = 128, max_steps: int = 256, seed: int = 0, shared: bool = False):
    """One site's R1/R2 (duquant.transforms.fit_block_rotations for a single input)."""
    from duquant.transforms import fit_block_rotations

    return fit_block_rotations([x], block_size, max_steps, seed, shared)[0]


def fit_duquant(
    x: torch.Tensor,
    w_absmax: torch.Tensor | None,
    alpha: float = 0.6,
    block_size: int = 128,
    max_steps: int = 256,
    permute: bool = True,
    rotate: bool = True,
    smooth: bool = True,
    seed: int = 0,
    shared: bool = False,
) -> Compose:
    """DuQuant's T = Smooth . R1 . P . R2 for one site, fit on its calibration activations x [..., C].

    w_absmax [C] is the per-input-channel max |W| over all linears reading this site; it is
    only needed for smoothing. Each step is fit on the activation as the previous steps left
    it, all in float64; the result is cast to x's dtype. Disabled steps are left out.
    """
    if smooth and w_absmax is None:
        raise ValueError("smoothing needs w_absmax (max |W| per input channel over the readers)")
    cur = x.reshape(-1, x.shape[-1]).double()
    steps: list[nn.Module] = []

    def add(t: nn.Module) -> None:
        nonlocal cur
        steps.append(t)
        cur = t.act(cur)

    if smooth:
        add(fit_smooth(cur.abs().amax(0), w_absmax.double(), alpha))
    if rotate or permute:
        steps.extend(fit_rotations([cur], block_size, max_steps, permute, rotate, seed, shared)[0].transforms)
    return Compose(steps).to(x.dtype)
