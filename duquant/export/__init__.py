"""Quantized models as compressed-tensors checkpoints, which plain transformers loads
(`AutoModelForCausalLM.from_pretrained(DIR)` with only transformers and compressed-tensors installed;
docs/export.md says which schemes export, which engines load them and what each loses).

    names.py        checkpoint names (per expert, as transformers' save_pretrained writes them)
    grids.py        the weight grids in compressed-tensors' terms, and the config groups
    checkpoint.py   the checkpoint itself, and the refusals checked before any work
    online.py       DuQuant's online transforms and input quantizers, for the modeling file below
    online_template.py  that modeling file (written as modeling_duquant.py; loaded with trust_remote_code)
    errors.py       the refusals' messages
"""
from .checkpoint import FORMATS, INFO, check_configs, check_model, check_request, export_compressed_tensors
from .errors import ExportError
from .names import fused_expert_names

__all__ = ["FORMATS", "INFO", "ExportError", "check_configs", "check_model", "check_request",
           "export_compressed_tensors", "fused_expert_names"]
