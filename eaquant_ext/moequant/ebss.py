"""MoEQuant's expert-balanced self-sampling (EBSS): the model writes its own calibration set.

Text corpora route unevenly (a long tail of rarely used experts), and their perplexity under the
model is high. EBSS searches for sequences that the model finds likely AND that use its experts
evenly (MoEQuant Eq. 9-14). Each sequence starts from BOS and a first token sampled from the
model (different for every sequence, which is where the set's diversity comes from); then `width`
candidate sequences (beams) are kept. At each step every beam S of length l is extended by its
`width` most likely next tokens v, and the `width` candidates with the lowest
    score(S||v) = -(R_S + log P(v|S)) / (l + 1)  +  sigma(S) / tau            (Eq. 13)
survive (Eq. 14), where R_S is the beam's summed log-likelihood and sigma(S) its expert-balance
std (`duquant.diagnostics.expert_balance_std`, from the routing of S's own tokens). As in the paper the
balance of the candidate token itself is deferred (known only once it is fed), so sigma prunes
whole branches and the likelihood picks tokens. tau weighs balance against likelihood (1.2 is
the paper's best, R2); width 4 (R3). Everything runs once per step for all beams of `batch`
sequences together, with the KV cache reordered as beams are selected.

`ebss_calibration` caches the generated set on disk per (model, seed, nsamples, seqlen, tau, width).
"""
from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

import torch
from tqdm import tqdm

from duquant.diagnostics import expert_balance_std
from models.files import write_file_atomically
from models.routing import RoutingFunction
from models.spec import ModelSpec, config_value, moe_routings

log = logging.getLogger(__name__)
DEFAULT_CACHE_DIR = Path("results") / "ebss_cache"


def beam_balance_std(counts: torch.Tensor, tokens: int) -> torch.Tensor:
    """sigma(S) of every beam: counts [beams, L, E] over `tokens` tokens -> [beams] (Eq. 3-4)."""
    return (counts.double() / max(tokens, 1)).std(-1, unbiased=True).mean(-1)


class _RoutingCounter:
    """Router hooks adding each fed token's experts (as the family's routing function chooses them,
    `models/routing.py`) to its row's counts [rows, L, E]."""

    def __init__(self, routers: list[tuple[torch.nn.Module, RoutingFunction]], num_experts: int, rows: int, device):
        self.counts = torch.zeros(rows, len(routers), num_experts, dtype=torch.long, device=device)
        self.handles = [r.register_forward_hook(self._hook(i, routing)) for i, (r, routing) in enumerate(routers)]

    def _hook(self, layer: int, routing: RoutingFunction):
        def hook(module, args, out):
            chosen = routing.from_output(out).index
            index = chosen.reshape(self.counts.shape[0], -1, chosen.shape[-1])  # [rows, new tokens, k]
            flat = index.reshape(self.counts.shape[0], -1)
            self.counts[:, layer].scatter_add_(1, flat, torch.ones_like(flat))
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _step(model, ids: torch.Tensor, cache):
    out = model(input_ids=ids, past_key_values=cache, use_cache=True)
    return out.logits[:, -1].float().log_softmax(-1), out.past_key_values


@torch.no_grad()
def _start_beams(model, n_seq: int, width: int, first: torch.Tensor, banned: torch.Tensor, used_first: set[int],
                 gen: torch.Generator):
    """Each sequence's first generated token, sampled (distinct across sequences) and shared by its
    beams; returns (ids, cache, score_sum, alive)."""
    device = first.device
    logp, cache = _step(model, first, None)
    probs = logp[::width].exp().cpu().double()
    if banned.numel():
        probs[:, banned.cpu()] = 0
    tok = []
    for p in probs:
        q = p.clone()
        q[list(used_first)] = 0
        t = int(torch.multinomial(q if q.sum() > 0 else p, 1, generator=gen))
        used_first.add(t)
        tok.append(t)
    tok = torch.tensor(tok, device=device).repeat_interleave(width)
    score_sum = logp.gather(1, tok[:, None])[:, 0].double()  # R_S
    alive = torch.zeros(n_seq, width, dtype=torch.bool, device=device)
    alive[:, 0] = True  # the beams of a sequence are copies until the first expansion
    return torch.cat([first, tok[:, None]], 1), cache, score_sum, alive


def _expand(model, beams, counter, n_seq: int, width: int, tau: float, banned: torch.Tensor):
    """One step of the beam search: every beam's `width` likeliest next tokens, scored by mean NLL +
    balance std / tau; the best `width` of each sequence's width^2 candidates survive."""
    ids, cache, score_sum, alive = beams
    device = ids.device
    logp, cache = _step(model, ids[:, -1:], cache)
    if banned.numel():
        logp[:, banned] = -float("inf")
    n_fed, n_scored = ids.shape[1], ids.shape[1] - 1
    sigma = beam_balance_std(counter.counts, n_fed).view(n_seq, width)
    top_lp, top_tok = logp.topk(width, dim=-1)  # a beam's best candidates are its likeliest tokens
    total = score_sum.view(n_seq, width, 1) + top_lp.view(n_seq, width, width).double()
    score = -total / (n_scored + 1) + (sigma / tau)[..., None]
    score = score.masked_fill(~alive[..., None], float("inf")).view(n_seq, -1)
    pick = score.topk(width, dim=-1, largest=False).indices  # [n_seq, width] over width*width
    rows_idx = (pick // width + torch.arange(n_seq, device=device)[:, None] * width).reshape(-1)
    new_tok = top_tok.view(n_seq, width * width).gather(1, pick).reshape(-1)
    cache.reorder_cache(rows_idx)
    counter.counts = counter.counts[rows_idx]
    return (torch.cat([ids[rows_idx], new_tok[:, None]], 1), cache,
            total.view(n_seq, -1).gather(1, pick).reshape(-1), torch.isfinite(score.gather(1, pick)))


def ebss_generate(model, spec: ModelSpec, nsamples: int, seqlen: int, tau: float = 1.2, width: int = 4,
                  seed: int = 0, bos_id: int | None = None, banned_ids: tuple[int, ...] = (), batch: int = 8,
                  progress: bool = True) -> tuple[torch.Tensor, dict]:
    """`nsamples` sequences of `seqlen` tokens (the first is BOS, or a random token without one)
    generated by `model` where it is (move it to the device first). Returns ids [nsamples, seqlen]
    and a report: per-sequence mean NLL and balance std, and the balance std of the whole set."""
    if seqlen < 2 or nsamples < 1 or width < 1 or tau <= 0:
        raise ValueError("ebss_generate needs seqlen >= 2, nsamples >= 1, width >= 1 and tau > 0")
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    vocab = model.get_output_embeddings().weight.shape[0]
    routers = moe_routings(model, spec)
    num_experts = config_value(model.config, spec.num_experts_attr)
    top_k = config_value(model.config, spec.top_k_attr)
    banned = torch.tensor(sorted(set(banned_ids) & set(range(vocab))), dtype=torch.long, device=device)
    used_first: set[int] = set()
    seqs, nlls, stds, all_counts = [], [], [], []
    for b0 in tqdm(range(0, nsamples, batch), desc="ebss", disable=not progress):
        n_seq = min(batch, nsamples - b0)
        counter = _RoutingCounter(routers, num_experts, n_seq * width, device)
        try:
            if bos_id is not None:
                first = torch.full((n_seq * width, 1), bos_id, dtype=torch.long)
            else:
                first = torch.randint(vocab, (n_seq, 1), generator=gen).repeat_interleave(width, 0)
            beams = _start_beams(model, n_seq, width, first.to(device), banned, used_first, gen)
            for _ in range(seqlen - beams[0].shape[1]):
                beams = _expand(model, beams, counter, n_seq, width, tau, banned)
            ids, cache, score_sum, alive = beams
            _step(model, ids[:, -1:], cache)  # route the last tokens too, so sigma covers the whole sequence
            n_scored = ids.shape[1] - 1
            sigma = beam_balance_std(counter.counts, ids.shape[1]).view(n_seq, width)
            final = (-score_sum.view(n_seq, width) / n_scored + sigma / tau).masked_fill(~alive, float("inf"))
            best = final.argmin(-1) + torch.arange(n_seq, device=device) * width
        finally:
            counter.remove()
        seqs.append(ids[best].cpu())
        nlls += (-score_sum[best] / n_scored).tolist()
        stds += sigma.view(-1)[best].tolist()
        all_counts.append(counter.counts[best].cpu())
    counts = torch.cat(all_counts)
    report = {"nsamples": nsamples, "seqlen": seqlen, "tau": tau, "width": width, "seed": seed,
              "balance_std": expert_balance_std(counts, top_k),
              "mean_sequence_balance_std": sum(stds) / len(stds), "mean_nll": sum(nlls) / len(nlls),
              "expert_tokens": counts.sum(0).tolist()}
    return torch.cat(seqs), report


def model_fingerprint(model, name: str) -> str:
    """Name-safe id of a model: its name plus a hash of its config and a few weights."""
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    blob = model.config.to_json_string() + f"{emb.double().sum().item():.10e}{head.double().abs().sum().item():.10e}"
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(name.rstrip("/")).name) or "model"
    return f"{stem}-{hashlib.sha1(blob.encode()).hexdigest()[:10]}"


def cache_path(cache_dir: Path, fingerprint: str, seed: int, nsamples: int, seqlen: int, tau: float, width: int) -> Path:
    return Path(cache_dir) / f"{fingerprint}-seed{seed}-n{nsamples}-len{seqlen}-tau{tau:g}-w{width}.pt"


def ebss_calibration(model, spec: ModelSpec, tokenizer, name: str, nsamples: int, seqlen: int, tau: float = 1.2,
                     width: int = 4, seed: int = 0, device="cpu", cache_dir: str | Path | None = None,
                     batch: int = 8) -> tuple[torch.Tensor, dict]:
    """EBSS calibration ids [nsamples, seqlen], from the cache when this exact set was made before.

    The whole model moves to `device` for generation (and back to where it was afterwards).
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
    path = cache_path(cache_dir, model_fingerprint(model, name), seed, nsamples, seqlen, tau, width)
    if path.exists():
        saved = torch.load(path, map_location="cpu")
        log.info("EBSS: loaded %s", path)
        return saved["ids"], {**saved["report"], "cache": str(path), "cached": True}
    home = next(model.parameters()).device
    model.to(device)
    try:
        banned = tuple(tokenizer.all_special_ids) if tokenizer is not None else ()
        bos = tokenizer.bos_token_id if tokenizer is not None else None
        bos = bos if bos is not None else getattr(model.config, "bos_token_id", None)
        ids, report = ebss_generate(model, spec, nsamples, seqlen, tau, width, seed, bos, banned, batch)
    finally:
        model.to(home)
    write_file_atomically(path, lambda tmp: torch.save({"ids": ids, "report": report}, tmp))
    return ids, {**report, "cache": str(path), "cached": False}
