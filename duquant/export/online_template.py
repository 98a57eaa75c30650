"""DuQuant's online input transforms and activation quantization for this compressed-tensors checkpoint.

Written next to the weights by moe-ptq's `--export compressed-tensors` (from duquant/export/online_template.py)
and loaded by `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`; it imports only torch,
safetensors and transformers (compressed-tensors loads the packed weights through transformers).

transformers builds the architecture's own CausalLM class and decompresses the quantized weights, which
already carry the weight side of every transform (W T). This file then makes every linear read its input
as the quantized model did, Q_a(x T):

    dense linears and routers   a forward pre-hook
    fused experts               a forward that runs each routed expert on its own transforms and quantizers
    attention (KV cache)        Q and K times a per-head Hadamard, then Q, K, V fake-quantized per token

T is one dense matrix or the steps it is made of (per-channel scale, block rotations, permutation), as
the quantizer applied it; the activation quantizer is per token, asymmetric or symmetric, with a clip
ratio, exactly the toolkit's. Everything is read from config.json ("duquant_online") and
duquant_online.safetensors.
"""
from __future__ import annotations

import math
import types

import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.utils import cached_file

BASE_MODEL_TYPE = "llama"  # filled in by the export
BASE_CLASS = "LlamaForCausalLM"  # filled in by the export
MODEL_TYPE = f"duquant_{BASE_MODEL_TYPE}"
TENSORS = "duquant_online.safetensors"
KV_ATTENTION = "duquant_online_kv_sdpa"
MIN_SCALE = 1e-8

# transformers reads per-expert checkpoint tensors into fused ones by model_type; ours is its own
# (so that loading without trust_remote_code fails instead of skipping the transforms).
register_checkpoint_conversion_mapping(MODEL_TYPE, get_checkpoint_conversion_mapping(BASE_MODEL_TYPE) or [],
                                       overwrite=True)


class DuQuantConfig(CONFIG_MAPPING[BASE_MODEL_TYPE]):
    model_type = MODEL_TYPE


# ----------------------------------------------------------------------------- quantization


def fake_quant(x: torch.Tensor, bits: int, sym: bool, clip: float, with_zero: bool) -> torch.Tensor:
    """Quantize-dequantize each row of the last dimension (per token), in at least float32."""
    if bits >= 16:
        return x
    work = x.to(torch.promote_types(x.dtype, torch.float32))
    if sym:
        scale = (work.abs().amax(-1, keepdim=True) * clip / (2 ** (bits - 1) - 1)).clamp(min=MIN_SCALE)
        zero, lo, hi = torch.zeros_like(scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    else:
        xmin, xmax = work.amin(-1, keepdim=True), work.amax(-1, keepdim=True)
        if with_zero:
            xmin, xmax = xmin.clamp(max=0), xmax.clamp(min=0)
        xmin, xmax = xmin * clip, xmax * clip
        scale = ((xmax - xmin) / (2**bits - 1)).clamp(min=MIN_SCALE)
        zero, lo, hi = torch.round(-xmin / scale), 0, 2**bits - 1
    q = (torch.round(work.to(scale.dtype) / scale) + zero).clamp(lo, hi)
    return ((q - zero) * scale).to(x.dtype)


def _quantizer(act: dict):
    return lambda x: fake_quant(x, act["bits"], act["sym"], act["clip"], act["with_zero"])


# ----------------------------------------------------------------------------- transforms


def _wide(x: torch.Tensor, buf: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, buf.dtype)


def _rotate(x: torch.Tensor, blocks: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
    """x times a block-diagonal rotation: b x b blocks (or one shared), then a tail block."""
    dtype, b, r = _wide(x, blocks), blocks.shape[-1], tail.shape[-1]
    flat = x.reshape(-1, x.shape[-1]).to(dtype)
    head = flat[:, : flat.shape[1] - r]
    head = head.reshape(head.shape[0], -1, b).permute(1, 0, 2)
    out = (head @ blocks.to(x.device, dtype)).permute(1, 0, 2).reshape(flat.shape[0], -1)
    if r:
        out = torch.cat([out, flat[:, -r:] @ tail.to(x.device, dtype)], dim=1)
    return out.reshape(x.shape).to(x.dtype)


def _step(kind: str, t: dict):
    if kind == "matrix":
        m = t["matrix"]
        return lambda x: (x.to(_wide(x, m)) @ m.to(x.device, _wide(x, m))).to(x.dtype)
    if kind == "smooth":
        s = t["scale"]
        return lambda x: (x.to(_wide(x, s)) / s.to(x.device, _wide(x, s))).to(x.dtype)
    if kind == "permutation":
        return lambda x: x[..., t["perm"].to(x.device)]
    if kind == "rotation":
        return lambda x: _rotate(x, t["blocks"], t["tail"])
    raise ValueError(f"unknown transform step {kind!r}")


def _transform(site: str | None, steps: dict, tensors: dict):
    """The site's T as one function (identity without a site)."""
    if site is None:
        return lambda x: x
    fns = [_step(kind, {k.rpartition(".")[2]: v for k, v in tensors.items() if k.startswith(f"{site}.{i}.")})
           for i, kind in enumerate(steps[site])]

    def apply(x):
        for fn in fns:
            x = fn(x)
        return x
    return apply


def _reader(spec: dict, steps: dict, tensors: dict):
    """Q_a(T(x)) for one reader."""
    t, q = _transform(spec["site"], steps, tensors), _quantizer(spec["act"])
    return lambda x: q(t(x))


# ----------------------------------------------------------------------------- the model


def _hook(reader):
    return lambda module, args: (reader(args[0]), *args[1:])


def _experts_forward(readers: list[dict]):
    """Each routed expert as the quantized model ran it: down(act(gate(x')) * up(x'')), where each of
    gate, up and down reads its input through its own site transform and quantizer, on the expert's
    rows of the fused gate_up_proj [E, 2I, H] (gate rows first) and down_proj [E, H, I]."""

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        inter = self.gate_up_proj.shape[1] // 2
        for e in top_k_index.unique().tolist():
            token_idx, slot = torch.where(top_k_index == e)
            x, r = hidden_states[token_idx], readers[e]
            gate = F.linear(r["gate"](x), self.gate_up_proj[e, :inter])
            up = F.linear(r["up"](x), self.gate_up_proj[e, inter:])
            y = F.linear(r["down"](self.act_fn(gate) * up), self.down_proj[e])
            out.index_add_(0, token_idx, (y * top_k_weights[token_idx, slot, None]).to(out.dtype))
        return out
    return forward


def hadamard(n: int) -> torch.Tensor:
    """Normalized Sylvester Hadamard matrix (float32); identity for head dims that are not powers of two."""
    if n & (n - 1):
        return torch.eye(n)
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(n)).float()


def _kv_attention(module, query, key, value, attention_mask, **kwargs):
    """SDPA on Q H, K H and V fake-quantized per token and head (attention modules with `duquant_kv`)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kv = getattr(module, "duquant_kv", None)
    if kv is not None:
        h = hadamard(kv["head_dim"]).to(query.device, query.dtype)
        query, key = (fake_quant(t @ h, kv["bits"], kv["sym"], kv["clip"], kv["with_zero"]) for t in (query, key))
        value = fake_quant(value, kv["bits"], kv["sym"], 1.0, kv["with_zero"])
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def apply_online(model, online: dict, tensors: dict) -> None:
    """Install every reader's transform and quantizer, the experts' forwards and the KV quantizers."""
    steps = online["sites"]
    for name, spec in online["readers"].items():
        model.get_submodule(name).register_forward_pre_hook(_hook(_reader(spec, steps, tensors)))
    for name, experts in online["experts"].items():
        module = model.get_submodule(name)
        readers = [{role: _reader(spec, steps, tensors) for role, spec in e.items()} for e in experts]
        module.forward = types.MethodType(_experts_forward(readers), module)
    if online["kv"]:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

        AttentionInterface.register(KV_ATTENTION, _kv_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(KV_ATTENTION, sdpa_mask)
        for name, kv in online["kv"].items():
            model.get_submodule(name).duquant_kv = kv
        model.set_attn_implementation(KV_ATTENTION)


class DuQuantForCausalLM(getattr(transformers, BASE_CLASS)):
    config_class = DuQuantConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """The base class's loading (compressed-tensors decompresses the weights), then the online parts.
        Decompressed fused experts come out in float32; they are cast to the model's dtype, which is
        the dtype their codes were decoded to when quantizing."""
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        dtype = model.get_input_embeddings().weight.dtype
        for name in model.config.duquant_online["experts"]:
            for p in model.get_submodule(name).parameters():
                p.data = p.data.to(dtype)
        hub = {k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only") if k in kwargs}
        tensors = load_file(cached_file(pretrained_model_name_or_path, TENSORS, **hub))
        apply_online(model, model.config.duquant_online, tensors)
        return model
