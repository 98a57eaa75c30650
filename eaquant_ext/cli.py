"""The command line, turned once into a frozen `RunConfig` that results.json records verbatim.

It lives in the top package because a run's configuration composes every method's options
(duquant/config.py, eaquant_ext/config.py, eaquant_ext/moequant/config.py). Resolution order:
defaults < method recipe (`--recipe eaquant` or `--method eaquant`) < component switches
(`--eaquant`, `--moequant`) < fidelity recipe (`--recipe ...,official`) < options given explicitly
< `--set key=value`. `python main.py --help` lists the everyday options, `--help-all` every one,
`--help-recipes` the recipes and every key `--set` reaches.
"""
from __future__ import annotations

import argparse
import math
import re
import sys
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

from duquant.config import CHOICES, QUANT_CHOICES, ConfigError, DuQuantConfig, GPTQConfig, QuantConfig, check_bits
from duquant.data import CALIB_DATASETS, PPL_DATASETS
from duquant.packed import QuantizedLoadError
from duquant.recipes import (EAQUANT_COMPONENTS, METHOD_RECIPES, MOEQUANT_COMPONENTS, default_weight_clip,
                             describe_recipes, recipe_values, split_recipes)
from duquant.zeroshot import TASKS, check_tasks
from models import DEFAULT_MODEL

from .config import AGGREGATIONS, ALIGN_RULES, BALANCE_RULES, EXPERT_ACTS, EAQuantConfig
from .moequant.config import MoEQuantConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
BASE_METHODS = ("fp", "rtn", "duquant")


@dataclass(frozen=True)
class DataConfig:
    calib_dataset: str = "c4"
    nsamples: int = 128
    seqlen: int = 2048
    route_all_tokens: bool = False  # calibration: every expert sees every token


@dataclass(frozen=True)
class EvalConfig:
    eval_ppl: tuple[str, ...] = ("wikitext2", "c4")
    ppl_samples: int | None = None
    eval_batch_size: int = 4
    compare_fp: bool = True
    baseline: str | None = None  # "rtn": also evaluate round-to-nearest at the same bits
    tasks: tuple[str, ...] = ()
    limit: int | None = None
    plots: bool = False
    plot_layer: int | None = None
    fp_reference: str | None = None  # folder where the FP evaluation is kept and reused (main.fp_step)


@dataclass(frozen=True)
class OutputConfig:
    output_dir: str
    save_dir: str | None = None
    export: tuple[str, str] | None = None
    load: str | None = None
    resume: bool = True
    stream: bool = False
    stream_dir: str | None = None
    replay_attention: bool = True


@dataclass(frozen=True)
class RunConfig:
    """One run, resolved. `quant`/`duquant` are None for `--method fp` (nothing is quantized)."""

    model: str
    method: str  # the name results are labelled with: rtn, duquant, eaquant, duquant+sa-maximum, moequant, ...
    base_method: str  # fp, rtn or duquant
    recipe: str
    seed: int
    device: str
    dtype: str
    data: DataConfig
    quant: QuantConfig | None
    duquant: DuQuantConfig | None
    eaquant: EAQuantConfig
    moequant: MoEQuantConfig
    gptq: GPTQConfig | None
    eval: EvalConfig
    output: OutputConfig
    given_bits: tuple[tuple[str, int], ...] = ()  # bit widths typed with --load: must match the saved model
    kv_bits_given: bool = False  # an explicit --kv_bits is refused where the family cannot honour it


    def fingerprint(self) -> dict:
        """What decides the quantized model: a partial run resumes only if this is the same."""
        return {k: v for k, v in asdict(self).items() if k not in ("eval", "output", "device", "given_bits", "kv_bits_given")}


@dataclass(frozen=True)
class Range:
    """The values a numeric option admits; None = unbounded. Real values must also be finite."""
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def admits(self, v: float) -> bool:
        if isinstance(v, float) and not math.isfinite(v):
            return False
        above = self.lo is None or (v > self.lo if self.lo_open else v >= self.lo)
        below = self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)
        return above and below

    def __str__(self) -> str:
        if self.hi is None:
            return f"a value {'>' if self.lo_open else '>='} {self.lo}"
        return f"a value in {'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"


# Every numeric option but the bit widths (duquant.config.check_bits); an option left unset (None) passes.
RANGES = {
    "seed": Range(0, 2**31 - 1),  # numpy seeds stop at 2**32 - 1, and seed + 1 is used too
    "nsamples": Range(1), "seqlen": Range(16), "ppl_samples": Range(1), "eval_batch_size": Range(1),
    "plot_layer": Range(0), "limit": Range(1),
    "swc": Range(0, 1, lo_open=True), "lac": Range(0, 1, lo_open=True),
    "alpha": Range(0, 1), "block_size": Range(2), "max_rotation_step": Range(1), "permutation_times": Range(1),
    "rotation_tokens": Range(1), "smooth_scale_floor": Range(0), "act_absmax_floor": Range(0),
    "kl_top": Range(0, 100), "balance_ratio": Range(0), "balance_max_extra": Range(1),
    "group_size": Range(2), "percdamp": Range(0, 1, lo_open=True, hi_open=True), "gptq_blocksize": Range(1),
    "gptq_min_tokens": Range(1), "ebss_tau": Range(0, lo_open=True), "ebss_width": Range(1),
}
SAVED_BITS = ("wbits", "abits", "kv_bits", "router_wbits", "router_abits")
# The options that apply to --load; the saved model fixes every other one (the SAVED_BITS are
# accepted when they match it). --export converts a loaded model as well as a freshly quantized one.
LOAD_OPTIONS = {"--load", "--device", "--output_dir", "--eval_ppl", "--ppl_samples", "--eval_batch_size", "--seqlen",
                "--tasks", "--limit", "--no-compare_fp", "--export", "--fp_reference", *(f"--{k}" for k in SAVED_BITS)}
# What a saved model's method name starts with (method_name).
SAVED_METHODS = ("rtn", "duquant", "eaquant", "moequant")
# Old spellings that now mean something else, refused with the new one.
RENAMED = {"--calib_dataset=ebss": "--ebss (MoEQuant's self-sampled calibration set is a component, not a dataset)"}


# ---- the parser ----

def _everyday(p: argparse.ArgumentParser, show_all: bool) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--model", default=DEFAULT_MODEL, help="local path, hub id, or alias (demo-mixtral, demo-olmoe, demo-deepseek, demo-llama-s, demo-llama-m, mixtral, olmoe, deepseek-moe, qwen-moe, tiny-<arch>)")
    g.add_argument("--recipe", default=None, help="method recipe and/or fidelity recipe, comma-separated: "
                   + ", ".join(METHOD_RECIPES) + "; default, official, paper (--help-recipes)")
    g.add_argument("--method", choices=tuple(METHOD_RECIPES), default="duquant", help="a method recipe by name (as --recipe NAME)")
    g.add_argument("--wbits", type=int, default=4)
    g.add_argument("--abits", type=int, default=4)
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (one decoder layer at a time lives there)")
    g.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="auto: float32 on CPU, bfloat16 on GPU")
    g.add_argument("--seed", type=int, default=2, help="calibration sampling and transform fitting (DuQuant's default 2)")
    g.add_argument("--output_dir", type=Path, default=None, help="default results/<model>-<method>-w<W>a<A>")
    g.add_argument("--save_dir", type=Path, default=None, help="also write the quantized model there: packed integer weights, grids, transforms")
    g.add_argument("--load", type=Path, default=None, help="evaluate a model saved with --save_dir instead of quantizing")
    g.add_argument("--export", nargs=2, metavar=("FORMAT", "DIR"), default=None,
                   help="also write a checkpoint plain transformers loads; FORMAT: compressed-tensors (docs/export.md)")
    g.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue a killed run from <output_dir>/partial (--no-resume starts over)")
    g.add_argument("--stream", action="store_true", help="read decoder layers from disk one at a time (models larger than RAM)")
    g.add_argument("--stream_dir", type=Path, default=None, help="with --stream, where quantized layers are kept (default: a temporary directory)")
    g.add_argument("--replay_attention", action=argparse.BooleanOptionalAction, default=True,
                   help="sequential fitting replays each layer's attention in its later passes: the same results, "
                        "for one more copy of the calibration activations (--no-replay_attention saves it)")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any option of the method configurations, e.g. --set min_expert_tokens=8 (--help-recipes lists them)")
    g.add_argument("--help-recipes", action="store_true", help="list the recipes and every key --set reaches, then exit")
    g.add_argument("--help-all", action="store_true", help="list every option, then exit")
    g = p.add_argument_group("data and evaluation")
    g.add_argument("--calib_dataset", default="c4", help="c4 train or gutenberg (" + ", ".join(CALIB_DATASETS) + ")")
    g.add_argument("--nsamples", type=int, default=128)
    g.add_argument("--seqlen", type=int, default=2048, help="calibration and evaluation window (capped at the model's max positions)")
    g.add_argument("--eval_ppl", default="wikitext2,c4", help="comma list of " + ",".join(PPL_DATASETS) + "; empty to skip")
    g.add_argument("--ppl_samples", type=int, default=None, help="at most this many windows per perplexity set")
    g.add_argument("--eval_batch_size", type=int, default=4)
    g.add_argument("--compare_fp", action=argparse.BooleanOptionalAction, default=True, help="also evaluate the FP model")
    g.add_argument("--fp_reference", type=Path, default=None, metavar="DIR",
                   help="keep the FP evaluation in DIR and reuse it in later runs on the same model, windows and tasks")
    g.add_argument("--baseline", choices=["rtn"], default=None, help="also evaluate round-to-nearest at the same bits (data-free)")
    g.add_argument("--tasks", default="", help="comma list of lm-eval zero-shot tasks on the bundled data (" + ",".join(TASKS) + ")")
    g.add_argument("--limit", type=int, default=None, help="at most this many examples per task (per MMLU subject)")
    g.add_argument("--plots", action="store_true", help="write PNGs: expert load, routing agreement, channel absmax")
    g.add_argument("--plot_layer", type=int, default=None, help="layer of the channel-absmax plot (default: middle)")


def _quantization(p: argparse.ArgumentParser, show_all: bool) -> None:
    h = (lambda text: text) if show_all else (lambda text: argparse.SUPPRESS)
    g = p.add_argument_group("quantization")
    g.add_argument("--kv_bits", type=int, default=None, help=h("Q/K/V of the attention matmuls (default: abits)"))
    g.add_argument("--router_wbits", type=int, default=None, help=h("default 8, or 16 when wbits and abits are 16"))
    g.add_argument("--router_abits", type=int, default=None, help=h("default 8, or 16 when wbits and abits are 16"))
    g.add_argument("--swc", type=float, default=0.8, help=h("weight clip ratio"))
    g.add_argument("--lac", type=float, default=0.9, help=h("activation clip ratio"))
    g.add_argument("--w_clip", choices=["minmax", "mse"], default="minmax",
                   help=h("weight clip: fixed ratio (--swc) or per-row MSE search; DuQuant and EAQuant take mse at 4-8 bit weights"))
    g.add_argument("--w_sym", action="store_true", help=h("symmetric weight grid"))
    g.add_argument("--a_sym", action="store_true", help=h("symmetric activation grid"))
    g = p.add_argument_group("duquant")
    for flag in ("smooth", "rotate", "permute"):
        g.add_argument(f"--{flag}", action=argparse.BooleanOptionalAction, default=True, help=h(f"DuQuant's {flag} step"))
    g.add_argument("--alpha", type=float, default=0.6, help=h("smoothing strength"))
    g.add_argument("--block_size", type=int, default=128, help=h("rotation block"))
    g.add_argument("--max_rotation_step", type=int, default=256, help=h("greedy rotation steps"))
    g.add_argument("--permutation_times", type=int, default=1, help=h("R1 P R2 repeats"))
    g.add_argument("--rotation", choices=["paper", "shared"], default="paper",
                   help=h("paper: per-block greedy rotation on the outlier channel; shared: the published code's one matrix"))
    g.add_argument("--rotation_tokens", type=int, default=2048, help=h("calibration rows kept per site"))
    g.add_argument("--route_all_tokens", action="store_true", help=h("calibration: every expert sees every token"))
    for name, choices in CHOICES.items():
        g.add_argument(f"--{name}", choices=choices, default=choices[0], help=h(f"default {choices[0]} (docs/fidelity.md)"))
    g.add_argument("--smooth_scale_floor", type=float, default=1e-2, help=h("smoothing scales below this are raised to it"))
    g.add_argument("--act_absmax_floor", type=float, default=0.0, help=h("activation max clamped to at least this before smoothing"))


def _components(p: argparse.ArgumentParser, show_all: bool) -> None:
    h = (lambda text: text) if show_all else (lambda text: argparse.SUPPRESS)
    g = p.add_argument_group("eaquant (MoE models; --recipe eaquant turns all three on)")
    g.add_argument("--eaquant", action="store_true", help=h("the three EAQuant components on top of the method"))
    g.add_argument("--smooth_aggregate", choices=AGGREGATIONS, default=None, help=h("expert-aware smoothing aggregation"))
    g.add_argument("--smooth_aggregate_router", action=argparse.BooleanOptionalAction, default=True, help=h("the router joins the aggregate"))
    g.add_argument("--router_align", action=argparse.BooleanOptionalAction, default=False, help=h("KL-aligned router quantizer"))
    g.add_argument("--kl_top", type=int, default=0, help=h("R: KL over k + int((n-k)R/100) experts"))
    g.add_argument("--expert_act", choices=EXPERT_ACTS, default="moe_in", help=h("an expert's smoothing requirement from the MoE input's or its routed tokens' max"))
    g.add_argument("--align_rule", choices=ALIGN_RULES, default="ours", help=h("per-row MSE+KL descent, or the published one-ratio KL search"))
    g.add_argument("--calib_balance", action=argparse.BooleanOptionalAction, default=False, help=h("expert-balanced calibration"))
    g.add_argument("--balance_ratio", type=float, default=2.0, help=h("r: threshold r*k*N/n routed tokens"))
    g.add_argument("--balance_dataset", choices=CALIB_DATASETS, default="gutenberg", help=h("source of extra sequences"))
    g.add_argument("--balance_max_extra", type=int, default=None, help=h("cap on added sequences (default nsamples)"))
    g.add_argument("--balance_rule", choices=BALANCE_RULES, default="paper",
                   help=h("paper: extra sequences; official: experts' rotation rows topped up from the layer's FP outputs"))
    g = p.add_argument_group("gptq and moequant (--recipe moequant = rtn + gptq + agq + ebss)")
    g.add_argument("--moequant", action="store_true", help=h("GPTQ, AGQ and EBSS on top of the method"))
    g.add_argument("--gptq", action=argparse.BooleanOptionalAction, default=False, help=h("GPTQ rounding of every quantized weight"))
    g.add_argument("--act_order", action="store_true", help=h("GPTQ: columns by descending Hessian diagonal"))
    g.add_argument("--group_size", type=int, default=None, help=h("GPTQ: one scale/zero per this many input columns"))
    g.add_argument("--percdamp", type=float, default=0.01, help=h("GPTQ: dampening, fraction of mean(diag H)"))
    g.add_argument("--gptq_blocksize", type=int, default=128, help=h("GPTQ: columns per lazy-update block"))
    g.add_argument("--gptq_min_tokens", type=int, default=16, help=h("GPTQ: fewer calibration rows -> round to nearest"))
    g.add_argument("--agq", action=argparse.BooleanOptionalAction, default=False, help=h("affinity-guided GPTQ (implies --gptq)"))
    g.add_argument("--agq_gate", action=argparse.BooleanOptionalAction, default=True, help=h("AGQ also on each expert's gate_proj (R5)"))
    g.add_argument("--agq_c", default="0.1,0.3,0.5,0.7,0.9", help=h("affinities at which the gate approximation is reported (R4)"))
    g.add_argument("--ebss", action=argparse.BooleanOptionalAction, default=False, help=h("MoEQuant's expert-balanced self-sampled calibration"))
    g.add_argument("--ebss_tau", type=float, default=1.2, help=h("EBSS: score = NLL + balance std / tau"))
    g.add_argument("--ebss_width", type=int, default=4, help=h("EBSS: candidate sequences kept per step"))
    g.add_argument("--ebss_cache_dir", default=None, help=h("EBSS cache folder (default results/ebss_cache)"))


def parser(show_all: bool = False) -> argparse.ArgumentParser:
    # No abbreviations: the options given must be known exactly as typed (recipes fill in the rest).
    p = argparse.ArgumentParser(prog="main.py", description="Quantize an MoE (or dense) model and evaluate it.",
                                allow_abbrev=False)
    _everyday(p, show_all)
    _quantization(p, show_all)
    _components(p, show_all)
    return p


def given_options(argv: list[str]) -> set[str]:
    """Option names typed on the command line, without dashes or a "no-" prefix."""
    return {a.split("=")[0][2:].removeprefix("no-") for a in argv if a.startswith("--")}


def _fill(args, values: dict, given: set[str]) -> None:
    for key, value in values.items():
        if key not in given:
            setattr(args, key, value)


def resolve_recipes(args, given: set[str]) -> tuple[str, str]:
    """Apply the recipes to `args` (options not given only); returns (method recipe, fidelity recipe)."""
    method_recipe, fidelity = split_recipes(args.recipe) if args.recipe else (None, "default")
    method_recipe = method_recipe or args.method
    values = dict(METHOD_RECIPES[method_recipe])
    base = values.pop("method")
    args.method = METHOD_RECIPES[args.method]["method"] if "method" in given else base
    _fill(args, values, given)
    if args.method == "duquant":
        _fill(args, default_weight_clip(args.wbits), given)
    if args.eaquant:
        _fill(args, {k: v for k, v in METHOD_RECIPES["eaquant"].items() if k in EAQUANT_COMPONENTS}, given)
    if args.moequant:
        _fill(args, {k: True for k in MOEQUANT_COMPONENTS}, given)
    eaquant_on = bool(args.smooth_aggregate or args.router_align or args.calib_balance)
    _fill(args, recipe_values(fidelity, given, eaquant_on), given)
    return method_recipe, fidelity


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, set[str], str]:
    """The parsed options with every recipe applied, the options given, and the recipe label."""
    for old, new in RENAMED.items():
        name, _, value = old.partition("=")
        if any(a == f"{name}={value}" for a in argv) or any(a == name and b == value for a, b in zip(argv, argv[1:])):
            raise ConfigError(f"{name} {value} is now {new}")
    args = parser().parse_args(argv)
    if args.help_recipes:
        print(describe_recipes() + "\n\n" + describe_settable())
        sys.exit(0)
    if args.help_all:
        parser(show_all=True).print_help()
        sys.exit(0)
    given = given_options(argv)
    method_recipe, fidelity = resolve_recipes(args, given)
    return args, given, method_recipe + ("" if fidelity == "default" else f",{fidelity}")


# ---- from options to configurations ----

def validate_args(args) -> None:
    """Every option's range, in one place, before any work."""
    for name, allowed in RANGES.items():
        value = getattr(args, name, None)
        if value is not None and not allowed.admits(value):
            raise ConfigError(f"--{name} {value} is out of range; use {allowed}")
    for name in SAVED_BITS:
        if getattr(args, name) is not None:
            check_bits(name, getattr(args, name))
    if args.calib_dataset not in CALIB_DATASETS:
        raise ConfigError(f"--calib_dataset {args.calib_dataset!r} is unknown; choose from {', '.join(CALIB_DATASETS)}")
    for name in args.eval_ppl.split(","):
        if name and name not in PPL_DATASETS:
            raise ConfigError(f"--eval_ppl {name!r} is unknown; choose from {', '.join(PPL_DATASETS)}")
    parse_device(args.device)


def parse_device(name: str) -> torch.device:
    """cpu, cuda or cuda:N (a visible one); anything else is refused rather than failing mid-run."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name!r} is not supported; use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} was asked for but no CUDA device is visible; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible "
                          f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return device


def quant_configs(args) -> tuple[QuantConfig, DuQuantConfig]:
    quant = QuantConfig(args.wbits, args.abits, args.kv_bits, args.router_wbits, args.router_abits,
                        args.w_sym, args.a_sym, args.swc, args.lac, args.w_clip,
                        **{k: getattr(args, k) for k in QUANT_CHOICES})
    if args.method == "rtn":
        return quant, DuQuantConfig.rtn()
    fidelity = {k: getattr(args, k) for k in (*CHOICES, "act_absmax_floor", "smooth_scale_floor") if k not in QUANT_CHOICES}
    return quant, DuQuantConfig(args.smooth, args.rotate, args.permute, args.alpha, args.block_size,
                                args.max_rotation_step, args.permutation_times, args.rotation, args.rotation_tokens,
                                **fidelity)


def eaquant_config(args) -> EAQuantConfig:
    return EAQuantConfig(smooth_aggregate=args.smooth_aggregate, smooth_aggregate_router=args.smooth_aggregate_router,
                         expert_act=args.expert_act, align_rule=args.align_rule, router_align=args.router_align,
                         kl_top=args.kl_top, calib_balance=args.calib_balance, balance_ratio=args.balance_ratio,
                         balance_dataset=args.balance_dataset, balance_max_extra=args.balance_max_extra,
                         balance_rule=args.balance_rule)


def moequant_configs(args) -> tuple[MoEQuantConfig, GPTQConfig | None]:
    """--agq implies GPTQ; GPTQ options without GPTQ are refused rather than ignored."""
    try:
        agq_c = tuple(float(c) for c in args.agq_c.split(",") if c.strip())
    except ValueError:
        raise ConfigError(f"--agq_c {args.agq_c!r} must be a comma list of numbers in (0, 1]") from None
    mq = MoEQuantConfig(agq=args.agq, agq_gate=args.agq_gate, agq_c=agq_c, ebss=args.ebss, ebss_tau=args.ebss_tau,
                        ebss_width=args.ebss_width, ebss_cache_dir=args.ebss_cache_dir)
    if not (args.gptq or mq.agq):
        if args.act_order or args.group_size is not None:
            raise ConfigError("--act_order and --group_size are GPTQ options; add --gptq")
        return mq, None
    return mq, GPTQConfig(args.gptq_blocksize, args.percdamp, args.act_order, args.group_size, args.gptq_min_tokens)


def method_name(base: str, ea: EAQuantConfig, mq: MoEQuantConfig, gptq: GPTQConfig | None) -> str:
    """rtn, duquant, eaquant, duquant+sa-...; then +gptq/+agq/+ebss, or +moequant for all three
    ("moequant" alone on rtn, the paper's setting)."""
    name = base
    if base == "duquant" and ea.any:
        if ea.smooth_aggregate == "maximum" and ea.router_align and ea.calib_balance:
            name = "eaquant"
        else:
            parts = [f"sa-{ea.smooth_aggregate}"] if ea.smooth_aggregate else []
            name = "duquant+" + "+".join(parts + ["ra"] * ea.router_align + ["cb"] * ea.calib_balance)
    if gptq is None and not mq.any:
        return name
    if gptq is not None and mq.agq and mq.ebss:
        name = "moequant" if name == "rtn" else f"{name}+moequant"
    else:
        name = "+".join([name] + ["gptq"] * (gptq is not None) + ["agq"] * mq.agq + ["ebss"] * mq.ebss)
    return name + ("-nogate" if mq.agq and not mq.agq_gate else "")


def check_combination(base: str, ea: EAQuantConfig, mq: MoEQuantConfig, gptq: GPTQConfig | None, args) -> None:
    if ea.any and base != "duquant":
        raise ConfigError(f"EAQuant options build on DuQuant; use --method duquant (or --recipe eaquant), not {base}")
    if base == "fp" and (gptq is not None or mq.any):
        raise ConfigError("GPTQ and MoEQuant options quantize; use --method rtn, duquant or eaquant, not fp")
    if base == "fp" and args.save_dir is not None:
        raise ConfigError("--save_dir writes a quantized model; --method fp has none (the checkpoint is the FP model)")
    if args.fp_reference is not None and args.stream:
        raise ConfigError("--fp_reference keys the FP evaluation by every weight, which --stream never holds at once; "
                          "drop one of them")
    if args.stream_dir is not None and not args.stream:
        raise ConfigError("--stream_dir only applies with --stream; add --stream or drop --stream_dir")
    if mq.ebss and args.calib_dataset != "c4" and "calib_dataset" in args.given:
        raise ConfigError(f"EBSS makes its own calibration set; drop --calib_dataset {args.calib_dataset} or --ebss")


SECTIONS = ("quant", "duquant", "eaquant", "moequant", "gptq", "data", "eval")


def _parse_value(text: str, current):
    if text.lower() == "none":
        return None
    if isinstance(current, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(text)
        return text.lower() in ("true", "1")
    if isinstance(current, tuple):
        return tuple(float(t) for t in text.split(",") if t)
    if isinstance(current, (int, float)):
        return type(current)(text)
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _owner_of(run: RunConfig, key: str) -> tuple[str, str]:
    """(section, field) that --set KEY names: `section.field`, or a field name found in one section."""
    section, _, name = key.rpartition(".")
    candidates = [section] if section else [s for s in SECTIONS if getattr(run, s) is not None]
    owners = [s for s in candidates if s in SECTIONS and getattr(run, s) is not None
              and name in {f.name for f in fields(getattr(run, s))}]
    if len(owners) != 1:
        problem = "no such option" if not owners else "ambiguous: write " + " or ".join(f"{o}.{name}" for o in owners)
        raise ConfigError(f"--set {key}: {problem}; python main.py --help-recipes lists every key")
    return owners[0], name


def apply_sets(run: RunConfig, settings: list[str]) -> RunConfig:
    """--set KEY=VALUE, each applied to a fresh copy of its section (re-validated there)."""
    for item in settings:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set min_expert_tokens=8")
        section, name = _owner_of(run, key)
        current = getattr(getattr(run, section), name)
        try:
            value = _parse_value(text, current)
        except ValueError:
            raise ConfigError(f"--set {item!r}: {text!r} is not a valid {type(current).__name__}") from None
        run = replace(run, **{section: replace(getattr(run, section), **{name: value})})
    return run


def describe_settable() -> str:
    """Every key --set reaches, with its default."""
    defaults = {"quant": QuantConfig(), "duquant": DuQuantConfig(), "eaquant": EAQuantConfig(),
                "moequant": MoEQuantConfig(), "gptq": GPTQConfig(), "data": DataConfig(), "eval": EvalConfig()}
    lines = ["Keys for --set KEY=VALUE (section.KEY where a name repeats):"]
    for section, cfg in defaults.items():
        lines.append(f"  {section}: " + ", ".join(f"{f.name}={getattr(cfg, f.name)!r}" for f in fields(cfg)))
    return "\n".join(lines)


def default_output_dir(model: str, method: str, quant: QuantConfig | None) -> str:
    tag = f"-{quant.tag}" if quant is not None else ""
    return str(Path("results") / f"{Path(model.rstrip('/')).name}-{method}{tag}")


def _common_sections(args) -> tuple[DataConfig, EvalConfig]:
    data = DataConfig(args.calib_dataset, args.nsamples, args.seqlen, args.route_all_tokens)
    evaluation = EvalConfig(tuple(s for s in args.eval_ppl.split(",") if s), args.ppl_samples, args.eval_batch_size,
                            args.compare_fp, args.baseline, tuple(check_tasks([s.strip() for s in args.tasks.split(",") if s.strip()])),
                            args.limit, args.plots, args.plot_layer,
                            None if args.fp_reference is None else str(args.fp_reference))
    return data, evaluation


def build_load_config(args, argv: list[str], given: set[str]) -> RunConfig:
    refused = sorted({a.split("=")[0] for a in argv if a.startswith("--")} - LOAD_OPTIONS)
    if refused:
        them = "them" if len(refused) > 1 else "it"
        raise ConfigError(f"{', '.join(refused)} cannot apply to --load (the saved model fixes {them}); "
                          f"drop {them}, or quantize again without --load")
    data, evaluation = _common_sections(args)
    out = OutputConfig(str(args.output_dir or Path("results") / f"{args.load.name}-loaded"), export=tuple(args.export) if args.export else None,
                       load=str(args.load))
    bits = tuple((k, getattr(args, k)) for k in SAVED_BITS if k in given)
    return RunConfig(args.model, "loaded", "loaded", "", args.seed, args.device, args.dtype, data, None, None,
                     EAQuantConfig(), MoEQuantConfig(), None, evaluation, out, bits)


def build_config(argv: list[str]) -> RunConfig:
    """The run's one configuration, from the command line; every check that needs no model is here."""
    args, given, recipe = parse_args(argv)
    args.given = given
    validate_args(args)
    if args.load is not None:
        return build_load_config(args, argv, given)
    ea, (mq, gptq) = eaquant_config(args), moequant_configs(args)
    check_combination(args.method, ea, mq, gptq, args)
    quant, duq = quant_configs(args) if args.method != "fp" else (None, None)
    method = method_name(args.method, ea, mq, gptq)
    data, evaluation = _common_sections(args)
    out = OutputConfig(str(args.output_dir or default_output_dir(args.model, method, quant)),
                       None if args.save_dir is None else str(args.save_dir), tuple(args.export) if args.export else None,
                       None, args.resume, args.stream, None if args.stream_dir is None else str(args.stream_dir),
                       args.replay_attention)
    run = RunConfig(args.model, method, args.method, recipe, args.seed, args.device, args.dtype, data, quant, duq,
                    ea, mq, gptq, evaluation, out, kv_bits_given="kv_bits" in given)
    return apply_sets(run, args.set)


def saved_label(saved: dict, path: Path, given_bits=()) -> tuple[str, int, int]:
    """(method, wbits, abits) that a saved model's results are labelled with, after checking that
    its linears carry those bits, the method is one this version writes, and bits given with --load
    match."""
    try:
        method, quant = saved["run"]["method"], saved["run"]["quant"]
        wbits, abits = quant["wbits"], quant["abits"]
        weight_bits = {e["bits"] for e in saved["linears"].values()}
        act_bits = {e["act"]["bits"] for e in saved["linears"].values()}
    except (KeyError, TypeError, AttributeError) as e:
        raise QuantizedLoadError(f"{path / 'quant_config.json'} lacks {e}; save the model again") from None
    if not isinstance(method, str) or re.split(r"[+-]", method)[0] not in SAVED_METHODS:
        raise QuantizedLoadError(f"{path} was saved with method {method!r}, which this version does not know; "
                                 "save the model again")
    if (wbits < 16 and wbits not in weight_bits) or (abits < 16 and abits not in act_bits):
        raise QuantizedLoadError(f"{path}: the config says W{wbits}A{abits} but its linears hold weights of "
                                 f"{sorted(weight_bits)} and activations of {sorted(act_bits)} bits; save the model again")
    for key, value in given_bits:
        if value != quant[key]:
            raise ConfigError(f"--{key} {value} does not match the saved model's {quant[key]} ({path}); "
                              "drop the flag, or quantize again")
    return method, wbits, abits
