"""Zero-shot accuracy through lm-evaluation-harness, on the bundled task files only.

The papers report lm-eval's acc / acc_norm, so scoring goes through lm-eval itself (its prompts, its
context/continuation tokenisation, its length normalisation) rather than an in-repo scorer. lm-eval's
built-in tasks download their data from the hub, so they are never indexed here: the task definitions
in `data/tasks/lm_eval/` keep lm-eval's names, prompts and metrics but read `data/tasks/*.jsonl`.

The model is evaluated where it already is. The pipeline keeps the model on the CPU and moves one
decoder layer at a time to `--device`; a whole-model forward (what lm-eval runs) would need the whole
model on the accelerator, which an 8x7B model does not fit. So tasks run on the model's own device (the
CPU by default) and a different `device` only earns a notice.
"""
from __future__ import annotations

import logging
import os
import random
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError

TASK_DIR = Path(__file__).resolve().parent.parent / "data" / "tasks" / "lm_eval"
TASKS = ("arc_easy", "arc_challenge", "boolq", "piqa", "winogrande", "hellaswag", "openbookqa",
         "lambada_openai", "mmlu", "gsm8k", "mathqa", "copa")
UNSUPPORTED = {
    "humaneval": "it is scored by running model-written code (lm-eval's unsafe_code), which this toolkit never does",
}
# lm-eval's perplexity stderr (lambada_openai) is a bootstrap; 1000 resamples are plenty for a stderr
# and take seconds, where lm-eval's default 100000 would take minutes. acc stderrs are closed-form.
BOOTSTRAP_ITERS = 1000
# Messages lm-eval logs on every run of in-memory models with local tasks; they ask nothing of the user.
_EXPECTED_NOISE = ("Custom kwargs can be passed", "`pretrained` model kwarg is not of type `str`",
                   "Passed an already-initialized model", "Overwriting default num_fewshot")


def check_tasks(tasks: list[str]) -> list[str]:
    """Run before the model loads, so a misspelt task name costs nothing; returns the names deduplicated."""
    out: list[str] = []
    for name in tasks:
        if name in UNSUPPORTED:
            raise ConfigError(f"--tasks {name} is not supported: {UNSUPPORTED[name]}")
        subject = name.startswith("mmlu_") and (TASK_DIR / "mmlu" / f"{name}.yaml").is_file()
        if name not in TASKS and not subject:
            raise ConfigError(f"--tasks {name!r} is unknown; choose from {', '.join(TASKS)} (or one MMLU subject, mmlu_<subject>)")
        if name not in out:
            out.append(name)
    return out


def task_manager():
    """include_defaults=False: lm-eval's own tasks of the same names (which fetch from the hub) are not even
    indexed, so ours can neither be shadowed nor clash with them, and nothing is downloaded."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASK_DIR), include_defaults=False)


class _DropExpected(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in _EXPECTED_NOISE)


@contextmanager
def _isolated_run():
    """simple_evaluate reseeds Python, NumPy and torch globally; restoring them keeps calibration sampling
    after an FP evaluation identical to a run without --tasks. The bootstrap runs in-process because
    forking a process that holds the model costs more than the bootstrap."""
    py, npy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    old_multiproc = os.environ.get("DISABLE_MULTIPROC")
    os.environ["DISABLE_MULTIPROC"] = "1"
    noise = _DropExpected()
    loggers = [logging.getLogger(n) for n in ("lm_eval.api.task", "lm_eval.models.huggingface", "lm_eval.evaluator")]
    for lg in loggers:
        lg.addFilter(noise)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(noise)
        if old_multiproc is None:
            os.environ.pop("DISABLE_MULTIPROC", None)
        else:
            os.environ["DISABLE_MULTIPROC"] = old_multiproc
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def evaluate_tasks(model, tokenizer, tasks: list[str], limit: int | None, batch_size: int, device) -> dict:
    """{task: {"acc,none": ..., "acc_norm,none": ..., ...}} with lm-eval's metric names; numbers only, so
    it goes straight into results.json. `limit` caps the examples of each task (of each MMLU subject)."""
    tasks = check_tasks(tasks)
    if not tasks:
        return {}
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    here, wanted = next(model.parameters()).device, torch.device(device)
    if here.type != wanted.type or (wanted.index is not None and wanted.index != here.index):
        print(f"notice: zero-shot tasks run on {here}, where the model is (the pipeline moves one layer at a time "
              f"to {wanted}; lm-eval needs the whole model on one device)")
    with _isolated_run():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = simple_evaluate(model=lm, tasks=tasks, num_fewshot=0, limit=limit, log_samples=False,
                              task_manager=task_manager(), bootstrap_iters=BOOTSTRAP_ITERS)
    results = out["results"]
    return {name: {k: float(v) for k, v in results[name].items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)} for name in tasks}
