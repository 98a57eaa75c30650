"""The quantization sites of a decoder layer, declared once from its resolved `LayerView`.

A site is one activation and the linears that read it through one shared transform. Everything
that needs to know a layer's structure reads this list and nothing else: the statistics hook a
site's first reader, smoothing folds into the site's `fold` target, one rotation is fitted per site,
GPTQ builds one Hessian per site and activation precision, the memory estimate counts the sites'
widths, and the export names them. It plays the role of llm-compressor's mappings, derived from
the adapter rather than written per algorithm.

Fold kinds (docs/algorithm.md, section 2):
    "norm"    the input is a norm's output: gamma / s, each reader's W diag(s) (exact);
    "up_rows" the input is act(gate x) * (up x), linear in up's rows: up / s, down diag(s) (exact);
    "v_rows"  the attention output, a per-channel mix of V: v_proj rows / s where every o_proj input
              channel is one v_proj output channel (multi-head attention), else applied online;
    "moe_in"  a routed expert's input is the MoE input: its smoothing is the MoE-input site's vector
              (already folded into the norm), only its rotation is its own;
    "online"  nothing produces the input linearly (e.g. a clamped activation before down_proj):
              smoothing joins the online transform.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from .spec import LayerView, MLPView

FOLDS = ("norm", "up_rows", "v_rows", "moe_in", "online")


@dataclass(frozen=True, eq=False)
class Site:
    """One activation of a decoder layer and its readers.

    `readers` share the site's transform (their first is where statistics are hooked; for the MoE
    input it is the router, whose output also gives the routing statistics). `also_smoothed` read
    the same activation and take its smoothing but fit their own rotations (the routed experts'
    gate/up at the MoE input). `target` is what smoothing folds into: the norm ("norm"), the up
    projection ("up_rows") or the value projection ("v_rows"); `smooth_reader` is the one reader
    whose weight the published code's one-reader smoothing rule uses (None: always every reader, as at
the MoE input, which the published DuQuant code does not have). `expert` numbers a routed
    expert's sites (their statistics see routed tokens only); `mlp` is the MLP a down-in site
    belongs to. `depth` orders the sites by data flow: a site's input depends only on the readers
    of sites of smaller depth, so fitting depth by depth can see the earlier sites quantized.
    """

    name: str
    readers: tuple[nn.Module, ...]
    fold: str
    target: nn.Module | None = None
    smooth_reader: nn.Module | None = None
    also_smoothed: tuple[nn.Module, ...] = ()
    expert: int | None = None
    mlp: MLPView | None = None
    depth: int = 0

    @property
    def hook(self) -> nn.Module:
        return self.readers[0]

    @property
    def smoothing_readers(self) -> tuple[nn.Module, ...]:
        """Every linear whose weight carries this site's smoothing."""
        return self.readers + self.also_smoothed


def _down_site(name: str, mlp: MLPView, depth: int, expert: int | None = None) -> Site:
    if not mlp.down_input_foldable:
        return Site(name, (mlp.down_proj,), "online", None, mlp.down_proj, expert=expert, mlp=mlp, depth=depth)
    return Site(name, (mlp.down_proj,), "up_rows", mlp.up_proj, mlp.down_proj, expert=expert, mlp=mlp, depth=depth)


def _mlp_sites(prefix: str, mlp: MLPView, norm: nn.Module, depth: int) -> list[Site]:
    return [Site(f"{prefix}mlp_in", tuple(mlp.in_projs), "norm", norm, mlp.up_proj, depth=depth),
            _down_site(f"{prefix}down_in", mlp, depth + 1)]


def attention_sites(view: LayerView) -> list[Site]:
    """attn-in (every projection reading the input norm), the norms inside attention (MLA's
    q_a_layernorm / kv_a_layernorm and their readers), then o-in."""
    sites = [Site("attn_in", tuple(view.attn_in), "norm", view.attn_norm, view.attn_in[0])]
    for k, (norm, readers) in enumerate(view.inner_norms):
        sites.append(Site(f"attn_inner{k}", tuple(readers), "norm", norm, readers[0], depth=1))
    sites.append(Site("o_in", (view.attn_out,), "v_rows", view.attn_value, view.attn_out,
                      depth=1 + bool(view.inner_norms)))
    return sites


def moe_sites(view: LayerView, depth: int) -> list[Site]:
    """The MoE input (router, shared-expert gate, shared experts' gate/up; the routed experts' gate/up
    take its smoothing), each shared expert's down-in, then every routed expert's input and down-in.
    Routed experts' sites come grouped by kind, so same-width rotation searches can run jointly."""
    shared_in = tuple(p for sh in view.shared for p in sh.in_projs)
    gate = (view.shared_gate,) if view.shared_gate is not None else ()
    experts_in = tuple(p for e in view.experts for p in e.in_projs)
    sites = [Site("moe_in", (view.router, *gate, *shared_in), "norm", view.mlp_norm, also_smoothed=experts_in,
                  depth=depth)]
    sites += [_down_site(f"shared{k}.down_in", sh, depth + 1) for k, sh in enumerate(view.shared)]
    sites += [Site(f"expert{e}.in", tuple(x.in_projs), "moe_in", expert=e, mlp=x, depth=depth)
              for e, x in enumerate(view.experts)]
    sites += [_down_site(f"expert{e}.down_in", x, depth + 1, e) for e, x in enumerate(view.experts)]
    return sites


def layer_sites(view: LayerView) -> list[Site]:
    """Every site of one decoder layer, attention first, in the order the transforms are fitted."""
    attention = attention_sites(view)
    depth = attention[-1].depth + 1
    if not view.is_moe:
        return attention + _mlp_sites("", view.dense, view.mlp_norm, depth)
    return attention + moe_sites(view, depth)
