"""MoEQuant options (MoEQuant: EBSS calibration and affinity-guided GPTQ)."""
from __future__ import annotations

from dataclasses import dataclass

from duquant.config import ConfigError


@dataclass(frozen=True)
class MoEQuantConfig:
    """MoEQuant's MoE-specific parts; `--moequant` turns on GPTQ (duquant.config.GPTQConfig), AGQ and EBSS.

    agq_c are the constant affinities at which the gate-layer approximation of AGQ (MoEQuant Eq. 17,
    f(c x W_gate) for c f(x W_gate)) is checked per layer, as in the paper's R4; a diagnostic only.
    """

    agq: bool = False  # affinity-weighted GPTQ Hessians for routed experts (needs GPTQ)
    agq_gate: bool = True  # AGQ also on each expert's gate_proj, through the Eq. 17 approximation (R5)
    agq_c: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    ebss: bool = False  # expert-balanced self-sampled calibration set
    ebss_tau: float = 1.2  # weight of expert balance against likelihood: score = NLL + sigma / tau
    ebss_width: int = 4  # beams kept per sequence
    ebss_cache_dir: str | None = None  # default results/ebss_cache

    def __post_init__(self):
        object.__setattr__(self, "agq_c", tuple(float(c) for c in self.agq_c))  # frozen after this
        if any(not 0.0 < c <= 1.0 for c in self.agq_c):
            raise ConfigError(f"--agq_c {','.join(f'{c:g}' for c in self.agq_c)}: every c must be in (0, 1]")
        if self.ebss_tau <= 0:
            raise ConfigError(f"--ebss_tau {self.ebss_tau} must be > 0")
        if self.ebss_width < 1:
            raise ConfigError(f"--ebss_width {self.ebss_width} must be >= 1")

    @property
    def any(self) -> bool:
        return self.agq or self.ebss
