"""Refusals of the compressed-tensors export: one line that names the problem and the fix."""
from __future__ import annotations

from ..config import ConfigError


class ExportError(ConfigError):
    """A model or directory that cannot be exported; the message is one line that names the fix."""


ACT_ORDER_REFUSED = ("GPTQ --act_order groups columns in quantization order, which compressed-tensors no longer "
                     "stores; quantize again without --act_order (or without --group_size)")
