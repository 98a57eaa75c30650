"""Bundled text: perplexity sets built as GPTQ/DuQuant build them, and seeded calibration samplers.

Everything reads `data/` in the repo (see data/README_shared.md); nothing comes from a hub.
WikiText-2 train does not exist here, so the default calibration text is C4 train.
"""
from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import torch

from models.lazy import return_freed_memory

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
FILES = {
    "wikitext2": DATA_DIR / "wikitext2" / "test.jsonl",
    "c4_validation": DATA_DIR / "c4" / "validation.jsonl.gz",
    "c4_train": DATA_DIR / "c4" / "train.jsonl.gz",
    "gutenberg": DATA_DIR / "train_corpus" / "gutenberg_en.jsonl.gz",
}
PPL_DATASETS = ("wikitext2", "c4", "gutenberg")
CALIB_DATASETS = ("c4", "gutenberg")
C4_PPL_DOCS, C4_PPL_SEGMENTS = 1100, 256


class DataError(RuntimeError):
    """Missing or too-small data; the message is one line that names the fix."""


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        raise DataError(f"data file {path} is missing; restore the repository's data/ folder (git checkout -- data)")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def ppl_text(name: str) -> str:
    """WikiText-2 test joined with "\\n\\n" (GPTQ); C4 validation's first 1,100 docs joined with " ";
    the Gutenberg books held out from zoo training, joined with "\\n\\n"."""
    if name == "gutenberg":
        return "\n\n".join(r["text"] for r in read_jsonl(FILES["gutenberg"]) if r["split"] == "validation")
    if name == "wikitext2":
        return "\n\n".join(r["text"] for r in read_jsonl(FILES["wikitext2"]))
    if name == "c4":
        return " ".join(r["text"] for r in read_jsonl(FILES["c4_validation"])[:C4_PPL_DOCS])
    raise DataError(f"unknown perplexity dataset {name!r}; choose from {', '.join(PPL_DATASETS)}")


def _leading_tokens(tokenizer, text: str, count: int | None, margin: int = 64) -> torch.Tensor:
    """The first `count` tokens of `text` (all of them for None), tokenizing only a prefix.

    Tokenizing a whole test set for a few windows costs seconds and hundreds of MB (the tokenizer
    keeps offsets and token strings beside the ids, ~0.5 KB per token at its peak). Tokens of a
    prefix equal the full text's except near the cut (a word split by it), so the prefix grows
    until it yields `margin` tokens beyond the `count` kept: it starts at 4 characters per token
    and is rescaled by the ratio each try measured.
    """
    chars = len(text) if count is None else 4 * (count + margin)
    while True:
        ids = tokenizer(text[:chars], return_tensors="pt", return_attention_mask=False, verbose=False).input_ids[0]
        return_freed_memory()
        if chars >= len(text):
            return ids if count is None else ids[:count]
        if ids.numel() >= count + margin:
            return ids[:count]
        chars = int(chars * 1.25 * (count + margin) / max(ids.numel(), 1))


def ppl_segments(name: str, tokenizer, seqlen: int, max_segments: int | None = None) -> torch.Tensor:
    """Non-overlapping seqlen windows [n, seqlen]; C4 keeps at most 256 (GPTQ), fewer if the text is short."""
    cap = C4_PPL_SEGMENTS if name == "c4" else None
    if max_segments is not None:
        cap = max_segments if cap is None else min(cap, max_segments)
    ids = _leading_tokens(tokenizer, ppl_text(name), None if cap is None else cap * seqlen)
    n = ids.numel() // seqlen
    if cap is not None:
        n = min(n, cap)
    if n == 0:
        raise DataError(f"{name} has {ids.numel()} tokens, fewer than one window of seqlen {seqlen}; lower --seqlen")
    return ids[: n * seqlen].view(n, seqlen)


def _documents(name: str) -> list[str]:
    if name == "c4":
        return [r["text"] for r in read_jsonl(FILES["c4_train"])]
    if name == "gutenberg":
        return [r["text"] for r in read_jsonl(FILES["gutenberg"]) if r["split"] == "train"]
    raise DataError(f"unknown calibration dataset {name!r}; choose from {', '.join(CALIB_DATASETS)}")


# Requests up to this many tokens fit every bundled source many times over (C4 train alone holds
# 596k tokens in documents longer than 256); above it the source is measured before sampling.
SMALL_REQUEST = 32768


def _encode_all(tokenizer, docs: list[str], chunk: int = 256) -> dict[int, torch.Tensor]:
    """Every document's token ids, tokenized a chunk of documents at a time and without attention
    masks: the Python lists of a whole source at once (ids and masks) cost ~100 MB for C4 train."""
    out: dict[int, torch.Tensor] = {}
    for s in range(0, len(docs), chunk):
        ids = tokenizer(docs[s : s + chunk], return_attention_mask=False, verbose=False)["input_ids"]
        out.update((s + j, torch.tensor(x)) for j, x in enumerate(ids))
    return out


def calibration_segments(name: str, tokenizer, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """nsamples random seqlen windows [nsamples, seqlen], seeded.

    C4 follows GPTQ: pick a random document, then a random window inside it; documents shorter than
    the window are redrawn. Gutenberg books are long, so each draw is a random window of a random book.
    Windows may overlap; a source whose usable text would make every token repeat more than twice
    is refused.
    """
    rng = random.Random(seed)
    docs = _documents(name)
    if name == "gutenberg":
        docs = rng.sample(docs, k=min(len(docs), max(4, nsamples // 8)))
    encoded: dict[int, torch.Tensor] = {}
    if nsamples * seqlen > SMALL_REQUEST:
        encoded = _encode_all(tokenizer, docs)
        usable = sum(ids.numel() for ids in encoded.values() if ids.numel() > seqlen)
        if usable < nsamples * seqlen // 2:
            raise DataError(f"{name} is too small for {nsamples} x {seqlen} calibration tokens: documents longer than "
                            f"seqlen hold {usable} tokens, so windows would repeat each token more than twice; "
                            "lower --nsamples or --seqlen, or use --calib_dataset gutenberg")
    out, tries = [], 0
    while len(out) < nsamples:
        tries += 1
        if tries > 50 * nsamples + 1000:
            raise DataError(
                f"{name}: too few documents longer than seqlen {seqlen} for {nsamples} samples; lower --seqlen or --nsamples"
            )
        i = rng.randrange(len(docs))
        if i not in encoded:
            encoded[i] = torch.tensor(tokenizer(docs[i], return_attention_mask=False, verbose=False)["input_ids"])
        ids = encoded[i]
        if ids.numel() <= seqlen:
            continue
        start = rng.randrange(ids.numel() - seqlen)
        out.append(ids[start : start + seqlen])
    return torch.stack(out)
