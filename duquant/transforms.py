"""DuQuant's exactly invertible activation transforms (docs/algorithm.md sections 2 and 3).

Every transform has an activation side and a weight side with

    act(x) @ weight(W).T == x @ W.T        (W is [out, in], x is [..., in])

so a linear computes the same function in full precision while its quantizers see
activations and weights whose outliers have been flattened. `inverse_act` undoes `act`
(for tests and diagnostics). Parameters are buffers, so they travel with state_dict, and
they are stored compactly: a vector of scales, an index vector, b x b blocks. Each
method computes in the wider of the input's and the buffer's dtype and returns the
input's dtype, on the input's device (statistics live on the CPU and the rotation search
runs on the layer's device, so a transform may be fitted on one device and used on
another). The fitting functions work in float64 (the greedy search in float32, see
`_greedy_rotation`) and return buffers in the dtype of their input statistics (the model
dtype), as QuaRot does.

DuQuant is Compose([Smooth, BlockRotation R1, Permutation (zigzag), BlockRotation R2]), fitted
site by site by duquant/fitting.py.
"""
from __future__ import annotations

import math
from typing import Callable

import einops
import torch
import torch.nn as nn


def _promote(x: torch.Tensor, buf: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, buf.dtype)


class Smooth(nn.Module):
    """SmoothQuant-style per-channel scale: activation columns / s, weight columns * s."""

    def __init__(self, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("scale", scale)

    def act(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _promote(x, self.scale)
        return (x.to(dtype) / self.scale.to(x.device, dtype)).to(x.dtype)

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        dtype = _promote(w, self.scale)
        return (w.to(dtype) * self.scale.to(w.device, dtype)).to(w.dtype)

    def inverse_act(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight(x)


class Permutation(nn.Module):
    """Channel reordering: output channel j is input channel perm[j] (on both sides)."""

    def __init__(self, perm: torch.Tensor):
        super().__init__()
        self.register_buffer("perm", perm.long())

    def act(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., self.perm.to(x.device)]

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        return w[..., self.perm.to(w.device)]

    def inverse_act(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., torch.argsort(self.perm).to(x.device)]


class BlockRotation(nn.Module):
    """Block-diagonal orthogonal matrix, applied as x_block @ R_block (rows of W likewise).

    `blocks` is [n_blocks, b, b], or [1, b, b] when one matrix is shared by every block
    (the published code's variant); it then broadcasts over however many blocks the input
    has. When the channel count is not a multiple of b, the last C mod b channels form a
    smaller block with its own matrix `tail` [r, r]; without a tail it is empty, [0, 0].
    Keeping the tail separate, rather than padding it into a b x b identity-bordered block,
    means every stored matrix is a genuine rotation and nothing depends on padding.
    """

    def __init__(self, blocks: torch.Tensor, tail: torch.Tensor | None = None):
        super().__init__()
        if blocks.dim() != 3 or blocks.shape[1] != blocks.shape[2]:
            raise ValueError(f"blocks must be [n_blocks, b, b], got {tuple(blocks.shape)}")
        if tail is None:
            tail = blocks.new_zeros(0, 0)
        if tail.dim() != 2 or tail.shape[0] != tail.shape[1]:
            raise ValueError(f"tail must be [r, r], got {tuple(tail.shape)}")
        self.register_buffer("blocks", blocks)
        self.register_buffer("tail", tail)

    def _rotate(self, x: torch.Tensor, blocks: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
        dtype = _promote(x, blocks)
        b, r = blocks.shape[-1], tail.shape[-1]
        flat = x.reshape(-1, x.shape[-1]).to(dtype)
        head = einops.rearrange(flat[:, : flat.shape[1] - r], "t (n b) -> n t b", b=b)
        if blocks.shape[0] not in (1, head.shape[0]):
            raise ValueError(f"{blocks.shape[0]} stored blocks cannot rotate {head.shape[0]} blocks of {b}")
        out = einops.rearrange(head @ blocks.to(x.device, dtype), "n t b -> t (n b)")
        if r:
            out = torch.cat([out, flat[:, -r:] @ tail.to(x.device, dtype)], dim=1)
        return out.reshape(x.shape).to(x.dtype)

    def act(self, x: torch.Tensor) -> torch.Tensor:
        return self._rotate(x, self.blocks, self.tail)

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        # x R (W R)^T = x R R^T W^T = x W^T because R is orthogonal.
        return self._rotate(w, self.blocks, self.tail)

    def inverse_act(self, x: torch.Tensor) -> torch.Tensor:
        return self._rotate(x, self.blocks.transpose(1, 2), self.tail.T)


# The activation side of a site as one dense [C, C] matrix costs C^2 multiply-adds per token against
# C * (sum of the rotations' block sizes) for the block-diagonal steps, but it is one matmul instead
# of a chain of reshapes, copies, batched products and a gather. Measured on CPU (float32, 512 and
# 2048 tokens): dense takes 0.5-0.8x the time of the steps at 1.5x their multiply-adds (C = 3b with
# R1 and R2), 1.1-1.2x at 2x, 1.6-2.4x at 4x. Up to 1.5x it is the faster form.
DENSE_COST_RATIO = 1.5


def act_matrix(t: nn.Module, channels: int) -> torch.Tensor | None:
    """The [C, C] matrix M with t.act(x) == x @ M up to rounding, when one matmul by it is cheaper
    than t's own steps (`DENSE_COST_RATIO`), else None.

    Every step of a transform is linear in x (a scale, a permutation, block rotations), so their
    product is exact; it is composed in float64 from the stored buffers and returned in their
    dtype, on their device. A transform without rotations (a scale, a permutation) is cheaper
    elementwise than as a matrix, so it never gets one.
    """
    rotations = [m.blocks for m in t.modules() if isinstance(m, BlockRotation)]
    if not rotations or channels > DENSE_COST_RATIO * sum(min(r.shape[-1], channels) for r in rotations):
        return None
    eye = torch.eye(channels, dtype=torch.float64, device=rotations[0].device)
    return t.act(eye).to(rotations[0].dtype)


class Compose(nn.Module):
    """Applies transforms in order; the weight side in the same order telescopes to identity."""

    def __init__(self, transforms: list[nn.Module]):
        super().__init__()
        self.transforms = nn.ModuleList(transforms)

    def act(self, x: torch.Tensor) -> torch.Tensor:
        for t in self.transforms:
            x = t.act(x)
        return x

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        for t in self.transforms:
            w = t.weight(w)
        return w

    def inverse_act(self, x: torch.Tensor) -> torch.Tensor:
        for t in reversed(self.transforms):
            x = t.inverse_act(x)
        return x


# ----------------------------------------------------------------------------- fitting


def fit_smooth(act_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float = 0.6, act_floor: float = 0.0,
               scale_floor: float = 1e-2) -> Smooth:
    """s = act^alpha / w^(1-alpha): moves part of the activation range into the weights.

    Activation maxima are clamped to >= `act_floor` (the published code uses 1e-5) and weight
    maxima to >= 1e-5 so a dead weight column cannot divide by zero; scales below `scale_floor`
    (DuQuant's 1e-2) are raised to it so a dead activation channel (max 0) does not become an
    enormous weight column.
    """
    a = act_absmax.double().clamp(min=act_floor)
    w = w_absmax.double().clamp(min=1e-5)
    s = (a.pow(alpha) / w.pow(1 - alpha)).clamp(min=scale_floor)
    return Smooth(s.to(act_absmax.dtype))


def _spreading_matrix(b: int, seed: int, kind: str = "uniform") -> torch.Tensor:
    """Orthogonal b x b matrix whose first row spreads coordinate 0 over all b coordinates.

    "uniform": first row exactly 1/sqrt(b) (coordinate 0 spread evenly; what docs/algorithm.md describes),
    the other rows a seeded random orthogonal completion: QR of a random matrix whose first column is
    all ones makes Q's first column ones/sqrt(b) (up to sign, fixed here).
    "official": the published code's matrix, a fixed chain of Givens rotations (first row 1/sqrt(b))
    times diag(1, Q) with Q random orthogonal, which mixes the first row's other entries, so coordinate
    0 is spread unevenly (largest entry about 0.24 instead of 0.088 at b = 128).
    "reflection": the Householder reflection swapping e_0 and s / sqrt(b) for seeded signs s
    (`_reflection_signs`): coordinate 0 spread evenly, the others only shifted along s. The search
    uses it differently from the matrices above (`_reflect_rows`): each step reflects the channel it
    spreads directly, with fresh signs, and is a rank-one update instead of a b x b product; this
    is the matrix of a first step on channel 0.
    Built on the CPU so the same seed gives the same matrix on every device.
    """
    if kind == "reflection":
        return _reflection_matrix(_reflection_signs(b, seed, 1)[0])
    gen = torch.Generator().manual_seed(seed)
    if kind == "official":
        q, _ = torch.linalg.qr(torch.randn(b - 1, b - 1, generator=gen, dtype=torch.float64))
        return _givens_chain(b) @ torch.block_diag(torch.ones(1, 1, dtype=torch.float64), q)
    m = torch.randn(b, b, generator=gen, dtype=torch.float64)
    m[:, 0] = 1.0
    q, r = torch.linalg.qr(m)
    q = q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0)
    return q.T


def _givens_chain(n: int) -> torch.Tensor:
    """G_{n-2} ... G_1 G_0 with G_i rotating coordinates (i, i+1) by cos 1/sqrt(i+2), then the first
    and last coordinates swapped: an orthogonal matrix whose first row is exactly 1/sqrt(n)."""
    r = torch.eye(n, dtype=torch.float64)
    for i in range(n - 1):
        c, s = 1 / math.sqrt(i + 2), math.sqrt(i + 1) / math.sqrt(i + 2)
        r[[i, i + 1]] = torch.tensor([[c, -s], [s, c]], dtype=torch.float64) @ r[[i, i + 1]]
    swap = torch.arange(n)
    swap[[0, n - 1]] = swap[[n - 1, 0]]
    return r[swap][:, swap]


def _reflection_signs(b: int, seed: int, steps: int) -> torch.Tensor:
    """Seeded signs +-1 (float64) [steps, b], one row per greedy step (`_reflect_rows`). A reflection
    moves energy only along its spreading vector, so one vector for all steps would stack every
    spread outlier onto the same direction, coherently; fresh signs per step add them up with random
    signs instead. Random signs also keep the spread coordinate from collecting each row's plain
    sum, a new outlier in a row whose channels share a sign."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (steps, b), generator=gen).double() * 2 - 1


def _reflection_matrix(signs: torch.Tensor) -> torch.Tensor:
    """I - 2 v v^T / |v|^2 with v = e_0 - t / sqrt(b), t the signs with t_0 = +1: symmetric,
    orthogonal, first row t / sqrt(b)."""
    t = signs.clone()
    t[0] = 1.0
    v = -t / math.sqrt(t.shape[0])
    v[0] += 1.0
    return torch.eye(t.shape[0], dtype=t.dtype) - 2 * torch.outer(v, v) / v.dot(v)


def _reflect_rows(cur: torch.Tensor, signs: torch.Tensor, channel: torch.Tensor) -> None:
    """cur [n, T, b] <- cur H in place, per block the reflection H that swaps e_c (c = channel[i], or
    channel[0] for all) and t / sqrt(b), where t is `signs` ([b], or [n, b]) with t_c = +1.

    With r = 1/sqrt(b) and w = e_c - r t, H = I - w w^T / (1 - r): every coordinate of a row moves by
    a multiple of its d = x.w, so a step costs a few passes over the rows where a dense b x b
    product costs b multiply-adds per entry."""
    n, rows, b = cur.shape
    r = 1 / math.sqrt(b)
    alpha = 1 / (1 - r)
    at = channel.expand(n)
    t = signs.to(cur.dtype).expand(n, b).scatter(1, at[:, None], 1.0)
    at = at[:, None, None].expand(n, rows, 1)
    d = cur.gather(2, at) - r * torch.linalg.vecdot(cur, t[:, None, :])[..., None]  # 4x a batched matmul's speed
    cur.addcmul_(d, t[:, None, :], value=alpha * r)
    cur.scatter_add_(2, at, d.mul_(-alpha))  # coordinate c: x_c + alpha r d - alpha d = x_c - d


def _step_signs(signs: torch.Tensor, k: int) -> torch.Tensor:
    """Step k's signs from [steps, b] (shared by all blocks) or [n, steps, b] (one set per block)."""
    return signs[k] if signs.dim() == 2 else signs[:, k]


def _kept_reflections(signs: torch.Tensor, spread: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """`_kept_product` for the reflection kind, in float64: each kept step is `_reflect_rows` on the
    rows of the product so far (b^2 multiply-adds instead of b^3), on the leading blocks of the
    kept-steps order as views; a product of reflections is orthogonal to float64 rounding as it is."""
    m, b = kept.shape[0], signs.shape[-1]
    order = torch.argsort(kept, descending=True, stable=True)
    signs = signs.double() if signs.dim() == 2 else signs[order].double()
    spread = spread[:, order]
    rot = torch.eye(b, dtype=torch.float64, device=signs.device).repeat(m, 1, 1)
    active = (kept[None] > torch.arange(int(kept.max()) if m else 0, device=kept.device)[:, None]).sum(1)
    for k, n in enumerate(active.tolist()):
        step = _step_signs(signs, k)
        _reflect_rows(rot[:n], step if step.dim() == 1 else step[:n], spread[k, :n])
    out = torch.empty_like(rot)
    out[order] = rot
    return out


def _step_matrices(g: torch.Tensor, channel: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """P_k G P_k for each block [m, b, b], where P_k swaps coordinates 0 and channel[k] (channel [m]).

    Built by copying G (into `out` when given) and swapping two rows and two columns per block;
    the step itself is then one batched product, which runs as fast as a single shared matmul and
    needs no swapped copies of the rows.
    """
    n = channel.shape[0]
    blocks = torch.arange(n, device=g.device)
    step = g.expand(n, -1, -1).clone() if out is None else out.copy_(g.expand(n, -1, -1))
    for view in (step, step.transpose(1, 2)):  # rows, then columns
        first = view[blocks, 0].clone()
        view[blocks, 0] = view[blocks, channel]
        view[blocks, channel] = first
    return step


# Largest b^3 (entries of float32) for which a dense search keeps all b step matrices of one shared
# spreading matrix (8 MB at b = 128): gathering a step's matrices from them takes 0.3-0.7x the time
# of building them by swaps.
STEP_TABLE_ENTRIES = 2**21


class _DenseSteps:
    """The step matrices P_k G P_k of a dense search (`_step_matrices`), written into a buffer each step.

    With one spreading matrix for every block (g [b, b]) the b possible ones are made once and a
    step gathers its blocks' copies; with one per block (g [m, b, b]) each step swaps them afresh.
    Both hold the same values, so the search's bits do not depend on which runs.
    """

    def __init__(self, g: torch.Tensor):
        self.g, self.table = g, None
        if g.dim() == 2 and g.shape[-1] ** 3 <= STEP_TABLE_ENTRIES:
            self.table = _step_matrices(g, torch.arange(g.shape[-1], device=g.device))

    def in_order(self, order: torch.Tensor) -> "_DenseSteps":
        """The steps of the blocks taken in `order` (one shared matrix serves any order)."""
        return self if self.g.dim() == 2 else _DenseSteps(self.g[order])

    def fill(self, channel: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The matrices of the leading len(channel) blocks into out [len(channel), b, b]."""
        if self.table is not None:
            return torch.index_select(self.table, 0, channel, out=out)
        return _step_matrices(self.g if self.g.dim() == 2 else self.g[: channel.shape[0]], channel, out=out)


def _candidate_mask(xb: torch.Tensor, prune: bool = True) -> torch.Tensor:
    """[n, T] True for the rows of each block [n, T, b] that can ever hold the block's max |x|.

    A rotation keeps each row's 2-norm, a row's max |x| is at most its 2-norm, and the block max
    is at least (largest row 2-norm) / sqrt(b). Rows below that bound can never be the maximum,
    so dropping them changes nothing in the search. The bound says nothing about a block's signed
    max - min (the "range" stop rule), so `prune=False` keeps every row.
    """
    norms = xb.norm(dim=-1)
    if not prune:
        return torch.ones_like(norms, dtype=torch.bool)
    return norms >= norms.amax(1, keepdim=True) / math.sqrt(xb.shape[-1])


# Entries of rows per piece of a per-block reflection search on a CPU (4 MB of float32). Its steps
# are a few passes over the rows, so a piece that stays in cache runs them several times faster than
# the whole stack from memory (7x at 32 blocks of 2048 rows); the blocks are independent, so the
# pieces give the same bits. The dense kinds' steps are bound by their products and a GPU by its
# launches, so both take the whole stack.
SEARCH_PIECE_ENTRIES = 2**20


def _greedy_rotation(xb: torch.Tensor, max_steps: int, g: torch.Tensor, shared: bool, stop: str = "absmax",
                     reflection: bool = False) -> torch.Tensor:
    """Greedy outlier-spreading search on xb [n, T, b]; returns [n, b, b], or [1, b, b] if shared.

    g is the spreading matrix [b, b], or one per block [n, b, b]; with `reflection` it is the signs
    of the reflection kind instead, one row per step ([steps, b] or [n, steps, b],
    `_reflection_signs`), and each step and the kept product are rank-one updates (a per-block
    search then runs in cache-sized pieces of blocks on a CPU, `SEARCH_PIECE_ENTRIES`). `stop` is
    what the kept prefix minimises: "absmax" (max |x|) or "range" (max x - min x, the published
    code's score).

    For the per-block rule xb holds only the candidate rows (`_stack_candidates`). A float32 xb
    becomes one of the search's two row buffers and is overwritten.

    All blocks step together (blocks of many sites can be stacked into one search: each block's
    search is independent). Per block (paper's rule) each step spreads the channel holding that
    block's largest |x|. Shared (published code) one matrix serves every block: the global max
    over the activation viewed as rows of b, i.e. [(T n), b], picks the row holding it and the
    step spreads channel `row mod b`. Either way the kept rotation is the prefix of steps with the
    smallest max |x| (per block, or global), the identity included, so the result is never worse
    than no rotation.

    The dense kinds' search is bound by its matmuls (steps x rows x b^2), so it runs in float32
    (the reflection steps too, with their kept product in float64, `_kept_reflections`); it records
    which channel each step spread and how many steps each block keeps, and `_kept_product` then
    multiplies only the kept steps, instead of a running product of every step (another b^3 per
    block and step, most of them past the block's last improvement). The kept product is snapped
    to the nearest orthogonal matrix (polar factor, float64), so the stored rotation is orthogonal
    to float64 precision and still within ~1e-6 of the exact product of the chosen steps. Every
    step writes into the same preallocated buffers: a fresh rows-sized tensor per step, freed while
    small ones survive it, fragments the heap (resident memory grew by tens of MB per layer that
    way) and costs page faults.
    """
    if reflection and not shared and xb.device.type == "cpu" and xb.shape[0] > 1:
        per = max(1, SEARCH_PIECE_ENTRIES // max(1, xb[0].numel()))
        if per < xb.shape[0]:
            return torch.cat([_greedy_rotation(xb[i : i + per], max_steps, g if g.dim() == 2 else g[i : i + per], False,
                                               stop, True) for i in range(0, xb.shape[0], per)])
    cur = xb.float()
    best, channel = _search_peak(cur, shared, stop)
    spread = torch.empty(max_steps, channel.shape[0], dtype=torch.long, device=xb.device)
    kept = torch.zeros_like(channel)  # steps in each block's best prefix
    g32 = g.float()
    if not reflection:
        steps = _DenseSteps(g32)
        step = torch.empty(channel.shape[0], xb.shape[2], xb.shape[2], device=xb.device)
        spare_cur = torch.empty_like(cur)
    for k in range(max_steps):
        spread[k] = channel
        if reflection:
            _reflect_rows(cur, _step_signs(g32, k), channel)
        else:
            steps.fill(channel, step)
            cur, spare_cur = torch.matmul(cur, step, out=spare_cur), cur
        score, channel = _search_peak(cur, shared, stop)
        better = score < best
        best = torch.where(better, score, best)
        kept = torch.where(better, k + 1, kept)
    if reflection:
        return _kept_reflections(g, spread, kept)
    u, _, vh = torch.linalg.svd(_kept_product(steps, spread, kept).double())
    return u @ vh


def _search_peak(y: torch.Tensor, shared: bool, stop: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The greedy search's score of the rows y [n, T, b], per block (or global when `shared`), and
    the channel its next step spreads (`_greedy_rotation`)."""
    if shared:
        a = y.abs()
        block, token, col = torch.unravel_index(a.argmax(), a.shape)
        score = a[block, token, col] if stop == "absmax" else y.amax() - y.amin()
        return score.reshape(1), ((token * y.shape[0] + block) % y.shape[2]).reshape(1)
    hi, lo = y.amax(1), y.amin(1)  # per channel, no |y| copy of the rows
    score, channel = torch.maximum(hi, -lo).max(-1)
    return (score if stop == "absmax" else hi.amax(-1) - lo.amin(-1)), channel


def _kept_product(steps: _DenseSteps, spread: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Per block i, the product of its first kept[i] step matrices [m, b, b] (float32), given the
    channel each step spread (spread [n_steps, m]) and the search's `_DenseSteps`.

    The product is formed left to right, step by step, exactly as a running product over the
    search would form it. Every block's product is its own batched matmul, so leaving other blocks
    out of the batch changes no bit: the blocks are ordered by how many steps they keep, and step
    k multiplies the leading ones that keep it, as views (no gathered copies, one sync in all).
    """
    m, b = kept.shape[0], steps.g.shape[-1]
    order = torch.argsort(kept, descending=True, stable=True)
    steps = steps.in_order(order)
    spread = spread[:, order]
    rot = torch.eye(b, device=steps.g.device).repeat(m, 1, 1)
    step, product = torch.empty_like(rot), torch.empty_like(rot)
    active = (kept[None] > torch.arange(int(kept.max()) if m else 0, device=kept.device)[:, None]).sum(1)
    for k, n in enumerate(active.tolist()):
        steps.fill(spread[k, :n], step[:n])
        rot[:n] = torch.matmul(rot[:n], step[:n], out=product[:n])
    out = torch.empty_like(rot)
    out[order] = rot
    return out


def _blocks_of(x: torch.Tensor, b: int) -> torch.Tensor:
    """[T, C] -> the full blocks [C // b, T, b] (float64)."""
    n = x.shape[-1] // b
    return einops.rearrange(x.reshape(-1, x.shape[-1])[:, : n * b].double(), "t (n b) -> n t b", b=b)


def _stack_candidates(xs: list[torch.Tensor], blocks_of: Callable[[torch.Tensor], torch.Tensor], b: int,
                      prune: bool = True) -> torch.Tensor:
    """The candidate rows (`_candidate_mask`) of every site's blocks `blocks_of(x)` [n_i, T_i, b],
    stacked into one float32 search input [sum n_i, rows, b].

    Blocks keep different numbers of rows; the shorter ones are padded with zero rows, which stay
    zero under rotation and so never change a block's max |x| or the channel holding it. The
    stack is filled one site at a time, so beside it only one site's blocks exist at once.
    """
    keeps = [_candidate_mask(blocks_of(x), prune) for x in xs]
    rows = max(int(k.sum(1).max()) for k in keeps)
    out = torch.zeros(sum(k.shape[0] for k in keeps), rows, b, device=xs[0].device)
    start = 0
    for x, keep in zip(xs, keeps):
        order = torch.argsort((~keep).byte(), dim=1, stable=True)[:, :rows]  # kept rows first
        picked = blocks_of(x).gather(1, order[..., None].expand(-1, -1, b)) * keep.gather(1, order)[..., None]
        out[start : start + len(keep), : order.shape[1]] = picked
        start += len(keep)
    return out


def _search_spreading(size: int, seed: int, kind: str, steps: int) -> torch.Tensor:
    """What `_greedy_rotation` takes as g: the spreading matrix, or the reflection kind's signs."""
    return _reflection_signs(size, seed, steps) if kind == "reflection" else _spreading_matrix(size, seed, kind)


def _spreading_per_block(size: int, seeds: list[int], blocks_per_site: int, device, kind: str, steps: int) -> torch.Tensor:
    """The search's spreading (`_search_spreading`) of each site's seed, one ([size, size], or the
    reflection's [steps, size] signs) when all sites share one seed (it then broadcasts over the
    blocks), else one per block of the stacked search [sites * blocks, ...]."""
    mats = {s: _search_spreading(size, s, kind, steps) for s in dict.fromkeys(seeds)}
    if len(mats) == 1:
        return next(iter(mats.values())).to(device)
    return torch.stack([mats[s] for s in seeds]).repeat_interleave(blocks_per_site, 0).to(device)


def fit_block_rotations(
    xs: list[torch.Tensor], block_size: int = 128, max_steps: int = 256, seed: int | list[int] = 0,
    shared: bool = False, stop: str = "absmax", spreading: str = "uniform",
) -> list[BlockRotation]:
    """Fit R1/R2 of DuQuant for several sites at once (docs/algorithm.md section 3, step 1).

    Every x [..., C] (same C; e.g. the inputs of all experts of a layer) gets its own rotation, as
    if fit alone; stacking their blocks into one search only saves the per-step overhead. The
    block size is capped at C. A tail block (C mod b channels) gets its own greedy search; the
    shared variant has nothing to share with it, so it uses the per-block rule there. `seed` seeds
    the spreading matrix, one for every site or one per site.
    """
    c = xs[0].shape[-1]
    if any(x.shape[-1] != c for x in xs):
        raise ValueError("fit_block_rotations needs inputs with the same channel count")
    seeds = [seed] * len(xs) if isinstance(seed, int) else list(seed)
    b = min(block_size, c)
    n, r = divmod(c, b)
    device = xs[0].device
    prune, reflection = stop == "absmax", spreading == "reflection"
    if shared:
        blocks = [_greedy_rotation(_blocks_of(x, b).contiguous(), max_steps, _search_spreading(b, s, spreading, max_steps).to(device),
                                   True, stop, reflection) for x, s in zip(xs, seeds)]
    else:
        stacked = _stack_candidates(xs, lambda x: _blocks_of(x, b), b, prune)
        blocks = list(_greedy_rotation(stacked, max_steps, _spreading_per_block(b, seeds, n, device, spreading, max_steps), False, stop,
                                       reflection).split(n))
    tails: list[torch.Tensor | None] = [None] * len(xs)
    if r:
        stacked = _stack_candidates(xs, lambda x: x.reshape(-1, c)[None, :, n * b :].double(), r, prune)
        tails = list(_greedy_rotation(stacked, max_steps, _spreading_per_block(r, seeds, 1, device, spreading, max_steps), False, stop,
                                      reflection))
    return [BlockRotation(bl.to(x.dtype), None if t is None else t.to(x.dtype)) for bl, t, x in zip(blocks, tails, xs)]


def _snake(count: int, n_blocks: int, first_round: int = 0) -> torch.Tensor:
    """Block index for each of `count` ranks dealt 0,1,..,n-1,n-1,..,0,0,1,.. ."""
    i = torch.arange(count)
    rnd, pos = i // n_blocks + first_round, i % n_blocks
    return torch.where(rnd % 2 == 0, pos, n_blocks - 1 - pos)


def zigzag_permutation(channel_absmax: torch.Tensor, block_size: int) -> Permutation:
    """Deal channels, largest max |x| first, to the blocks in snake order.

    Each block then holds a similar share of the large channels, so the next block rotation
    has something small to spread every outlier over. With a tail block of r < b channels,
    the first r rounds deal over all blocks including the tail, the rest over the full ones.
    Within a block channels keep descending order.
    """
    c = channel_absmax.shape[0]
    b = min(block_size, c)
    n, r = divmod(c, b)
    order = torch.sort(channel_absmax.detach().cpu(), descending=True, stable=True).indices
    n_all = n + (r > 0)
    block = torch.cat([_snake(r * n_all, n_all), _snake(c - r * n_all, n, first_round=r)])
    rank = torch.arange(c)
    perm = order[torch.argsort(block * c + rank)]
    return Permutation(perm.to(channel_absmax.device))


def fit_rotations(
    xs: list[torch.Tensor],
    block_size: int = 128,
    max_steps: int = 256,
    permute: bool = True,
    rotate: bool = True,
    seed: int | list[int] = 0,
    shared: bool = False,
    stop: str = "absmax",
    seed2: int | list[int] | None = None,
    spreading: str = "uniform",
) -> list[Compose]:
    """R1 . P . R2 for each of several sites (same channel count), fit jointly for speed.

    Each site's transform is exactly what fitting it alone gives. Disabled steps are left out.
    R1 uses `seed` and R2 `seed2` (default: the same) for its spreading matrix.
    """
    cur = [x.reshape(-1, x.shape[-1]).double() for x in xs]
    steps: list[list[nn.Module]] = [[] for _ in xs]

    def add(ts: list[nn.Module]) -> None:
        for i, t in enumerate(ts):
            steps[i].append(t)
            cur[i] = t.act(cur[i])

    if rotate:
        add(fit_block_rotations(cur, block_size, max_steps, seed, shared, stop, spreading))
    if permute:
        add([zigzag_permutation(x.abs().amax(0), block_size) for x in cur])
    if rotate:
        add(fit_block_rotations(cur, block_size, max_steps, seed if seed2 is None else seed2, shared, stop, spreading))
    return [Compose(st).to(x.dtype) for st, x in zip(steps, xs)]
