"""Quantize an MoE (or dense Llama-family) model and evaluate it; one run, one results.json.

    python main.py                                   # the demo: bundled Mixtral-style model, W4A4
    python main.py --model demo-mixtral --method duquant --wbits 3 --abits 4
    python main.py --model mistralai/Mixtral-8x7B-v0.1 --device cuda --eval_ppl wikitext2,c4
    python main.py --model demo-mixtral --method eaquant --save_dir q/mixtral-w4a4   # packed integers
    python main.py --load q/mixtral-w4a4 --eval_ppl wikitext2                          # no recalibration
    python main.py --model /data/Mixtral-8x7B-v0.1 --device cuda --stream            # layers read from disk
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import random
import re
import resource
import shutil
import signal
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from duquant import export
from duquant.config import CHOICES, QUANT_CHOICES, ConfigError, DuQuantConfig, GPTQConfig, QuantConfig, check_bits
from duquant.data import CALIB_DATASETS, PPL_DATASETS, DataError, calibration_segments, ppl_segments
from duquant.diagnostics import plot_run, summarize
from duquant.evaluate import FPStates, divergence_from_fp, perplexity
from duquant.packed import QuantizedLoadError, check_save_dir, load_quantized, save_quantized
from duquant.pipeline import Extensions, quantize_model
from duquant.recipes import RECIPES, recipe_values
from duquant.resume import check_readable, finished_layers
from duquant.zeroshot import TASKS, check_tasks, evaluate_tasks
from eaquant_ext.moequant.agq import affinity_weights
from eaquant_ext.balance import balance_calibration
from eaquant_ext.config import AGGREGATIONS, ALIGN_RULES, EXPERT_ACTS, EAQuantConfig
from eaquant_ext.moequant.config import MoEQuantConfig
from eaquant_ext.moequant.ebss import ebss_calibration
from eaquant_ext.router_align import router_quantizer
from eaquant_ext.smoothing import moe_smoothing
from models import DEFAULT_MODEL, ModelLoadError, get_spec, load_model, resolve_model_name
from models.files import PathError, check_output_dir, describe, remove_stale_temporaries, write_file_atomically

METHODS = ("fp", "rtn", "duquant", "eaquant")
# `python main.py` with no arguments: sizes chosen to finish in minutes on 2 CPU cores.
DEMO_ARGS = ["--model", DEFAULT_MODEL, "--method", "eaquant", "--wbits", "4", "--abits", "4",
             "--nsamples", "32", "--seqlen", "512", "--rotation_tokens", "512", "--eval_ppl", "wikitext2",
             "--ppl_samples", "40"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
log = logging.getLogger("main")


def parse_args(argv: list[str]) -> argparse.Namespace:
    # No abbreviations: `args.given` must name every option as the user spelled it.
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    g = p.add_argument_group("run")
    g.add_argument("--model", default=DEFAULT_MODEL, help="local path, hub id, or alias (demo-mixtral, demo-olmoe, demo-deepseek, demo-llama-s, demo-llama-m, mixtral, olmoe, deepseek-moe, qwen-moe, tiny-<arch>)")
    g.add_argument("--method", choices=METHODS, default="duquant", help="eaquant = duquant --eaquant")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (one decoder layer at a time lives there)")
    g.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="auto: float32 on CPU, bfloat16 on GPU")
    g.add_argument("--seed", type=int, default=2, help="calibration sampling and transform fitting (DuQuant's default 2)")
    g.add_argument("--output_dir", type=Path, default=None, help="default results/<model>-<method>-w<W>a<A>")
    g.add_argument("--save_dir", type=Path, default=None,
                   help="also write the quantized model there: packed integer weights, grids, transforms")
    g.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue a killed run from the layer checkpoints in <output_dir>/partial "
                        "(--no-resume discards them and starts over)")
    g.add_argument("--stream", action="store_true",
                   help="read decoder layers from the safetensors checkpoint one at a time (models larger than RAM)")
    g.add_argument("--stream_dir", type=Path, default=None,
                   help="with --stream, where quantized layers are kept between passes (default: a temporary directory)")
    g.add_argument("--load", type=Path, default=None,
                   help="evaluate a model saved with --save_dir instead of quantizing (no recalibration)")
    g.add_argument("--export", nargs=2, metavar=("FORMAT", "DIR"), default=None,
                   help="also write the quantized (or --load-ed) model as a checkpoint that plain transformers loads; "
                        "FORMAT: compressed-tensors (docs/export.md)")
    g = p.add_argument_group("data")
    g.add_argument("--calib_dataset", choices=(*CALIB_DATASETS, "ebss"), default="c4",
                   help="c4 train (WikiText-2 train is not bundled), gutenberg, or ebss (MoEQuant's self-sampled set; MoE only)")
    g.add_argument("--nsamples", type=int, default=128)
    g.add_argument("--seqlen", type=int, default=2048, help="calibration and evaluation window (capped at the model's max positions)")
    g.add_argument("--eval_ppl", default="wikitext2,c4", help="comma list of " + ",".join(PPL_DATASETS) + "; empty to skip")
    g.add_argument("--ppl_samples", type=int, default=None, help="at most this many windows per perplexity set")
    g.add_argument("--eval_batch_size", type=int, default=4)
    g.add_argument("--compare_fp", action=argparse.BooleanOptionalAction, default=True, help="also evaluate the FP model")
    g.add_argument("--tasks", default="", help="comma list of lm-eval zero-shot tasks on the bundled data (" + ",".join(TASKS) + "); empty to skip")
    g.add_argument("--plots", action="store_true", help="write PNGs: expert load, routing agreement, channel absmax")
    g.add_argument("--plot_layer", type=int, default=None, help="layer of the channel-absmax plot (default: middle)")
    g.add_argument("--limit", type=int, default=None, help="at most this many examples per task (per MMLU subject)")
    g = p.add_argument_group("quantization")
    g.add_argument("--wbits", type=int, default=4)
    g.add_argument("--abits", type=int, default=4)
    g.add_argument("--kv_bits", type=int, default=None, help="Q/K/V of the attention matmuls (default: abits)")
    g.add_argument("--router_wbits", type=int, default=8)
    g.add_argument("--router_abits", type=int, default=8)
    g.add_argument("--swc", type=float, default=0.8, help="weight clip ratio")
    g.add_argument("--lac", type=float, default=0.9, help="activation clip ratio")
    g.add_argument("--w_clip", choices=["minmax", "mse"], default="minmax")
    g.add_argument("--w_sym", action="store_true")
    g.add_argument("--a_sym", action="store_true")
    g = p.add_argument_group("duquant")
    g.add_argument("--smooth", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--rotate", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--permute", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--alpha", type=float, default=0.6)
    g.add_argument("--block_size", type=int, default=128)
    g.add_argument("--max_rotation_step", type=int, default=256)
    g.add_argument("--permutation_times", type=int, default=1)
    g.add_argument("--rotation", choices=["paper", "shared"], default="paper", help="paper: per-block greedy rotation on the outlier channel; shared: the published code's one matrix")
    g.add_argument("--rotation_tokens", type=int, default=2048)
    g.add_argument("--route_all_tokens", action="store_true", help="calibration: every expert sees every token")
    g = p.add_argument_group("fidelity (docs/fidelity.md: where our pipeline, the published code and the paper differ)")
    g.add_argument("--recipe", choices=sorted(RECIPES), default="default",
                   help="default: ours; official: the published DuQuant/EAQuant code; paper: the paper text. "
                        "Options given explicitly override the recipe")
    for name, choices in CHOICES.items():
        g.add_argument(f"--{name}", choices=choices, default=choices[0], help=f"default {choices[0]}")
    g.add_argument("--smooth_scale_floor", type=float, default=1e-2,
                   help="smoothing scales below this are raised to it (published EAQuant code: 1e-5)")
    g.add_argument("--act_absmax_floor", type=float, default=0.0,
                   help="activation max clamped to at least this before smoothing (published code: 1e-5)")
    g = p.add_argument_group("eaquant (MoE models only; each defaults to off, --eaquant turns all three on)")
    g.add_argument("--eaquant", action="store_true", help="smooth_aggregate=maximum, router_align, calib_balance")
    g.add_argument("--smooth_aggregate", choices=AGGREGATIONS, default=None)
    g.add_argument("--smooth_aggregate_router", action=argparse.BooleanOptionalAction, default=True,
                   help="the router's requirement joins the aggregate (paper: yes; the authors' script: no)")
    g.add_argument("--router_align", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--kl_top", type=int, default=0, help="R: KL over k + int((n-k)R/100) experts")
    g.add_argument("--expert_act", choices=EXPERT_ACTS, default="moe_in",
                   help="an expert's smoothing requirement from the MoE input's max (ours) or its routed tokens' (published code)")
    g.add_argument("--align_rule", choices=ALIGN_RULES, default="ours",
                   help="router alignment: per-row MSE+KL descent (ours) or one KL-only ratio for all rows (published code)")
    g.add_argument("--calib_balance", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--balance_ratio", type=float, default=2.0, help="r: threshold r*k*N/n routed tokens")
    g.add_argument("--balance_dataset", choices=CALIB_DATASETS, default="gutenberg", help="source of extra sequences")
    g.add_argument("--balance_max_extra", type=int, default=None, help="cap on added sequences (default nsamples)")
    g = p.add_argument_group("gptq and moequant (--moequant = --gptq --agq --calib_dataset ebss)")
    g.add_argument("--gptq", action="store_true", help="GPTQ rounding of every quantized weight (after the transforms)")
    g.add_argument("--act_order", action="store_true", help="GPTQ: quantize columns by descending Hessian diagonal")
    g.add_argument("--group_size", type=int, default=None, help="GPTQ: one scale/zero per this many input columns")
    g.add_argument("--percdamp", type=float, default=0.01, help="GPTQ: dampening, fraction of mean(diag H)")
    g.add_argument("--gptq_blocksize", type=int, default=128, help="GPTQ: columns per lazy-update block")
    g.add_argument("--gptq_min_tokens", type=int, default=16, help="GPTQ: fewer calibration rows -> round to nearest")
    g.add_argument("--moequant", action="store_true", help="MoEQuant: --gptq --agq --calib_dataset ebss")
    g.add_argument("--agq", action=argparse.BooleanOptionalAction, default=None,
                   help="affinity-guided GPTQ: a token's share of an expert's Hessian is its router score (implies --gptq)")
    g.add_argument("--agq_gate", action=argparse.BooleanOptionalAction, default=True,
                   help="AGQ also on each expert's gate_proj, via MoEQuant Eq. 17's approximation (R5)")
    g.add_argument("--agq_c", default="0.1,0.3,0.5,0.7,0.9",
                   help="constant affinities at which the gate-layer approximation's cosine is reported per layer (R4)")
    g.add_argument("--ebss_tau", type=float, default=1.2, help="EBSS: score = NLL + balance std / tau")
    g.add_argument("--ebss_width", type=int, default=4, help="EBSS: candidate sequences kept per step")
    g.add_argument("--ebss_cache_dir", default=None, help="EBSS cache folder (default results/ebss_cache)")
    args = p.parse_args(argv)
    args.given = {a.split("=")[0] for a in argv if a.startswith("--")}
    given = {g[2:].removeprefix("no-") for g in args.given}
    eaquant = args.eaquant or args.method == "eaquant" or any(
        getattr(args, k) for k in ("smooth_aggregate", "router_align", "calib_balance"))
    for key, value in recipe_values(args.recipe, given, eaquant).items():
        setattr(args, key, value)
    return args


def build_eaquant(args) -> EAQuantConfig:
    """--eaquant (or --method eaquant) sets the paper's defaults; explicit switches override them."""
    paper = args.eaquant or args.method == "eaquant"
    return EAQuantConfig(
        smooth_aggregate=args.smooth_aggregate or ("maximum" if paper else None),
        smooth_aggregate_router=args.smooth_aggregate_router,
        expert_act=args.expert_act,
        align_rule=args.align_rule,
        router_align=paper if args.router_align is None else args.router_align,
        kl_top=args.kl_top,
        calib_balance=paper if args.calib_balance is None else args.calib_balance,
        balance_ratio=args.balance_ratio,
        balance_dataset=args.balance_dataset,
        balance_max_extra=args.balance_max_extra,
    )


def build_moequant(args) -> tuple[MoEQuantConfig, GPTQConfig | None]:
    """--moequant turns on GPTQ, AGQ and EBSS; --agq implies --gptq; explicit switches override."""
    try:
        agq_c = tuple(float(c) for c in args.agq_c.split(",") if c.strip())
    except ValueError:
        raise ConfigError(f"--agq_c {args.agq_c!r} must be a comma list of numbers in (0, 1]") from None
    if args.moequant and args.calib_dataset not in ("c4", "ebss"):
        raise ConfigError(f"--moequant calibrates on EBSS; drop --calib_dataset {args.calib_dataset} or --moequant")
    mq = MoEQuantConfig(agq=args.moequant if args.agq is None else args.agq, agq_gate=args.agq_gate, agq_c=agq_c,
                        ebss=args.moequant or args.calib_dataset == "ebss", ebss_tau=args.ebss_tau,
                        ebss_width=args.ebss_width, ebss_cache_dir=args.ebss_cache_dir)
    if mq.ebss:
        args.calib_dataset = "ebss"
    if not (args.gptq or args.moequant or mq.agq):
        if args.act_order or args.group_size is not None:
            raise ConfigError("--act_order and --group_size are GPTQ options; add --gptq")
        return mq, None
    return mq, GPTQConfig(args.gptq_blocksize, args.percdamp, args.act_order, args.group_size, args.gptq_min_tokens)


def extensions(ea: EAQuantConfig, mq: MoEQuantConfig | None = None) -> Extensions:
    return Extensions(
        moe_smoothing=moe_smoothing(ea.smooth_aggregate, ea.smooth_aggregate_router, ea.expert_act)
        if ea.smooth_aggregate else None,
        quantize_router=router_quantizer(ea.kl_top, ea.align_grid, ea.align_rounds, ea.align_rule)
        if ea.router_align else None,
        hessian_weights=affinity_weights(mq.agq_gate, mq.agq_c) if mq is not None and mq.agq else None,
    )


def method_name(args, ea: EAQuantConfig, mq: MoEQuantConfig | None = None, gptq: GPTQConfig | None = None) -> str:
    """rtn, duquant, eaquant, duquant+sa-...; then +gptq/+agq/+ebss, or +moequant for all three
    ("moequant" alone on rtn, the paper's setting)."""
    base = _base_method_name(args, ea)
    if mq is None or (gptq is None and not mq.any):
        return base
    if gptq is not None and mq.agq and mq.ebss:
        name = "moequant" if base == "rtn" else f"{base}+moequant"
    else:
        name = "+".join([base] + ["gptq"] * (gptq is not None) + ["agq"] * mq.agq + ["ebss"] * mq.ebss)
    return name + ("-nogate" if mq.agq and not mq.agq_gate else "")


def _base_method_name(args, ea: EAQuantConfig) -> str:
    if args.method in ("fp", "rtn") or not ea.any:
        return args.method
    if ea.smooth_aggregate == "maximum" and ea.router_align and ea.calib_balance:
        return "eaquant"
    parts = [f"sa-{ea.smooth_aggregate}"] if ea.smooth_aggregate else []
    parts += ["ra"] * ea.router_align + ["cb"] * ea.calib_balance
    return "duquant+" + "+".join(parts)


def build_configs(args) -> tuple[QuantConfig, DuQuantConfig]:
    for name in args.eval_ppl_list:
        if name not in PPL_DATASETS:
            raise ConfigError(f"--eval_ppl {name!r} is unknown; choose from {', '.join(PPL_DATASETS)}")
    args.tasks_list = check_tasks(args.tasks_list)
    quant = QuantConfig(args.wbits, args.abits, args.kv_bits, args.router_wbits, args.router_abits,
                        args.w_sym, args.a_sym, args.swc, args.lac, args.w_clip,
                        **{k: getattr(args, k) for k in QUANT_CHOICES})
    fidelity = {k: getattr(args, k) for k in (*CHOICES, "act_absmax_floor", "smooth_scale_floor") if k not in QUANT_CHOICES}
    duq = DuQuantConfig(args.smooth, args.rotate, args.permute, args.alpha, args.block_size,
                        args.max_rotation_step, args.permutation_times, args.rotation, args.rotation_tokens,
                        **fidelity)
    if args.method == "rtn":
        duq = DuQuantConfig.rtn()
    return quant, duq


def evaluate(model, spec, tokenizer, segments: dict, args, device, label: str,
             keep: FPStates | None = None, against: FPStates | None = None) -> tuple[dict, dict, dict, dict]:
    """Perplexity on every set, then the zero-shot tasks: the same for the FP and the quantized model.
    The FP pass keeps its last-layer states in `keep`; the quantized pass compares with them (`against`)
    for each set's KL to FP and top-1 agreement (duquant/evaluate.py, docs/evaluation.md)."""
    ppl, kl, tasks, times = {}, {}, {}, {}
    t = time.time()
    for name, seg in segments.items():
        desc = f"{label} {name}"
        if against is not None:
            ppl[name], kl[name] = divergence_from_fp(model, spec, seg, against.sets[name], device, args.eval_batch_size, desc)
        else:
            ppl[name] = perplexity(model, spec, seg, device, args.eval_batch_size, desc, keep.sets[name] if keep else None)
    times["eval"] = time.time() - t
    if args.tasks_list:
        t = time.time()
        tasks = evaluate_tasks(model, tokenizer, args.tasks_list, args.limit, args.eval_batch_size, device)
        times["tasks"] = time.time() - t
    return ppl, kl, tasks, times


def plot_layer(args, model) -> int:
    """The layer whose channel profile --plots draws (default: the middle one)."""
    n = model.config.num_hidden_layers
    layer = n // 2 if args.plot_layer is None else args.plot_layer
    if not 0 <= layer < n:
        raise ConfigError(f"--plot_layer {layer} is out of range; the model has layers 0..{n - 1}")
    return layer


def write_json_atomic(path: Path, obj: dict) -> None:
    write_file_atomically(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2)))


def versions() -> dict:
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "platform": platform.platform(), "cpu_threads": torch.get_num_threads()}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def peak_memory_mb(device: torch.device) -> dict:
    out = {"host_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        out["device"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


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


def device_and_dtype(args) -> tuple[torch.device, torch.dtype]:
    device = parse_device(args.device)
    return device, DTYPES.get(args.dtype) or (torch.float32 if device.type == "cpu" else torch.bfloat16)


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
                "--tasks", "--limit", "--no-compare_fp", "--export", *(f"--{k}" for k in SAVED_BITS)}
# What a saved model's method name starts with (method_name).
SAVED_METHODS = ("rtn", "duquant", "eaquant", "moequant")


def validate_args(args) -> None:
    """Every option's range, in one place, before any work."""
    for name, allowed in RANGES.items():
        value = getattr(args, name, None)
        if value is not None and not allowed.admits(value):
            raise ConfigError(f"--{name} {value} is out of range; use {allowed}")
    for name in SAVED_BITS:
        if getattr(args, name) is not None:
            check_bits(name, getattr(args, name))
    parse_device(args.device)


def check_load_options(args) -> None:
    refused = sorted(args.given - LOAD_OPTIONS)
    if refused:
        raise ConfigError(f"{', '.join(refused)} cannot apply to --load (the saved model fixes "
                          f"{'them' if len(refused) > 1 else 'it'}); drop {'them' if len(refused) > 1 else 'it'}, "
                          "or quantize again without --load")


def saved_label(saved: dict, path: Path) -> tuple[str, int, int]:
    """(method, wbits, abits) that a saved model's results are labelled with, after checking that
    its linears carry those bits and the method is one this version writes."""
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
    return method, wbits, abits


def run_loaded(args, out_dir: Path) -> dict:
    """Evaluate a saved quantized model: its own config decides the method and bits."""
    device, _ = device_and_dtype(args)
    t = time.time()
    model, tokenizer, saved = load_quantized(args.load)
    timings = {"load": time.time() - t}
    saved_label(saved, args.load)
    cfg = saved["run"]
    for key in SAVED_BITS:
        if f"--{key}" in args.given and getattr(args, key) != cfg["quant"][key]:
            raise ConfigError(f"--{key} {getattr(args, key)} does not match the saved model's {cfg['quant'][key]} "
                              f"({args.load}); drop the flag, or quantize again")
    if tokenizer is None:
        raise ConfigError(f"{args.load} holds no tokenizer; save it again with main.py --save_dir")
    spec = get_spec(model)
    args.seqlen = min(args.seqlen, getattr(model.config, "max_position_embeddings", args.seqlen))
    print(f"loaded {args.load} ({cfg['method']} w{cfg['quant']['wbits']}a{cfg['quant']['abits']}) in {timings['load']:.1f} s; "
          f"eval {args.eval_ppl or 'none'} (windows {args.ppl_samples or 'all'}), device {device}")
    segments = {name: ppl_segments(name, tokenizer, args.seqlen, args.ppl_samples) for name in args.eval_ppl_list}
    result = {"model": cfg["model"], "method": cfg["method"], "seed": cfg["run"]["seed"], "loaded_from": str(args.load),
              "config": cfg, "eval": {k: args_value(v) for k, v in vars(args).items()},
              "ppl_fp": {}, "kl_fp": {}, "tasks_fp": {}, "timings": timings}
    if args.export is not None:
        result["exported"] = export_model(args, model, tokenizer, cfg)
    result["ppl"], _, result["tasks"], times = evaluate(model, spec, tokenizer, segments, args, device, cfg["method"])
    timings.update(times)
    result["peak_memory_mb"] = peak_memory_mb(device)
    result["versions"] = versions()
    write_json_atomic(out_dir / "results.json", result)
    print_summary(result, out_dir)
    return result


def export_model(args, model, tokenizer, run_config: dict) -> dict:
    """--export: write the model, and say on one line each what the export could not keep."""
    fmt, out = args.export[0], Path(args.export[1])
    info = export.export_compressed_tensors(model, tokenizer, out, run_config)
    for line in info["lost"]:
        print(f"warning: the {fmt} export does not keep {line}")
    print(f"exported {out} ({fmt}): {info['total_bytes'] / 2**20:.1f} MiB"
          + (f", {info['decoded_linears']} linears as decoded weights" if info["decoded_linears"] else ""))
    return {"format": fmt, "dir": str(out), **info}


def args_value(v):
    return str(v) if isinstance(v, Path) else sorted(v) if isinstance(v, set) else v


def run(args) -> dict:
    """Check every option and path, then run; a run refused or failing before its first finished
    layer leaves nothing behind."""
    validate_args(args)
    if args.export is not None:
        export.check_request(args.export[0], Path(args.export[1]))
    args.eval_ppl_list = [s for s in args.eval_ppl.split(",") if s]
    args.tasks_list = [s.strip() for s in args.tasks.split(",") if s.strip()]
    if args.load is not None:
        check_load_options(args)
        args.tasks_list = check_tasks(args.tasks_list)
        out_dir = args.output_dir or Path("results") / f"{args.load.name}-loaded"
        check_output_dir(out_dir, "--output_dir")
        with cleaned_up_on_failure(out_dir, args):
            return run_loaded(args, out_dir)
    if args.save_dir is not None:
        check_save_dir(args.save_dir)  # before the quantization it would otherwise waste
    quant, duq = build_configs(args)
    ea = build_eaquant(args)
    if ea.any and args.method in ("fp", "rtn"):
        raise ConfigError(f"EAQuant options build on DuQuant; use --method duquant (or eaquant), not {args.method}")
    mq, gptq = build_moequant(args)
    if args.export is not None:
        export.check_configs(args.method != "fp", duq, gptq)
    if args.method == "fp" and (gptq is not None or mq.any):
        raise ConfigError("GPTQ and MoEQuant options quantize; use --method rtn, duquant or eaquant, not fp")
    method = method_name(args, ea, mq, gptq)
    if args.method == "fp" and args.save_dir is not None:
        raise ConfigError("--save_dir writes a quantized model; --method fp has none (the checkpoint is the FP model)")
    if args.stream_dir is not None and not args.stream:
        raise ConfigError("--stream_dir only applies with --stream; add --stream or drop --stream_dir")
    out_dir = args.output_dir or Path("results") / f"{Path(args.model.rstrip('/')).name}-{method}-{quant.tag}"
    check_paths(args, quant, out_dir)
    with cleaned_up_on_failure(out_dir, args):
        return quantize_and_evaluate(args, method, quant, duq, ea, mq, gptq, out_dir)


def quantize_and_evaluate(args, method: str, quant: QuantConfig, duq: DuQuantConfig, ea: EAQuantConfig,
                          mq: MoEQuantConfig, gptq: GPTQConfig | None, out_dir: Path) -> dict:
    """Load the model, quantize it (unless --method fp), evaluate, write results.json."""
    device, dtype = device_and_dtype(args)
    seed_everything(args.seed)
    timings: dict[str, float] = {}
    t = time.time()
    model, tokenizer = load_model(args.model, dtype, stream=args.stream, spill_dir=args.stream_dir)
    spec = get_spec(model)
    timings["load"] = time.time() - t
    if args.export is not None:
        export.check_model(model, spec, quant.wbits, quant.w_sym)
    max_pos = getattr(model.config, "max_position_embeddings", args.seqlen)
    if args.seqlen > max_pos:
        print(f"notice: --seqlen {args.seqlen} exceeds the model's {max_pos} positions; using {max_pos}")
        args.seqlen = max_pos
    if (args.route_all_tokens or ea.any) and spec.router is None:
        option = "--route_all_tokens" if args.route_all_tokens else "EAQuant options (--eaquant and its components)"
        raise ConfigError(f"{option} require an MoE model, but {args.model} ({type(model).__name__}) has no MoE layers")
    if mq.any and spec.router is None:
        raise ConfigError(f"MoEQuant options (--moequant, --agq, --calib_dataset ebss) require an MoE model, "
                          f"but {args.model} ({type(model).__name__}) has no MoE layers")
    print(f"model {args.model} ({type(model).__name__}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params), "
          f"method {method} {quant.tag} (kv {quant.kv_bits}, router w{quant.router_wbits}a{quant.router_abits}), "
          f"calibration {args.nsamples} x {args.seqlen} from {args.calib_dataset}, "
          f"eval {args.eval_ppl or 'none'} (windows {args.ppl_samples or 'all'}), device {device}")

    segments = {name: ppl_segments(name, tokenizer, args.seqlen, args.ppl_samples) for name in args.eval_ppl_list}
    result = {"model": args.model, "method": method, "seed": args.seed,
              "config": {"run": {k: args_value(v) for k, v in vars(args).items()},
                         "quant": asdict(quant), "duquant": asdict(duq), "eaquant": asdict(ea),
                         "gptq": asdict(gptq) if gptq is not None else None, "moequant": asdict(mq)},
              "ppl": {}, "ppl_fp": {}, "kl_fp": {}, "tasks": {}, "tasks_fp": {}, "timings": timings}
    fp_states = FPStates(segments) if args.compare_fp and args.method != "fp" and segments else None
    if args.compare_fp and args.method != "fp":
        result["ppl_fp"], _, result["tasks_fp"], times = evaluate(model, spec, tokenizer, segments, args, device, "FP",
                                                                  keep=fp_states)
        timings.update({f"{k}_fp": v for k, v in times.items()})
    if args.method != "fp":
        t = time.time()
        if mq.ebss:
            calib, result["ebss"] = ebss_calibration(model, spec, tokenizer, args.model, args.nsamples, args.seqlen,
                                                     mq.ebss_tau, mq.ebss_width, args.seed, device, mq.ebss_cache_dir)
            e = result["ebss"]
            print(f"EBSS calibration ({'cached ' if e['cached'] else ''}{e['cache']}): expert-balance std "
                  f"{e['balance_std']:.4f}, mean NLL {e['mean_nll']:.3f}")
        else:
            calib = calibration_segments(args.calib_dataset, tokenizer, args.nsamples, args.seqlen, args.seed)
        extra = None
        if ea.calib_balance:
            cap = args.nsamples if ea.balance_max_extra is None else ea.balance_max_extra
            pool = calibration_segments(ea.balance_dataset, tokenizer, 2 * cap, args.seqlen, args.seed + 1)
            extra, result["calib_balance"] = balance_calibration(
                model, spec, calib, pool, getattr(model.config, spec.top_k_attr), ea.balance_ratio, cap, device)
            b = result["calib_balance"]
            print(f"calibration balance: {b['starved_before']} starved (layer, expert) pairs under {b['threshold']:.0f} "
                  f"tokens -> {b['starved_after']} after adding {b['added_sequences']} sequences"
                  + ("" if b["stop"] == "passed" else f" ({b['stop']})"))
        timings["calibration_data"] = time.time() - t
        profile_layer = plot_layer(args, model) if args.plots else None
        partial = checkpoint_dir(out_dir, result["config"], args.resume)
        report = quantize_model(model, spec, calib, quant, duq, extensions(ea, mq), device=device, seed=args.seed,
                                route_all=args.route_all_tokens, expert_extra_ids=extra, gptq=gptq,
                                profile_layer=profile_layer, checkpoint_dir=partial)
        if report.resumed_from:
            print(f"resumed: layers 0..{report.resumed_from - 1} restored from {partial}")
            result["resumed_from_layer"] = report.resumed_from
        timings["quantize"] = report.timings.pop("total")
        timings.update({f"quantize_{k}": v for k, v in report.timings.items()})
        result["layers"] = report.layers
        result["router"], result["experts"] = summarize(report.layers, getattr(model.config, spec.top_k_attr, None))
        profiles = [r.pop("channel_absmax") for r in report.layers if "channel_absmax" in r]
        if profiles:
            result["channel_absmax"] = {"layer": profile_layer, "sites": profiles[0]}
        result["expert_tokens"] = {str(r["layer"]): r["expert_tokens"] for r in report.layers if "expert_tokens" in r}
        if args.save_dir is not None:
            t = time.time()
            saved = save_quantized(model, tokenizer, args.save_dir,
                                   {"model": args.model, "method": method, **result["config"]})
            timings["save"] = time.time() - t
            result["saved"] = {"dir": str(args.save_dir), **saved}
            print(f"saved {args.save_dir}: quantized linears {saved['quantized_linears_bytes'] / 2**20:.1f} MiB = "
                  f"{saved['ratio']:.3f}x their bf16 size; directory {saved['total_bytes'] / 2**20:.1f} MiB")
        if args.export is not None:
            result["exported"] = export_model(args, model, tokenizer, {"model": args.model, "method": method,
                                                                        **result["config"]})
    result["ppl"], result["kl_fp"], result["tasks"], times = evaluate(model, spec, tokenizer, segments, args, device,
                                                                      args.method, against=fp_states)
    if fp_states is not None:
        fp_states.close()
    timings.update(times)
    result["peak_memory_mb"] = peak_memory_mb(device)
    result["versions"] = versions()
    write_json_atomic(out_dir / "results.json", result)
    if args.plots:
        for path in plot_run(result, out_dir):
            print(f"plot: {path}")
    if args.method != "fp":
        shutil.rmtree(out_dir / "partial", ignore_errors=True)
    print_summary(result, out_dir)
    return result


def disk_needs(args, quant: QuantConfig) -> dict[str, int]:
    """Lower bounds of the bytes the run writes per directory option, from the local checkpoint's
    size (none for a hub id or a tiny model): the packed model (--save_dir, and the layer
    checkpoints in --output_dir with the calibration activations) and the spilled layers (--stream_dir)."""
    try:
        path = Path(resolve_model_name(args.model))
    except ModelLoadError:
        return {}
    files = [f for f in path.iterdir() if f.suffix in (".safetensors", ".bin")] if path.is_dir() else []
    if not files:
        return {}
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    stored = {"bfloat16": 2, "float16": 2}.get(config.get("dtype") or config.get("torch_dtype"), 4)
    weights = sum(f.stat().st_size for f in files) / stored  # at 4 bytes when unknown: the smallest count
    compute = 4 if args.dtype in ("auto", "float32") else 8 if args.dtype == "float64" else 2
    packed = weights * min(quant.wbits, 16) / 8
    activations = args.nsamples * args.seqlen * config.get("hidden_size", 0) * compute
    # Decoder layers hold over half of a model's weights; the spill keeps them at the compute dtype.
    return {"save_dir": int(packed), "output_dir": int(packed + activations) if args.method != "fp" else 0,
            "stream_dir": int(weights * compute / 2)}


def check_paths(args, quant: QuantConfig, out_dir: Path) -> None:
    """Every directory the run writes, checked before any work (models/files.py: check_output_dir);
    temporaries a killed earlier save left next to --save_dir are removed."""
    needs = disk_needs(args, quant)
    check_output_dir(out_dir, "--output_dir", needs.get("output_dir", 0))
    if args.save_dir is not None:
        remove_stale_temporaries(args.save_dir)
        check_output_dir(args.save_dir, "--save_dir", needs.get("save_dir", 0))
    if args.stream:
        check_output_dir(args.stream_dir or Path(tempfile.gettempdir()), "--stream_dir", needs.get("stream_dir", 0))


class Interrupted(Exception):
    """Ctrl-C during a run; the message says what was kept and how to resume."""


def _layers_done(partial: Path) -> int:
    try:
        return finished_layers(partial)
    except (OSError, ValueError, KeyError):
        return 0


@contextmanager
def cleaned_up_on_failure(out_dir: Path, args):
    """On any failure, remove what the run wrote before its first finished layer: partial/ holding no
    layer, and the output directory if this run created it and left it empty. Ctrl-C becomes
    `Interrupted`, whose message says how to resume from the layers that were kept."""
    created = not out_dir.exists()
    partial = out_dir / "partial"
    try:
        yield
    except BaseException as e:
        done = _layers_done(partial)
        if done == 0:
            shutil.rmtree(partial, ignore_errors=True)
        if created and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        if not isinstance(e, KeyboardInterrupt):
            raise
        if done == 0:
            raise Interrupted("interrupted; nothing to resume from (no layer had been quantized)") from None
        again = "the same command" if args.resume else "the same command without --no-resume"
        raise Interrupted(f"interrupted; rerun {again} to resume from {partial} (layers done: {done})") from None


# Run options that change the quantized model; a partial run resumes only if they are all the same.
EVAL_ONLY = {"output_dir", "save_dir", "export", "load", "resume", "stream", "stream_dir", "eval_ppl", "eval_ppl_list",
             "ppl_samples", "eval_batch_size", "compare_fp", "tasks", "tasks_list", "limit", "plots", "plot_layer", "device", "given"}


def checkpoint_dir(out_dir: Path, config: dict, resume: bool) -> Path:
    """<out_dir>/partial, after checking that a partial run found there is this run's."""
    partial = out_dir / "partial"
    fingerprint = {**config, "run": {k: v for k, v in config["run"].items() if k not in EVAL_ONLY}}
    saved = partial / "run.json"
    if partial.exists() and not resume:
        shutil.rmtree(partial)
    try:
        found = json.loads(saved.read_text()) if saved.exists() else None
        check_readable(partial)
    except Exception as e:  # whatever a damaged file raises
        first = (str(e).strip().splitlines() or [""])[0][:120]
        raise ConfigError(f"{partial} holds a damaged checkpoint ({type(e).__name__}: {first}); "
                          "pass --no-resume to discard it and start over") from None
    if found is not None and found != json.loads(json.dumps(fingerprint)):
        raise ConfigError(f"{out_dir} holds a partial run of another configuration; pass --no-resume to discard it, "
                          "or choose another --output_dir")
    partial.mkdir(parents=True, exist_ok=True)
    write_json_atomic(saved, fingerprint)
    return partial


def print_summary(result: dict, out_dir: Path) -> None:
    names = list(result["ppl"])
    label = "FP" if result["method"] == "fp" else \
        f"{result['method']} W{result['config']['quant']['wbits']}A{result['config']['quant']['abits']}"
    if names:
        print("\n| perplexity | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
        if result["ppl_fp"]:
            print("| FP | " + " | ".join(f"{result['ppl_fp'][n]:.2f}" for n in names) + " |")
        print(f"| {label} | " + " | ".join(f"{result['ppl'][n]:.2f}" for n in names) + " |")
        kl = result.get("kl_fp") or {}
        if kl:
            print("| KL to FP, mean (p99) | " + " | ".join(f"{kl[n]['mean']:.4f} ({kl[n]['p99']:.3f})" for n in names) + " |")
            print("| top-1 agreement with FP | " + " | ".join(f"{100 * kl[n]['top1_agreement']:.2f}%" for n in names) + " |")
    if result["tasks"]:
        fp = result.get("tasks_fp") or {}
        print("\n| task | metric | " + ("FP | " if fp else "") + label + " |\n|---|---|" + "---|" * (2 if fp else 1))
        for task, metrics in result["tasks"].items():
            for key, value in metrics.items():
                metric, _, filt = key.partition(",")
                if not filt or metric.endswith("_stderr"):
                    continue
                shown = metric + ("" if filt == "none" else f" ({filt})")
                cells = ([fp.get(task, {}).get(key)] if fp else []) + [value]
                print(f"| {task} | {shown} | " + " | ".join(
                    "-" if v is None else f"{v:.2f}" if metric == "perplexity" else f"{100 * v:.2f}" for v in cells) + " |")
    quant_time = result["timings"].get("quantize")
    if quant_time is not None:
        print(f"quantization took {quant_time:.1f} s")
    print(f"results: {out_dir / 'results.json'}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not argv:
        print("no arguments: running the demo, i.e. python main.py " + " ".join(DEMO_ARGS))
        argv = DEMO_ARGS
    if hasattr(signal, "SIGXFSZ"):  # past the file-size limit a write then fails (WriteError) instead of killing us
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        run(parse_args(argv))
    except (ConfigError, ModelLoadError, DataError, QuantizedLoadError, PathError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a write that failed (models.files.WriteError) or another I/O failure
        print(f"error: {describe(e)}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(e, file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted before the run started; nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
