"""A family's routing function as data: how router logits become the experts a token uses.

MoE families differ in what turns logits into a choice: softmax then top-k (Mixtral, OLMoE, Qwen),
top-k then softmax over the chosen logits (gpt-oss, Granite), sigmoid scores with a learned
correction bias that only steers the choice, group-limited top-k and a routed scaling factor
(DeepSeek-V3, GLM-4.5, dots1), or a bias added to softmax probabilities (ERNIE 4.5). Every routing
consumer (calibration statistics, router alignment's KL and top-k agreement, calibration balance,
MoEQuant's EBSS) reads a layer's `RoutingFunction` (`LayerView.routing`, set by `models/spec.py`
`resolve`) instead of assuming a softmax, so no algorithm needs to know which family it runs on.

`Routing.probs` is the distribution KL and balance use: the softmax of the logits for softmax
routers, and for sigmoid routers the sigmoid scores normalised to sum to one (what the chosen
experts' weights are proportional to before the top-k renormalisation). Both are `energy(logits)
.softmax(-1)`, with energy = logits (softmax) or log sigmoid(logits) (sigmoid), so a KL restricted
to a token's top experts is a log-softmax over their energies for every family.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

SCORES = ("softmax", "sigmoid")
WEIGHTS = ("scores", "softmax_of_top_logits", "sigmoid_of_top_logits", "selector")
GROUP_SCORES = ("top2_sum", "max")
OUTPUTS = ("triple", "logits", "scores_logits")


class Routing(NamedTuple):
    """One forward's routing: logits [T, E], the family's probabilities [T, E], the chosen experts
    [T, k] and the weights [T, k] their outputs are multiplied by."""

    logits: torch.Tensor
    probs: torch.Tensor
    index: torch.Tensor
    weights: torch.Tensor


def expert_counts(index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Routed tokens per expert [E] (on the CPU) of a selection [..., k]: what calibration
    statistics, routing agreement and calibration balance all count."""
    return torch.bincount(index.reshape(-1).cpu(), minlength=num_experts)


def unwrapped(module: nn.Module) -> nn.Module:
    """The router itself when the pipeline has wrapped it (duquant/qlinear.py's QLinear keeps the
    original module as `inner`), so biases are found before and after quantization."""
    return getattr(module, "inner", module)


def _at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """Routers score in float32 (bf16 logits are promoted); float64 (alignment) stays float64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _owner(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    """The module holding `path` (through wrapped modules) and the attribute name there. The module,
    not the tensor, is kept: moving a layer between devices replaces its buffers."""
    *parents, name = path.split(".")
    for p in parents:
        root = getattr(unwrapped(root), p)
    return unwrapped(root), name


@dataclass(frozen=True, eq=False)
class RoutingFunction:
    """One MoE layer's routing, reproducing its block's selection exactly.

    scores = softmax or sigmoid of the float32 logits; the choice is top-k over scores (+ the
    choice bias, if any), limited to the `topk_group` best of `n_group` expert groups; the weights
    are the chosen experts' scores, optionally divided by their sum (clamped below by `norm_min`,
    plus `norm_eps`) or by their `norm_ord`-norm (DBRX), times `scale`. `weights="softmax_of_top_logits"` chooses by logits and
    softmaxes the chosen logits instead (gpt-oss, Granite); "sigmoid_of_top_logits" takes their
    sigmoids (Llama 4). `output` says what the hooked router module returns: the (logits, weights,
    index) triple, only the logits, or (dense scores [T, E], zero where not chosen; logits) (Llama 4).
    """

    top_k: int
    num_experts: int
    router: nn.Module
    score: str = "softmax"
    weights: str = "scores"
    normalize: bool = True
    norm_eps: float = 0.0
    norm_min: float = 0.0
    norm_ord: float | None = None
    scale: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    group_score: str = "top2_sum"
    output: str = "triple"
    choice_bias_at: tuple[nn.Module, str] | None = None
    # weights="selector": logits -> (weights, index), a choice no field above describes (PhiMoE's
    # sparse mixer), taken from the family's modeling code.
    selector: Callable | None = None

    def __post_init__(self):
        for value, allowed in ((self.score, SCORES), (self.weights, WEIGHTS), (self.group_score, GROUP_SCORES),
                               (self.output, OUTPUTS)):
            if value not in allowed:
                raise ValueError(f"routing: {value!r} is not one of {allowed}")
        if self.num_experts % self.n_group:
            raise ValueError(f"routing: {self.num_experts} experts do not split into {self.n_group} groups")

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        logits = _at_least_float32(logits)
        return logits.softmax(-1) if self.score == "softmax" else logits.sigmoid()

    def energy(self, logits: torch.Tensor) -> torch.Tensor:
        """Log of the unnormalised probabilities: probs = energy.softmax(-1)."""
        logits = _at_least_float32(logits)
        return logits if self.score == "softmax" else F.logsigmoid(logits)

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        return self.energy(logits).softmax(-1)

    def log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        return self.energy(logits).log_softmax(-1)

    def choice_bias(self) -> torch.Tensor | None:
        if self.choice_bias_at is None:
            return None
        return getattr(*self.choice_bias_at).reshape(-1)

    def ranking(self, logits: torch.Tensor) -> torch.Tensor:
        """A tensor whose per-token order is the family's preference order before group limits:
        the logits themselves (scores are monotone in them) unless a choice bias shifts the scores."""
        bias = self.choice_bias()
        return logits if bias is None else self.scores(logits) + bias.to(logits.device)

    def _group_limited(self, choice: torch.Tensor) -> torch.Tensor:
        """Scores outside each token's `topk_group` best groups set to -inf (DeepSeek-V2/V3)."""
        if self.n_group <= 1:
            return choice
        grouped = choice.view(-1, self.n_group, self.num_experts // self.n_group)
        if self.group_score == "top2_sum":
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)
        else:
            group_scores = grouped.amax(-1)
        keep = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(self.topk_group, dim=-1).indices, 1)
        mask = keep.bool().repeat_interleave(self.num_experts // self.n_group, dim=-1)
        return choice.masked_fill(~mask, float("-inf"))

    def select(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(index [T, k], weights [T, k]) as the family's MoE block computes them."""
        logits = _at_least_float32(logits)
        if self.weights == "selector":
            weights, index = self.selector(logits)
            return index, weights
        if self.weights != "scores":
            top, index = logits.topk(self.top_k, dim=-1)
            return index, top.softmax(-1) if self.weights == "softmax_of_top_logits" else top.sigmoid()
        scores = self.scores(logits)
        bias = self.choice_bias()
        choice = scores if bias is None else scores + bias.to(scores.device)
        index = self._group_limited(choice).topk(self.top_k, dim=-1).indices
        weights = scores.gather(-1, index)
        if self.normalize and self.norm_ord is not None:
            weights = weights / torch.norm(weights, p=self.norm_ord, dim=-1, keepdim=True)
        elif self.normalize:
            weights = weights / (weights.sum(-1, keepdim=True).clamp_min(self.norm_min) + self.norm_eps)
        return index, weights * self.scale

    def from_logits(self, logits: torch.Tensor) -> Routing:
        logits = logits.reshape(-1, logits.shape[-1])
        index, weights = self.select(logits)
        return Routing(logits, self.probs(logits), index, weights)

    def from_output(self, output) -> Routing:
        """The routing of one call of the hooked router module, from what it returned; a router that
        returns its own choice is taken at its word (bit-exact with the block)."""
        if self.output == "logits":
            return self.from_logits(output)
        if self.output == "scores_logits":
            scores, logits = output
            weights, index = scores.topk(self.top_k, dim=-1)  # the chosen experts' scores are the nonzero ones
            return Routing(logits, self.probs(logits), index, weights)
        logits, weights, index = output
        logits = logits.reshape(-1, logits.shape[-1])
        return Routing(logits, self.probs(logits), index.reshape(logits.shape[0], -1),
                       weights.reshape(logits.shape[0], -1))

    def logit_bias(self) -> torch.Tensor | None:
        """The router linear's own bias (gpt-oss), which every logit includes."""
        return getattr(unwrapped(self.router), "bias", None)

    def logits_of_weight(self, x: torch.Tensor, w: torch.Tensor, expert: int | None = None) -> torch.Tensor:
        """Router logits x @ w.T (+ the router's bias) for a candidate weight w [n, H]; with `expert`,
        w holds candidate rows for that one expert and every column gets its bias."""
        out = x @ w.T
        bias = self.logit_bias()
        if bias is None:
            return out
        bias = bias.to(out)
        return out + (bias if expert is None else bias[expert])

    def kl(self, fp_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
        """Per-token KL(p_fp || p_q) of the family's probabilities."""
        logp, logq = self.log_probs(fp_logits), self.log_probs(q_logits)
        return (logp.exp() * (logp - logq)).sum(-1)

    @staticmethod
    def same_experts(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per token: whether two selections [T, k] choose the same set of experts."""
        return (a.sort(-1).values == b.sort(-1).values).all(-1)

    def expert_counts(self, index: torch.Tensor) -> torch.Tensor:
        """Routed tokens per expert [E] (on the CPU) of a selection [T, k]."""
        return expert_counts(index, self.num_experts)


RoutingBuilder = Callable[..., RoutingFunction]


def _base(router: nn.Module, top_k: int, **kw) -> RoutingFunction:
    return RoutingFunction(top_k=top_k, num_experts=unwrapped(router).weight.shape[0], router=router, **kw)


def softmax_topk(config, mlp: nn.Module, router: nn.Module, top_k: int) -> RoutingFunction:
    """Softmax, top-k, renormalised when `config.norm_topk_prob` (always, where the config has no
    such field: Mixtral). OLMoE, Qwen2/3-MoE, Qwen3-Next, HunYuan."""
    return _base(router, top_k, normalize=getattr(config, "norm_topk_prob", True))


def softmax_topk_eps(config, mlp: nn.Module, router: nn.Module, top_k: int) -> RoutingFunction:
    """As `softmax_topk`, dividing by sum + 1e-20 (models/deepseek_moe/modeling_deepseek_moe.py)."""
    return _base(router, top_k, normalize=config.norm_topk_prob, norm_eps=1e-20)


def top_logits_softmax(config, mlp: nn.Module, router: nn.Module, top_k: int) -> RoutingFunction:
    """Top-k of the logits, softmax over the chosen ones (gpt-oss, Granite MoE)."""
    return _base(router, top_k, weights="softmax_of_top_logits")


def sigmoid_grouped(config, mlp: nn.Module, router: nn.Module, top_k: int) -> RoutingFunction:
    """DeepSeek-V3 / GLM-4.5 / dots1: sigmoid scores, e_score_correction_bias steering the choice
    only, group-limited top-k (sum of each group's two best), routed_scaling_factor."""
    return _base(router, top_k, score="sigmoid", normalize=config.norm_topk_prob, norm_eps=1e-20,
                 scale=config.routed_scaling_factor, n_group=config.n_group, topk_group=config.topk_group,
                 choice_bias_at=_owner(router, "e_score_correction_bias"))


def softmax_grouped_scaled(config, mlp: nn.Module, router: nn.Module, top_k: int) -> RoutingFunction:
    """DeepSeek-V2: softmax, greedy or group-limited (each group's best) top-k, unnormalised, times
    routed_scaling_factor."""
    grouped = config.topk_method == "group_limited_greedy"
    return _base(router, top_k, normalize=False, scale=config.routed_scaling_factor,
                 n_group=config.n_group if grouped else 1, topk_group=config.topk_group if grouped else 1,
                 group_score="max")


def softmax_biased(config, mlp: nn.Module, router: nn.Module, top_k: int) -> RoutingFunction:
    """ERNIE 4.5: experts chosen on softmax + e_score_correction_bias, weights the chosen
    probabilities over their sum clamped at moe_norm_min."""
    return _base(router, top_k, norm_min=config.moe_norm_min,
                 choice_bias_at=_owner(router, "moe_statics.e_score_correction_bias"))


def sigmoid_block_biased(config, mlp: nn.Module, router: nn.Module, top_k: int) -> RoutingFunction:
    """MiniMax-M2: sigmoid scores, the block's e_score_correction_bias steering the choice,
    renormalised weights."""
    return _base(router, top_k, score="sigmoid", choice_bias_at=_owner(mlp, "e_score_correction_bias"))


def softmax_topk_of_logits(config, mlp: nn.Module, router: nn.Module, top_k: int) -> RoutingFunction:
    """A router linear that returns logits only, its block doing softmax top-k with renormalisation
    (HunYuan's gate.wg)."""
    return _base(router, top_k, output="logits")


def sigmoid_top_logits_dense(config, mlp: nn.Module, router: nn.Module, top_k: int) -> RoutingFunction:
    """Llama 4: top-k of the logits, each chosen expert weighted by the sigmoid of its logit; the router
    returns the dense [T, E] weights (zero elsewhere) with the logits."""
    return _base(router, top_k, score="sigmoid", weights="sigmoid_of_top_logits", output="scores_logits")


def softmax_topk_pnorm(config, mlp: nn.Module, router: nn.Module, top_k: int) -> RoutingFunction:
    """DBRX: the router linear returns logits only; softmax, top-k, divided by their
    `moe_normalize_expert_weights`-norm (none when it is None)."""
    p = config.ffn_config.moe_normalize_expert_weights
    return _base(router, top_k, normalize=p is not None, norm_ord=p, output="logits")


def sparse_mixer(config, mlp: nn.Module, router: nn.Module, top_k: int) -> RoutingFunction:
    """PhiMoE: the sparse mixer's inference path (the best expert by softmax, then the best of the
    rest that is within 2 * router_jitter_noise of it, each weighted by a softmax over the candidates),
    computed by transformers' own `sparsemixer`; probabilities are the softmax of the logits."""
    from transformers.models.phimoe.modeling_phimoe import sparsemixer

    jitter = config.router_jitter_noise
    return _base(router, top_k, weights="selector",
                 selector=lambda logits: sparsemixer(logits, jitter_eps=jitter, training=False, top_k=top_k))
