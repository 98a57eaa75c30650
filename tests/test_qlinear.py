"""Readers of one transform reuse its transformed, quantized input only while it is the same tensor."""
import copy

import torch

from duquant.qlinear import QLinear
from duquant.quantizer import ActQuantizer, WeightQuantizer
from duquant.transforms import fit_duquant


def _readers(n: int, bits: list[int]):
    torch.manual_seed(0)
    x = torch.randn(64, 32)
    transform = fit_duquant(x, torch.rand(32) + 0.5, block_size=8, max_steps=8)
    lins = [torch.nn.Linear(32, 16, bias=False) for _ in range(n)]
    alone = [copy.deepcopy(lin) for lin in lins]
    shared = [QLinear(lin, transform, ActQuantizer(b), WeightQuantizer(4)) for lin, b in zip(lins, bits)]
    separate = [QLinear(lin, copy.deepcopy(transform), ActQuantizer(b), WeightQuantizer(4)) for lin, b in zip(alone, bits)]
    return x, shared, separate, transform


def test_shared_input_matches_separate_transforms_and_is_released():
    x, shared, separate, transform = _readers(3, [4, 8, 4])
    for _ in range(2):  # a second pass sees a fresh memo
        for a, b in zip(shared, separate):
            assert torch.equal(a(x), b(x))
    assert transform.shared_input.x is None and transform.shared_input.readers == 3


def test_in_place_change_between_readers_is_seen():
    x, shared, separate, _ = _readers(2, [4, 4])
    shared[0](x)
    x.mul_(3.0)
    assert torch.equal(shared[1](x), separate[1](x))


def test_weight_grid_moves_and_is_stored_with_the_module():
    """The grid is computed where the fit ran; `.to()` (a layer leaving the GPU), a streamed spill
    (the state dict) and a release (to meta) must all carry it, or a packed save mixes devices;
    a dtype cast of the module must not round it."""
    x, shared, _, _ = _readers(1, [4])
    q = shared[0]
    grid = q.quantized_weight()
    assert {"scale", "zero"} <= set(q.state_dict())
    codes = grid.codes()
    q.to(torch.bfloat16)  # the weight is cast, the grid keeps the precision its codes are defined in
    assert q.weight.dtype == torch.bfloat16 and q.scale.dtype == grid.scale.dtype
    assert torch.equal(q.quantized_weight().codes(), codes)
    q.to("meta")
    assert all(t.device.type == "meta" for t in (q.weight, q.scale, q.zero))
