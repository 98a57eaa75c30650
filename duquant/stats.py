"""Calibration statistics gathered with forward hooks: what every fitting step reads.

Per hooked module: per-channel max |x| over all tokens, the token count, and a uniform random
sample of at most `cap` input rows (priority sampling, so the sample does not depend on batch
order and memory stays bounded). Routers also record how many tokens each expert received.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from models.routing import RoutingFunction, expert_counts
from models.sites import layer_sites
from models.spec import LayerView

from .layerwise import input_hooks


@dataclass
class InputStats:
    cap: int
    generator: torch.Generator
    absmax: torch.Tensor | None = None
    count: int = 0
    sample: torch.Tensor | None = None
    _keys: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        if x.shape[0] == 0:
            return
        amax = x.abs().amax(0).float().cpu()
        self.absmax = amax if self.absmax is None else torch.maximum(self.absmax, amax)
        self.count += x.shape[0]
        if self.cap == 0:  # maxima only (the FP pre-pass): no sample to draw
            return
        old = 0 if self._keys is None else self._keys.numel()
        keys = torch.rand(x.shape[0], generator=self.generator)
        keys = keys if self._keys is None else torch.cat([self._keys, keys])
        keep = keys.topk(self.cap, largest=False).indices if keys.numel() > self.cap else torch.arange(keys.numel())
        self._keys, self.sample = keys[keep], self._gather(keep, old, x)

    def take(self) -> torch.Tensor:
        """The sample, handed to its last reader: the statistics stop holding it, so the reader's
        smoothed copy replaces the raw rows in memory rather than joining them (the experts' rows
        are most of a layer's statistics)."""
        sample, self.sample = self.sample, None
        return sample

    def _gather(self, keep: torch.Tensor, old: int, x: torch.Tensor) -> torch.Tensor:
        """The kept rows, in `keep`'s order: index < old from the sample, the rest from the batch x.

        Only the batch's kept rows are copied (and moved off the accelerator): once the sample is
        full that is a few rows per batch, where copying the whole batch first cost a transfer and
        a (cap + batch)-row concatenation per hooked module and batch. One gather from the sample
        followed by those rows puts every row in place (with masked assignments `update` took 1.4x as
        long at 512 rows of 256)."""
        new = keep >= old
        fresh = x[(keep[new] - old).to(x.device)].to("cpu", torch.promote_types(x.dtype, torch.float32))
        if not old:
            return fresh
        at_fresh = old + torch.cumsum(new, 0) - 1  # where each kept batch row lands after the sample
        return torch.cat([self.sample, fresh])[torch.where(new, at_fresh, keep)]


@dataclass
class RouterStats:
    """Tokens per expert and the running sum of the router's FP routing probabilities (the family's
    probabilities, `models/routing.py`; without a routing function, the softmax of the logits of a
    router returning (logits, weights, index), as every family did before routing functions)."""

    num_experts: int
    routing: RoutingFunction | None = None
    counts: torch.Tensor = None
    prob_sum: torch.Tensor = None
    tokens: int = 0

    def __post_init__(self):
        self.counts = torch.zeros(self.num_experts, dtype=torch.long)
        self.prob_sum = torch.zeros(self.num_experts, dtype=torch.float64)

    def update(self, output) -> None:
        if self.routing is not None:
            logits, probs, index, _ = self.routing.from_output(output)
        else:
            logits, _, index = output
            probs = logits.float().softmax(-1)
        self.counts += expert_counts(index, self.num_experts)
        self.prob_sum += probs.sum(0).double().cpu()
        self.tokens += logits.shape[0]


@dataclass
class LayerStats:
    inputs: dict[nn.Module, InputStats] = field(default_factory=dict)
    router: RouterStats | None = None
    # Modules (and the router, as None) whose statistics no longer update: used when extra
    # calibration data is meant for some readers only (EAQuant's expert-balanced calibration).
    frozen: set = field(default_factory=set)
    # Signed per-channel ranges of the routed experts' down inputs (`expert_down_smooth="outlier_mask"`).
    ranges: dict = field(default_factory=dict)

    def __getitem__(self, module: nn.Module) -> InputStats:
        return self.inputs[module]

    def update_input(self, module: nn.Module, x: torch.Tensor) -> None:
        if module not in self.frozen:
            self.inputs[module].update(x)

    def update_router(self, output) -> None:
        if None not in self.frozen:
            self.router.update(output)


@contextmanager
def collect(modules: list[nn.Module], router: nn.Module | None, num_experts: int, cap: int, seed: int,
            routing: RoutingFunction | None = None):
    """Hooks on `modules` (inputs) and `router` (routing, read through `routing`), always removed on exit."""
    gen = torch.Generator().manual_seed(seed)
    stats = LayerStats({m: InputStats(cap, gen) for m in modules})
    handle = None
    if router is not None:
        stats.router = RouterStats(num_experts, routing=routing)
        handle = router.register_forward_hook(lambda mod, args, out: stats.update_router(out))
    try:
        with input_hooks(modules, stats.update_input):
            yield stats
    finally:
        if handle is not None:
            handle.remove()


def hooked_sites(view: LayerView) -> list[nn.Module]:
    """One reader per site (models/sites.py): a site's statistics are those of its first reader."""
    return [site.hook for site in layer_sites(view)]


def routed_expert_inputs(view: LayerView) -> set[nn.Module]:
    """The hooked modules that only routed tokens reach (what expert-only extra data calibrates)."""
    return {site.hook for site in layer_sites(view) if site.expert is not None}


def expert_down_inputs(view: LayerView) -> list[nn.Module]:
    """The routed experts' down_proj modules (their down-in sites' hooks)."""
    return [site.hook for site in layer_sites(view) if site.expert is not None and site.fold in ("up_rows", "online")]


def take_rotation_rows(stats: LayerStats, rows: LayerStats) -> None:
    """Rotations are fit on `rows`' samples (their token counts decide expert fallbacks), while
    smoothing keeps reading `stats`' maxima."""
    for m, st in stats.inputs.items():
        st.sample, st.count = rows[m].sample, rows[m].count


def replace_absmax(stats: LayerStats, layer: nn.Module, absmax: dict[str, torch.Tensor],
                   ranges: dict | None = None) -> None:
    """Smoothing reads another pass's per-channel maxima (the FP model's, keyed by module path in
    `layer`); a module that pass never reached (an expert no FP token was routed to) keeps its own.
    Its down-in channel ranges, where given, replace this pass's the same way."""
    names = {m: n for n, m in layer.named_modules()}
    for m, st in stats.inputs.items():
        if absmax.get(names[m]) is not None:
            st.absmax = absmax[names[m]]
    for m in stats.ranges:
        if ranges and ranges.get(names[m]) is not None and ranges[names[m]].high is not None:
            stats.ranges[m] = ranges[names[m]]
