"""EAQuant options; `--eaquant` turns all three components on with the paper's defaults."""
from __future__ import annotations

from dataclasses import dataclass

from duquant.config import ConfigError

AGGREGATIONS = ("maximum", "expert_frequency", "router_logits")
EXPERT_ACTS = ("moe_in", "routed")  # each expert's act max: over all MoE-input tokens, or its routed tokens
ALIGN_RULES = ("ours", "official")  # router alignment: eaquant_ext/router_align.py
# Calibration balance: extra sequences until every expert has r k N / n routed tokens (paper), or each
# expert's rotation rows topped up to int(k / n x seqlen x r) from the layer's FP outputs (published code).
BALANCE_RULES = ("paper", "official")


@dataclass(frozen=True)
class EAQuantConfig:
    smooth_aggregate: str | None = None  # None = DuQuant's rule; else one of AGGREGATIONS
    smooth_aggregate_router: bool = True  # the router's own requirement joins the aggregate (paper: yes)
    expert_act: str = "moe_in"  # "routed": an expert's requirement uses its routed tokens' max (published code)
    router_align: bool = False
    kl_top: int = 0  # R: the KL term covers m = k + int((n - k) * R / 100) experts
    align_grid: int = 20  # clip ratios tried per router row, 1.0 down to 0.5
    align_rounds: int = 2  # coordinate-descent passes over the router rows
    align_rule: str = "ours"  # "official": one KL-only clip ratio for all rows (published code)
    calib_balance: bool = False
    balance_ratio: float = 2.0  # experts below r * k * N / n routed tokens get extra sequences
    balance_dataset: str = "gutenberg"
    balance_max_extra: int | None = None  # cap on added sequences (None = nsamples)
    balance_rule: str = "paper"

    def __post_init__(self):
        if self.smooth_aggregate is not None and self.smooth_aggregate not in AGGREGATIONS:
            raise ConfigError(f"--smooth_aggregate {self.smooth_aggregate!r}: choose from {', '.join(AGGREGATIONS)}")
        if self.expert_act not in EXPERT_ACTS:
            raise ConfigError(f"--expert_act {self.expert_act!r}: choose from {', '.join(EXPERT_ACTS)}")
        if self.align_rule not in ALIGN_RULES:
            raise ConfigError(f"--align_rule {self.align_rule!r}: choose from {', '.join(ALIGN_RULES)}")
        if not 0 <= self.kl_top <= 100:
            raise ConfigError(f"--kl_top {self.kl_top} must be in 0..100")
        if self.balance_rule not in BALANCE_RULES:
            raise ConfigError(f"--balance_rule {self.balance_rule!r}: choose from {', '.join(BALANCE_RULES)}")
        if self.balance_ratio < 0:
            raise ConfigError(f"--balance_ratio {self.balance_ratio} must be >= 0")

    @property
    def extra_sequences(self) -> bool:
        """Whether the balance adds calibration sequences (the paper's rule)."""
        return self.calib_balance and self.balance_rule == "paper"

    @property
    def fill_ratio(self) -> float:
        """r of the published balance, which tops up the experts' rotation rows in the pipeline; else 0."""
        return self.balance_ratio if self.calib_balance and self.balance_rule == "official" else 0.0

    @property
    def any(self) -> bool:
        return self.smooth_aggregate is not None or self.router_align or self.calib_balance
