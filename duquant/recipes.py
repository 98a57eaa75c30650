"""Named recipes: sets of option values, so a paper's setting is one name instead of many flags.

Two kinds, combined with a comma (`--recipe eaquant,official`):
- method recipes (`METHOD_RECIPES`): which algorithm and which of its components run
  (fp, rtn, duquant, eaquant, gptq, moequant);
- fidelity recipes (`RECIPES`): one value for every pipeline choice on which our code, the
  published code and the paper text differ (docs/fidelity.md lists them with what each does).
  `default` is ours; `official` reproduces the published DuQuant code, and with any EAQuant
  component on, the published EAQuant code (whose DuQuant part differs from DuQuant's own); `paper`
  follows the paper text where it conflicts with the code; `fast` takes the two choices that cost
  least time, with their quality measured (docs/speed.md).
A recipe only fills in options the user did not give: explicit options always win.
"""
from __future__ import annotations

from .config import ConfigError

OFFICIAL_DUQUANT = {
    "w_clip": "minmax",
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
    "fit_order": "sequential",
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
    "expert_down_smooth": "outlier_mask",
    "balance_rule": "official",
    "smooth_aggregate_router": False,
    "align_rule": "official",
}

# The papers describe a per-block search on the outlier channel that keeps the prefix with the
# smallest max |x|, and EAQuant's Eq. 6 includes the router and its objective is MSE + KL;
# where they say nothing, the paper recipe takes the code's choice.
PAPER = {"rotation": "paper", "rotation_stop": "absmax"}

# Rank-one greedy steps and every site fitted on the FP layer's rows (no refresh passes). On the
# three zoo models DuQuant W4A4's KL to FP moved by about the seed spread, both ways
# (results/spreading/README.md); the time it saves is in docs/speed.md.
FAST = {"spreading": "reflection", "fit_order": "layer"}

RECIPES: dict[str, tuple[dict[str, object], dict[str, object]]] = {
    # name: (values for DuQuant runs, values when an EAQuant component is on)
    "default": ({}, {}),
    "official": (OFFICIAL_DUQUANT, OFFICIAL_EAQUANT),
    "paper": ({**OFFICIAL_DUQUANT, **PAPER},
              {**OFFICIAL_EAQUANT, **PAPER, "smooth_aggregate_router": True, "align_rule": "ours"}),
    "fast": (FAST, FAST),
}


def recipe_values(name: str, given: set[str], eaquant: bool = False) -> dict[str, object]:
    """The recipe's values for the options not in `given` (option names without leading dashes)."""
    if name not in RECIPES:
        raise ConfigError(f"--recipe {name!r} is unknown; choose from {', '.join(RECIPES)}")
    return {k: v for k, v in RECIPES[name][eaquant].items() if k not in given}


# The papers' methods; values are CLI option names (docs/usage.md).
METHOD_RECIPES: dict[str, dict[str, object]] = {
    "fp": {"method": "fp"},
    "rtn": {"method": "rtn"},
    "duquant": {"method": "duquant"},
    "eaquant": {"method": "duquant", "smooth_aggregate": "maximum", "router_align": True, "calib_balance": True},
    "gptq": {"method": "rtn", "gptq": True},
    "moequant": {"method": "rtn", "gptq": True, "agq": True, "ebss": True},
}
EAQUANT_COMPONENTS = ("smooth_aggregate", "router_align", "calib_balance")
MOEQUANT_COMPONENTS = ("gptq", "agq", "ebss")

# Our DuQuant's weight clipping by weight width (docs/fidelity.md, "Weight clipping"): the per-row
# MSE search on the published EAQuant grid lowered KL to FP and perplexity at 4 bits on every model
# measured; at 3 bits it raised perplexity on all of them (and KL on the dense ones), so the fixed
# ratio (swc) stays there.
MSE_CLIP_MIN_WBITS = 4


def default_weight_clip(wbits: int) -> dict[str, object]:
    """The weight-clip options of a DuQuant run at `wbits` (RTN and GPTQ keep the fixed ratio)."""
    if MSE_CLIP_MIN_WBITS <= wbits < 16:
        return {"w_clip": "mse", "mse_grid": "official"}
    return {"w_clip": "minmax"}


def split_recipes(spec: str) -> tuple[str | None, str]:
    """`--recipe a,b` -> (method recipe or None, fidelity recipe); at most one of each."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in METHOD_RECIPES and n not in RECIPES]
    if unknown or not names:
        raise ConfigError(f"--recipe {spec!r}: unknown name {', '.join(unknown) or '(empty)'}; choose from "
                          f"{', '.join(METHOD_RECIPES)} and {', '.join(RECIPES)} (python main.py --help-recipes)")
    methods = [n for n in names if n in METHOD_RECIPES]
    fidelity = [n for n in names if n in RECIPES]
    if len(methods) > 1 or len(fidelity) > 1:
        raise ConfigError(f"--recipe {spec!r} names two recipes of one kind; give one method recipe "
                          f"({', '.join(METHOD_RECIPES)}) and at most one of {', '.join(RECIPES)}")
    return (methods[0] if methods else None), (fidelity[0] if fidelity else "default")


def describe_recipes() -> str:
    """The text of `python main.py --help-recipes`."""
    lines = ["Method recipes (--recipe NAME, or --method NAME):"]
    lines += [f"  {name:10s} " + " ".join(f"--{k} {v}" for k, v in values.items()) for name, values in METHOD_RECIPES.items()]
    lines.append(f"  (duquant and eaquant also take --w_clip mse --mse_grid official at --wbits {MSE_CLIP_MIN_WBITS}..8, "
                 "--w_clip minmax below)")
    lines.append("\nFidelity recipes (--recipe NAME or --recipe METHOD,NAME; docs/fidelity.md, fast: docs/speed.md):")
    for name, (duq, ea) in RECIPES.items():
        lines.append(f"  {name:10s} DuQuant runs: " + (" ".join(f"--{k} {v}" for k, v in duq.items()) or "(our defaults)"))
        if ea != duq:
            lines.append(f"  {'':10s} with EAQuant: " + " ".join(f"--{k} {v}" for k, v in ea.items()))
    return "\n".join(lines)
