"""Refusals of the compressed-tensors export: one line that names the problem and the fix."""
from __future__ import annotations

from ..config import ConfigError


class ExportError(ConfigError):
    """A model or directory that cannot be exported; the message is one line that names the fix."""


TRANSFORMS_REFUSED = ("transformers applies no compressed-tensors transforms when loading, so a linear that reads its "
                      "input through DuQuant's online transform (rotations, permutation, or o_proj smoothing) cannot "
                      "be exported: quantize with --method rtn (optionally --gptq), or keep the model in the "
                      "toolkit's format (--save_dir)")


ACT_ORDER_REFUSED = ("GPTQ --act_order groups columns in quantization order, which compressed-tensors no longer "
                     "stores; quantize again without --act_order (or without --group_size)")
