"""Loaders and document adapters for the local lm-eval task definitions in this directory.

The bundled files (`data/tasks/*.jsonl[.gz]`) come from llm-foundry and keep its field names and
prompt text. Each adapter here turns a bundled row back into the fields lm-eval's own task YAML reads
(as far as the bundled fields allow), so every YAML next to this file keeps lm-eval's
`doc_to_text` / `doc_to_choice` / `doc_to_target` and its scores stay comparable with lm-eval's.
A YAML names its adapter in `dataset_kwargs: {adapter: ...}`.

Files are found relative to this module, so the definitions work from any working directory, and
they are read into memory with `datasets.Dataset.from_list`: nothing touches a hub or the datasets cache.
"""
from __future__ import annotations

import gzip
import json
import re
from functools import lru_cache
from pathlib import Path

import datasets

DATA_DIR = Path(__file__).resolve().parent.parent  # data/tasks
LETTERS = ["A", "B", "C", "D", "E"]


@lru_cache(maxsize=None)
def _rows(file: str, adapter: str | None) -> tuple[dict, ...]:
    """Parsed and adapted once per process: the 57 MMLU subject tasks all read the same file, and
    lm-eval re-reads a task's documents several times (adapting here, not in process_docs, keeps that cheap)."""
    path = DATA_DIR / file
    opener = gzip.open if path.suffix == ".gz" else open
    convert = ADAPTERS[adapter] if adapter else dict
    with opener(path, "rt", encoding="utf-8") as f:
        return tuple(convert(json.loads(line)) for line in f if line.strip())


def load(file: str, split: str = "test", adapter: str | None = None, fewshot_file: str | None = None,
         subject: str | None = None, **_metadata):
    """lm-eval's `custom_dataset` hook (called with the task's metadata as well, hence **_metadata)."""
    def dataset(name):
        return datasets.Dataset.from_list([r for r in _rows(name, adapter) if subject is None or r["subject"] == subject])

    splits = {split: dataset(file)}
    if fewshot_file:
        splits["dev"] = dataset(fewshot_file)
    return datasets.DatasetDict(splits)


def _strip_prefix(text: str, prefix: str) -> str:
    return text[len(prefix):] if text.startswith(prefix) else text


def _lettered(choices: list[str], gold: int) -> dict:
    labels = LETTERS[: len(choices)]
    return {"choices": {"text": list(choices), "label": labels}, "answerKey": labels[gold]}


def arc(d: dict) -> dict:
    """llm-foundry's query is "Question: <q>" (no "Answer:"); lm-eval reads question / choices / answerKey."""
    return {"question": _strip_prefix(d["query"], "Question: "), **_lettered(d["choices"], d["gold"])}


def openbookqa(d: dict) -> dict:
    return {"question_stem": d["query"], **_lettered(d["choices"], d["gold"])}


def boolq(d: dict) -> dict:
    """"Passage: <passage>\nQuestion: <question>?" back to passage / question (lm-eval adds the "?")."""
    # rpartition: one passage itself contains "\nQuestion: "; the real question is the last one.
    passage, _, question = d["query"].rpartition("\nQuestion: ")
    return {"passage": _strip_prefix(passage, "Passage: "), "question": question.removesuffix("?"), "label": d["gold"]}


def piqa(d: dict) -> dict:
    """"Question: <goal>\n" / choices / gold back to goal / sol1 / sol2 / label."""
    goal = _strip_prefix(d["query"], "Question: ").removesuffix("\n")
    return {"goal": goal, "sol1": d["choices"][0], "sol2": d["choices"][1], "label": d["gold"]}


def _hellaswag_clean(text: str) -> str:
    """The clean-up lm-eval applies (WikiHow tags out, double spaces collapsed); the bundled text is mostly clean already."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _capitalize_ctx_b(ctx: str) -> str:
    """lm-eval capitalises ctx_b (`ctx_a + " " + ctx_b.capitalize()`), but the bundled ctx joined the two
    uncapitalised and lost the boundary. ctx_b is the unfinished last sentence, so a final fragment after
    ". " that starts in lower case is taken to be ctx_b. A heuristic, exact for the usual ActivityNet
    items ("... on a roof. he" -> "... on a roof. He")."""
    label, sep, body = ctx.partition(": ")
    head, dot, tail = body.rpartition(". ")
    if not sep or not head or not tail[:1].islower():
        return ctx
    return label + sep + head + dot + tail.capitalize()


def hellaswag(d: dict) -> dict:
    """lm-eval's process_docs output: query / choices / gold next to the original fields."""
    return {**d, "query": _hellaswag_clean(_capitalize_ctx_b(d["ctx"])),
            "choices": [_hellaswag_clean(e) for e in d["endings"]], "gold": int(d["label"])}


def lambada(d: dict) -> dict:
    """lm-eval splits `text` on its last space; llm-foundry split it the same way into context / continuation."""
    return {"text": d["context"] + " " + d["continuation"]}


_MATHQA = re.compile(r"Question: (?P<problem>.*)\nA\. (?P<a>.*)\nB\. (?P<b>.*)\nC\. (?P<c>.*)\nD\. (?P<d>.*)\nAnswer: ", re.S)


def mathqa(d: dict) -> dict:
    """lm-eval scores the option texts after "Question: <problem>\nAnswer:", not llm-foundry's letters."""
    m = _MATHQA.fullmatch(d["query"])
    if m is None:
        raise ValueError(f"unexpected MathQA query layout: {d['query'][:80]!r}")
    return {"Problem": m["problem"], "choices": [m["a"], m["b"], m["c"], m["d"]], "gold": d["gold"]}


def gsm8k(d: dict) -> dict:
    """lm-eval's target is the full HF answer, "<reasoning>\n#### <number>"."""
    return {"question": d["context"], "answer": d["chain_of_thought"] + "\n#### " + d["answer"]}


def copa(d: dict) -> dict:
    """"<premise without its period>, because|therefore" -> lm-eval's "<premise> because|therefore"; lm-eval's
    choices carry a leading space and a lower-cased first letter (so the scored text follows two spaces)."""
    premise, _, connector = d["query"].rpartition(" ")
    return {"text": premise.removesuffix(",") + " " + connector,
            "choices": [" " + c[:1].lower() + c[1:] for c in d["choices"]], "label": d["gold"]}


ADAPTERS = {f.__name__: f for f in (arc, openbookqa, boolq, piqa, hellaswag, lambada, mathqa, gsm8k, copa)}
