"""Zero-shot tasks through lm-eval on the bundled data: exact scores on a tiny model, offline, and one-line errors."""
import json
import math
import socket

import pytest
import torch

import main
from duquant.zeroshot import TASK_DIR, TASKS, evaluate_tasks, task_manager
from models.tiny import tiny_model

LIMIT = 8


def _rows(name: str, n: int) -> list[dict]:
    with open(TASK_DIR.parent / name) as f:
        return [json.loads(next(f)) for _ in range(n)]


@torch.no_grad()
def _score(model, tok, context: str, continuation: str) -> tuple[float, bool]:
    """log p(continuation | context), and whether greedy decoding would produce it; the continuation's
    tokens come from encoding the joined text, so a token merged across the boundary is scored as the
    model would see it."""
    ctx = tok(context).input_ids
    whole = tok(context + continuation).input_ids
    logp = model(torch.tensor([whole])).logits[0].float().log_softmax(-1)
    steps = range(len(ctx), len(whole))
    return sum(logp[i - 1, whole[i]].item() for i in steps), all(logp[i - 1].argmax().item() == whole[i] for i in steps)


def _loglik(model, tok, context: str, continuation: str) -> float:
    return _score(model, tok, context, continuation)[0]


def _argmax(xs):
    best = max(xs)
    # a near-tie could flip between our unbatched forward and lm-eval's padded batches
    assert sorted(xs)[-2] < best - 1e-4, "near-tie: pick another seed"
    return xs.index(best)


def test_scores_match_independent_loglikelihoods(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("zero-shot evaluation tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    model, tok = tiny_model("mixtral", seed=0)
    got = evaluate_tasks(model, tok, ["arc_easy", "winogrande", "lambada_openai"], limit=LIMIT, batch_size=3, device="cpu")

    # lm-eval's ARC: "Question: <q>\nAnswer:" then " <choice>"; acc_norm divides by the choice's characters.
    acc = acc_norm = 0
    for r in _rows("arc_easy.jsonl", LIMIT):
        lls = [_loglik(model, tok, r["query"] + "\nAnswer:", " " + c) for c in r["choices"]]
        acc += _argmax(lls) == r["gold"]
        acc_norm += _argmax([ll / len(c) for ll, c in zip(lls, r["choices"])]) == r["gold"]
    # lm-eval's WinoGrande partial scoring: the shared ending, scored after each filled-in context.
    wino = 0
    for r in _rows("winogrande.jsonl", LIMIT):
        lls = [_loglik(model, tok, ctx, " " + r["continuation"]) for ctx in r["context_options"]]
        wino += _argmax(lls) == r["gold"]
    # lm-eval's LAMBADA: " <last word>" after the rest; perplexity = exp(-mean log-likelihood), a continuous
    # check that the exact prompt and target text reach the model.
    lambada = [_score(model, tok, r["context"], " " + r["continuation"]) for r in _rows("lambada_openai.jsonl", LIMIT)]

    assert got["arc_easy"]["acc,none"] == acc / LIMIT
    assert got["arc_easy"]["acc_norm,none"] == acc_norm / LIMIT
    assert got["winogrande"]["acc,none"] == wino / LIMIT
    assert got["lambada_openai"]["perplexity,none"] == pytest.approx(math.exp(-sum(ll for ll, _ in lambada) / LIMIT), rel=1e-4)
    assert got["lambada_openai"]["acc,none"] == sum(greedy for _, greedy in lambada) / LIMIT
    assert got["arc_easy"]["sample_len"] == got["winogrande"]["sample_len"] == LIMIT
    json.dumps(got)  # goes into results.json as is


def test_local_definitions_rebuild_lm_eval_prompts():
    manager = task_manager()
    # only our definitions are indexed: lm-eval's built-ins of the same names cannot shadow them
    assert set(TASKS) <= set(manager.all_tasks) and "humaneval" not in manager.all_tasks
    assert all(TASK_DIR in e.yaml_path.parents for e in manager.task_index.values() if e.yaml_path)

    names = ["boolq", "piqa", "hellaswag", "openbookqa", "lambada_openai", "gsm8k", "mathqa", "copa", "mmlu_anatomy"]
    tasks = manager.load(names)["tasks"]

    def first(name):
        task = tasks[name]
        doc = task.eval_docs[0]
        choices = task.doc_to_choice(doc) if task.config.doc_to_choice is not None else None
        return task.fewshot_context(doc, 0), choices, task.doc_to_target(doc)

    ctx, choices, target = first("boolq")
    assert ctx.startswith("All biomass goes through") and "\n\nQuestion" not in ctx
    assert ctx.endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert choices == ["no", "yes"] and target == 0
    ctx, choices, target = first("piqa")
    assert ctx == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:" and target == 0
    ctx, choices, target = first("hellaswag")  # ctx_b capitalised as lm-eval does
    assert ctx == "Roof shingle removal: A man is sitting on a roof. He" and target == 3
    assert choices[3] == "starts pulling up roofing on a roof."
    ctx, choices, target = first("openbookqa")
    assert ctx.startswith("A person wants to start saving money") and choices[1] == "quit eating lunch out" and target == 1
    ctx, _, target = first("lambada_openai")
    assert ctx.endswith("I don't care about") and target == " signs"
    ctx, _, target = first("gsm8k")
    assert ctx.startswith("Question: Janet’s ducks") and ctx.endswith("?\nAnswer:") and target.endswith("\n#### 18")
    ctx, choices, target = first("mathqa")  # the option texts are scored, not the letters
    assert ctx.startswith("Question: a shopkeeper sold") and ctx.endswith("offered ?\nAnswer:")
    assert choices == ["30", "data inadequate", "none of these", "38"] and target == 3
    ctx, choices, target = first("copa")
    assert ctx == "The man turned on the faucet therefore" and target == 1
    assert choices == [" the toilet filled with water.", " water flowed from the spout."]
    ctx, choices, _ = first("mmlu_anatomy")
    assert ctx.startswith("The following are multiple choice questions (with answers) about anatomy.\n\n")
    assert "\nA. " in ctx and ctx.endswith("\nAnswer:") and choices == ["A", "B", "C", "D"]


@pytest.mark.parametrize("tasks, message", [
    ("arc_easy,arc_esay", "--tasks 'arc_esay' is unknown; choose from arc_easy, arc_challenge"),
    ("humaneval", "--tasks humaneval is not supported"),
])
def test_bad_task_is_one_line(tasks, message, tmp_path, capsys):
    rc = main.main(["--model", "tiny-mixtral", "--method", "fp", "--tasks", tasks, "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
