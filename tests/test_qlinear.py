"""Readers of one site reuse its transformed, quantized input only while it is the same tensor; a
site applies its transform as one matrix where cheaper, with the same result up to rounding."""
import copy

import torch

from duquant.qlinear import QLinear, SiteInput
from duquant.quantizer import ActQuantizer, WeightQuantizer

from .helpers import fit_duquant, gen


def _transform(channels: int = 32, block: int = 8):
    x = torch.randn(64, channels, generator=gen(0))
    return x, fit_duquant(x, torch.rand(channels, generator=gen(1)) + 0.5, block_size=block, max_steps=8)


def _readers(n: int, bits: list[int]):
    x, transform = _transform()
    torch.manual_seed(0)
    lins = [torch.nn.Linear(32, 16, bias=False) for _ in range(n)]
    alone = [copy.deepcopy(lin) for lin in lins]
    site = SiteInput(transform, 32)
    shared = [QLinear(lin, site, ActQuantizer(b), WeightQuantizer(4)) for lin, b in zip(lins, bits)]
    separate = [QLinear(lin, copy.deepcopy(transform), ActQuantizer(b), WeightQuantizer(4)) for lin, b in zip(alone, bits)]
    return x, shared, separate, site


def test_shared_input_matches_separate_transforms_and_is_released():
    x, shared, separate, site = _readers(3, [4, 8, 4])
    for _ in range(2):  # a second pass starts a fresh round
        for a, b in zip(shared, separate):
            assert torch.equal(a(x), b(x))
    assert site._round.x is None and site.readers == 3
    assert all(q.transform is site.transform for q in shared)


def test_a_round_transforms_its_input_once_for_all_readers(monkeypatch):
    x, shared, _, site = _readers(3, [4, 8, 4])
    calls = []
    act = site.act
    monkeypatch.setattr(site, "act", lambda t: calls.append(1) or act(t))
    for _ in range(2):
        for q in shared:
            q(x)
    assert len(calls) == 2  # once per round, not once per reader


def test_in_place_change_between_readers_is_seen():
    x, shared, separate, _ = _readers(2, [4, 4])
    shared[0](x)
    x.mul_(3.0)
    assert torch.equal(shared[1](x), separate[1](x))


def test_bare_transform_gets_a_site_of_its_own():
    """The old call QLinear(inner, transform, ...) still works; each such reader has its own site."""
    _, transform = _transform()
    a, b = (QLinear(torch.nn.Linear(32, 4), transform, ActQuantizer(4), WeightQuantizer(4)) for _ in range(2))
    assert a.site is not b.site and a.transform is b.transform is transform and a.site.readers == 1


def test_one_matrix_per_site_matches_the_steps():
    """A site's dense matrix gives T(x) of its steps to float32 rounding, so unquantized activations
    (and the linear after them) agree tightly; 4-bit codes may differ only where a value sits
    within rounding of a step boundary, which is a tiny fraction."""
    x, transform = _transform(48, 16)  # 48 = 3 blocks of 16: dense costs 1.5x the steps' multiply-adds
    x = torch.randn(512, 48, generator=gen(2)) * torch.rand(48, generator=gen(3)) * 5
    site = SiteInput(transform, 48)
    assert site.matrix is not None
    torch.testing.assert_close(site.act(x), transform.act(x), rtol=0, atol=1e-5 * x.abs().max().item())
    lin = torch.nn.Linear(48, 8)
    q16 = QLinear(lin, site, ActQuantizer(16), WeightQuantizer(16))
    steps = copy.deepcopy(q16)
    steps.site.matrix = None
    torch.testing.assert_close(q16(x), steps(x), rtol=1e-5, atol=1e-5)
    q4 = ActQuantizer(4)
    dense, stepwise = q4(site.act(x)), q4(transform.act(x))
    flipped = (dense - stepwise).abs() > 1e-4 * x.abs().max()  # a code one step off, not a scale's rounding
    assert flipped.float().mean() < 1e-3


def test_site_matrix_moves_with_the_module_and_is_not_saved():
    _, transform = _transform(48, 16)
    q = QLinear(torch.nn.Linear(48, 4), SiteInput(transform, 48), ActQuantizer(4), WeightQuantizer(4))
    assert SiteInput(_transform(64, 16)[1], 64).matrix is None  # 4 blocks of 16 per rotation: the steps are cheaper
    assert q.site.matrix is not None and not any(k.endswith("matrix") for k in q.state_dict())
    q.to(torch.float64)
    assert q.site.matrix.dtype == torch.float64


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
