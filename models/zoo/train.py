"""Train the zoo: small MoE language models on the bundled Gutenberg corpus.

No pretrained MoE checkpoint can be downloaded here, so the project trains its own and ships them
as ordinary Hugging Face checkpoints. Run in the background; it resumes from its last checkpoint:

    mkdir -p runs/zoo && nohup python -m models.zoo.train --arch mixtral > runs/zoo/mixtral.log 2>&1 &
    python -m models.zoo.train --arch mixtral --export runs/zoo/demo-mixtral

`--export` never replaces an existing model (the shipped ones under models/zoo/ included) unless
given `--force`, and refuses to export a run that has not trained a step. `--smoke` runs keep their
state under runs/zoo/smoke/<arch>, away from the real runs.

Choices real LLMs share and that let outliers and attention sinks form: a BOS token at the start
of every training sequence, no weight decay on norm gains, a per-layer balancing loss (the pooled
Mixtral loss was seen to leave nearly dead experts in some layers).
"""
from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from models.files import describe, write_dir_atomically, write_file_atomically
from models.registry import get_spec
from models.spec import moe_routers

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "data" / "train_corpus" / "gutenberg_en.jsonl.gz"
RUNS = Path(os.environ.get("ZOO_RUNS", REPO / "runs" / "zoo"))
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"

_COMMON = dict(
    vocab_size=8192, hidden_size=256, num_hidden_layers=6, num_attention_heads=8,
    max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
    bos_token_id=0, eos_token_id=1, pad_token_id=2,
)
ARCHS = {
    "mixtral": dict(
        model_type="mixtral", num_key_value_heads=4, intermediate_size=384,
        num_local_experts=8, num_experts_per_tok=2, **_COMMON,
    ),
    "olmoe": dict(
        model_type="olmoe", num_key_value_heads=8, intermediate_size=96,
        num_experts=32, num_experts_per_tok=4, norm_topk_prob=False, **_COMMON,
    ),
    "deepseek": dict(
        model_type="deepseek", num_key_value_heads=8, intermediate_size=768, moe_intermediate_size=96,
        n_routed_experts=32, num_experts_per_tok=4, n_shared_experts=2, first_k_dense_replace=1,
        norm_topk_prob=False, **_COMMON,
    ),
    # Dense models for comparisons with the published DuQuant code on Llama. Head dim 128 and widths
    # that are multiples of 128, as in Llama-2-7B: that code's rotation blocks and its Q/K Hadamard
    # are 128 wide and assume both.
    "llama-s": dict(
        _COMMON, model_type="llama", num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=640,
    ),
    "llama-m": dict(
        _COMMON, model_type="llama", num_hidden_layers=4, hidden_size=384, num_attention_heads=3,
        num_key_value_heads=3, intermediate_size=1024,
    ),
}


SHIPPED_TOKENIZER = Path(__file__).resolve().parent / "tokenizer"
SMOKE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=64, moe_intermediate_size=32, max_position_embeddings=256)


def read_books(split: str, limit: int | None = None) -> list[str]:
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        books = [r["text"] for r in map(json.loads, f) if r["split"] == split]
    return books[:limit]


def build_tokenizer(out_dir: Path, vocab_size: int = 8192):
    """Byte-level BPE trained on the training books; every encoding starts with BOS, as Llama's does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if (out_dir / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(out_dir)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(read_books("train"), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=2048
    )
    write_dir_atomically(out_dir, fast.save_pretrained)
    return fast


def token_stream(tokenizer, split: str, cache: Path, limit: int | None = None) -> np.ndarray:
    """All books of a split as one uint16 stream, books separated by EOS (BOS is added per window)."""
    if cache.exists():
        return np.load(cache)
    ids = tokenizer(read_books(split, limit), add_special_tokens=False, verbose=False)["input_ids"]
    stream = np.concatenate([np.array(x + [tokenizer.eos_token_id], dtype=np.uint16) for x in ids])
    write_file_atomically(cache, lambda tmp: np.save(tmp, stream))
    return stream


def batch_at(stream: np.ndarray, step: int, seed: int, batch: int, seqlen: int, bos: int) -> torch.Tensor:
    """The batch of one step depends only on (seed, step), so a resumed run sees the same data."""
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(stream) - seqlen, size=batch)
    x = np.stack([stream[s : s + seqlen - 1] for s in starts]).astype(np.int64)
    return torch.cat([torch.full((batch, 1), bos), torch.from_numpy(x)], dim=1)


def balance_loss(router_logits: list[torch.Tensor], top_k: int) -> torch.Tensor:
    """Switch-style loss E * sum_i f_i P_i computed per layer and averaged, so every layer is balanced."""
    losses = []
    for logits in router_logits:
        probs = logits.float().softmax(-1)
        n_exp = probs.shape[-1]
        chosen = F.one_hot(probs.topk(top_k, dim=-1).indices, n_exp).sum(1).float()
        losses.append(n_exp * (chosen.mean(0) / top_k * probs.mean(0)).sum())
    return torch.stack(losses).mean()


@torch.no_grad()
def evaluate(model, stream, args, bos: int, n_windows: int = 24) -> float:
    model.eval()
    nll = []
    for i in range(0, n_windows, args.batch):
        x = batch_at(stream, 10**6 + i, 0, args.batch, args.seqlen, bos).to(args.device)
        logits = model(input_ids=x).logits
        nll.append(F.cross_entropy(logits[:, 1:-1].flatten(0, 1), x[:, 2:].flatten()).item())
    model.train()
    return math.exp(float(np.mean(nll)))


def lr_at(step: int, args, elapsed: float = 0.0) -> float:
    """Warmup, then cosine to 10%; under --time_limit the cosine follows whichever of steps or time
    runs out first, so a run stopped by the clock still ends annealed."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.max_steps - args.warmup)
    if args.time_limit:
        progress = max(progress, elapsed / args.time_limit)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def hardware(device: str) -> str:
    if device.startswith("cuda"):
        return f"1 {torch.cuda.get_device_name(device)} GPU"
    return f"{torch.get_num_threads()} CPU threads"


def save_checkpoint(path: Path, model, opt, step: int, history: list, elapsed: float, where: str) -> None:
    write_file_atomically(path, lambda tmp: torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "history": history,
         "elapsed": elapsed, "hardware": where}, tmp))


def export(model, tokenizer, out: Path, meta: dict) -> None:
    """Write an ordinary HF checkpoint in bf16 (atomically: a half-written export never loads)."""
    def fill(tmp: Path) -> None:
        model.to(torch.bfloat16).save_pretrained(tmp, max_shard_size="15MB")
        tokenizer.save_pretrained(tmp)
        (tmp / "training.json").write_text(json.dumps(meta, indent=2))

    write_dir_atomically(out, fill)


def warm_start(model, export_dir: Path) -> tuple[int, list, float]:
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32)
    try:
        model.load_state_dict(exported.state_dict())
    except RuntimeError as e:
        raise SystemExit(f"--warm_start {export_dir}: weights do not match --arch: {str(e).splitlines()[1:2]}")
    meta = json.loads((export_dir / "training.json").read_text())
    history = meta["history"] + [{"step": meta["steps"], "warm_start": export_dir.name,
                                  "prior_train_seconds": meta["train_seconds"] or None}]
    return meta["steps"], history, meta["train_seconds"]


def fail(message: str) -> None:
    """One `error:` line and exit status 2, as main.py does for bad input."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def check_export_target(out: Path, force: bool, step: int, run_dir: Path) -> None:
    """An export replaces an exported model only with --force, never another directory, and is
    never of an untrained (step 0) model."""
    if step == 0:
        fail(f"no training state in {run_dir} (step 0): the export would be an untrained model; train first "
             "(same --arch and --run_dir), or pass --warm_start DIR")
    if out.exists() and not out.is_dir():
        fail(f"--export {out} is a file; choose a new directory")
    if out.is_dir() and any(out.iterdir()):
        if not (out / "config.json").exists():
            fail(f"--export {out} exists and is not an exported model; choose a new directory")
        if not force:
            fail(f"--export {out} already holds a model (shipped models are replaced only on purpose, and their "
                 "cards are lost); export to a new directory, or pass --force to replace it")


def build_model(arch: str, seed: int, smoke: bool = False):
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = {**ARCHS[arch], **(SMOKE if smoke else {})}
    if kw["model_type"] == "deepseek":
        import models.deepseek_moe  # noqa: F401  (registers our DeepSeek-MoE classes with the Auto API)

    config = AutoConfig.for_model(kw.pop("model_type"), **kw)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=sorted(ARCHS), required=True)
    p.add_argument("--run_dir", type=Path, default=None, help=f"training state (default {RUNS}/<arch>)")
    p.add_argument("--max_steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--warmup", type=int, default=150)
    p.add_argument("--weight_decay", type=float, default=0.1)
    p.add_argument("--aux_coef", type=float, default=0.01)
    p.add_argument("--save_every", type=int, default=100)
    p.add_argument("--eval_every", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--time_limit", type=float, default=0.0,
                   help="stop after this many seconds of training (0 = none); the schedule anneals by then")
    p.add_argument("--export", type=Path, default=None, help="write the current checkpoint as a HF model and exit")
    p.add_argument("--warm_start", type=Path, default=None,
                   help="when no checkpoint exists: start from an exported zoo model's weights and step "
                        "(fresh optimizer state), e.g. after the training state was lost")
    p.add_argument("--force", action="store_true", help="let --export replace an existing exported model")
    p.add_argument("--smoke", action="store_true",
                   help=f"tiny model, shipped tokenizer, two books: a seconds-long check (default --run_dir {RUNS}/smoke/<arch>)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run_dir = args.run_dir or (RUNS / "smoke" / args.arch if args.smoke else RUNS / args.arch)
    if args.device.startswith("cuda"):
        torch.set_float32_matmul_precision("high")
    tokenizer = build_tokenizer(SHIPPED_TOKENIZER)
    model = build_model(args.arch, args.seed, args.smoke).to(args.device)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95),
    )
    ckpt_path, step, history, elapsed = run_dir / "checkpoint.pt", 0, [], 0.0
    where = hardware(args.device)
    if ckpt_path.exists():
        state = torch.load(ckpt_path, weights_only=False, map_location=args.device)
        try:
            model.load_state_dict(state["model"])
        except RuntimeError:
            fail(f"{ckpt_path} is a checkpoint of another model (--smoke or not, --arch); choose another --run_dir")
        opt.load_state_dict(state["opt"])
        step, history, elapsed = state["step"], state["history"], state.get("elapsed", 0.0)
        where = state.get("hardware", where)
        print(f"resumed {args.arch} from step {step}")
    elif args.warm_start:
        step, history, elapsed = warm_start(model, args.warm_start)
        print(f"warm-started {args.arch} from {args.warm_start} at step {step} (fresh optimizer state)")
    if args.export:
        check_export_target(args.export, args.force, step, run_dir)
        meta = {"arch": args.arch, "steps": step, "tokens": step * args.batch * args.seqlen,
                "train_seconds": elapsed, "hardware": where, "history": history,
                "args": {k: str(v) for k, v in vars(args).items() if k not in ("export", "run_dir", "force")}}
        export(model, tokenizer, args.export, meta)
        print(f"exported step {step} to {args.export}")
        return

    run_dir.mkdir(parents=True, exist_ok=True)
    data_dir, limit = (run_dir, 2) if args.smoke else (RUNS, None)
    train = token_stream(tokenizer, "train", data_dir / "train_tokens.npy", limit)
    val = token_stream(tokenizer, "validation", data_dir / "val_tokens.npy", limit)
    captured: list[torch.Tensor] = []
    routers = moe_routers(model, get_spec(model))
    for r in routers:
        r.register_forward_hook(lambda mod, inp, out: captured.append(out[0]))
    top_k = routers[0].top_k if routers else 0
    bos = tokenizer.bos_token_id
    print(f"{args.arch}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
          f"{len(train) / 1e6:.1f}M train tokens, {len(val) / 1e6:.2f}M val tokens")
    model.train()
    bar = tqdm(range(step, args.max_steps), initial=step, total=args.max_steps, desc=args.arch)
    t_last = time.time()
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args, elapsed)
        x = batch_at(train, step, args.seed, args.batch, args.seqlen, bos).to(args.device)
        captured.clear()
        logits = model(input_ids=x).logits
        lm = F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
        aux = balance_loss(captured, top_k) if routers else torch.zeros((), device=lm.device)
        (lm + args.aux_coef * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        now = time.time()
        bar.set_postfix(loss=f"{lm.item():.3f}", aux=f"{aux.item():.3f}", tok_s=f"{x.numel() / (now - t_last):.0f}")
        elapsed += now - t_last
        t_last = now
        done = step + 1
        last = done == args.max_steps or (args.time_limit and elapsed >= args.time_limit)
        if done % args.eval_every == 0 or last:
            history.append({"step": done, "train_loss": lm.item(), "val_ppl": evaluate(model, val, args, bos)})
            print(json.dumps(history[-1]), flush=True)
        if done % args.save_every == 0 or last:
            save_checkpoint(ckpt_path, model, opt, done, history, elapsed, where)
        if last:
            break


if __name__ == "__main__":
    try:
        main()
    except OSError as e:  # a write that failed: full disk, file-size limit (models.files.WriteError)
        fail(describe(e))
