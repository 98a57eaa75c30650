"""Named recipes: one value for every pipeline choice on which our code, the published code and
the paper text differ (docs/fidelity.md lists them with what each does).

`default` is ours; `official` reproduces the published DuQuant code, and with any EAQuant component
on, the published EAQuant code (whose DuQuant part differs from DuQuant's own); `paper` follows the
paper text where it conflicts with the code. A recipe only fills in options the user did not give:
explicit options always win.
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
    "spreading": "official",
    "act_range": "minmax",
    "weight_range": "minmax",
    "qk_clip": "lac",
}

# The published EAQuant scripts on top of their own DuQuant pipeline.
OFFICIAL_EAQUANT = {
    **OFFICIAL_DUQUANT,
    "smooth_weight": "all_readers",
    "smooth_scale_floor": 1e-5,
    "o_smooth": "fold_v_or_none",
    "rotation_data": "layer_mean",
    "propagation": "fp",
    "w_clip": "mse",
    "mse_grid": "official",
    "expert_act": "routed",
    "smooth_aggregate_router": False,
    "align_rule": "official",
}

# The papers describe a per-block search on the outlier channel that keeps the prefix with the
# smallest max |x|, and EAQuant's Eq. 6 includes the router and its objective is MSE + KL;
# where they say nothing, the paper recipe takes the code's choice.
PAPER = {"rotation": "paper", "rotation_stop": "absmax"}

RECIPES: dict[str, tuple[dict[str, object], dict[str, object]]] = {
    # name: (values for DuQuant runs, values when an EAQuant component is on)
    "default": ({}, {}),
    "official": (OFFICIAL_DUQUANT, OFFICIAL_EAQUANT),
    "paper": ({**OFFICIAL_DUQUANT, **PAPER},
              {**OFFICIAL_EAQUANT, **PAPER, "smooth_aggregate_router": True, "align_rule": "ours"}),
}


def recipe_values(name: str, given: set[str], eaquant: bool = False) -> dict[str, object]:
    """The recipe's values for the options not in `given` (option names without leading dashes)."""
    if name not in RECIPES:
        raise ConfigError(f"--recipe {name!r} is unknown; choose from {', '.join(RECIPES)}")
    return {k: v for k, v in RECIPES[name][eaquant].items() if k not in given}
