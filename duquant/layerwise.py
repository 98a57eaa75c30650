"""Run a model one decoder layer at a time (the GPTQ "Catcher" loop).

Only the layer being worked on, plus the embeddings, final norm and head, ever sit on the
accelerator, so an 8x7B model calibrates and evaluates on one GPU. Calibration and evaluation
share this runner, which keeps their numerics identical.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
import torch.nn as nn

from models.lazy import return_freed_memory
from models.spec import ModelSpec, decoder_layers, get_module


class _Stop(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for layer 0: records its inputs with every keyword argument, then stops the forward."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer
        self.inputs: list[torch.Tensor] = []
        self.kwargs: dict | None = None

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.layer, name)

    def forward(self, hidden_states, *args, **kwargs):
        self.inputs.append(hidden_states)
        if self.kwargs is None:
            self.kwargs = kwargs
        raise _Stop


@contextmanager
def non_layer_modules_on(model: nn.Module, spec: ModelSpec, device: torch.device):
    """Embeddings, rotary tables, final norm and head on `device`; decoder layers stay where they are."""
    prefix = spec.layers + "."
    moved = [t for n, t in list(model.named_parameters()) + list(model.named_buffers()) if not n.startswith(prefix)]
    home = [t.device for t in moved]
    for t in moved:
        t.data = t.data.to(device)
    try:
        yield
    finally:
        for t, d in zip(moved, home):
            t.data = t.data.to(d)


@contextmanager
def layer_on(model: nn.Module, spec: ModelSpec, index: int, device: torch.device, changed: bool = False):
    """Decoder layer `index` on `device` for the block, and back on the CPU after it.

    A streamed model (`models.lazy`) reads the layer from disk first and releases it after; pass
    `changed` when the block quantizes it, so the changed layer is kept (spilled) for later passes.
    Memory freed by the block (working copies, a released layer) is handed back to the OS after it.
    """
    stream = getattr(model, "layer_stream", None)
    with stream.hold(index, changed) if stream is not None else nullcontext():
        layer = decoder_layers(model, spec)[index]
        layer.to(device)
        try:
            yield layer
        finally:
            if device.type != "cpu":
                layer.to("cpu")
    return_freed_memory()


@torch.no_grad()
def capture_layer_inputs(model, spec: ModelSpec, input_ids: torch.Tensor, device, batch_size: int = 1):
    """First decoder layer's inputs, one tensor per batch of `input_ids`, and the shared kwargs."""
    layers = decoder_layers(model, spec)
    catcher = _Catcher(layers[0])
    layers[0] = catcher
    try:
        with non_layer_modules_on(model, spec, device):
            for s in range(0, input_ids.shape[0], batch_size):
                try:
                    model(input_ids=input_ids[s : s + batch_size].to(device), use_cache=False)
                except _Stop:
                    pass
    finally:
        layers[0] = catcher.layer
    return catcher.inputs, catcher.kwargs


def _kwargs_for(kwargs: dict, batch: int) -> dict:
    """The captured kwargs fit the first batch; a smaller last batch needs them sliced."""
    out = {}
    for k, v in kwargs.items():
        if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] > batch:
            v = v[:batch]
        elif isinstance(v, tuple) and all(torch.is_tensor(t) and t.shape[0] > batch for t in v):
            v = tuple(t[:batch] for t in v)
        out[k] = v
    return out


def _forward(layer: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    y = layer(x, **_kwargs_for(kwargs, x.shape[0]))
    return y[0] if isinstance(y, tuple) else y


@torch.no_grad()
def observe(layer: nn.Module, inputs: list[torch.Tensor], kwargs: dict, until: nn.Module | None = None) -> None:
    """Runs the layer over every batch of `inputs` for the hooks on it; each output is dropped as
    soon as it exists (keeping them would hold a second copy of the calibration activations).
    With `until`, each batch stops once that submodule has run: a pass whose hooks all sit inside
    it (attention-only sites) then skips the MLP or MoE, most of a layer's work."""
    def stop(*_):
        raise _Stop

    handle = until.register_forward_hook(stop) if until is not None else None
    try:
        for x in inputs:
            try:
                _forward(layer, x, kwargs)
            except _Stop:
                pass
    finally:
        if handle is not None:
            handle.remove()


@torch.no_grad()
def advance(layer: nn.Module, hidden: list[torch.Tensor], kwargs: dict) -> list[torch.Tensor]:
    """Moves `hidden` through the layer in place: each batch's output replaces its input as soon as
    it exists, so a calibration or evaluation set's activations are held once, not twice."""
    for j, x in enumerate(hidden):
        hidden[j] = _forward(layer, x, kwargs)
    return hidden


@contextmanager
def input_hooks(modules, fn):
    """fn(module, x) on the input x of every call of each of `modules` while the block runs; the hooks
    are removed on exit, whatever happens inside."""
    handles = [m.register_forward_pre_hook(lambda mod, args: fn(mod, args[0])) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def forward_replaced(modules, forward_of):
    """While the block runs, each of `modules` runs `forward_of(module)` instead of its forward; its
    hooks still run. A forward the module already had on its instance (e.g. a hook library's
    wrapper) is put back after."""
    own = {m: m.__dict__["forward"] for m in modules if "forward" in m.__dict__}
    for m in modules:
        m.forward = forward_of(m)
    try:
        yield
    finally:
        for m in modules:
            del m.forward
            if m in own:
                m.forward = own[m]


def outputs_skipped(linears):
    """While the block runs, each of `linears` (an nn.Linear, or a module around one with its
    `weight`) returns zeros of its output's shape instead of computing it; its hooks still run. A
    pass that only gathers the inputs of some sites thus skips the linears that read them and the
    ones after, whose outputs it drops."""
    def zeros(linear: nn.Module):
        return lambda x: x.new_zeros(*x.shape[:-1], linear.weight.shape[0])

    return forward_replaced(linears, zeros)


def windows(hidden: list[torch.Tensor]):
    """The windows of a batched activation list, one [seqlen, hidden] tensor at a time."""
    return (w for batch in hidden for w in batch)


@contextmanager
def head_on(model: nn.Module, spec: ModelSpec, device: torch.device):
    """The final norm and LM head on `device`, as a function from one window's last-layer states
    (on `device`) to its fp32 logits.

    One window at a time: a window's fp32 logits (and the log-softmax beside them) are the largest
    tensors of an evaluation, vocab / hidden times the hidden states (32x for the zoo).
    """
    norm, head = get_module(model, spec.final_norm), get_module(model, spec.lm_head)
    with non_layer_modules_on(model, spec, device):
        yield lambda h: head(norm(h[None])).float()[0]


@torch.no_grad()
def head_nll(model, spec: ModelSpec, hidden: list[torch.Tensor], input_ids: torch.Tensor, device) -> torch.Tensor:
    """Per-window mean next-token NLL from the last layer's outputs."""
    nlls = torch.empty(input_ids.shape[0])
    with head_on(model, spec, device) as logits_of:
        for k, (h, ids) in enumerate(zip(windows(hidden), input_ids)):
            nlls[k] = nn.functional.cross_entropy(logits_of(h)[:-1], ids[1:].to(device))
    return nlls
