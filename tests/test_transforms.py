import einops
import pytest
import torch

from duquant import transforms
from duquant.transforms import (
    BlockRotation,
    _spreading_matrix,
    _step_matrices,
    act_matrix,
    Compose,
    Permutation,
    Smooth,
    fit_rotations,
    fit_smooth,
    zigzag_permutation,
)

from .helpers import fit_block_rotation, fit_duquant, gen


def _outlier_acts(tokens=512, channels=256, outliers=(3, 70, 200), dtype=torch.float64):
    x = torch.randn(tokens, channels, generator=gen(), dtype=dtype)
    x[:, [o % channels for o in outliers]] *= 50
    return x


def _random_orthogonal(n, b):
    return torch.linalg.qr(torch.randn(n, b, b, generator=gen(1), dtype=torch.float64)).Q


def _block_max(x, b):
    return einops.rearrange(x.abs().amax(0), "(n b) -> n b", b=b).amax(-1)


def _assert_invariant(t, c, tol=1e-10):
    x = torch.randn(3, 5, c, generator=gen(2), dtype=torch.float64)
    w = torch.randn(7, c, generator=gen(3), dtype=torch.float64)
    assert torch.allclose(t.act(x) @ t.weight(w).T, x @ w.T, rtol=0, atol=tol)
    assert torch.allclose(t.inverse_act(t.act(x)), x, rtol=0, atol=tol)


def _assert_orthogonal(rot):
    eye = torch.eye(rot.blocks.shape[-1], dtype=rot.blocks.dtype)
    assert torch.allclose(rot.blocks @ rot.blocks.transpose(1, 2), eye.expand_as(rot.blocks), atol=1e-12)
    eye_tail = torch.eye(rot.tail.shape[0], dtype=rot.tail.dtype)
    assert torch.allclose(rot.tail @ rot.tail.T, eye_tail, atol=1e-12)


def test_smooth_and_permutation_are_exact():
    s = torch.rand(24, generator=gen(), dtype=torch.float64) * 10 + 0.01
    _assert_invariant(Smooth(s), 24)
    _assert_invariant(Permutation(torch.randperm(24, generator=gen())), 24)


@pytest.mark.parametrize("c, b", [(256, 64), (200, 64), (48, 64)])
def test_block_rotation_is_exact(c, b):
    b = min(b, c)
    n, r = divmod(c, b)
    rot = BlockRotation(_random_orthogonal(n, b), _random_orthogonal(1, r)[0] if r else None)
    assert rot.tail.shape == (r, r)
    _assert_orthogonal(rot)
    _assert_invariant(rot, c)


def test_block_rotation_acts_blockwise():
    # Only the block (or tail) a channel belongs to can change it.
    rot = BlockRotation(_random_orthogonal(2, 8), _random_orthogonal(1, 3)[0])
    x = torch.zeros(1, 19, dtype=torch.float64)
    x[0, 9] = 1.0
    y = rot.act(x)[0]
    assert torch.allclose(y[8:16], rot.blocks[1][1]) and not y[:8].any() and not y[16:].any()
    x = torch.zeros(1, 19, dtype=torch.float64)
    x[0, 17] = 1.0
    assert torch.allclose(rot.act(x)[0, 16:], rot.tail[1])


def test_shared_rotation_broadcasts_over_blocks():
    rot = BlockRotation(_random_orthogonal(1, 16))
    _assert_invariant(rot, 64)
    x = torch.randn(4, 64, generator=gen(), dtype=torch.float64)
    assert torch.allclose(rot.act(x)[:, 16:32], x[:, 16:32] @ rot.blocks[0])
    with pytest.raises(ValueError):
        BlockRotation(_random_orthogonal(3, 16)).act(x)


def test_compose_is_exact():
    c = 40
    t = Compose([
        Smooth(torch.rand(c, generator=gen(), dtype=torch.float64) + 0.1),
        BlockRotation(_random_orthogonal(2, 16), _random_orthogonal(1, 8)[0]),
        Permutation(torch.randperm(c, generator=gen())),
        BlockRotation(_random_orthogonal(4, 10)),
    ])
    _assert_invariant(t, c)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("c", [256, 200])
def test_fit_duquant_is_exact(shared, c):
    x = _outlier_acts(tokens=256, channels=c)
    w_absmax = torch.rand(c, generator=gen(), dtype=torch.float64) + 0.05
    t = fit_duquant(x, w_absmax, block_size=64, max_steps=16, shared=shared)
    assert [type(s) for s in t.transforms] == [Smooth, BlockRotation, Permutation, BlockRotation]
    for rot in (t.transforms[1], t.transforms[3]):
        _assert_orthogonal(rot)
        assert rot.blocks.shape[0] == (1 if shared else c // 64)
        assert rot.tail.shape == (c % 64, c % 64)
    _assert_invariant(t, c)

    t32 = fit_duquant(x.float(), w_absmax.float(), block_size=64, max_steps=16, shared=shared)
    assert all(buf.dtype in (torch.float32, torch.long) for buf in t32.state_dict().values())
    x32 = torch.randn(64, c, generator=gen(4))
    w32 = torch.randn(32, c, generator=gen(5))
    ref = x32 @ w32.T
    out = t32.act(x32) @ t32.weight(w32).T
    assert ((out - ref).norm() / ref.norm()) < 1e-4


def test_fit_duquant_skips_disabled_steps():
    x = _outlier_acts(tokens=64, channels=64)
    w_absmax = torch.ones(64, dtype=torch.float64)
    t = fit_duquant(x, None, block_size=16, max_steps=4, smooth=False)
    assert [type(s) for s in t.transforms] == [BlockRotation, Permutation, BlockRotation]
    t = fit_duquant(x, w_absmax, block_size=16, rotate=False)
    assert [type(s) for s in t.transforms] == [Smooth, Permutation]
    t = fit_duquant(x, w_absmax, block_size=16, max_steps=4, permute=False)
    assert [type(s) for s in t.transforms] == [Smooth, BlockRotation, BlockRotation]
    with pytest.raises(ValueError, match="w_absmax"):
        fit_duquant(x, None)


@pytest.mark.parametrize("shared", [False, True])
def test_greedy_rotation_lowers_block_max(shared):
    x = _outlier_acts()
    rot = fit_block_rotation(x, block_size=64, max_steps=32, shared=shared)
    _assert_orthogonal(rot)
    before, after = _block_max(x, 64), _block_max(rot.act(x), 64)
    # The kept prefix may be empty (identity), never worse than it.
    assert (after <= before + 1e-12).all()
    if not shared:
        # Paper's rule: the three outlier blocks (0, 1, 3) lose most of their peak.
        assert (after[[0, 1, 3]] < 0.5 * before[[0, 1, 3]]).all()


def test_step_matrix_swaps_the_outlier_channel_to_the_front_and_back():
    """Each greedy step is P_c G P_c with P_c the swap of coordinates 0 and c (docs/algorithm.md, section 3)."""
    b = 16
    g = _spreading_matrix(b, 0)
    channel = torch.tensor([0, 5, 15, 1])
    steps = _step_matrices(g, channel)
    for c, step in zip(channel.tolist(), steps):
        p = torch.eye(b, dtype=g.dtype)[torch.tensor([c] + [i if i != c else 0 for i in range(1, b)])]
        assert torch.equal(step, p @ g @ p)
    x = torch.zeros(1, b, dtype=g.dtype)
    x[0, 5] = 1.0  # the spread coordinate lands evenly on all b channels
    assert torch.allclose((x @ steps[1]).abs(), torch.full((1, b), b**-0.5, dtype=g.dtype))


def test_greedy_rotation_handles_a_tail_block():
    x = _outlier_acts(tokens=256, channels=200, outliers=(3, 195))
    rot = fit_block_rotation(x, block_size=64, max_steps=16)
    assert rot.blocks.shape == (3, 64, 64) and rot.tail.shape == (8, 8)
    _assert_orthogonal(rot)
    y = rot.act(x)
    assert y[:, 192:].abs().max() < 0.5 * x[:, 192:].abs().max()
    assert y[:, :64].abs().max() < 0.5 * x[:, :64].abs().max()


def test_fit_block_rotation_is_seeded():
    x = _outlier_acts(tokens=128, channels=64)
    a = fit_block_rotation(x, block_size=32, max_steps=8, seed=3)
    b = fit_block_rotation(x, block_size=32, max_steps=8, seed=3)
    assert torch.equal(a.blocks, b.blocks)


def test_zigzag_balances_blocks():
    c, b = 256, 32
    absmax = torch.rand(c, generator=gen()) + 1.0
    absmax[:16] = torch.linspace(100, 60, 16)  # every large channel sits in block 0
    perm = zigzag_permutation(absmax, b).perm
    assert torch.equal(torch.sort(perm).values, torch.arange(c))

    def spread(v):
        per_block = einops.rearrange(v, "(n b) -> n b", b=b)
        return per_block.sum(-1).std(), per_block.amax(-1).std()

    sum_id, max_id = spread(absmax)
    sum_zz, max_zz = spread(absmax[perm])
    assert sum_zz < 0.1 * sum_id and max_zz < 0.3 * max_id
    # Snake order: ranks 0..7 go to blocks 0..7, ranks 8..15 back from block 7 to 0.
    assert perm.view(8, 32)[:, 0].tolist() == list(range(8))
    assert perm.view(8, 32)[:, 1].tolist() == list(range(15, 7, -1))


def test_zigzag_with_a_tail_block():
    c, b = 200, 64
    absmax = torch.rand(c, generator=gen())
    perm = zigzag_permutation(absmax, b).perm
    assert torch.equal(torch.sort(perm).values, torch.arange(c))
    # The 8-channel tail gets one of the 4 largest channels, not the smallest leftovers.
    largest = torch.argsort(absmax, descending=True)[:4]
    assert perm[192] in largest
    for block in range(3):
        assert perm[block * 64] in largest


def test_fit_smooth_never_nan():
    act = torch.tensor([0.0, 0.0, 5.0, 1e-9, 3.0])
    w = torch.tensor([0.0, 2.0, 0.0, 1e-9, 1.5])
    s = fit_smooth(act, w, alpha=0.6).scale
    assert torch.isfinite(s).all() and (s >= 1e-2).all()
    assert torch.allclose(s[4].double(), torch.tensor(3.0).double() ** 0.6 / 1.5**0.4)
    assert torch.isfinite(fit_smooth(torch.zeros(4), torch.zeros(4)).scale).all()


def test_state_dict_round_trip():
    c = 200
    x = _outlier_acts(tokens=128, channels=c, dtype=torch.float32)
    t = fit_duquant(x, torch.rand(c) + 0.1, block_size=64, max_steps=8)
    empty = Compose([
        Smooth(torch.empty(c)),
        BlockRotation(torch.empty(3, 64, 64), torch.empty(8, 8)),
        Permutation(torch.empty(c, dtype=torch.long)),
        BlockRotation(torch.empty(3, 64, 64), torch.empty(8, 8)),
    ])
    empty.load_state_dict(t.state_dict())
    assert torch.equal(empty.act(x), t.act(x))
    assert torch.equal(empty.weight(x[:5]), t.weight(x[:5]))


def test_joint_fit_equals_fitting_each_site_alone():
    """Stacking several sites (e.g. all experts of a layer) into one search is only a speed-up."""
    gen = torch.Generator().manual_seed(5)
    xs = []
    for t, hot in ((40, 3), (200, 17), (7, 60)):  # different token counts, outliers in different channels
        x = torch.randn(t, 80, generator=gen, dtype=torch.float64)
        x[:, hot] *= 30
        xs.append(x)
    joint = fit_rotations(xs, block_size=32, max_steps=24, seed=1)
    for x, t in zip(xs, joint):
        alone = fit_rotations([x], block_size=32, max_steps=24, seed=1)[0]
        torch.testing.assert_close(t.act(x), alone.act(x), rtol=0, atol=1e-9)


@pytest.mark.parametrize("c, b, shared", [(48, 16, False), (40, 16, False), (32, 16, True), (16, 16, False)])
def test_act_matrix_is_the_transform_as_one_matmul(c, b, shared):
    """Smoothing, both rotations (a tail block, or one block shared by all) and the permutation
    compose into one matrix exactly, up to float64 rounding."""
    x = _outlier_acts(256, c)
    t = fit_duquant(x, torch.rand(c, generator=gen(4), dtype=torch.float64) + 0.5, block_size=b, max_steps=6, shared=shared)
    m = act_matrix(t, c)
    assert m is not None and m.dtype == torch.float64
    torch.testing.assert_close(x @ m, t.act(x), rtol=0, atol=1e-12 * x.abs().max().item())


def test_act_matrix_only_where_one_matmul_is_cheaper():
    x = _outlier_acts(256, 64)
    rotations = fit_rotations([x], block_size=16, max_steps=4)[0]  # 4 blocks of 16 in R1 and R2
    assert act_matrix(rotations, 64) is None
    assert act_matrix(Compose([Smooth(torch.ones(64, dtype=torch.float64)), Permutation(torch.arange(64))]), 64) is None


def _running_product_search(xb: torch.Tensor, max_steps: int, g: torch.Tensor, shared: bool, stop: str = "absmax",
                            reflection: bool = False) -> torch.Tensor:
    """The search as it was before `_kept_product`: a running product of every step, the best
    prefix copied out whenever a block improves. Kept as the reference the new one must match bit for bit."""
    assert not reflection, "the reference is the dense kinds' search"
    b = xb.shape[2]
    cur = xb.float()
    best, channel = transforms._search_peak(cur, shared, stop)
    rot = torch.eye(b, device=xb.device).repeat(channel.shape[0], 1, 1)
    best_rot, step = rot.clone(), torch.empty_like(rot)
    spare_cur, spare_rot = torch.empty_like(cur), torch.empty_like(rot)
    g32 = g.float()
    for _ in range(max_steps):
        transforms._step_matrices(g32, channel, out=step)
        cur, spare_cur = torch.matmul(cur, step, out=spare_cur), cur
        rot, spare_rot = torch.matmul(rot, step, out=spare_rot), rot
        score, channel = transforms._search_peak(cur, shared, stop)
        better = score < best
        best = torch.where(better, score, best)
        best_rot[better] = rot[better]
    u, _, vh = torch.linalg.svd(best_rot.double())
    return u @ vh


@pytest.mark.parametrize("shared, stop, per_block_g", [(False, "absmax", False), (False, "range", True), (True, "absmax", False),
                                                      (True, "range", False)])
def test_greedy_search_gives_the_same_bits_as_a_running_product(shared, stop, per_block_g):
    n, rows, b = 6, 40, 16
    x = torch.randn(n, rows, b, generator=gen(5)) * torch.rand(n, 1, b, generator=gen(6)) * 10
    g = (torch.stack([transforms._spreading_matrix(b, s) for s in range(n)]) if per_block_g
         else transforms._spreading_matrix(b, 0)).float()
    new = transforms._greedy_rotation(x.clone(), 40, g, shared, stop)
    assert torch.equal(new, _running_product_search(x.clone(), 40, g, shared, stop))


def test_fitted_rotations_are_bitwise_those_of_the_running_product(monkeypatch):
    xs = [_outlier_acts(300, 80) * (1 + i) for i in range(3)]
    new = fit_rotations(xs, block_size=32, max_steps=30, seed=[1, 2, 3])
    monkeypatch.setattr(transforms, "_greedy_rotation", _running_product_search)
    old = fit_rotations(xs, block_size=32, max_steps=30, seed=[1, 2, 3])
    for a, b in zip(new, old):
        assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def _reflection(b: int, signs: torch.Tensor, c: int) -> torch.Tensor:
    """The dense matrix of one reflection step on channel c: I - 2 w w^T / |w|^2, w = e_c - t / sqrt(b)."""
    t = signs.clone()
    t[c] = 1.0
    w = -t / b**0.5
    w[c] += 1.0
    return torch.eye(b, dtype=torch.float64) - 2 * torch.outer(w, w) / w.dot(w)


def test_a_reflection_step_is_the_product_with_its_householder_matrix():
    b = 32
    x = torch.randn(5, 40, b, generator=gen(1), dtype=torch.float64)
    signs = transforms._reflection_signs(b, 1, 1)[0]
    channel = torch.tensor([0, 3, 31, 7, 3])
    y = x.clone()
    transforms._reflect_rows(y, signs, channel)
    for i, c in enumerate(channel.tolist()):
        h = _reflection(b, signs, c)
        torch.testing.assert_close(h @ h.T, torch.eye(b, dtype=h.dtype), rtol=0, atol=1e-12)
        assert torch.allclose(h[c].abs(), torch.full((b,), b**-0.5, dtype=h.dtype))  # channel c spread evenly
        torch.testing.assert_close(y[i], x[i] @ h, rtol=0, atol=1e-12)
    torch.testing.assert_close(y[0], x[0] @ _spreading_matrix(b, 1, "reflection"), rtol=0, atol=1e-12)


@pytest.mark.parametrize("shared", [False, True])
def test_reflection_search_keeps_the_best_prefix_of_its_dense_steps(shared):
    """The rank-one search against a plain one: float64 rows times each step's dense reflection,
    the same channel rule, the prefix with the least max |x| (per block, or global if shared)."""
    n, rows, b, steps = 4, 60, 16, 30
    x = (torch.randn(n, rows, b, generator=gen(2)) * torch.rand(n, 1, b, generator=gen(3)) * 10).double()
    signs = transforms._reflection_signs(b, 5, steps)
    fast = transforms._greedy_rotation(x.float(), steps, signs, shared, reflection=True)
    cur, rot = x.clone(), torch.eye(b, dtype=torch.float64).repeat(1 if shared else n, 1, 1)
    best, best_rot = None, rot.clone()
    for k in range(steps + 1):
        a = cur.abs()
        score = a.amax().reshape(1) if shared else a.amax((1, 2))
        better = torch.ones_like(score, dtype=torch.bool) if best is None else score < best
        best = score if best is None else torch.where(better, score, best)
        best_rot[better] = rot[better]
        if k == steps:
            break
        if shared:  # the published rule: the global max's row of the [(T n), b] view, mod b
            block, token, _ = torch.unravel_index(a.argmax(), a.shape)
            channel = [int((token * n + block) % b)]
        else:
            channel = a.amax(1).argmax(-1).tolist()
        h = torch.stack([_reflection(b, signs[k], c) for c in channel])
        cur, rot = cur @ h, rot @ h
    torch.testing.assert_close(fast, best_rot, rtol=0, atol=1e-5)
    torch.testing.assert_close(fast @ fast.transpose(1, 2), torch.eye(b, dtype=fast.dtype).expand_as(fast), rtol=0, atol=1e-12)


def test_reflection_spreading_lowers_the_peak_at_a_fraction_of_the_dense_search():
    """Not a timing: the same search budget spreads heavy-tailed channels at least as well as the
    dense spreading matrix (mean peak over sites), on these rows."""
    g = gen(4)
    xs = [torch.randn(400, 256, generator=g).double() * (1 + 20 * torch.rand(256, generator=g) ** 8) for _ in range(4)]
    peak = {k: sum(t.act(x).abs().amax() for t, x in zip(fit_rotations(xs, 128, 64, seed=0, spreading=k), xs))
            for k in ("uniform", "reflection")}
    raw = sum(x.abs().amax() for x in xs)
    assert peak["reflection"] < 0.5 * raw
    assert peak["reflection"] <= 1.05 * peak["uniform"]


def test_a_reflection_search_in_pieces_gives_the_same_bits(monkeypatch):
    x = torch.randn(7, 90, 16, generator=gen(8)) * torch.rand(7, 1, 16, generator=gen(9)) * 10
    signs = transforms._reflection_signs(16, 2, 20)
    per_block = torch.stack([transforms._reflection_signs(16, s, 20) for s in range(7)])
    whole = {k: transforms._greedy_rotation(x.clone(), 20, g, False, reflection=True) for k, g in (("one", signs), ("per", per_block))}
    monkeypatch.setattr(transforms, "SEARCH_PIECE_ENTRIES", 2 * 90 * 16)  # pieces of 2 blocks
    for k, g in (("one", signs), ("per", per_block)):
        assert torch.equal(transforms._greedy_rotation(x.clone(), 20, g, False, reflection=True), whole[k])


def test_reflection_rotations_handle_a_tail_block():
    x = _outlier_acts(tokens=256, channels=200, outliers=(3, 195))
    rot = transforms.fit_block_rotations([x], block_size=64, max_steps=16, spreading="reflection")[0]
    assert rot.blocks.shape == (3, 64, 64) and rot.tail.shape == (8, 8)
    _assert_orthogonal(rot)
    y = rot.act(x)
    assert y[:, 192:].abs().max() < 0.5 * x[:, 192:].abs().max()
    assert y[:, :64].abs().max() < 0.5 * x[:, :64].abs().max()
