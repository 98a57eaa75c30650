"""Named recipes: one value for every pipeline choice on which our code, the published code and
the paper text differ (docs/fidelity.md lists them with what each does).

`default` is ours; `official` reproduces the published DuQuant code (and, for EAQuant options,
the published EAQuant scripts); `paper` follows the paper text where it conflicts with the code.
A recipe only fills in options the user did not give: explicit options always win.
"""
from __future__ import annotations

from .config import ConfigError

OFFICIAL_DUQUANT = {
    "smooth_weight": "one_reader",
    "smooth_stats": "fp",
    "act_absmax_floor": 1e-5,
    "o_smooth": "fold_v",
    "rotation_data": "mean",
    "rotation_seed": "redraw",
    "rotation": "shared",
    "rotation_stop": "range",
    "act_range": "minmax",
    "weight_range": "minmax",
    "spreading": "official",
    "qk_clip": "lac",
}

RECIPES: dict[str, dict[str, object]] = {
    "default": {},
    "official": {**OFFICIAL_DUQUANT},
    # The paper describes a per-block search on the outlier channel that keeps the prefix with the
    # smallest max |x|; where it says nothing, it is read as the published code.
    "paper": {**OFFICIAL_DUQUANT, "rotation": "paper", "rotation_stop": "absmax"},
}


def recipe_values(name: str, given: set[str]) -> dict[str, object]:
    """The recipe's values for the options not in `given` (option names without leading dashes)."""
    if name not in RECIPES:
        raise ConfigError(f"--recipe {name!r} is unknown; choose from {', '.join(RECIPES)}")
    return {k: v for k, v in RECIPES[name].items() if k not in given}
