"""Our GPTQ W4A16 against llm-compressor's GPTQ: quantization time on the same calibration windows.

    python -m venv peer-venv && peer-venv/bin/pip install llmcompressor==0.14.0.1 torch==2.13.0
    python bench/peer.py --peer_python peer-venv/bin/python                 # demo-mixtral, 32 x 512, 3 rounds
    python bench/peer.py --peer_python peer-venv/bin/python --nsamples 128 --seqlen 2048 --rounds 2

llm-compressor 0.14.0.1 pins transformers 5.15-5.17, so it lives in its own virtual environment
(pip then installs transformers 5.17.0 there) and never in the toolkit's. This script writes the
calibration windows once (our c4 sampling) and runs each side in a fresh process, alternating
ours and the peer's for `--rounds` rounds, because on a shared machine timings drift by tens of
percent within minutes; the ratio uses each side's shortest round. Both sides quantize the same
linears with the same grid: 4-bit asymmetric, one scale and zero point per output channel, range
min/max with 0 included (our --swc 1.0), dampening 0.01 of mean diag(H), 128-column blocks, no
act-order; attention and expert projections are quantized, the router and the LM head stay in
full precision. Only the quantization call is timed (not loading the model or the windows), and
each side's perplexity on the same held-out windows is printed as a check that both quantized.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def ours(model_name: str, data: dict) -> dict:
    """quantize_model with GPTQ W4A16 on the windows in `data`; time and perplexity."""
    sys.path.insert(0, str(ROOT))
    from duquant.config import DuQuantConfig, GPTQConfig, QuantConfig
    from duquant.evaluate import perplexity
    from duquant.pipeline import quantize_model
    from models import get_spec, load_model

    model, _ = load_model(model_name)
    spec = get_spec(model)
    quant = QuantConfig(4, 16, 16, 16, 16, swc=1.0)
    t = time.time()
    quantize_model(model, spec, data["calib"], quant, DuQuantConfig.rtn(), seed=0, gptq=GPTQConfig())
    elapsed = time.time() - t
    return {"quantize_s": elapsed, "ppl": perplexity(model, spec, data["eval"], desc="ppl")}


def peer(model_dir: str, data: dict) -> dict:
    """llm-compressor's oneshot GPTQ with the same grid and windows (runs in the peer's venv)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    calib = data["calib"]
    dataset = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    weights = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="channel")
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head", "re:.*router.*", "re:.*\\.gate$"],
                          block_size=128, dampening_frac=0.01, actorder=None)
    t = time.time()
    oneshot(model=model, dataset=dataset, recipe=recipe, num_calibration_samples=len(calib),
            max_seq_length=calib.shape[1], shuffle_calibration_samples=False)
    elapsed = time.time() - t
    return {"quantize_s": elapsed, "ppl": _plain_ppl(model, data["eval"])}


@torch.no_grad()
def _plain_ppl(model, windows: torch.Tensor) -> float:
    """exp(mean next-token NLL) over the windows with plain transformers (the peer has no duquant)."""
    nll = [model(w[None], labels=w[None]).loss for w in windows]
    return torch.stack(nll).mean().exp().item()


def write_windows(args, path: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from duquant.data import calibration_segments, ppl_segments
    from models import load_model

    _, tok = load_model(args.model)
    torch.save({"calib": calibration_segments("c4", tok, args.nsamples, args.seqlen, 0),
                "eval": ppl_segments("wikitext2", tok, args.seqlen, args.eval_windows)}, path)


def run_side(python: str, side: str, args, data: Path) -> dict:
    cmd = [python, __file__, "--side", side, "--data", str(data), "--model", args.model]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def model_dir(name: str) -> str:
    """The demo models are checkpoints under models/zoo/; anything else is a local path or hub id."""
    zoo = ROOT / "models" / "zoo" / name
    return str(zoo) if zoo.is_dir() else name


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo-mixtral")
    p.add_argument("--peer_python", default="peer-venv/bin/python", help="python of the venv with llmcompressor")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval_windows", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--side", choices=["ours", "peer"], help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        data = torch.load(args.data, weights_only=True)
        result = ours(args.model, data) if args.side == "ours" else peer(model_dir(args.model), data)
        print(json.dumps(result))
        return
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "windows.pt"
        write_windows(args, data)
        rounds = [{"ours": run_side(sys.executable, "ours", args, data),
                   "peer": run_side(args.peer_python, "peer", args, data)} for _ in range(args.rounds)]
    best = {side: min(r[side]["quantize_s"] for r in rounds) for side in ("ours", "peer")}
    print(json.dumps(rounds, indent=2))
    print(f"\n| {args.model}, GPTQ W4A16, {args.nsamples} x {args.seqlen} calibration | ours (s) | llm-compressor (s) "
          f"| ratio |\n|---|---|---|---|\n| quantization, best of {args.rounds} | {best['ours']:.1f} | "
          f"{best['peer']:.1f} | {best['ours'] / best['peer']:.2f} |")


if __name__ == "__main__":
    main()
