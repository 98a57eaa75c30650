"""Refresh passes that replay a layer's attention instead of recomputing it.

Sequential fitting (duquant/fitting.py) observes a layer again before each depth of sites, with the
earlier depths wrapped (duquant/calibration.py `site_rows`). Between the o-in pass and the next one
only o_proj has changed, and between a pass through the MLP and the next one (or the propagation,
duquant/pipeline.py) nothing in the attention has, while the attention is most of a layer's work at
2048 tokens a sequence. So the o-in pass records each batch's o_proj input, the next pass runs the
attention as the (now wrapped) o_proj of it and records the attention's outputs, and the passes
after replay those. Inputs, weights and kernels are the same as in a computed pass, so the rows are the same bits
(tests/test_fidelity.py); each record costs one copy of the calibration activations while it lives.

A record is used only where it is still true: `AttentionReplay` checks which readers were wrapped
since it was taken, and a pass records nothing it cannot replay exactly (an attention that does
something after o_proj, or returns tensors besides its output, such as eager attention weights).
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .layerwise import forward_replaced


@dataclass
class _Batch:
    tensor: torch.Tensor  # the o_proj input ("o_in") or the attention output ("output")
    rest: tuple | None  # the attention's other return values; None where it returned a bare tensor


@dataclass
class AttentionRecord:
    """What one refresh pass recorded for the next, per observed list of batches (`site_rows`' keys):
    `kind` "o_in" (o_proj's inputs) or "output" (the attention's outputs); `wrapped` are the readers
    that pass's sites had wrapped after it, which decide whether the next pass may use it."""

    kind: str
    o_proj: str | None  # o_proj's path inside the attention when recorded (its QLinear's, once wrapped)
    wrapped: frozenset
    batches: dict[str, list[_Batch | None]] = field(default_factory=dict)


@dataclass
class Handoff:
    """Where each refresh pass of a layer leaves its record for the next pass (or the propagation)."""

    record: AttentionRecord | None = None


def _returned(y: torch.Tensor, rest: tuple | None):
    return y if rest is None else (y, *rest)


class AttentionReplay:
    """One refresh pass over a layer: replays `previous` where it still holds, and records what the
    next pass can use (`record`, None when nothing)."""

    def __init__(self, attn: nn.Module, o_proj: nn.Module, previous: AttentionRecord | None,
                 kind: str | None, wrapped_after: frozenset):
        self.attn = attn
        inside = set(attn.modules())
        self.path = next((n for n, m in attn.named_modules() if m is o_proj), None)
        if previous is not None and not self._holds(previous, inside, o_proj):
            previous = None
        self.previous = previous
        recordable = kind == "output" or (kind == "o_in" and self.path is not None)
        self.record = AttentionRecord(kind, self.path, wrapped_after) if recordable else None

    @staticmethod
    def _holds(record: AttentionRecord, inside: set, o_proj: nn.Module) -> bool:
        """A record of outputs holds while no attention reader was wrapped since; one of o_proj inputs
        while o_proj was the only one (it is then called as it is now)."""
        changed = record.wrapped & inside
        return not changed if record.kind == "output" else changed <= {o_proj}

    @contextmanager
    def batches(self, key: str, count: int):
        """Around the observation of `count` batches under `key`: the attention replays them if
        `previous` has exactly those, and the batches are recorded for the next pass."""
        old = self.previous.batches.get(key) if self.previous is not None else None
        with ExitStack() as stack:
            if old is not None and len(old) == count:
                stack.enter_context(self._replaying(old, self.previous.kind))
            if self.record is not None:
                stack.enter_context(self._recording(key))
            yield

    @contextmanager
    def _replaying(self, old: list, kind: str):
        position = iter(range(len(old)))

        def forward(*_, **__):
            k = next(position)
            batch, old[k] = old[k], None  # released once replayed
            y = self.attn.get_submodule(self.previous.o_proj)(batch.tensor) if kind == "o_in" else batch.tensor
            return _returned(y, batch.rest)

        with forward_replaced([self.attn], lambda _: forward):
            yield

    @contextmanager
    def _recording(self, key: str):
        """Forward hooks on the attention (and, for "o_in", on o_proj); registered before the pass's
        own, so they see each batch even where the pass stops after the attention."""
        record, got = self.record, []
        o_call: list = []
        handles = []
        if record.kind == "o_in":
            def o_proj_call(module, args, out):
                o_call[:] = [args[0] if args else None, out]

            handles.append(self.attn.get_submodule(self.path).register_forward_hook(o_proj_call))

        def keep(module, args, out):
            y, rest = (out[0], tuple(out[1:])) if isinstance(out, tuple) else (out, None)
            exact = rest is None or not any(torch.is_tensor(r) for r in rest)
            if record.kind == "o_in":
                exact = exact and len(o_call) == 2 and o_call[0] is not None and o_call[1] is y
                y = o_call[0] if exact else None
            got.append(_Batch(y, rest) if exact else None)
            o_call.clear()

        handles.append(self.attn.register_forward_hook(keep))
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        if all(b is not None for b in got):
            record.batches[key] = got
        else:
            self.record = None
