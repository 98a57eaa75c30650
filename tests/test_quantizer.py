import pytest
import torch

from duquant.quantizer import (
    ActQuantizer,
    WeightQuantizer,
    dequantize,
    fake_quant,
    mse_clip_search,
    quant_params,
    quantize,
)

from .helpers import gen


@pytest.mark.parametrize("bits", range(2, 9))
def test_at_most_2_to_the_bits_levels_per_row(bits):
    w = torch.randn(8, 300, generator=gen())
    x = torch.randn(2, 5, 300, generator=gen(1))
    for q in (fake_quant(w, bits), WeightQuantizer(bits=bits, clip_ratio=0.8)(w)):
        assert all(len(torch.unique(row)) <= 2**bits for row in q)
    qx = ActQuantizer(bits, clip_ratio=0.9)(x)
    assert qx.shape == x.shape
    assert all(len(torch.unique(tok)) <= 2**bits for tok in qx.reshape(-1, 300))


def test_rows_of_the_last_dim_are_independent():
    # Rows with wildly different magnitudes: only a per-row (per-token / per-output-channel)
    # quantizer keeps the small rows; a per-column one would flush them to zero.
    mags = torch.tensor([1e-3, 1.0, 1e3, 10.0])
    x = torch.randn(4, 64, generator=gen()) * mags[:, None]
    q = fake_quant(x, 8)
    rel = (q - x).norm(dim=-1) / x.norm(dim=-1)
    assert (rel < 1e-2).all()

    scale, zero = quant_params(torch.randn(3, 7, 64), 4)
    assert scale.shape == zero.shape == (3, 7, 1)  # activations: one per token
    scale, _ = quant_params(torch.randn(16, 64), 4)
    assert scale.shape == (16, 1)  # weights [out, in]: one per output channel

    # Quantizing a token does not depend on the other tokens in the batch.
    assert torch.equal(fake_quant(x, 4)[1], fake_quant(x[1:2], 4)[0])


def test_clip_ratio_shrinks_the_range():
    x = torch.randn(6, 128, generator=gen())
    full = x.amax(-1) - x.amin(-1).clamp(max=0)
    for clip in (0.5, torch.linspace(0.4, 0.9, 6)[:, None]):
        q = fake_quant(x, 4, clip=clip)
        ratio = clip if isinstance(clip, float) else clip[:, 0]
        assert (q.amax(-1) - q.amin(-1) <= ratio * full + 1e-6).all()
    assert (fake_quant(x, 4, clip=0.5).abs().amax(-1) < x.abs().amax(-1)).all()


def test_16_bits_is_identity():
    x = torch.randn(3, 4, 32)
    assert fake_quant(x, 16) is x
    act = ActQuantizer(bits=16)
    assert not act.enabled and torch.equal(act(x), x)
    assert ActQuantizer(bits=4).enabled
    assert torch.equal(WeightQuantizer(bits=16, clip="mse")(x[0]), x[0])


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fake_quant_is_dequantize_of_quantize(sym, dtype):
    x = torch.randn(10, 96, generator=gen(), dtype=dtype) * 3
    clip = torch.linspace(0.5, 1.0, 10, dtype=dtype)[:, None]
    scale, zero = quant_params(x, 4, sym, clip)
    q = quantize(x, scale, zero, 4, sym)
    assert q.dtype == (torch.int8 if sym else torch.uint8)
    assert int(q.min()) >= (-8 if sym else 0) and int(q.max()) <= (7 if sym else 15)
    assert torch.equal(fake_quant(x, 4, sym, clip), dequantize(q, scale, zero))


def test_symmetric_mode():
    x = torch.randn(5, 64, generator=gen())
    scale, zero = quant_params(x, 4, sym=True)
    assert torch.equal(zero, torch.zeros_like(zero))
    q = fake_quant(x, 4, sym=True)
    codes = q / scale
    assert torch.allclose(codes, codes.round(), atol=1e-5)
    assert codes.min() >= -8 and codes.max() <= 7
    # absmax / (2^(b-1)-1) scales and half-to-even rounding are odd-symmetric.
    assert torch.equal(fake_quant(-x, 4, sym=True), -q)


def test_round_half_to_even():
    # Row range [0, 15] at 4 bits gives scale 1 and zero 0, so x itself is the code.
    x = torch.tensor([[0.0, 0.5, 1.5, 2.5, 15.0]])
    assert fake_quant(x, 4).tolist() == [[0.0, 0.0, 2.0, 2.0, 15.0]]


def test_zero_and_constant_rows_give_no_nan():
    w = torch.randn(4, 32)
    w[1] = 0.0
    w[2] = 3.0
    for sym in (False, True):
        q = fake_quant(w, 4, sym)
        assert torch.isfinite(q).all()
        assert torch.equal(q[1], w[1])
        assert torch.allclose(q[2], w[2])
    assert torch.isfinite(mse_clip_search(w, 4)).all()
    assert torch.isfinite(WeightQuantizer(clip="mse")(w)).all()
    assert torch.equal(ActQuantizer(4)(torch.zeros(2, 3, 8)), torch.zeros(2, 3, 8))


@pytest.mark.parametrize("sym", [False, True])
def test_mse_search_never_worse_than_minmax(sym):
    w = torch.randn(32, 256, generator=gen())
    w[::4, 0] *= 20  # heavy-tailed rows, where clipping pays
    ratio = mse_clip_search(w, 4, sym)
    assert ratio.shape == (32, 1)
    assert ((ratio >= 0.35 - 1e-6) & (ratio <= 1.0)).all()
    assert (ratio < 1).any()
    err = lambda q: (q - w).pow(2).sum(-1)  # noqa: E731
    assert (err(fake_quant(w, 4, sym, ratio)) <= err(fake_quant(w, 4, sym))).all()
    wq = WeightQuantizer(bits=4, sym=sym, clip="mse")
    assert torch.equal(wq(w), fake_quant(w, 4, sym, ratio))
    assert torch.equal(wq.params(w)[0], quant_params(w, 4, sym, ratio)[0])


@pytest.mark.parametrize("bits", [0, 1, 9, 12, 15])
def test_invalid_bits_raise(bits):
    with pytest.raises(ValueError, match="bits"):
        fake_quant(torch.randn(2, 8), bits)
    with pytest.raises(ValueError, match="bits"):
        ActQuantizer(bits)
    with pytest.raises(ValueError, match="bits"):
        WeightQuantizer(bits=bits)


def test_invalid_clip_mode_and_16_bit_params_raise():
    with pytest.raises(ValueError, match="clip"):
        WeightQuantizer(clip="percentile")
    with pytest.raises(ValueError):
        quant_params(torch.randn(2, 8), 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("sym, with_zero", [(False, True), (False, False), (True, True)])
def test_fake_quant_is_bitwise_dequantize_of_quantize(dtype, sym, with_zero):
    x = (torch.randn(6, 9, 64, generator=gen(3)) * torch.logspace(-3, 3, 9)[:, None]).to(dtype)
    x[0, 0] = 0.0  # an all-zero row (scale floor)
    for bits in (2, 4, 8):
        for clip in (1.0, 0.9, torch.rand(6, 9, 1, generator=gen(4)) * 0.5 + 0.5):
            scale, zero = quant_params(x, bits, sym, clip, with_zero)
            ref = dequantize(quantize(x, scale, zero, bits, sym), scale, zero).to(dtype)
            assert torch.equal(fake_quant(x, bits, sym, clip, with_zero), ref)


def _search_by_definition(w, bits, sym, ratios, with_zero):
    """The clip search as defined: fake_quant at every ratio over the whole matrix, strict improvements only."""
    ref = w.float()
    best_err = torch.full((*w.shape[:-1], 1), float("inf"))
    best = torch.ones_like(best_err)
    for r in ratios:
        err = (fake_quant(w, bits, sym, r, with_zero).float() - ref).pow(2).sum(-1, keepdim=True)
        best = torch.where(err < best_err, torch.full_like(best, r), best)
        best_err = torch.minimum(err, best_err)
    return best


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sym, with_zero", [(False, True), (False, False), (True, True)])
def test_blocked_clip_search_matches_its_definition(dtype, sym, with_zero, monkeypatch):
    """The search runs block by block on a scratch buffer; it must pick exactly the ratios that
    fake_quant at each ratio over the whole matrix picks (blocks of 3 rows here, ragged end)."""
    import duquant.quantizer as quantizer

    monkeypatch.setattr(quantizer, "SEARCH_CHUNK_ENTRIES", 3 * 96)
    w = torch.randn(2, 25, 96, generator=gen()).to(dtype)
    w[:, ::5, 7] *= 25
    w[:, 3] = 0  # every ratio ties: the grid's order decides
    for bits, grid, ascending in ((4, 101, True), (3, 20, False)):
        ratios = torch.linspace(0.35, 1.0, grid).tolist() if ascending else torch.linspace(1.0, 0.35, grid).tolist()
        got = mse_clip_search(w, bits, sym, grid, with_zero=with_zero, ascending=ascending)
        assert torch.equal(got, _search_by_definition(w, bits, sym, ratios, with_zero))

