"""Method options as frozen dataclasses, built once from the CLI and written verbatim into results.json.

Defaults are the published DuQuant/EAQuant scripts' (docs/algorithm.md); `None` bit widths inherit.
"""
from __future__ import annotations

from dataclasses import dataclass

VALID_BITS = tuple(range(2, 9)) + (16,)


class ConfigError(ValueError):
    """An invalid option; the message is one line that names the fix."""


# Pipeline choices on which our code and the published DuQuant code differ (docs/fidelity.md).
# The first value of each is our default; `duquant.recipes` names the published code's.
CHOICES: dict[str, tuple[str, ...]] = {
    "act_range": ("with_zero", "minmax"),
    "smooth_weight": ("all_readers", "one_reader"),
    "smooth_stats": ("quantized", "fp"),
    "o_smooth": ("online", "fold_v", "fold_v_or_none"),
    "rotation_data": ("sample", "mean", "layer_mean"),
    "propagation": ("quantized", "fp"),
    "rotation_seed": ("fixed", "redraw"),
    "rotation_stop": ("absmax", "range"),
    "spreading": ("uniform", "official", "reflection"),
    "weight_range": ("with_zero", "minmax"),
    "qk_clip": ("none", "lac"),
    "mse_grid": ("coarse", "official"),
    "expert_down_smooth": ("alpha", "outlier_mask"),
    "fit_order": ("sequential", "layer"),
}


QUANT_CHOICES = ("act_range", "weight_range", "qk_clip", "mse_grid")  # the CHOICES that QuantConfig holds; DuQuantConfig the rest


def check_choice(name: str, value: str) -> None:
    if value not in CHOICES[name]:
        raise ConfigError(f"--{name} {value!r} is unknown; choose from {', '.join(CHOICES[name])}")


def check_bits(name: str, bits: int) -> None:
    if bits not in VALID_BITS:
        raise ConfigError(f"--{name} {bits} is out of range; use 2..8, or 16 for no quantization")


@dataclass(frozen=True)
class QuantConfig:
    """Fake-quantization precision of every tensor kind. 16 bits means "not quantized"."""

    wbits: int = 4
    abits: int = 4
    kv_bits: int | None = None  # Q, K (after RoPE, per-head Hadamard) and V; None = abits
    # The router at 8 bits wherever anything else is quantized; None resolves to 16 when weights
    # and activations are both 16 bits ("--wbits 16 --abits 16" quantizes nothing), else 8.
    router_wbits: int | None = None
    router_abits: int | None = None
    w_sym: bool = False
    a_sym: bool = False
    swc: float = 0.8  # weight clip ratio
    lac: float = 0.9  # activation clip ratio
    w_clip: str = "minmax"  # or "mse": per-row clip-ratio search
    act_range: str = "with_zero"  # or "minmax": a token's range need not contain 0 (published code)
    weight_range: str = "with_zero"  # or "minmax": the same for a weight row
    qk_clip: str = "none"  # or "lac": Q and K (KV quantization) clipped by lac too (published code); V never
    mse_grid: str = "coarse"  # --w_clip mse: 20 ratios 1.0 -> 0.35, or the published EAQuant's 101 ratios 0.35 -> 1.0

    def __post_init__(self):
        # Unset widths are resolved once here; the config is frozen after.
        if self.kv_bits is None:
            object.__setattr__(self, "kv_bits", self.abits)
        router_default = 16 if self.wbits == 16 and self.abits == 16 else 8
        for name in ("router_wbits", "router_abits"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, router_default)
        for name in ("wbits", "abits", "kv_bits", "router_wbits", "router_abits"):
            check_bits(name, getattr(self, name))
        for name in ("swc", "lac"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ConfigError(f"--{name} {getattr(self, name)} must be in (0, 1]")
        if self.w_clip not in ("minmax", "mse"):
            raise ConfigError(f"--w_clip {self.w_clip!r}: choose minmax or mse")
        for name in QUANT_CHOICES:
            check_choice(name, getattr(self, name))

    @property
    def tag(self) -> str:
        return f"w{self.wbits}a{self.abits}"

    @property
    def act_with_zero(self) -> bool:
        return self.act_range == "with_zero"

    @property
    def weight_with_zero(self) -> bool:
        return self.weight_range == "with_zero"


@dataclass(frozen=True)
class DuQuantConfig:
    """Which transforms to fit and how. All off is plain round-to-nearest (`--method rtn`)."""

    smooth: bool = True
    rotate: bool = True
    permute: bool = True
    alpha: float = 0.6
    block_size: int = 128
    max_rotation_step: int = 256
    permutation_times: int = 1
    rotation: str = "paper"  # "paper": per-block greedy on the outlier channel; "shared": the published code's one matrix
    rotation_tokens: int = 2048  # calibration rows kept per site for fitting rotations
    min_expert_tokens: int = 16  # below this an expert's transforms are fit on all MoE-input tokens
    # Fit transforms even for sites left at 16 bits (normally skipped: nothing to protect). The FP
    # exactness checks use it: every transform must leave the unquantized model unchanged.
    fit_at_16_bits: bool = False
    # Fidelity choices (CHOICES; docs/fidelity.md says what each does and which one the published code makes).
    smooth_weight: str = "all_readers"  # max |W| per input channel over every reader of a site, or one reader
    smooth_stats: str = "quantized"  # activation max from inputs through the quantized layers, or the FP model
    act_absmax_floor: float = 0.0  # activation max clamped to at least this before smoothing (published: 1e-5)
    smooth_scale_floor: float = 1e-2  # smoothing scales below this are raised to it (published EAQuant: 1e-5)
    o_smooth: str = "online"  # o-in smoothing online, folded into v_proj rows where shapes allow (else online / none)
    rotation_data: str = "sample"  # sampled rows, the mean calibration sequence propagated, or each layer's mean input
    propagation: str = "quantized"  # next layer's calibration inputs: this layer's quantized or FP outputs
    rotation_seed: str = "fixed"  # one spreading matrix per layer, or a new one per rotation fit
    rotation_stop: str = "absmax"  # greedy search keeps the prefix with the least max |x|, or max - min
    spreading: str = "uniform"  # spreading matrix: first row 1/sqrt(b), the published code's matrix, or a reflection (fast)
    expert_down_smooth: str = "alpha"  # routed experts' down-in: DuQuant's smoothing, or the published EAQuant outlier mask
    fit_order: str = "sequential"  # rotations fit site by site with the earlier sites quantized, or all on the FP layer

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"--alpha {self.alpha} must be in [0, 1]")
        if self.block_size < 2:
            raise ConfigError(f"--block_size {self.block_size} must be >= 2")
        if self.rotation not in ("paper", "shared"):
            raise ConfigError(f"--rotation {self.rotation!r}: choose paper or shared")
        if self.permutation_times < 1 or self.max_rotation_step < 1:
            raise ConfigError("--permutation_times and --max_rotation_step must be >= 1")
        if self.act_absmax_floor < 0:
            raise ConfigError(f"--act_absmax_floor {self.act_absmax_floor} must be >= 0")
        if not 0 < self.smooth_scale_floor <= 1:
            raise ConfigError(f"--smooth_scale_floor {self.smooth_scale_floor} must be in (0, 1]")
        for name in CHOICES:
            if name not in QUANT_CHOICES:
                check_choice(name, getattr(self, name))

    @property
    def fits_rotations(self) -> bool:
        return self.rotate or self.permute

    @property
    def fits_transforms(self) -> bool:
        """Whether any site needs calibration statistics (plain round-to-nearest needs none)."""
        return self.smooth or self.fits_rotations

    @classmethod
    def rtn(cls) -> "DuQuantConfig":
        return cls(smooth=False, rotate=False, permute=False)


@dataclass(frozen=True)
class GPTQConfig:
    """GPTQ weight rounding (`--gptq`) on the project's weight grid; None in a run means round-to-nearest."""

    blocksize: int = 128  # columns per lazy-update block
    percdamp: float = 0.01  # dampening, as a fraction of mean(diag H)
    act_order: bool = False  # quantize columns by descending diag(H)
    group_size: int | None = None  # one scale/zero per this many columns (None = per output channel)
    min_tokens: int = 16  # a matrix whose Hessian saw fewer calibration rows is rounded to nearest

    def __post_init__(self):
        if self.blocksize < 1:
            raise ConfigError(f"--gptq_blocksize {self.blocksize} must be >= 1")
        if not 0.0 < self.percdamp < 1.0:
            raise ConfigError(f"--percdamp {self.percdamp} must be in (0, 1)")
        if self.group_size is not None and self.group_size < 2:
            raise ConfigError(f"--group_size {self.group_size} must be >= 2")
        if self.min_tokens < 1:
            raise ConfigError(f"--gptq_min_tokens {self.min_tokens} must be >= 1")
